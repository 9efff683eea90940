//! Bootstrap phases: the commands they build (pure), what they check, the missing
//! component error, and the file-sync and archive-install steps run for real over
//! SSH on 127.0.0.1 into a temp dir. The phases themselves change systemd units and
//! routes, so they only run against the lab's VMs: etcd, routes and runtime in the
//! VM end-to-end tests; control-plane and workers in no test (the Kubernetes server
//! binaries cannot be obtained here).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kthw_lab::actions::bootstrap::{
    ensure_etcd, ensure_workers, etcd_health_cmd, extract_cmd, inactive_units, is_active_cmd,
    missing_routes, sync_files, systemd_apply_cmd, unhealthy_endpoints, Bootstrap, BootstrapError,
};
use kthw_lab::components::ComponentCatalog;
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::remote::{Remote, RemoteError, SshRemote};
use kthw_lab::render::units::{self, Bins, RenderedFile};

mod support;

use kthw_lab::scenario::{load_str, HostLimits, Sources};
use support::loopback::{start_sshd, Sshd};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn plan_2m2w() -> LabPlan {
    let text = std::fs::read_to_string(root().join("scenarios/2m2w.yaml")).unwrap();
    let src = Sources {
        roots: vec![root()],
    };
    let s = load_str(&text, "2m2w.yaml", &src, &HostLimits { memory_mib: 65536 }).unwrap();
    plan(&s, &text, Path::new("/var/lib/kthw-lab"))
}

#[test]
fn systemd_commands_restart_only_when_something_changed() {
    assert_eq!(
        systemd_apply_cmd(&["kubelet", "kube-proxy"], false, false),
        "if systemctl show -p NeedDaemonReload --value kubelet kube-proxy | grep -qx yes; then systemctl daemon-reload; fi && { SYSTEMCTL_SKIP_SYSV=1 systemctl is-enabled --quiet kubelet kube-proxy || SYSTEMCTL_SKIP_SYSV=1 systemctl --no-reload enable kubelet kube-proxy; } && systemctl start kubelet kube-proxy"
    );
    assert_eq!(
        systemd_apply_cmd(&["etcd"], true, true),
        "systemctl daemon-reload && { SYSTEMCTL_SKIP_SYSV=1 systemctl is-enabled --quiet etcd || SYSTEMCTL_SKIP_SYSV=1 systemctl --no-reload enable etcd; } && systemctl --no-block restart etcd"
    );
    let units = ["etcd", "kube-apiserver", "kube-scheduler"];
    assert_eq!(
        is_active_cmd(&units),
        "systemctl is-active etcd kube-apiserver kube-scheduler || true"
    );
    assert!(inactive_units(&units, "active\nactive\nactive\n").is_empty());
    assert_eq!(
        inactive_units(&units, "active\nactivating\n"),
        [
            ("kube-apiserver", "activating".to_string()),
            ("kube-scheduler", "unknown".to_string())
        ]
    );
}

#[test]
fn etcd_health_uses_tls_with_the_nodes_certificate_on_every_endpoint() {
    let p = plan_2m2w();
    let m2 = p.node("m2").unwrap();
    let cmd = etcd_health_cmd(&p, m2, &Bins::downloaded());
    assert_eq!(
        cmd,
        "ETCDCTL_API=3 /usr/local/bin/etcdctl --endpoints=https://10.200.1.10:2379,https://10.200.1.11:2379 \
         --cacert=/etc/etcd/ca.pem --cert=/etc/etcd/etcd-m2.pem --key=/etc/etcd/etcd-m2-key.pem \
         --command-timeout=5s endpoint health"
    );
    // etcdctl prints healthy endpoints on stdout and unhealthy ones on stderr.
    let healthy = "https://10.200.1.10:2379 is healthy: successfully committed proposal: took = 2.2ms\n\
                   https://10.200.1.11:2379 is healthy: successfully committed proposal: took = 3.1ms\n";
    assert!(unhealthy_endpoints(&p, healthy).is_empty());
    let half = "https://10.200.1.10:2379 is healthy: successfully committed proposal: took = 2.2ms\n\
                https://10.200.1.11:2379 is unhealthy: failed to commit proposal: context deadline exceeded\n";
    assert_eq!(unhealthy_endpoints(&p, half), ["https://10.200.1.11:2379"]);
    assert_eq!(unhealthy_endpoints(&p, "").len(), 2);
}

