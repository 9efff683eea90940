//! The lab PKI checked with the standard tools: `openssl verify`/`x509`, real mutual-TLS
//! handshakes through `openssl s_server`/`s_client` on loopback, `kubectl config view`,
//! idempotency across runs and plan changes, file modes, and the linter against
//! deliberately broken certificates.

mod support;

use support::loopback::{free_port, wait_listening, Killed};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kthw_lab::pki::{self, issue, lint, store, Check, Outcome};
use kthw_lab::plan::{CertSpec, CertUsage, LabPlan};
use kthw_lab::render::{encryption, kubeconfig};
use kthw_lab::scenario::{self, HostLimits, KeyAlgorithm, Role, Sources};
use rcgen::KeyPair;

fn scenario_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/2m2w.yaml")
}

fn base_text() -> String {
    std::fs::read_to_string(scenario_path()).unwrap()
}

fn plan_from(text: &str, state: &Path) -> LabPlan {
    let path = scenario_path();
    let sc = scenario::load_str(
        text,
        "2m2w.yaml",
        &Sources::for_scenario(&path),
        &HostLimits { memory_mib: 65536 },
    )
    .unwrap_or_else(|e| panic!("scenario does not load: {e:?}"));
    kthw_lab::plan::plan(&sc, text, state)
}

fn rsa_text() -> String {
    base_text().replace("key_algorithm: ecdsa-p256", "key_algorithm: rsa-2048")
}

fn three_workers_text() -> String {
    base_text().replace(
        "  count: 2\n  names: [n1, n2]",
        "  count: 3\n  names: [n1, n2, n3]",
    )
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("the tool runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn openssl(args: &[&str]) -> (bool, String) {
    run(Command::new("openssl").args(args))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn pem_of(plan: &LabPlan, name: &str) -> String {
    std::fs::read_to_string(pki::cert_path(&plan.paths.pki, name)).unwrap()
}

fn key_of(plan: &LabPlan, name: &str) -> String {
    std::fs::read_to_string(pki::key_path(&plan.paths.pki, name)).unwrap()
}

fn spec<'a>(plan: &'a LabPlan, name: &str) -> &'a CertSpec {
    plan.certificates.iter().find(|c| c.name == name).unwrap()
}

