//! The host's view of the Kubernetes API: parsing the API's list shapes (fixtures in
//! tests/fixtures/kube, provenance in its README), and the HTTPS client's TLS set-up
//! against `openssl s_server` on loopback (a generic TLS server, not an API server:
//! it proves the client trusts only the lab CA, checks the address in the server
//! certificate and presents the admin certificate; it never answers `/readyz` with
//! `ok`, so readiness is never faked).

mod support;

use support::loopback::{free_port, wait_listening, Killed};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kthw_lab::kube::{
    parse_node_list, parse_pod_list, parse_service_cluster_ip, ApiClient, KubeError, Readiness,
};
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::scenario::{load_str, HostLimits, Sources};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(support::root().join("tests/fixtures/kube").join(name)).unwrap()
}

#[test]
fn node_list_ready_conditions() {
    let nodes = parse_node_list(&fixture("nodes-2m2w.json")).unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0].name, "n1");
    assert_eq!(nodes[0].ready, Readiness::Ready);
    assert_eq!(nodes[0].reason.as_deref(), Some("KubeletReady"));
    assert_eq!(nodes[0].internal_ip.as_deref(), Some("10.200.1.12"));
    assert_eq!(nodes[0].kubelet_version.as_deref(), Some("v1.32.3"));
    assert_eq!(nodes[1].name, "n2");
    assert_eq!(nodes[1].ready, Readiness::NotReady);
    assert_eq!(nodes[1].reason.as_deref(), Some("KubeletNotReady"));
    assert!(nodes[1]
        .message
        .as_deref()
        .unwrap()
        .contains("cni plugin not initialized"));
    // JSON output of status carries the same.
    let v = serde_json::to_value(&nodes).unwrap();
    assert_eq!(v[1]["ready"], "not-ready");
}

#[test]
fn node_list_unknown_and_missing_conditions_and_wrong_kinds() {
    // The node lifecycle controller sets Unknown when the kubelet stops reporting.
    let text = r#"{"kind":"NodeList","apiVersion":"v1","metadata":{},"items":[
      {"metadata":{"name":"n1"},"status":{"conditions":[{"type":"Ready","status":"Unknown",
        "lastHeartbeatTime":"2025-05-02T10:20:38Z","lastTransitionTime":"2025-05-02T10:25:00Z",
        "reason":"NodeStatusUnknown","message":"Kubelet stopped posting node status."}]}},
      {"metadata":{"name":"n2"},"status":{}}]}"#;
    let nodes = parse_node_list(text).unwrap();
    assert_eq!(nodes[0].ready, Readiness::Unknown);
    assert_eq!(nodes[0].reason.as_deref(), Some("NodeStatusUnknown"));
    assert_eq!(nodes[1].ready, Readiness::NoCondition);
    assert!(
        parse_node_list(r#"{"kind":"NodeList","apiVersion":"v1","items":[]}"#)
            .unwrap()
            .is_empty()
    );
    let e =
        parse_node_list(r#"{"kind":"Status","apiVersion":"v1","status":"Failure"}"#).unwrap_err();
    assert!(e.contains("Status"), "{e}");
    assert!(parse_node_list("<html>").is_err());
}

#[test]
fn pod_list_placement_and_waiting_reasons() {
    let pods = parse_pod_list(&fixture("smoke-pods.json")).unwrap();
    assert_eq!(pods.len(), 3);
    assert_eq!(pods[0].node.as_deref(), Some("n1"));
    assert!(pods[0].ready);
    assert_eq!(pods[0].ip.as_deref(), Some("10.100.0.5"));
    assert_eq!(pods[0].waiting, None);
    assert!(!pods[1].ready);
    assert!(pods[1]
        .waiting
        .as_deref()
        .unwrap()
        .starts_with("ErrImagePull: "));
    assert_eq!(pods[2].node, None);
    assert!(pods[2]
        .waiting
        .as_deref()
        .unwrap()
        .starts_with("Unschedulable: "));
}

#[test]
fn service_cluster_ip() {
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"kthw-smoke","namespace":"default"},
      "spec":{"clusterIP":"10.32.0.183","clusterIPs":["10.32.0.183"],"type":"ClusterIP",
      "ports":[{"name":"http","port":80,"protocol":"TCP","targetPort":"http"}],
      "selector":{"app.kubernetes.io/name":"kthw-smoke"}},"status":{"loadBalancer":{}}}"#;
    assert_eq!(parse_service_cluster_ip(svc).unwrap(), "10.32.0.183");
    let headless = svc.replace("\"clusterIP\":\"10.32.0.183\"", "\"clusterIP\":\"None\"");
    assert!(parse_service_cluster_ip(&headless).is_err());
    assert!(parse_service_cluster_ip(r#"{"kind":"Pod"}"#).is_err());
}

// ---- the client's TLS, against openssl on loopback -------------------------------------

fn lab(dir: &Path) -> LabPlan {
    let root = support::root();
    let text = std::fs::read_to_string(root.join("scenarios/2m2w.yaml")).unwrap();
    let src = Sources { roots: vec![root] };
    let s = load_str(&text, "2m2w.yaml", &src, &HostLimits { memory_mib: 65536 }).unwrap();
    let p = plan(&s, &text, dir);
    kthw_lab::pki::ensure_pki(&p).unwrap();
    p
}

/// `openssl s_server -www` with a certificate and key, requiring a client
/// certificate signed by `client_ca`.
fn https_server(cert: &Path, key: &Path, client_ca: &Path) -> (Killed, u16) {
    let port = free_port();
    let child = Command::new("openssl")
        .args(["s_server", "-www", "-verify_return_error", "-Verify", "1"])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(client_ca)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Killed(child);
    wait_listening(port, "openssl s_server");
    (s, port)
}

fn client(p: &LabPlan, port: u16) -> ApiClient {
    let pki = &p.paths.pki;
    ApiClient::from_files(
        &format!("https://127.0.0.1:{port}"),
        &kthw_lab::pki::cert_path(pki, "ca"),
        &kthw_lab::pki::cert_path(pki, "admin"),
        &kthw_lab::pki::key_path(pki, "admin"),
    )
    .unwrap()
}

#[test]
fn client_speaks_mutual_tls_with_the_lab_ca_and_never_calls_a_non_ok_answer_ready() {
    let d = tempfile::tempdir().unwrap();
    let p = lab(d.path());
    let pki = &p.paths.pki;
    // The apiserver's certificate names 127.0.0.1, so the address check passes.
    let (_s, port) = https_server(
        &kthw_lab::pki::cert_path(pki, "kube-apiserver"),
        &kthw_lab::pki::key_path(pki, "kube-apiserver"),
        &kthw_lab::pki::cert_path(pki, "ca"),
    );
    let api = client(&p, port);
    // The handshake (server verified, admin certificate accepted) and an HTTP answer.
    let (status, body) = api.get_raw("/readyz", Duration::from_secs(10)).unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("<HTML>") || body.contains("<html>") || body.contains("Ciphers"),
        "{body}"
    );
    // A 200 without `ok` is not ready.
    match api.readyz(Duration::from_secs(10)) {
        Err(KubeError::Unexpected { reason, .. }) => assert!(reason.contains("without the body")),
        other => panic!("{other:?}"),
    }
    // And the API's node list must be a NodeList.
    assert!(matches!(
        api.nodes(Duration::from_secs(10)),
        Err(KubeError::Unexpected { .. })
    ));
}