#[test]
fn route_check_reads_ip_json() {
    let p = plan_2m2w();
    let m1 = p.node("m1").unwrap();
    let expected = units::pod_routes(&p, m1);
    assert_eq!(expected.len(), 2);
    let json = r#"[{"dst":"default","gateway":"10.200.1.1","dev":"eth0","flags":[]},
        {"dst":"10.100.0.0/24","gateway":"10.200.1.12","dev":"eth0","protocol":"static","flags":[]},
        {"dst":"10.200.1.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.200.1.10","flags":[]}]"#;
    let missing = missing_routes(&expected, json).unwrap();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].dst, "10.100.1.0/24");
    assert_eq!(missing[0].via, "10.200.1.13");
    // Same route via another gateway does not count.
    let wrong = r#"[{"dst":"10.100.0.0/24","gateway":"10.200.1.99"},{"dst":"10.100.1.0/24","gateway":"10.200.1.13"}]"#;
    assert_eq!(missing_routes(&expected, wrong).unwrap().len(), 1);
    assert!(missing_routes(&expected, "not json").is_err());
}

/// The route check against the real `ip -j route` output of a node-like namespace
/// this test makes (never the host's own table, which may hold a running lab's
/// routes): one pod route present, the other only via a wrong gateway.
#[test]
fn route_check_reads_real_ip_json_in_a_namespace() {
    let p = plan_2m2w();
    let m1 = p.node("m1").unwrap();
    let expected = units::pod_routes(&p, m1);
    assert_eq!(expected.len(), 2);
    let ns = support::Netns::new("routes");
    ns.sh(
        "ip link add eth0 type veth peer name eth1 && ip link set eth1 up && \
         ip addr add 10.200.1.10/24 dev eth0 && ip link set eth0 up && \
         ip route add 10.100.0.0/24 via 10.200.1.12 dev eth0 proto static && \
         ip route add 10.100.1.0/24 via 10.200.1.99 dev eth0 proto static",
    );
    let out = ns.sh("ip -j route show");
    let missing = missing_routes(&expected, &out).unwrap();
    assert_eq!(missing.len(), 1, "{out}");
    assert_eq!(missing[0].dst, "10.100.1.0/24");
    assert_eq!(missing[0].via, "10.200.1.13");
    ns.sh("ip route replace 10.100.1.0/24 via 10.200.1.13 dev eth0 proto static");
    let out = ns.sh("ip -j route show");
    assert_eq!(missing_routes(&expected, &out).unwrap(), [], "{out}");
}

#[test]
fn a_missing_component_is_one_error_naming_files_and_the_import_command() {
    let p = plan_2m2w();
    let cat = ComponentCatalog::builtin().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // A real SshRemote without targets: any use would fail with `unknown node`.
    let remote = SshRemote::new(PathBuf::from("/nonexistent"), HashMap::new());
    let b = Bootstrap::new(&p, &cat, cache.path());
    let e = ensure_etcd(&b, &remote).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BootstrapError::MissingComponents(_)), "{msg}");
    assert!(msg.contains("etcd 3.5.21"), "{msg}");
    assert!(msg.contains("etcd-v3.5.21-linux-amd64.tar.gz"), "{msg}");
    assert!(msg.contains("kthw-lab cache import DIR"), "{msg}");
    assert!(
        !msg.contains("kubelet"),
        "only what this phase needs: {msg}"
    );
    let e = ensure_workers(&b, &remote).unwrap_err().to_string();
    assert!(
        e.contains("kubelet 1.32.3") && e.contains("kube-proxy 1.32.3"),
        "{e}"
    );
    // Taking etcd from the image skips the cache: the phase goes on to the nodes.
    let b2 = b.clone().use_image(&["etcd"]);
    assert_eq!(b2.bins.etcd, "/usr/bin/etcd");
    assert_eq!(b2.bins.etcdctl, "/usr/bin/etcdctl");
    match ensure_etcd(&b2, &remote) {
        Err(BootstrapError::Remote(RemoteError::UnknownNode { node })) => assert_eq!(node, "m1"),
        other => panic!("expected to reach the remote, got {other:?}"),
    }
}

// ---- real SSH on loopback ---------------------------------------------------------

fn remote(sshd: &Sshd) -> SshRemote {
    sshd.remote(&["n1"], sshd.host_key())
}