/// `openssl verify` and `openssl x509 -text` agree with the plan for every certificate.
fn check_with_openssl(plan: &LabPlan) {
    let pki = &plan.paths.pki;
    let ca = pki::cert_path(pki, "ca");
    let ca_s = ca.to_str().unwrap();
    let rsa = plan.key_algorithm == KeyAlgorithm::Rsa2048;
    for s in &plan.certificates {
        let file = pki::cert_path(pki, &s.name);
        let f = file.to_str().unwrap();
        let (ok, out) = openssl(&["verify", "-CAfile", ca_s, f]);
        assert!(
            ok && out.contains(": OK"),
            "openssl verify {}: {out}",
            s.name
        );
        let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", f]);
        assert!(ok, "{text}");
        let subject = text
            .lines()
            .find(|l| l.trim_start().starts_with("Subject:"))
            .unwrap();
        assert!(
            subject.contains(&format!("CN = {}", s.common_name)),
            "{}: {subject}",
            s.name
        );
        if let Some(o) = &s.organization {
            assert!(
                subject.contains(&format!("O = {o}")),
                "{}: {subject}",
                s.name
            );
        }
        for d in &s.dns_names {
            assert!(
                text.contains(&format!("DNS:{d}")),
                "{} lacks DNS:{d}",
                s.name
            );
        }
        for ip in &s.ip_addresses {
            assert!(
                text.contains(&format!("IP Address:{ip}")),
                "{} lacks IP {ip}",
                s.name
            );
        }
        let (client, server) = (
            text.contains("TLS Web Client Authentication"),
            text.contains("TLS Web Server Authentication"),
        );
        match s.usage {
            CertUsage::Ca => {
                assert!(text.contains("CA:TRUE"), "{text}");
                assert!(text.contains("Certificate Sign"), "{text}");
            }
            CertUsage::Client => assert!(client && !server, "{}: {text}", s.name),
            CertUsage::Server => assert!(server && !client, "{}: {text}", s.name),
            CertUsage::ClientServer => assert!(server && client, "{}: {text}", s.name),
            CertUsage::SigningKey => assert!(!server && !client, "{}: {text}", s.name),
        }
        if s.usage != CertUsage::Ca {
            assert!(text.contains("CA:FALSE"), "{}: {text}", s.name);
            assert!(text.contains("Digital Signature"), "{}: {text}", s.name);
            assert_eq!(
                text.contains("Key Encipherment"),
                rsa && s.usage != CertUsage::SigningKey
            );
        }
        let want_key = if rsa {
            "Public-Key: (2048 bit)"
        } else {
            "ASN1 OID: prime256v1"
        };
        assert!(text.contains(want_key), "{}: {text}", s.name);
        // The key file holds the certificate's key.
        let key = pki::key_path(pki, &s.name);
        let (ok, cert_pub) = openssl(&["x509", "-noout", "-pubkey", "-in", f]);
        assert!(ok);
        let (ok, key_pub) = openssl(&["pkey", "-pubout", "-in", key.to_str().unwrap()]);
        assert!(ok, "{key_pub}");
        assert_eq!(cert_pub, key_pub, "{}: key and certificate differ", s.name);
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    assert_eq!(mode(pki), 0o700);
}

fn make_lab(text: &str) -> (tempfile::TempDir, LabPlan) {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan_from(text, dir.path());
    (dir, plan)
}

fn ensure_all(plan: &LabPlan) -> pki::PkiReport {
    let r = pki::ensure_pki(plan).unwrap();
    pki::ensure_kubeconfigs(plan).unwrap();
    pki::ensure_encryption_config(plan).unwrap();
    r
}

#[test]
fn ecdsa_pki_passes_openssl_and_the_linter() {
    let (_d, plan) = make_lab(&base_text());
    let t = Instant::now();
    let report = pki::ensure_pki(&plan).unwrap();
    eprintln!(
        "ecdsa-p256: {} certificates in {:?}",
        report.certs.len(),
        t.elapsed()
    );
    assert_eq!(report.certs.len(), plan.certificates.len());
    assert!(report.certs.iter().all(|c| c.outcome == Outcome::Issued));
    check_with_openssl(&plan);
    let findings = pki::lint(&plan);
    assert!(findings.is_empty(), "{}", lint::render_table(&findings));
}

#[test]
fn rsa_pki_passes_openssl_and_the_linter() {
    let (_d, plan) = make_lab(&rsa_text());
    let t = Instant::now();
    let report = pki::ensure_pki(&plan).unwrap();
    eprintln!(
        "rsa-2048: {} certificates in {:?}",
        report.certs.len(),
        t.elapsed()
    );
    check_with_openssl(&plan);
    let findings = pki::lint(&plan);
    assert!(findings.is_empty(), "{}", lint::render_table(&findings));
    // RSA certificates carry keyEncipherment and work in a handshake as well.
    let ca = pki::cert_path(&plan.paths.pki, "ca");
    let (_s, port) = tls_server(&plan, "kube-apiserver", &ca);
    let (ok, out) = tls_client(&plan, port, "admin", "kubernetes.default");
    assert!(ok, "{out}");
    let (_e, port) = tls_server(&plan, "etcd-m2", &ca);
    let (ok, out) = tls_client(&plan, port, "etcd-m1", "10.200.1.11");
    assert!(ok, "{out}");
}

// ---------------------------------------------------------------- mutual TLS

/// `openssl s_server` on loopback with `cert`, requiring a client certificate from the
/// lab CA; it answers each line with the line reversed.
fn tls_server(plan: &LabPlan, cert: &str, ca_file: &Path) -> (Killed, u16) {
    let pki = &plan.paths.pki;
    let port = free_port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-rev", "-verify_return_error"])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(pki::cert_path(pki, cert))
        .arg("-key")
        .arg(pki::key_path(pki, cert))
        .arg("-CAfile")
        .arg(ca_file)
        .args(["-Verify", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Killed(child);
    wait_listening(port, "openssl s_server");
    (server, port)
}

/// Run `cmd` with `input` on stdin until its stdout contains `want`, it exits, or
/// `limit` passes; then kill it. Returns stdout and stderr. `openssl s_client -quiet`
/// ignores EOF on stdin, so the test, not the tool, decides when a session is over.
fn run_until(mut cmd: Command, input: &[u8], want: &str, limit: Duration) -> (String, String) {
    use std::io::{Read, Write};
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 512];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 || tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => got.extend(chunk),
            Err(_) => break, // exited (stdout closed) or out of time
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    let _ = out_reader.join();
    let err = err_reader.join().unwrap();
    (
        String::from_utf8_lossy(&got).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Connect with the client certificate `client_pki`/`client`, verifying the server as
/// `name` (a DNS name or an IP) against `plan`'s CA, send a line and expect it back
/// reversed. Returns whether that worked, and what openssl said.
fn tls_client_from(
    plan: &LabPlan,
    port: u16,
    client_pki: &Path,
    client: &str,
    name: &str,
) -> (bool, String) {
    let verify = if name.parse::<std::net::IpAddr>().is_ok() {
        "-verify_ip"
    } else {
        "-verify_hostname"
    };
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", name, verify, name])
        .arg("-CAfile")
        .arg(pki::cert_path(&plan.paths.pki, "ca"))
        .arg("-cert")
        .arg(pki::cert_path(client_pki, client))
        .arg("-key")
        .arg(pki::key_path(client_pki, client));
    let (out, err) = run_until(cmd, b"kthw-lab\n", "bal-whtk", Duration::from_secs(10));
    (out.contains("bal-whtk"), format!("{out}{err}"))
}

fn tls_client(plan: &LabPlan, port: u16, client: &str, name: &str) -> (bool, String) {
    tls_client_from(plan, port, &plan.paths.pki, client, name)
}

#[test]
fn mutual_tls_with_the_apiserver_and_etcd_certs() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let ca = pki::cert_path(&plan.paths.pki, "ca");

    // kubectl (admin) to the API server under each name clients use.
    let (_s, port) = tls_server(&plan, "kube-apiserver", &ca);
    for name in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
        "lb",
        "m1",
        "m2",
        "10.32.0.1",
        "10.200.1.10",
        "10.200.1.11",
        "10.200.1.15",
        "127.0.0.1",
    ] {
        let (ok, out) = tls_client(&plan, port, "admin", name);
        assert!(ok, "apiserver as {name}: {out}");
    }
    // A name the certificate does not carry is refused by the client.
    let (ok, out) = tls_client(&plan, port, "admin", "evil.example");
    assert!(!ok && out.contains("hostname mismatch"), "{out}");
    let (ok, out) = tls_client(&plan, port, "admin", "10.200.1.12");
    assert!(!ok && out.contains("IP address mismatch"), "{out}");
    // The kubelet's client certificate works too (node authorizer path).
    let (ok, out) = tls_client(&plan, port, "kubelet-n1", "kubernetes");
    assert!(ok, "{out}");

    // The API server to etcd, and etcd peer to peer.
    let (_e, port) = tls_server(&plan, "etcd-m1", &ca);
    for name in ["m1", "10.200.1.10", "127.0.0.1", "localhost"] {
        let (ok, out) = tls_client(&plan, port, "kube-apiserver-etcd-client", name);
        assert!(ok, "etcd-m1 as {name}: {out}");
    }
    let (ok, out) = tls_client(&plan, port, "etcd-m2", "m1");
    assert!(ok, "peer etcd-m2 -> etcd-m1: {out}");
    let (ok, out) = tls_client(&plan, port, "kube-apiserver-etcd-client", "m2");
    assert!(!ok && out.contains("hostname mismatch"), "{out}");

    // The API server to a kubelet (logs, exec).
    let (_k, port) = tls_server(&plan, "kubelet-n2", &ca);
    let (ok, out) = tls_client(&plan, port, "kube-apiserver-kubelet-client", "10.200.1.13");
    assert!(ok, "{out}");
}

#[test]
fn servers_refuse_a_client_of_another_ca() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let (_o, other) = make_lab(&base_text());
    pki::ensure_pki(&other).unwrap();
    let ca = pki::cert_path(&plan.paths.pki, "ca");
    let (_s, port) = tls_server(&plan, "kube-apiserver", &ca);
    // Sanity: the right client gets through the same server.
    assert!(tls_client(&plan, port, "admin", "kubernetes").0);
    // The other lab's admin presents a certificate this lab's CA did not sign; it does
    // trust this lab's server (CAfile from `plan`), so only the server can refuse.
    let (ok, out) = tls_client_from(&plan, port, &other.paths.pki, "admin", "kubernetes");
    assert!(
        !ok && out.contains("unknown ca"),
        "server answered a foreign client: {out}"
    );
}

// ---------------------------------------------------------------- kubeconfigs

fn kubectl_view(file: &Path) -> serde_json::Value {
    let (ok, out) = run(Command::new("kubectl").args([
        "config",
        "view",
        "--raw",
        "-o",
        "json",
        "--kubeconfig",
        file.to_str().unwrap(),
    ]));
    assert!(ok, "kubectl config view {}: {out}", file.display());
    serde_json::from_str(&out).unwrap()
}

#[test]
fn kubectl_reads_every_kubeconfig() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let written = pki::ensure_kubeconfigs(&plan).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "admin.kubeconfig",
            "n1.kubeconfig",
            "n2.kubeconfig",
            "kube-proxy.kubeconfig",
            "kube-controller-manager.kubeconfig",
            "kube-scheduler.kubeconfig"
        ]
    );
    assert_eq!(mode(&plan.paths.kubeconfigs), 0o700);
    let ca = pem_of(&plan, "ca");
    for k in pki::kubeconfig_plans(&plan) {
        let file = plan.paths.kubeconfigs.join(&k.file);
        assert_eq!(mode(&file), 0o600);
        let v = kubectl_view(&file);
        let user = &spec(&plan, &k.cert).common_name;
        let server = &v["clusters"][0]["cluster"]["server"];
        let want_server = match k.cert.as_str() {
            "kube-controller-manager" | "kube-scheduler" => "https://127.0.0.1:6443",
            _ => "https://10.200.1.15:6443",
        };
        assert_eq!(server, want_server, "{}", k.file);
        assert_eq!(v["clusters"][0]["name"], "k2m2w");
        assert_eq!(v["users"][0]["name"], user.as_str());
        assert_eq!(
            v["current-context"],
            kubeconfig::context_name("k2m2w", user).as_str()
        );
        assert_eq!(v["contexts"][0]["context"]["user"], user.as_str());
        let decode = |x: &serde_json::Value| {
            String::from_utf8(STANDARD.decode(x.as_str().unwrap()).unwrap()).unwrap()
        };
        assert_eq!(
            decode(&v["clusters"][0]["cluster"]["certificate-authority-data"]),
            ca
        );
        assert_eq!(
            decode(&v["users"][0]["user"]["client-certificate-data"]),
            pem_of(&plan, &k.cert)
        );
        assert_eq!(
            decode(&v["users"][0]["user"]["client-key-data"]),
            key_of(&plan, &k.cert)
        );
    }
    // `kthw-lab kubeconfig --write FILE` writes the same, private.
    let dest = plan.paths.root.join("for-the-user.kubeconfig");
    pki::write_admin_kubeconfig(&plan, &dest).unwrap();
    assert_eq!(mode(&dest), 0o600);
    assert_eq!(kubectl_view(&dest)["users"][0]["name"], "admin");
    // The admin kubeconfig printed by `kthw-lab kubeconfig` is the file's content.
    assert_eq!(
        pki::admin_kubeconfig(&plan).unwrap(),
        std::fs::read_to_string(plan.paths.kubeconfigs.join("admin.kubeconfig")).unwrap()
    );
}

