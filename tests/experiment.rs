//! Experiments without VMs: the file format (every shipped file, and the errors a
//! person makes, each with its `file:line:col`), the CLI's exit code for a bad file,
//! and the etcd probes and history check against a real etcd on loopback with TLS
//! (Debian's etcd-server), killed and started again under the probes.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use kthw_lab::experiment::etcd::{Etcd, Member, Tls};
use kthw_lab::experiment::history::{self, Op, OpKind, Outcome};
use kthw_lab::experiment::model::{Action, Metric, ProbeKind, Selector, When};
use kthw_lab::experiment::{load_str, probes, SHIPPED};
use support::loopback::{free_port, Killed};

fn problems(text: &str) -> Vec<String> {
    match load_str(text, "x.yaml") {
        Ok(e) => panic!("accepted: {e:?}"),
        Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
    }
}

#[test]
fn every_shipped_experiment_loads_and_uses_selectors_only() {
    assert_eq!(SHIPPED.len(), 5);
    for (name, text) in SHIPPED {
        let e = load_str(text, name).unwrap_or_else(|e| panic!("{name}: {:?}", e.diagnostics));
        assert_eq!(&e.name, name);
        // The file in experiments/ is the one compiled in.
        let on_disk = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{name}.yaml")),
        )
        .unwrap();
        assert_eq!(&on_disk, text);
        for s in &e.steps {
            for sel in s.action.selectors() {
                assert!(sel.is_selector(), "{name}: `{sel}` is a node name");
            }
        }
        assert!(!e.expect.is_empty(), "{name} checks nothing");
    }
    let e = load_str(SHIPPED[0].1, "etcd-member-down").unwrap();
    assert_eq!(
        e.steps[0].when,
        When::At(kthw_lab::experiment::model::Secs(10.0))
    );
    assert!(matches!(
        &e.steps[0].action,
        Action::KillUnit { node: Selector::EtcdLeader, unit, keep_down: true } if unit == "etcd"
    ));
    assert_eq!(e.planned(), vec![10.0, 30.0]);
    assert!(e.expect.iter().any(|x| x.metric == Metric::History));
    assert_eq!(e.probes[0].kind, ProbeKind::EtcdWrite);
}

#[test]
fn mistakes_are_reported_together_with_their_position() {
    let text = "\
name: t
requires: {phase: etcd, controllers: 2}
duration: 30s
colour: blue
probes:
  - {kind: etcd-write, every: 10ms}
  - {kind: etcd-write}
  - {kind: tcp, node: controller:0}
steps:
  - {id: a, at: 5s, action: crash-node, node: controller:0, unit: etcd}
  - {at: 2s, action: start-node, node: step:nope}
  - {after: 40s, action: wait}
  - {at: 1s, action: explode}
expect:
  - {probe: etcd-write, window: later, metric: availability, min: 0.5}
  - {probe: nothing, metric: history}
";
    let p = problems(text);
    let want = [
        "x.yaml:4:1: colour: unknown field `colour`",
        "x.yaml:6:31: probes[0].every: probes sample at most every 50ms",
        "probe name `etcd-write` is used twice",
        "probes[2].port: probe kind `tcp` needs `port`",
        "x.yaml:10:61: steps[0].unit: action `crash-node` takes no `unit` (it takes: node)",
        "`step:nope` names no earlier step (ids so far: a)",
        "before the previous one",
        "not before the end of the run",
        "`explode` is no action",
        "no window `later` (windows: whole, before, a)",
        "no probe named `nothing`",
    ];
    for w in want {
        assert!(
            p.iter().any(|l| l.contains(w)),
            "no `{w}` in:\n{}",
            p.join("\n")
        );
    }
}

#[test]
fn api_probes_need_the_control_plane_and_etcd_probes_need_etcd() {
    let p = problems(
        "name: t\nrequires: {phase: pki}\nduration: 10s\nprobes:\n  - {kind: api-ready}\n  - {kind: etcd-read}\n",
    );
    assert!(
        p.iter()
            .any(|l| l.contains("x.yaml:5:") && l.contains("exists from phase `control-plane`")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.contains("x.yaml:6:") && l.contains("from phase `etcd`")),
        "{p:?}"
    );
    let p = problems(
        "name: t\nrequires: {phase: nope}\nduration: 10s\nprobes: [{kind: ping, node: c1}]\n",
    );
    assert!(p.iter().any(|l| l.contains("`nope` is no phase")), "{p:?}");
}

#[test]
fn a_bad_file_exits_2_before_the_lab_is_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, "name: t\nduration: 1s\nprobes: []\nsurprise: 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .arg("--state-dir")
        .arg(dir.path())
        .args(["experiment", "run", "no-such-lab"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.yaml:4:1: surprise: unknown field"),
        "{err}"
    );
    assert!(err.contains("requires"), "{err}");
    assert!(
        !err.contains("no-such-lab"),
        "the lab was looked at first: {err}"
    );
}