#[test]
fn sync_files_writes_only_what_differs() {
    let sshd = start_sshd();
    let r = remote(&sshd);
    let base = sshd.dir.path().join("node-root");
    let p = plan_2m2w();
    let n1 = p.node("n1").unwrap();
    // The worker's real rendered files, re-rooted under the temp dir.
    let files: Vec<RenderedFile> =
        units::worker_files(&p, n1, &Bins::downloaded(), &Default::default())
            .into_iter()
            .map(|mut f| {
                f.path = format!("{}{}", base.display(), f.path);
                f
            })
            .collect();
    let first = sync_files(&r, "n1", &files).unwrap();
    assert_eq!(first.len(), files.len());
    for f in &files {
        assert_eq!(std::fs::read_to_string(&f.path).unwrap(), f.content);
    }
    // Check, act, check: nothing to do the second time.
    assert!(sync_files(&r, "n1", &files).unwrap().is_empty());
    // A drifted file on the node is put back, and only that one.
    let drifted = &files[2].path;
    std::fs::write(drifted, "changed by hand\n").unwrap();
    assert_eq!(
        sync_files(&r, "n1", &files).unwrap(),
        vec![drifted.to_string()]
    );
    assert_eq!(r.open_sessions(), 1);
}

#[test]
fn archive_members_are_installed_with_their_mode() {
    let sshd = start_sshd();
    let r = remote(&sshd);
    let work = sshd.dir.path().join("archive");
    std::fs::create_dir_all(work.join("src/pkg-v1")).unwrap();
    std::fs::write(
        work.join("src/pkg-v1/tool"),
        "#!/bin/sh\necho tool-from-archive\n",
    )
    .unwrap();
    let archive = work.join("pkg-v1.tar.gz");
    assert!(Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(work.join("src"))
        .arg("pkg-v1")
        .status()
        .unwrap()
        .success());
    let dest = work.join("bin/tool");
    let cmd = extract_cmd(
        archive.to_str().unwrap(),
        "pkg-v1/tool",
        dest.to_str().unwrap(),
        0o755,
    );
    r.run("n1", &cmd, Duration::from_secs(30)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let out = r
        .run("n1", dest.to_str().unwrap(), Duration::from_secs(30))
        .unwrap();
    assert_eq!(out.stdout, "tool-from-archive\n");
    // The scratch directory is gone again.
    assert!(!Path::new(&format!("{}.d", archive.display())).exists());
}

/// A catalog of two made-up tools (not Kubernetes components), versioned like crictl.
fn tool_catalog(bin_sha: &str) -> ComponentCatalog {
    use kthw_lab::components::{
        ArtifactKind, ChecksumSource, Component, InstallFile, NodeSet, Release, VersionOf,
    };
    let comp = |name: &str, rel: Release| Component {
        name: name.into(),
        nodes: NodeSet::Worker,
        version_of: VersionOf::Crictl,
        versions: [("1.32.0".to_string(), rel)].into_iter().collect(),
    };
    ComponentCatalog {
        arch: "amd64".into(),
        components: vec![
            comp(
                "tool-bin",
                Release {
                    url: "https://example.invalid/tool-bin".into(),
                    checksum: ChecksumSource::Sha256(bin_sha.into()),
                    kind: ArtifactKind::Binary,
                    install: vec![InstallFile {
                        from: None,
                        to: "/usr/local/bin/tool-bin".into(),
                        mode: 0o755,
                    }],
                },
            ),
            comp(
                "tool-archive",
                Release {
                    url: "https://example.invalid/tool-archive.tar.gz".into(),
                    checksum: ChecksumSource::Url {
                        url: "https://example.invalid/tool-archive.tar.gz.sha256".into(),
                        entry: None,
                    },
                    kind: ArtifactKind::TarGz,
                    install: vec![
                        InstallFile {
                            from: Some("pkg/one".into()),
                            to: "/usr/local/bin/one".into(),
                            mode: 0o755,
                        },
                        InstallFile {
                            from: Some("pkg/two".into()),
                            to: "/opt/tool/two".into(),
                            mode: 0o700,
                        },
                    ],
                },
            ),
        ],
        provided_by_image: Default::default(),
    }
}

#[test]
fn components_install_from_the_cache_once_and_refuse_a_tampered_file() {
    use kthw_lab::actions::bootstrap::install_component;
    use sha2::Digest;
    let sshd = start_sshd();
    let r = remote(&sshd);
    let p = plan_2m2w();
    let cache = sshd.dir.path().join("cache");
    let root = sshd.dir.path().join("node-root");
    // The single binary, cached where the catalog says.
    let bin = b"#!/bin/sh\necho tool\n".to_vec();
    std::fs::create_dir_all(cache.join("components")).unwrap();
    let bin_file = cache.join("components/tool-bin-1.32.0");
    std::fs::write(&bin_file, &bin).unwrap();
    // The archive.
    let src = sshd.dir.path().join("src/pkg");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("one"), "#!/bin/sh\necho one\n").unwrap();
    std::fs::write(src.join("two"), "#!/bin/sh\necho two\n").unwrap();
    assert!(Command::new("tar")
        .arg("-czf")
        .arg(cache.join("components/tool-archive-1.32.0"))
        .arg("-C")
        .arg(sshd.dir.path().join("src"))
        .arg("pkg")
        .status()
        .unwrap()
        .success());

    let cat = tool_catalog(&hex::encode(sha2::Sha256::digest(&bin)));
    let mut b = Bootstrap::new(&p, &cat, &cache);
    b.install_root = root.display().to_string();
    let at = |p: &str| format!("{}{p}", root.display());

    let first = install_component(&b, &r, "n1", "tool-bin").unwrap();
    assert_eq!(first, [at("/usr/local/bin/tool-bin")]);
    assert!(install_component(&b, &r, "n1", "tool-bin")
        .unwrap()
        .is_empty());
    let first = install_component(&b, &r, "n1", "tool-archive").unwrap();
    assert_eq!(first, [at("/usr/local/bin/one"), at("/opt/tool/two")]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&at("/opt/tool/two")), 0o700);
    assert_eq!(
        std::fs::read_to_string(at("/var/lib/kthw/components/tool-archive.sha256"))
            .unwrap()
            .trim()
            .len(),
        64
    );
    assert!(install_component(&b, &r, "n1", "tool-archive")
        .unwrap()
        .is_empty());
    // A file lost on the node brings the archive back.
    std::fs::remove_file(at("/opt/tool/two")).unwrap();
    assert_eq!(
        install_component(&b, &r, "n1", "tool-archive")
            .unwrap()
            .len(),
        2
    );
    // No archive copy is left behind on the node.
    assert!(!Path::new(&at("/var/cache/kthw/tool-archive.tar.gz")).exists());

    // A cached file that does not match the pinned digest is refused.
    std::fs::write(&bin_file, b"tampered").unwrap();
    let e = install_component(&b, &r, "n1", "tool-bin").unwrap_err();
    assert!(matches!(e, BootstrapError::CacheMismatch { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("does not match the catalog's pinned"),
        "{e}"
    );
}

/// The health check and its parser against a real etcd (Debian's 3.4) serving TLS
/// with client-certificate auth on 127.0.0.1, plus an endpoint nobody listens on.
/// Certificates come from openssl in a temp dir.
#[test]
fn etcd_health_reads_real_etcdctl_output() {
    use kthw_lab::actions::bootstrap::etcd_health_cmd_with;
    let etcd = support::require("etcd", "etcd-server");
    let etcdctl = support::require("etcdctl", "etcd-client");
    let etcdctl = etcdctl.to_str().unwrap();
    support::require("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca.pem -days 1 -subj /CN=test-ca 2>/dev/null");
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n",
    )
    .unwrap();
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout m-key.pem -out m.csr -subj /CN=etcd-test 2>/dev/null");
    sh("openssl x509 -req -in m.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out m.pem -days 1 -extfile ext.cnf 2>/dev/null");
    let port = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (client, peer, dead) = (port(), port(), port());
    let p = |f: &str| d.join(f).display().to_string();
    let mut child = Command::new(&etcd)
        .args([
            "--name=t".to_string(),
            format!("--data-dir={}", p("data")),
            format!("--listen-client-urls=https://127.0.0.1:{client}"),
            format!("--advertise-client-urls=https://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=t=http://127.0.0.1:{peer}"),
            format!("--cert-file={}", p("m.pem")),
            format!("--key-file={}", p("m-key.pem")),
            format!("--trusted-ca-file={}", p("ca.pem")),
            "--client-cert-auth".to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let live = format!("https://127.0.0.1:{client}");
    let gone = format!("https://127.0.0.1:{dead}");
    let mut plan = plan_2m2w();
    plan.cluster.etcd_endpoints = vec![live.clone(), gone.clone()];
    let cmd = etcd_health_cmd_with(
        etcdctl,
        &plan.cluster.etcd_endpoints,
        &p("ca.pem"),
        &p("m.pem"),
        &p("m-key.pem"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let bad = loop {
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bad = unhealthy_endpoints(&plan, &text);
        if bad.len() == 1 || Instant::now() > deadline {
            break (bad, text);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(bad.0, [gone], "etcdctl said:\n{}", bad.1);
    assert!(bad.1.contains(&format!("{live} is healthy")), "{}", bad.1);
}