#[test]
fn admin_kubeconfig_before_pki_says_what_is_missing() {
    let (_d, plan) = make_lab(&base_text());
    let e = pki::admin_kubeconfig(&plan).unwrap_err();
    assert!(matches!(e, pki::PkiError::Missing { .. }), "{e}");
    assert!(e.to_string().starts_with("no certificate yet at "));
    assert!(!e.hint().is_empty());
}

// ---------------------------------------------------------------- golden files

const FIXED_CA: &str = "-----BEGIN CERTIFICATE-----\nFIXED-CA\n-----END CERTIFICATE-----\n";
const FIXED_CERT: &str = "-----BEGIN CERTIFICATE-----\nFIXED-LEAF\n-----END CERTIFICATE-----\n";
const FIXED_KEY: &str = "-----BEGIN PRIVATE KEY-----\nFIXED-KEY\n-----END PRIVATE KEY-----\n";

#[test]
fn kubeconfig_matches_golden() {
    for (file, server, user) in [
        ("kubeconfig-admin.yaml", "https://10.200.1.15:6443", "admin"),
        (
            "kubeconfig-kubelet.yaml",
            "https://10.200.1.15:6443",
            "system:node:n1",
        ),
        (
            "kubeconfig-scheduler.yaml",
            "https://127.0.0.1:6443",
            "system:kube-scheduler",
        ),
    ] {
        let text = kubeconfig::render(&kubeconfig::KubeconfigInput {
            cluster: "k2m2w",
            server,
            user,
            ca_pem: FIXED_CA,
            cert_pem: FIXED_CERT,
            key_pem: FIXED_KEY,
        });
        support::golden(&format!("pki/{file}"), &text);
    }
}