#[test]
fn client_refuses_a_server_outside_the_lab_ca() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let ours = lab(d1.path());
    let theirs = lab(d2.path());
    let tp = &theirs.paths.pki;
    let (_s, port) = https_server(
        &kthw_lab::pki::cert_path(tp, "kube-apiserver"),
        &kthw_lab::pki::key_path(tp, "kube-apiserver"),
        &kthw_lab::pki::cert_path(&ours.paths.pki, "ca"),
    );
    match client(&ours, port).get_raw("/readyz", Duration::from_secs(10)) {
        Err(e @ KubeError::Request { .. }) => {
            let msg = e.to_string().to_lowercase();
            assert!(msg.contains("certificate"), "{msg}");
            assert!(e.hint().unwrap().contains("lb status"));
        }
        other => panic!("a server from another CA was accepted: {other:?}"),
    }
}

#[test]
fn waiting_for_an_api_that_is_not_there_times_out_with_progress() {
    let d = tempfile::tempdir().unwrap();
    let p = lab(d.path());
    let api = client(&p, free_port());
    let heard = Mutex::new(Vec::<String>::new());
    let t = Instant::now();
    let e = api
        .wait_ready(Duration::from_secs(3), Duration::from_millis(500), &|m| {
            heard.lock().unwrap().push(m.to_string())
        })
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(15));
    match &e {
        KubeError::NotReady {
            endpoint,
            secs,
            last,
        } => {
            assert_eq!(endpoint, &api.endpoint);
            assert_eq!(*secs, 3);
            assert!(last.to_lowercase().contains("connect"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    let heard = heard.into_inner().unwrap();
    assert!(!heard.is_empty());
    assert!(
        heard[0].starts_with(&format!("waiting for {}/readyz", api.endpoint)),
        "{heard:?}"
    );
}

#[test]
fn missing_admin_certificate_is_a_read_error_with_a_hint() {
    let d = tempfile::tempdir().unwrap();
    let root = support::root();
    let text = std::fs::read_to_string(root.join("scenarios/2m2w.yaml")).unwrap();
    let src = Sources { roots: vec![root] };
    let s = load_str(&text, "2m2w.yaml", &src, &HostLimits { memory_mib: 65536 }).unwrap();
    let p = plan(&s, &text, d.path());
    let e = ApiClient::for_lab(&p).unwrap_err();
    assert!(matches!(e, KubeError::Read { .. }), "{e:?}");
    assert!(e.hint().unwrap().contains("pki"));
}
