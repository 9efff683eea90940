//! The Kubernetes objects the control-plane and smoke phases apply, and the commands
//! they run, checked without a cluster: golden files, the RBAC subject against the
//! plan's certificate, `kubectl` reading the manifests offline (`label --local`) and
//! parsing every generated command line (against a closed loopback port, so the only
//! possible failure after parsing is "connection refused"), and the smoke test's
//! request loop run for real on loopback.
//!
//! What no test runs: applying the objects, the pods, kube-proxy. That needs the
//! Kubernetes server binaries in real VMs, and they cannot be obtained on the
//! machines the tests run on, so the control-plane, workers and smoke phases never
//! run against a node (the VM end-to-end tests stop at `runtime`).

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use kthw_lab::actions::bootstrap::{
    answers_by_node, parse_replies, rbac_steps, root_kubeconfig_cmd, service_requests_cmd,
    smoke_steps, workers_without_ready_pod, Bootstrap, FileCopy, RBAC_MANIFEST, SMOKE_MANIFEST,
};
use kthw_lab::components::ComponentCatalog;
use kthw_lab::kube::{parse_pod_list, PodInfo};
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::render::manifests::{self, SmokeWorkload};
use kthw_lab::scenario::{load_str, HostLimits, Sources};

fn plan_of(file: &str) -> LabPlan {
    let root = support::root();
    let text = std::fs::read_to_string(root.join("scenarios").join(file)).unwrap();
    let src = Sources { roots: vec![root] };
    let s = load_str(&text, file, &src, &HostLimits { memory_mib: 65536 }).unwrap();
    plan(&s, &text, Path::new("/var/lib/kthw-lab"))
}

/// The PKI files the runner hands the phases (sources need not exist for building
/// commands).
fn files(p: &LabPlan) -> Vec<FileCopy> {
    kthw_lab::actions::bootstrap::file_copies(p)
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---\n")
        .map(|d| yaml_serde::from_str(d).unwrap())
        .collect()
}

#[test]
fn manifests_match_golden_files() {
    let p = plan_of("2m2w.yaml");
    let user = manifests::apiserver_kubelet_user(&p).unwrap();
    support::golden(
        "manifests/rbac-apiserver-to-kubelet.yaml",
        &manifests::rbac_apiserver_to_kubelet(user),
    );
    let w = SmokeWorkload::builtin().unwrap();
    support::golden(
        "manifests/smoke-2m2w.yaml",
        &manifests::smoke_manifest(&p, &w),
    );
    support::golden(
        "manifests/smoke-3m3w.yaml",
        &manifests::smoke_manifest(&plan_of("3m3w.yaml"), &w),
    );
}

#[test]
fn rbac_binds_exactly_the_apiservers_kubelet_client_identity() {
    let p = plan_of("2m2w.yaml");
    // The CN of the certificate the apiserver presents to kubelets, from the plan.
    let spec = p
        .certificates
        .iter()
        .find(|c| c.name == "kube-apiserver-kubelet-client")
        .unwrap();
    let user = manifests::apiserver_kubelet_user(&p).unwrap();
    assert_eq!(user, spec.common_name);
    // And that certificate is the one the apiserver unit is told to use.
    let m1 = p.node("m1").unwrap();
    let unit = kthw_lab::render::units::kube_apiserver_service(
        &p,
        m1,
        &kthw_lab::render::units::Bins::downloaded(),
    );
    assert!(unit.contains(
        "--kubelet-client-certificate=/var/lib/kubernetes/kube-apiserver-kubelet-client.pem"
    ));

    let d = docs(&manifests::rbac_apiserver_to_kubelet(user));
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["kind"], "ClusterRole");
    let resources: Vec<&str> = d[0]["rules"][0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        resources,
        [
            "nodes/proxy",
            "nodes/stats",
            "nodes/log",
            "nodes/spec",
            "nodes/metrics"
        ]
    );
    assert_eq!(d[0]["rules"][0]["apiGroups"][0], "");
    assert_eq!(d[0]["rules"][0]["verbs"][0], "*");
    assert_eq!(d[1]["kind"], "ClusterRoleBinding");
    assert_eq!(d[1]["roleRef"]["name"], d[0]["metadata"]["name"]);
    assert_eq!(d[1]["subjects"][0]["kind"], "User");
    assert_eq!(d[1]["subjects"][0]["name"], spec.common_name.as_str());
}