#[test]
fn encryption_config_has_the_documented_shape() {
    let text = encryption::render(&[0x42; 32]);
    assert_eq!(
        text,
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - aescbc:
          keys:
            - name: key1
              secret: QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=
      - identity: {}
"
    );
}

#[test]
fn encryption_config_is_written_once_with_a_fresh_key() {
    let (_d, plan) = make_lab(&base_text());
    let first = pki::ensure_encryption_config(&plan).unwrap();
    assert!(first.written);
    assert_eq!(mode(&first.path), 0o600);
    let text = std::fs::read_to_string(&first.path).unwrap();
    let key = encryption::parse_key(&text).expect("a 32-byte key");
    assert_ne!(key, [0u8; 32]);
    let again = pki::ensure_encryption_config(&plan).unwrap();
    assert!(!again.written);
    assert_eq!(std::fs::read_to_string(&first.path).unwrap(), text);
    // Another lab gets another key.
    let (_o, other) = make_lab(&base_text());
    pki::ensure_encryption_config(&other).unwrap();
    let other_key = encryption::parse_key(
        &std::fs::read_to_string(pki::encryption_config_path(&other)).unwrap(),
    )
    .unwrap();
    assert_ne!(key, other_key);
}

// ---------------------------------------------------------------- idempotency