#[test]
fn experiment_list_shows_the_shipped_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_kthw-lab"))
        .args(["experiment", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, _) in SHIPPED {
        assert!(text.contains(name), "{text}");
    }
    assert!(text.contains("control-plane, 2+ controllers"), "{text}");
}

// ------------------------------------------------------------ a real etcd, TLS

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made by the
/// tool's own issuing code.
fn certs(dir: &Path) -> Tls {
    use kthw_lab::pki::issue::{generate_key, issue_leaf, self_signed_ca};
    use kthw_lab::plan::{CertSpec, CertUsage};
    use kthw_lab::scenario::KeyAlgorithm;
    let spec = |name: &str, usage| CertSpec {
        name: name.into(),
        purpose: "test".into(),
        common_name: name.into(),
        organization: None,
        usage,
        dns_names: vec!["localhost".into()],
        ip_addresses: vec!["127.0.0.1".parse().unwrap()],
        node: None,
    };
    let now = time::OffsetDateTime::now_utc();
    let ca_key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let ca = self_signed_ca(&spec("ca", CertUsage::Ca), &ca_key, now).unwrap();
    let mut out = Vec::new();
    for name in ["server", "client"] {
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        let usage = if name == "server" {
            CertUsage::ClientServer
        } else {
            CertUsage::Client
        };
        let cert = issue_leaf(&spec(name, usage), &key, &ca, &ca_key, now).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), &cert).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        out.push((cert, key.serialize_pem()));
    }
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    Tls {
        ca: ca.into_bytes(),
        cert: out[1].0.clone().into_bytes(),
        key: out[1].1.clone().into_bytes(),
    }
}

fn start_etcd(dir: &Path, client: u16, peer: u16) -> Killed {
    let etcd = support::require("etcd", "etcd-server");
    let c = format!("https://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let f = |n: &str| dir.join(n).display().to_string();
    let child = Command::new(&etcd)
        .args(["--name", "t1", "--data-dir", &f("data")])
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("t1={p}")])
        .args([
            "--cert-file",
            &f("server.pem"),
            "--key-file",
            &f("server-key.pem"),
        ])
        .args(["--trusted-ca-file", &f("ca.pem"), "--client-cert-auth"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("etcd.log"))
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    Killed(child)
}

fn until_ok(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what} never worked");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn etcd_probes_over_tls_fail_over_a_restart_and_the_history_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certs(dir.path());
    let (client, peer) = (free_port(), free_port());
    let mut etcd = start_etcd(dir.path(), client, peer);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let e = std::sync::Arc::new(Etcd::new(
        rt.handle().clone(),
        tls,
        vec![Member {
            node: "t1".into(),
            url: format!("https://127.0.0.1:{client}"),
        }],
    ));
    let key = probes::register_key("test-run");
    let t = Duration::from_secs(1);
    until_ok("a put over TLS", || {
        e.put(&key, 0, t).outcome == Outcome::Ok
    });
    // The leader, by the member's name.
    let (leader, detail) = e.leader(t).unwrap();
    assert_eq!(leader.as_deref(), Some("t1"), "{detail}");

    // Probes on their own threads, sampling while etcd dies and comes back.
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let end = Duration::from_secs(6);
    let (writes, reads) = std::thread::scope(|s| {
        let w = s.spawn(|| {
            let mut p = probes::EtcdWrite {
                etcd: e.clone(),
                key: key.clone(),
                next: 0,
            };
            probes::run(&mut p, Duration::from_millis(50), t, t0, end, &stop)
        });
        let r = s.spawn(|| {
            let mut p = probes::EtcdRead {
                etcd: e.clone(),
                key: key.clone(),
            };
            probes::run(&mut p, Duration::from_millis(50), t, t0, end, &stop)
        });
        std::thread::sleep(Duration::from_millis(1500));
        drop(std::mem::replace(
            &mut etcd,
            Killed(Command::new("true").spawn().unwrap()),
        ));
        std::thread::sleep(Duration::from_millis(1500));
        etcd = start_etcd(dir.path(), client, peer);
        (w.join().unwrap(), r.join().unwrap())
    });
    let failed = |v: &[kthw_lab::experiment::report::Sample]| v.iter().filter(|s| !s.ok).count();
    assert!(failed(&writes) > 0, "the writes never saw etcd down");
    assert!(
        writes.iter().any(|s| !s.ok && !s.indeterminate),
        "a refused connection is a definite failure: {:?}",
        writes.iter().filter(|s| !s.ok).collect::<Vec<_>>()
    );
    assert!(writes.last().unwrap().ok, "the writes never recovered");
    assert!(reads.last().unwrap().ok, "the reads never recovered");
    assert!(writes.iter().take(5).all(|s| s.ok), "{:?}", &writes[..5]);

    // The history as the run builds it, and the register read back.
    let mut ops = Vec::new();
    for (v, write) in [(&writes, true), (&reads, false)] {
        for s in v.iter() {
            let value: u64 = s.value.as_deref().and_then(|x| x.parse().ok()).unwrap_or(0);
            let outcome = if s.ok {
                Outcome::Ok
            } else if s.indeterminate {
                Outcome::Indeterminate
            } else {
                Outcome::Fail
            };
            if !write && !s.ok {
                continue;
            }
            ops.push(Op {
                kind: if write {
                    OpKind::Write { value }
                } else {
                    OpKind::Read { value }
                },
                invoke_s: s.t_s,
                complete_s: s.t_s + s.latency_ms / 1000.0,
                outcome,
            });
        }
    }
    let fin = e.get(&key, t);
    assert_eq!(fin.outcome, Outcome::Ok);
    let fin: u64 = fin.value.unwrap().parse().unwrap();
    let v = history::check(&ops, &[], Some(fin));
    assert!(v.ok(), "{:#?}", v.anomalies);
    assert_eq!(
        v.last_acknowledged,
        Some(fin),
        "the last acknowledged write is the final value"
    );
    // The same history with the register rolled back is caught.
    let v = history::check(&ops, &[], Some(fin - 3));
    assert_eq!(v.anomalies.last().unwrap().kind, "lost-write");
}