#[test]
fn smoke_deployment_puts_one_pod_on_each_worker() {
    for (file, workers) in [("1m1w.yaml", 1), ("2m2w.yaml", 2), ("3m3w.yaml", 3)] {
        let p = plan_of(file);
        assert_eq!(p.workers().count(), workers);
        let w = SmokeWorkload::builtin().unwrap();
        let d = docs(&manifests::smoke_manifest(&p, &w));
        let (dep, svc) = (&d[0], &d[1]);
        assert_eq!(dep["kind"], "Deployment");
        assert_eq!(dep["spec"]["replicas"], workers);
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            labels["app.kubernetes.io/name"]
        );
        let anti = &dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(
            anti["labelSelector"]["matchLabels"]["app.kubernetes.io/name"],
            labels["app.kubernetes.io/name"]
        );
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], w.image.as_str());
        assert!(w.image.contains("@sha256:"));
        assert_eq!(c["ports"][0]["containerPort"], w.container_port);
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(
            svc["spec"]["selector"],
            dep["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(svc["spec"]["ports"][0]["port"], w.service_port);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], c["ports"][0]["name"]);
        // The selector string kubectl is given matches the labels.
        let (k, v) = manifests::SMOKE_SELECTOR.split_once('=').unwrap();
        assert_eq!(labels[k], v);
    }
}

// ---- the phases' steps -------------------------------------------------------------

#[test]
fn control_plane_phase_applies_and_verifies_rbac_with_the_admin_kubeconfig() {
    let p = plan_of("2m2w.yaml");
    let cat = ComponentCatalog::builtin().unwrap();
    let b = Bootstrap::new(&p, &cat, Path::new("/nonexistent")).with_files(files(&p));
    // The PKI hands every controller the admin kubeconfig, workers never.
    for f in &b.files {
        if f.remote == "/var/lib/kubernetes/admin.kubeconfig" {
            assert!(f.node.starts_with('m'), "{}", f.node);
            assert_eq!(f.mode, 0o600);
            assert!(f.local.ends_with("admin.kubeconfig"));
        }
    }
    assert_eq!(
        b.files
            .iter()
            .filter(|f| f.remote == "/var/lib/kubernetes/admin.kubeconfig")
            .count(),
        2
    );
    assert_eq!(
        b.admin_kubeconfig.as_deref(),
        Some("/var/lib/kubernetes/admin.kubeconfig")
    );
    let s = rbac_steps(&b)
        .unwrap()
        .expect("rbac steps with an admin kubeconfig");
    assert_eq!(s.node, "m1");
    assert_eq!(s.manifest.path, RBAC_MANIFEST);
    assert_eq!(
        s.manifest.content,
        manifests::rbac_apiserver_to_kubelet("kube-apiserver-kubelet-client")
    );
    assert_eq!(
        s.apply,
        "/usr/local/bin/kubectl --kubeconfig /var/lib/kubernetes/admin.kubeconfig apply -f /var/lib/kubernetes/kthw-rbac-apiserver-to-kubelet.yaml"
    );
    let subs: Vec<&str> = s.verify.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(subs, manifests::KUBELET_API_RESOURCES);
    assert_eq!(
        s.verify[0].1,
        "/usr/local/bin/kubectl --kubeconfig /var/lib/kubernetes/admin.kubeconfig auth can-i get nodes --subresource=proxy --as=kube-apiserver-kubelet-client"
    );
    assert_eq!(
        root_kubeconfig_cmd(),
        "install -d -m 700 /root/.kube && ln -sfn /var/lib/kubernetes/admin.kubeconfig /root/.kube/config"
    );

    // Without the admin kubeconfig there is nothing to apply with: the step is skipped.
    let bare = Bootstrap::new(&p, &cat, Path::new("/nonexistent"));
    assert!(rbac_steps(&bare).unwrap().is_none());
    assert!(smoke_steps(&bare).unwrap().is_none());
}