#[test]
fn a_second_run_changes_nothing() {
    let (d, plan) = make_lab(&base_text());
    ensure_all(&plan);
    assert!(pki::lint_kubeconfigs(&plan).is_empty());
    let before = snapshot(d.path());
    let t = Instant::now();
    let report = ensure_all(&plan);
    eprintln!("second run (everything kept): {:?}", t.elapsed());
    assert!(
        report.certs.iter().all(|c| c.outcome == Outcome::Kept),
        "{}",
        report.summary()
    );
    let kc = pki::ensure_kubeconfigs(&plan).unwrap();
    assert!(kc.iter().all(|f| !f.written));
    assert_eq!(snapshot(d.path()), before);
}

#[test]
fn a_new_worker_gets_only_its_own_certificate() {
    let (d, plan) = make_lab(&base_text());
    ensure_all(&plan);
    let before = snapshot(d.path());
    let bigger = plan_from(&three_workers_text(), d.path());
    let report = ensure_all(&bigger);
    assert_eq!(
        report.with(Outcome::Issued),
        ["kubelet-n3"],
        "{}",
        report.summary()
    );
    assert!(
        report.with(Outcome::Reissued).is_empty(),
        "{}",
        report.summary()
    );
    let after = snapshot(d.path());
    let changed: Vec<String> = after
        .keys()
        .filter(|p| before.get(*p) != after.get(*p))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        changed,
        ["n3.kubeconfig", "kubelet-n3-key.pem", "kubelet-n3.pem"],
        "only the new worker's files appear"
    );
    assert!(pki::lint(&bigger).is_empty());
}

#[test]
fn a_new_san_reissues_with_the_same_key() {
    let (d, plan) = make_lab(&base_text());
    ensure_all(&plan);
    let key_before = key_of(&plan, "kube-apiserver");
    let cert_before = pem_of(&plan, "kube-apiserver");
    let ca_before = pem_of(&plan, "ca");
    // Move the load balancer: the API server's SANs change.
    let moved = plan_from(
        &base_text().replace("address: 10.200.1.15", "address: 10.200.1.16"),
        d.path(),
    );
    let report = pki::ensure_pki(&moved).unwrap();
    // Until they are written again, the kubeconfigs still point at the old address.
    let stale = pki::lint_kubeconfigs(&moved);
    let files: Vec<&str> = stale.iter().map(|f| f.cert.as_str()).collect();
    assert_eq!(
        files,
        [
            "admin.kubeconfig",
            "n1.kubeconfig",
            "n2.kubeconfig",
            "kube-proxy.kubeconfig"
        ],
        "{}",
        lint::render_table(&stale)
    );
    assert!(stale.iter().all(|f| f.found.contains("10.200.1.15")));
    ensure_all(&moved);
    assert!(pki::lint_kubeconfigs(&moved).is_empty());
    assert_eq!(
        report.with(Outcome::Reissued),
        ["kube-apiserver"],
        "{}",
        report.summary()
    );
    assert!(report.with(Outcome::Issued).is_empty());
    assert_eq!(key_of(&moved, "kube-apiserver"), key_before);
    assert_ne!(pem_of(&moved, "kube-apiserver"), cert_before);
    assert_eq!(pem_of(&moved, "ca"), ca_before);
    check_with_openssl(&moved);
    assert!(pki::lint(&moved).is_empty());
    // The kubeconfigs now point at the new LB address.
    let v = kubectl_view(&moved.paths.kubeconfigs.join("admin.kubeconfig"));
    assert_eq!(
        v["clusters"][0]["cluster"]["server"],
        "https://10.200.1.16:6443"
    );
}