#[test]
fn the_lease_holder_is_the_host_part_of_the_holder_identity() {
    use kthw_lab::kube::{lease_path, parse_lease_holder};
    let json = include_str!("fixtures/kube/lease-kube-controller-manager.json");
    assert_eq!(parse_lease_holder(json).unwrap().as_deref(), Some("m2"));
    let free = json.replace("m2_8c3b6f2e-0d41-4c57-9e1a-6f7b2a9d3c55", "");
    assert_eq!(parse_lease_holder(&free).unwrap(), None);
    assert!(parse_lease_holder(r#"{"kind":"Node"}"#).is_err());
    assert_eq!(
        lease_path("kube-scheduler"),
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-scheduler"
    );
    // In files: a lease probe needs its lease and the control plane, and so does
    // the selector of a lease's holder.
    let p = problems("name: t\nrequires: {phase: etcd}\nduration: 20s\nprobes:\n  - {kind: api-lease}\nsteps:\n  - {at: 1s, action: crash-node, node: lease-holder:kube-scheduler}\n");
    assert!(
        p.iter()
            .any(|l| l.contains("probes[0].lease: probe kind `api-lease` needs `lease`")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.contains("x.yaml:7:") && l.contains("`lease-holder:` asks the API")),
        "{p:?}"
    );
    let e = load_str(SHIPPED[4].1, "api-failover").unwrap();
    assert_eq!(
        e.steps[0].action.selectors()[0],
        &Selector::LeaseHolder("kube-controller-manager".into())
    );
}

#[test]
fn a_lab_that_lacks_what_the_file_requires_is_refused_before_anything_is_touched() {
    use kthw_lab::actions::{Journal, Phase, PhaseRecord, PhaseState};
    use kthw_lab::experiment::run::check_requires;
    let dir = tempfile::tempdir().unwrap();
    let plan = support::plan_1m1w(dir.path());
    let mut j = Journal::open(&dir.path().join("journal.json"), &plan.lab, "x").unwrap();
    let done = |j: &mut Journal, phase| {
        j.set(PhaseRecord {
            phase,
            state: PhaseState::Done,
            started: 0,
            seconds: 0.0,
            error: None,
        })
    };
    let e = load_str(SHIPPED[0].1, "etcd-member-down").unwrap();
    // Never created, one controller of the two it needs.
    let err = check_requires(&e, &plan, None).unwrap_err().to_string();
    assert!(
        err.contains("it needs 2 controller(s); lab `k1m1w` has 1"),
        "{err}"
    );
    assert!(err.contains("was never created"), "{err}");
    for p in Phase::ALL.into_iter().take_while(|p| *p <= Phase::Lb) {
        done(&mut j, p);
    }
    let one = load_str(
        "name: t\nrequires: {phase: etcd, controllers: 1}\nduration: 5s\nprobes: [{kind: ping, node: worker:3}]\n",
        "t",
    )
    .unwrap();
    let err = check_requires(&one, &plan, Some(&j))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is done up to `lb`"), "{err}");
    assert!(err.contains("`worker:3` needs 4 workers"), "{err}");
    done(&mut j, Phase::Etcd);
    let ok = load_str(
        "name: t\nrequires: {phase: etcd, controllers: 1}\nduration: 5s\nprobes: [{kind: ping, node: worker:0}]\n",
        "t",
    )
    .unwrap();
    check_requires(&ok, &plan, Some(&j)).unwrap();
}