#[test]
fn smoke_steps_run_kubectl_on_a_controller_and_requests_from_a_worker() {
    let p = plan_of("2m2w.yaml");
    let cat = ComponentCatalog::builtin().unwrap();
    let b = Bootstrap::new(&p, &cat, Path::new("/nonexistent")).with_files(files(&p));
    let s = smoke_steps(&b).unwrap().unwrap();
    assert_eq!(s.controller, "m1");
    assert_eq!(s.client, "n1");
    assert_eq!(s.manifest.path, SMOKE_MANIFEST);
    let k = "/usr/local/bin/kubectl --kubeconfig /var/lib/kubernetes/admin.kubeconfig";
    assert_eq!(
        s.cleanup,
        format!("{k} delete -f {SMOKE_MANIFEST} --ignore-not-found --wait=true --timeout=120s")
    );
    assert_eq!(
        s.remove,
        format!("{k} delete -f {SMOKE_MANIFEST} --ignore-not-found --wait=false")
    );
    assert_eq!(s.apply, format!("{k} apply -f {SMOKE_MANIFEST}"));
    assert_eq!(
        s.pods,
        format!("{k} get pods -n default -l app.kubernetes.io/name=kthw-smoke -o json")
    );
    assert_eq!(
        s.service,
        format!("{k} get service -n default kthw-smoke -o json")
    );
    assert_eq!(s.service_port, 80);
}

// ---- kubectl, offline ----------------------------------------------------------------

fn kubectl(args: &[&str]) -> (bool, String, String) {
    let o = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("kubectl on PATH (scripts/deps.sh installs one)");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `kubectl label --local -f FILE` decodes the file as kubectl would for `apply`,
/// without a server: kinds, names and fields as kubectl reads them.
fn kubectl_read(file: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = kubectl(&[
        "label",
        "--local",
        "-f",
        file.to_str().unwrap(),
        "kthw-lab/check=1",
        "-o",
        "json",
    ]);
    assert!(ok, "kubectl could not read {}: {err}", file.display());
    // One JSON document per object (kubectl 1.32), or one `List` (older kubectl).
    let mut objs = Vec::new();
    for v in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        let v = v.unwrap();
        match v["kind"].as_str() {
            Some("List") => objs.extend(v["items"].as_array().unwrap().iter().cloned()),
            _ => objs.push(v),
        }
    }
    objs
}