#[test]
fn changing_the_key_algorithm_rekeys_everything() {
    let (d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let rsa = plan_from(&rsa_text(), d.path());
    let report = pki::ensure_pki(&rsa).unwrap();
    assert!(report.certs.iter().all(|c| c.outcome == Outcome::Issued));
    check_with_openssl(&rsa);
}

#[test]
fn a_damaged_key_is_an_error_not_a_silent_rekey() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let k = pki::key_path(&plan.paths.pki, "admin");
    std::fs::write(&k, "garbage").unwrap();
    let e = pki::ensure_pki(&plan).unwrap_err();
    assert!(matches!(e, pki::PkiError::BadKey { .. }), "{e}");
    assert!(e.hint().contains("remove"));
}

#[test]
fn modes_are_repaired_by_the_next_run() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    std::fs::set_permissions(&plan.paths.pki, std::fs::Permissions::from_mode(0o755)).unwrap();
    let findings = pki::lint(&plan);
    assert!(
        findings
            .iter()
            .any(|f| f.check == Check::Mode && f.cert == lint::PKI_DIR),
        "{findings:?}"
    );
    pki::ensure_pki(&plan).unwrap();
    assert_eq!(mode(&plan.paths.pki), 0o700);
}

// ---------------------------------------------------------------- the linter

/// Replace `name`'s certificate with one issued from `spec` at `now`, by `ca`.
fn plant(
    plan: &LabPlan,
    name: &str,
    spec: &CertSpec,
    ca_pem: &str,
    ca_key: &KeyPair,
    now: time::OffsetDateTime,
) {
    let key = KeyPair::from_pem(&key_of(plan, name)).unwrap();
    let pem = issue::issue_leaf(spec, &key, ca_pem, ca_key, now).unwrap();
    std::fs::write(pki::cert_path(&plan.paths.pki, name), pem).unwrap();
}