#[test]
fn kubectl_reads_the_manifests_as_the_intended_objects() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan_of("2m2w.yaml");
    let user = manifests::apiserver_kubelet_user(&p).unwrap();
    let rbac = dir.path().join("rbac.yaml");
    std::fs::write(&rbac, manifests::rbac_apiserver_to_kubelet(user)).unwrap();
    let objs = kubectl_read(&rbac);
    let kinds: Vec<(&str, &str)> = objs
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("ClusterRole", "system:kube-apiserver-to-kubelet"),
            ("ClusterRoleBinding", "system:kube-apiserver")
        ]
    );
    // kubectl's own generator for the same binding, offline: same roleRef and subject.
    let (ok, out, err) = kubectl(&[
        "create",
        "clusterrolebinding",
        "system:kube-apiserver",
        "--clusterrole=system:kube-apiserver-to-kubelet",
        &format!("--user={user}"),
        "--dry-run=client",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let reference: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(objs[1]["roleRef"], reference["roleRef"]);
    assert_eq!(objs[1]["subjects"], reference["subjects"]);
    assert_eq!(objs[1]["apiVersion"], reference["apiVersion"]);

    let smoke = dir.path().join("smoke.yaml");
    let w = SmokeWorkload::builtin().unwrap();
    std::fs::write(&smoke, manifests::smoke_manifest(&p, &w)).unwrap();
    let objs = kubectl_read(&smoke);
    assert_eq!(objs.len(), 2);
    assert_eq!(objs[0]["apiVersion"], "apps/v1");
    assert_eq!(objs[0]["kind"], "Deployment");
    assert_eq!(objs[0]["metadata"]["namespace"], "default");
    assert_eq!(objs[0]["spec"]["replicas"], 2);
    assert_eq!(objs[1]["kind"], "Service");
    assert_eq!(objs[1]["metadata"]["name"], "kthw-smoke");
}

/// A kubeconfig for a closed loopback port: kubectl parses its command line, then
/// fails to connect. An unknown flag would fail earlier, with another message.
fn closed_kubeconfig(dir: &Path) -> PathBuf {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // listener dropped: nothing listens there any more
    let kc = dir.join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    kc
}

#[test]
fn every_generated_kubectl_command_line_parses() {
    let dir = tempfile::tempdir().unwrap();
    let kc = closed_kubeconfig(dir.path());
    let p = plan_of("2m2w.yaml");
    let cat = ComponentCatalog::builtin().unwrap();
    let mut b = Bootstrap::new(&p, &cat, Path::new("/nonexistent")).with_files(files(&p));
    b.bins.kubectl = "kubectl".into();
    b.admin_kubeconfig = Some(kc.to_str().unwrap().to_string());
    let rbac = rbac_steps(&b).unwrap().unwrap();
    let smoke = smoke_steps(&b).unwrap().unwrap();
    // The manifests at local paths instead of the controllers'.
    let rbac_file = dir.path().join("rbac.yaml");
    std::fs::write(&rbac_file, &rbac.manifest.content).unwrap();
    let smoke_file = dir.path().join("smoke.yaml");
    std::fs::write(&smoke_file, &smoke.manifest.content).unwrap();
    let local = |c: &str| {
        c.replace(RBAC_MANIFEST, rbac_file.to_str().unwrap())
            .replace(SMOKE_MANIFEST, smoke_file.to_str().unwrap())
    };
    let mut cmds = vec![local(&rbac.apply)];
    cmds.extend(rbac.verify.iter().map(|(_, c)| local(c)));
    for c in [
        &smoke.cleanup,
        &smoke.remove,
        &smoke.apply,
        &smoke.pods,
        &smoke.service,
    ] {
        cmds.push(local(c));
    }
    for cmd in cmds {
        let o = Command::new("sh")
            .args(["-c", &format!("timeout 60 {cmd}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "`{cmd}` succeeded without a server?");
        assert!(
            err.contains("refused"),
            "`{cmd}` failed before contacting the server:\n{err}"
        );
        assert!(!err.contains("unknown flag"), "{cmd}: {err}");
    }
}

// ---- the request loop, for real on loopback ------------------------------------------

/// An HTTP/1.0 responder on loopback that answers each request with the next name,
/// as the smoke pods (agnhost serve-hostname) answer with their pod names.
fn name_server(names: Vec<&'static str>, requests: usize) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        for i in 0..requests {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET / HTTP/1.0\r\n"));
            let body = names[i % names.len()];
            write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (port, h)
}

#[test]
fn the_request_loop_collects_the_pod_names_that_answered() {
    let (port, h) = name_server(vec!["kthw-smoke-7d4b9-abcde", "kthw-smoke-7d4b9-fghij"], 6);
    let cmd = service_requests_cmd("127.0.0.1", port, 6);
    let o = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    h.join().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let (replies, total) = parse_replies(&out);
    assert_eq!(total, 6, "{out}");
    assert_eq!(replies.len(), 6, "{out}");
    let pods = vec![
        PodInfo {
            name: "kthw-smoke-7d4b9-abcde".into(),
            node: Some("n1".into()),
            phase: "Running".into(),
            ip: Some("10.100.0.5".into()),
            ready: true,
            waiting: None,
        },
        PodInfo {
            name: "kthw-smoke-7d4b9-fghij".into(),
            node: Some("n2".into()),
            phase: "Running".into(),
            ip: Some("10.100.1.7".into()),
            ready: true,
            waiting: None,
        },
    ];
    let by = answers_by_node(&replies, &pods);
    assert_eq!(by.get("n1"), Some(&3));
    assert_eq!(by.get("n2"), Some(&3));

    // Nobody listening: every request is counted, none answered.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = Command::new("sh")
        .args(["-c", &service_requests_cmd("127.0.0.1", closed, 3)])
        .output()
        .unwrap();
    let (replies, total) = parse_replies(&String::from_utf8_lossy(&o.stdout));
    assert_eq!((replies.len(), total), (0, 3));
    assert_eq!(
        answers_by_node(&["someone-else".to_string()], &pods).get("?"),
        Some(&1)
    );
}

#[test]
fn pods_missing_from_a_worker_are_named_with_what_they_wait_for() {
    let p = plan_of("2m2w.yaml");
    let pods = parse_pod_list(
        &std::fs::read_to_string(support::root().join("tests/fixtures/kube/smoke-pods.json"))
            .unwrap(),
    )
    .unwrap();
    let missing = workers_without_ready_pod(&p, &pods);
    assert_eq!(
        missing,
        [
            "n2: pod kthw-smoke-6c9f8d7b5d-x2v9q is Pending (ErrImagePull: failed to pull and unpack image \"registry.k8s.io/e2e-test-images/agnhost:2.53\": dial tcp: lookup registry.k8s.io: no such host)",
            "pod kthw-smoke-6c9f8d7b5d-q8w7e is not scheduled (Unschedulable: 0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules. preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod.)",
        ]
    );
    let ready: Vec<PodInfo> = pods.into_iter().filter(|p| p.ready).collect();
    assert_eq!(
        workers_without_ready_pod(&p, &ready),
        ["n2: no smoke pod scheduled there"]
    );
}