#[test]
fn the_linter_catches_broken_certificates() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    assert!(pki::lint(&plan).is_empty());
    let ca_pem = pem_of(&plan, "ca");
    let ca_key = KeyPair::from_pem(&key_of(&plan, "ca")).unwrap();
    let now = time::OffsetDateTime::now_utc();

    // Wrong SAN: the API server without kubernetes.default, with an extra name.
    let mut s = spec(&plan, "kube-apiserver").clone();
    s.dns_names.retain(|d| d != "kubernetes.default");
    s.dns_names.push("evil.example".into());
    plant(&plan, "kube-apiserver", &s, &ca_pem, &ca_key, now);

    // Wrong O: admin outside system:masters.
    let mut s = spec(&plan, "admin").clone();
    s.organization = Some("system:authenticated".into());
    plant(&plan, "admin", &s, &ca_pem, &ca_key, now);

    // Expired: a kubelet certificate issued two years ago.
    let s = spec(&plan, "kubelet-n1").clone();
    plant(
        &plan,
        "kubelet-n1",
        &s,
        &ca_pem,
        &ca_key,
        now - time::Duration::days(730),
    );

    // Expiring soon: issued 350 days ago (a year's validity).
    let s = spec(&plan, "kube-scheduler").clone();
    plant(
        &plan,
        "kube-scheduler",
        &s,
        &ca_pem,
        &ca_key,
        now - time::Duration::days(350),
    );

    // Another CA with the very same subject: only the signature tells.
    let ca_spec = spec(&plan, "ca").clone();
    let other_key = issue::generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let other_ca = issue::self_signed_ca(&ca_spec, &other_key, now).unwrap();
    let s = spec(&plan, "kube-proxy").clone();
    plant(&plan, "kube-proxy", &s, &other_ca, &other_key, now);

    // Another CA with another name: the issuer differs.
    let mut other_spec = ca_spec.clone();
    other_spec.common_name = "Someone Else".into();
    let other_ca2 = issue::self_signed_ca(&other_spec, &other_key, now).unwrap();
    let s = spec(&plan, "kube-controller-manager").clone();
    plant(
        &plan,
        "kube-controller-manager",
        &s,
        &other_ca2,
        &other_key,
        now,
    );

    // A server certificate used where a client one belongs (wrong usages).
    let mut s = spec(&plan, "kube-apiserver-etcd-client").clone();
    s.usage = CertUsage::Server;
    plant(
        &plan,
        "kube-apiserver-etcd-client",
        &s,
        &ca_pem,
        &ca_key,
        now,
    );

    // A certificate that belongs to another key.
    let stray = issue::generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let s = spec(&plan, "etcd-m1").clone();
    let pem = issue::issue_leaf(&s, &stray, &ca_pem, &ca_key, now).unwrap();
    std::fs::write(pki::cert_path(&plan.paths.pki, "etcd-m1"), pem).unwrap();

    // A key readable by others.
    let k = pki::key_path(&plan.paths.pki, "etcd-m2");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();

    let findings = pki::lint(&plan);
    let table = lint::render_table(&findings);
    eprintln!("{table}");
    let has = |cert: &str, check: Check, needle: &str| {
        findings.iter().any(|f| {
            f.cert == cert
                && f.check == check
                && (f.expected.contains(needle) || f.found.contains(needle))
        })
    };
    assert!(
        has("kube-apiserver", Check::San, "kubernetes.default"),
        "{table}"
    );
    assert!(has("kube-apiserver", Check::San, "evil.example"), "{table}");
    assert!(
        has("admin", Check::SubjectO, "system:authenticated"),
        "{table}"
    );
    assert!(has("kubelet-n1", Check::Validity, "expired"), "{table}");
    assert!(has("kube-scheduler", Check::Expiry, "expires"), "{table}");
    assert!(
        has("kube-proxy", Check::Chain, "does not verify"),
        "{table}"
    );
    assert!(
        has("kube-controller-manager", Check::Chain, "Someone Else"),
        "{table}"
    );
    assert!(
        has(
            "kube-apiserver-etcd-client",
            Check::ExtKeyUsage,
            "serverAuth"
        ),
        "{table}"
    );
    assert!(has("etcd-m1", Check::KeyPair, "another key"), "{table}");
    assert!(has("etcd-m2", Check::Mode, "0644"), "{table}");
    // Nothing else is flagged.
    let flagged: std::collections::BTreeSet<&str> =
        findings.iter().map(|f| f.cert.as_str()).collect();
    assert_eq!(
        flagged.into_iter().collect::<Vec<_>>(),
        [
            "admin",
            "etcd-m1",
            "etcd-m2",
            "kube-apiserver",
            "kube-apiserver-etcd-client",
            "kube-controller-manager",
            "kube-proxy",
            "kube-scheduler",
            "kubelet-n1"
        ]
    );
    // openssl agrees about the chain and the expiry.
    let ca = pki::cert_path(&plan.paths.pki, "ca");
    for bad in ["kube-proxy", "kube-controller-manager", "kubelet-n1"] {
        let f = pki::cert_path(&plan.paths.pki, bad);
        let (ok, out) = openssl(&[
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            f.to_str().unwrap(),
        ]);
        assert!(!ok, "openssl accepted {bad}: {out}");
    }
    // JSON for scripts.
    let json: serde_json::Value = serde_json::from_str(&lint::to_json(&findings)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), findings.len());
    assert!(json[0]["check"].is_string() && json[0]["severity"].is_string());

    // The next ensure repairs every one of them, keeping the keys.
    let report = pki::ensure_pki(&plan).unwrap();
    let mut reissued = report.with(Outcome::Reissued);
    reissued.sort();
    assert_eq!(
        reissued,
        [
            "admin",
            "etcd-m1",
            "kube-apiserver",
            "kube-apiserver-etcd-client",
            "kube-controller-manager",
            "kube-proxy",
            "kube-scheduler",
            "kubelet-n1"
        ],
        "{}",
        report.summary()
    );
    // The kept key of etcd-m2 is made private again without being rewritten.
    assert_eq!(mode(&k), 0o600);
    let findings = pki::lint(&plan);
    assert!(findings.is_empty(), "{}", lint::render_table(&findings));
    check_with_openssl(&plan);
}

#[test]
fn the_linter_reports_missing_files() {
    let (_d, plan) = make_lab(&base_text());
    let findings = pki::lint(&plan);
    assert!(findings.iter().all(|f| f.check == Check::File));
    assert_eq!(findings.len(), plan.certificates.len() * 2);
    assert!(lint::render_table(&findings).contains("error"));
    assert_eq!(
        lint::render_table(&[]),
        "every certificate matches the plan\n"
    );
}

// ---------------------------------------------------------------- distribution

#[test]
fn workers_never_get_a_ca_key_and_every_source_exists() {
    let (_d, plan) = make_lab(&base_text());
    ensure_all(&plan);
    let dist = pki::distribution(&plan);
    assert_eq!(dist.len(), plan.nodes.len());
    let ca_key = pki::key_path(&plan.paths.pki, "ca");
    for n in &dist {
        for f in &n.files {
            assert!(f.source.is_file(), "{} -> {}: no source", n.node, f.dest);
            assert!(f.dest.starts_with('/'), "{}", f.dest);
            let secret = f.dest.ends_with("-key.pem")
                || f.dest.ends_with("kubeconfig")
                || f.dest.ends_with("encryption-config.yaml");
            assert_eq!(f.mode, if secret { 0o600 } else { 0o644 }, "{}", f.dest);
        }
        let dests: Vec<&str> = n.files.iter().map(|f| f.dest.as_str()).collect();
        let mut unique = dests.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            dests.len(),
            "{}: duplicate destinations",
            n.node
        );
        match n.role {
            Role::Worker => {
                assert!(n.files.iter().all(|f| f.source != ca_key), "{}", n.node);
                assert!(n.files.iter().all(|f| !f.dest.contains("ca-key")));
                let own = format!("kubelet-{}.pem", n.node);
                assert!(n.files.iter().any(|f| f.source.ends_with(&own)));
                // Only its own kubelet identity.
                assert_eq!(
                    n.files
                        .iter()
                        .filter(|f| f.source.to_string_lossy().contains("kubelet-"))
                        .count(),
                    2
                );
            }
            Role::Controller => {
                assert!(dests.contains(&"/var/lib/kubernetes/ca-key.pem"));
                assert!(dests.contains(&"/var/lib/kubernetes/encryption-config.yaml"));
                assert!(dests.contains(&format!("/etc/etcd/etcd-{}.pem", n.node).as_str()));
                assert!(n
                    .files
                    .iter()
                    .all(|f| !f.source.to_string_lossy().contains("kubelet-n")));
                let other = if n.node == "m1" { "etcd-m2" } else { "etcd-m1" };
                assert!(n
                    .files
                    .iter()
                    .all(|f| !f.source.to_string_lossy().contains(other)));
            }
        }
    }
}

#[test]
fn store_writes_are_atomic_and_leave_no_temp_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.pem");
    store::write_atomic(&p, b"one", 0o600).unwrap();
    store::write_atomic(&p, b"two", 0o644).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    assert_eq!(mode(&p), 0o644);
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    assert!(!store::write_if_changed(&p, b"two", 0o644).unwrap());
    assert!(store::write_if_changed(&p, b"three", 0o644).unwrap());
}

/// Not a check: `KTHW_PKI_DUMP=/some/dir cargo test --test pki dump -- --ignored` leaves a
/// complete 2m2w PKI there, to poke at by hand with openssl and kubectl.
#[test]
#[ignore]
fn dump() {
    let dir = PathBuf::from(std::env::var_os("KTHW_PKI_DUMP").expect("set KTHW_PKI_DUMP"));
    let plan = plan_from(&base_text(), &dir);
    ensure_all(&plan);
    eprintln!("{}", plan.paths.root.display());
}

#[test]
fn a_lost_ca_cert_is_reissued_from_its_key_and_the_leaves_stay() {
    let (_d, plan) = make_lab(&base_text());
    pki::ensure_pki(&plan).unwrap();
    let admin = pem_of(&plan, "admin");
    std::fs::remove_file(pki::cert_path(&plan.paths.pki, "ca")).unwrap();
    let report = pki::ensure_pki(&plan).unwrap();
    assert_eq!(
        report.with(Outcome::Reissued),
        ["ca"],
        "{}",
        report.summary()
    );
    assert_eq!(report.with(Outcome::Issued), Vec::<&str>::new());
    // Same key, same name: what it signed before still verifies.
    assert_eq!(pem_of(&plan, "admin"), admin);
    check_with_openssl(&plan);
}

#[test]
fn the_kubeconfig_linter_catches_stale_embedded_certs() {
    let (_d, plan) = make_lab(&base_text());
    ensure_all(&plan);
    // Re-issue the scheduler's certificate behind the kubeconfig's back.
    std::fs::remove_file(pki::cert_path(&plan.paths.pki, "kube-scheduler")).unwrap();
    pki::ensure_pki(&plan).unwrap();
    let findings = pki::lint_kubeconfigs(&plan);
    assert_eq!(findings.len(), 1, "{}", lint::render_table(&findings));
    assert_eq!(findings[0].cert, "kube-scheduler.kubeconfig");
    assert_eq!(findings[0].check, Check::Kubeconfig);
    assert!(findings[0].found.contains("other certificates"));
    let out = pki::ensure_kubeconfigs(&plan).unwrap();
    let written: Vec<_> = out.iter().filter(|f| f.written).collect();
    assert_eq!(written.len(), 1);
    assert!(pki::lint_kubeconfigs(&plan).is_empty());
    // A missing kubeconfig is a finding too.
    std::fs::remove_file(plan.paths.kubeconfigs.join("n2.kubeconfig")).unwrap();
    let findings = pki::lint_kubeconfigs(&plan);
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].cert, "n2.kubeconfig");
}
