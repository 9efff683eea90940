//! Faults at every phase of `create` up to `runtime`, against the real system (real
//! VMs inside `scripts/netns-run`; `#[ignore]`d as a real-VM test, which `make test`
//! runs; then it fails rather than skips when anything is missing).
//!
//! One small lab (one controller, one worker, 512 MiB each). For every phase P from
//! `network` to `runtime`, in pipeline order:
//! - **kill**: a real SIGKILL inside P. For the phases that last seconds (wait-ssh,
//!   etcd, routes, runtime) the test sends it while `create` runs, a short delay after
//!   the progress output shows `==> P` or one of P's lines (in wait-ssh: while
//!   libvirt saves the fresh state of the first node to log in); the phases that last
//!   milliseconds kill themselves through the hook `KTHW_LAB_INJECT_FAULT=P:kill`
//!   right after their work (a timer cannot hit them reliably). Either way the journal
//!   must show P still `running`;
//! - **failing step**: `create` with the test hook `KTHW_LAB_INJECT_FAULT=P`, which
//!   fails P after its work is done and before the journal records it. This run must
//!   first converge through everything the kill left half-done: every phase before P
//!   is journaled `done` again.
//!
//! The lab's identity (saved plan, SSH user and host keys, every certificate and key,
//! kubeconfigs, encryption config, the domains' MACs and UUIDs) is fingerprinted after
//! the kill and after the failing step, and must not change between them.
//!
//! `destroy`, with the residue check of `support::lab` (domains, volumes, links, taps,
//! addresses, routes, nft table, balancer and qemu processes, state dir), runs after
//! the faults of every phase: after the injected fault in `network` before anything
//! else exists, right after the kill in `domains` (qemu processes mid-boot, taps),
//! after the failing step of every phase up to `routes` (each P's lab is then built
//! again from an empty host by the next kill run), and at the end, after the
//! converging create, right after a kill in `etcd` (booted VMs, a running balancer,
//! SSH sessions in flight). At the end a plain `create` converges from the fault in
//! `runtime`, and `status`, `certs check` and a pinned-key SSH login work.
//!
//! The VMs boot once for every phase from `wait-ssh` on (about 20 s each for two
//! 512 MiB nodes with the offline image's lean first boot, more under load).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use support::lab::{
    destroy_leaves_nothing, enter, kthw, kthw_cmd, kthw_env, plan_json, sh_may_fail,
    stand_in_uplink, state_dir,
};
use support::text;

const LAB: &str = "flt";
const UNTIL: &str = "runtime";

/// Every phase that can run here, and how its SIGKILL lands inside it:
/// - `None`: the phases that last milliseconds (network, image, disks, domains' define
///   and start, pki's 11 certificates, lb's spawn) cannot be hit reliably by a timer
///   (on a fast run `disks` took 84 ms), so the run kills itself with SIGKILL through
///   the hook `KTHW_LAB_INJECT_FAULT=PHASE:kill`, right after the phase's work and
///   before the journal records it: the worst moment, every time;
/// - `Some((line, ms))`: the test sends the SIGKILL `ms` after the progress output
///   shows `==> PHASE` and then `line` (when given), while the phase waits on the VMs
///   (wait-ssh: libvirt saving the fresh state of the first node that logged in, which
///   takes seconds, with the other node perhaps still booting: a fixed delay after
///   `==>` would land after the phase on a quick boot; etcd, routes, runtime: their
///   SSH work started, which takes 3-10 s on a quiet host and more under load).
type KillPoint = (&'static str, Option<(Option<&'static str>, u64)>);
const KILLS: [KillPoint; 10] = [
    ("network", None),
    ("image", None),
    ("disks", None),
    ("domains", None),
    (
        "wait-ssh",
        Some((Some(": ssh login ok, saving its fresh state"), 300)),
    ),
    ("pki", None),
    ("lb", None),
    ("etcd", Some((None, 2_000))),
    ("routes", Some((Some("  routes: c1, w1"), 1_000))),
    ("runtime", Some((Some("  runtime: w1"), 1_500))),
];

fn scenario(tmp: &Path) -> PathBuf {
    let f = tmp.join("flt.yaml");
    std::fs::write(
        &f,
        "name: flt\nnetwork:\n  bridge: fbr0\n  subnet: 10.250.1.0/24\n  gateway: 10.250.1.1\n  uplink: upl0\naccelerator: auto\ncontrollers: {count: 1, names: [c1], memory_mib: 512, disk_gib: 4}\nworkers: {count: 1, names: [w1], memory_mib: 512, disk_gib: 4}\nload_balancer: {name: api, address: 10.250.1.15}\ncluster: {pod_cidr: 10.251.0.0/16, service_cidr: 10.252.0.0/24}\nfrom_image: [etcd, containerd, runc, cni-plugins]\n",
    )
    .unwrap();
    f
}

fn journal(state: &Path) -> Value {
    let p = state.join("labs").join(LAB).join("journal.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn phase_state(state: &Path, phase: &str) -> Option<String> {
    journal(state)["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["phase"] == phase)
        .map(|r| r["state"].as_str().unwrap().to_string())
}

fn earlier(phase: &str) -> impl Iterator<Item = &'static str> + '_ {
    KILLS
        .iter()
        .map(|(p, ..)| *p)
        .take_while(move |p| *p != phase)
}

/// `create` with the failing-step hook at `phase`: it fails there, with the hook's
/// error, after every earlier phase converged.
fn fail_at(state: &Path, f: &str, phase: &str) -> f64 {
    let t = Instant::now();
    let o = kthw_env(
        state,
        &["create", f, "--until", UNTIL],
        &[("KTHW_LAB_INJECT_FAULT", phase)],
    );
    let secs = t.elapsed().as_secs_f64();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "fault at {phase}: {err}");
    assert!(
        err.contains(&format!("error: phase `{phase}` of lab `{LAB}` failed"))
            && err.contains(&format!(
                "caused by: injected fault: phase `{phase}` failed on purpose"
            )),
        "{err}"
    );
    assert_eq!(phase_state(state, phase).as_deref(), Some("failed"));
    for p in earlier(phase) {
        assert_eq!(
            phase_state(state, p).as_deref(),
            Some("done"),
            "phase {p} did not converge before the fault at {phase}"
        );
    }
    secs
}

/// `create`, SIGKILLed inside `phase` (see [`KILLS`]); the journal proves the kill
/// landed inside the phase.
fn kill_at(state: &Path, f: &str, phase: &str, timer: Option<(Option<&str>, u64)>) -> f64 {
    let t = Instant::now();
    let Some((then, delay_ms)) = timer else {
        let o = kthw_env(
            state,
            &["create", f, "--until", UNTIL],
            &[("KTHW_LAB_INJECT_FAULT", &format!("{phase}:kill"))],
        );
        eprintln!("--- killed itself (SIGKILL) after the work of {phase}");
        assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{}", o.status);
        assert_eq!(
            phase_state(state, phase).as_deref(),
            Some("running"),
            "the kill did not land inside {phase}: {}",
            journal(state)
        );
        return t.elapsed().as_secs_f64();
    };
    let mut child = kthw_cmd(state, &["create", f, "--until", UNTIL])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let announce = format!("==> {phase}:");
    let mut triggers: Vec<&str> = vec![&announce];
    triggers.extend(then);
    for trigger in triggers {
        let mut seen = false;
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(600)) {
            eprintln!("{line}");
            if line.contains(trigger) {
                seen = true;
                break;
            }
        }
        assert!(seen, "create never printed `{trigger}` ({phase})");
    }
    std::thread::sleep(Duration::from_millis(delay_ms));
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) },
        0,
        "create ended before the kill"
    );
    let st = child.wait().unwrap();
    let secs = t.elapsed().as_secs_f64();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        eprintln!("{line}");
    }
    eprintln!(
        "--- killed (SIGKILL) {delay_ms} ms after `{}` in {phase}",
        then.unwrap_or("==>")
    );
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    assert_eq!(
        phase_state(state, phase).as_deref(),
        Some("running"),
        "the kill did not land inside {phase}: {}",
        journal(state)
    );
    secs
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fingerprints of what makes the lab this lab: the saved plan, every key,
/// certificate, kubeconfig and the encryption config, and the domains' MACs and
/// UUIDs.
fn identity(state: &Path, plan: &Value) -> BTreeMap<String, String> {
    let mut id = BTreeMap::new();
    let root = state.join("labs").join(LAB);
    if let Ok(b) = std::fs::read(root.join("plan.json")) {
        id.insert("plan.json".into(), sha(&b));
    }
    for dir in ["ssh", "pki", "kubeconfigs"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_file() {
                continue;
            }
            id.insert(
                format!("{dir}/{name}"),
                sha(&std::fs::read(e.path()).unwrap()),
            );
        }
    }
    for n in plan["nodes"].as_array().unwrap() {
        let d = n["domain"].as_str().unwrap();
        // Before phase `domains` has run, libvirt has no such domain: no MAC or UUID yet.
        let xml = sh_may_fail(&format!("virsh -c qemu:///system dumpxml {d}")).unwrap_or_default();
        let pick = |open: &str, close: &str| {
            xml.split_once(open)
                .and_then(|(_, r)| r.split_once(close))
                .map(|(v, _)| v.to_string())
        };
        if let Some(mac) = pick("<mac address='", "'") {
            assert_eq!(mac, n["mac"].as_str().unwrap(), "{d} has another MAC");
            id.insert(format!("{d} mac"), mac);
        }
        if let Some(uuid) = pick("<uuid>", "</uuid>") {
            id.insert(format!("{d} uuid"), uuid);
        }
    }
    id
}

/// Everything seen so far must stay the same.
#[derive(Default)]
struct Identity(BTreeMap<String, String>);

impl Identity {
    fn absorb(&mut self, now: BTreeMap<String, String>, step: &str) {
        for (k, v) in &self.0 {
            assert_eq!(now.get(k), Some(v), "{k} changed or vanished after {step}");
        }
        self.0.extend(now);
    }
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn faults_at_every_phase_converge_and_destroy_leaves_nothing() {
    if !enter("faults_at_every_phase_converge_and_destroy_leaves_nothing") {
        return;
    }
    let t0 = Instant::now();
    stand_in_uplink();
    let tmp = tempfile::tempdir().unwrap();
    let state = state_dir(tmp.path());
    let f = scenario(tmp.path());
    let f = f.to_str().unwrap();
    let plan = plan_json(&state, f);
    let mut timings: Vec<String> = Vec::new();

    // Before anything exists: a failure in the first phase, then destroy.
    let s = fail_at(&state, f, "network");
    timings.push(format!("fail network {s:.1} s"));
    let s = destroy_leaves_nothing(&state, &plan);
    timings.push(format!("destroy after fail network {s:.1} s"));

    let mut id = Identity::default();
    for (i, (phase, timer)) in KILLS.into_iter().enumerate() {
        // From an empty host (after the destroy below), create runs up to the phase
        // and is killed inside it.
        let s = kill_at(&state, f, phase, timer);
        timings.push(format!("kill {phase} {s:.1} s"));
        if phase == "domains" {
            // Right after a kill too: qemu mid-boot, taps on the bridge, domains
            // defined: all must go.
            let s = destroy_leaves_nothing(&state, &plan);
            timings.push(format!("destroy after kill domains {s:.1} s"));
            id = Identity::default();
        } else {
            id.absorb(identity(&state, &plan), &format!("kill in {phase}"));
        }
        let s = fail_at(&state, f, phase);
        timings.push(format!("fail {phase} {s:.1} s"));
        id.absorb(identity(&state, &plan), &format!("fault in {phase}"));
        if i + 1 < KILLS.len() {
            // Destroy after the faults of every phase (the last one's lab goes on to
            // the converging create, and is destroyed after a final kill).
            let s = destroy_leaves_nothing(&state, &plan);
            timings.push(format!("destroy after faults in {phase} {s:.1} s"));
            id = Identity::default();
        }
    }

    // A plain run converges; the lab is the same lab and it works.
    let t = Instant::now();
    let o = kthw(&state, &["create", f, "--until", UNTIL]);
    assert!(o.status.success(), "create after the faults failed");
    timings.push(format!(
        "converging create {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let j = journal(&state);
    for (p, ..) in KILLS {
        assert_eq!(phase_state(&state, p).as_deref(), Some("done"), "{j}");
    }
    id.absorb(identity(&state, &plan), "the converging create");
    for key in [
        "ssh",
        "pki/ca.pem",
        "kubeconfigs/admin.kubeconfig",
        "c1 mac",
        "w1 uuid",
    ] {
        assert!(
            id.0.keys().any(|k| k.starts_with(key) || k.ends_with(key)),
            "nothing fingerprinted for {key}: {:?}",
            id.0.keys()
        );
    }
    let o = kthw(&state, &["status", LAB, "-o", "json"]);
    assert!(o.status.success(), "status says the lab is not up");
    let st: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["etcd_healthy"], true, "{st}");
    assert!(kthw(&state, &["certs", "check", LAB]).status.success());
    for node in ["c1", "w1"] {
        let o = kthw(&state, &["ssh", LAB, node, "--", "hostname"]);
        assert!(o.status.success(), "pinned-key login to {node}");
        assert_eq!(text(&o.stdout).trim(), node);
    }

    // A kill after boot (balancer running, SSH sessions open), then destroy.
    let s = kill_at(&state, f, "etcd", Some((None, 500)));
    timings.push(format!("kill etcd (post-boot) {s:.1} s"));
    let s = destroy_leaves_nothing(&state, &plan);
    timings.push(format!("destroy after kill etcd {s:.1} s"));

    println!("timings:\n  {}", timings.join("\n  "));
    println!("fault test took {:.0} s", t0.elapsed().as_secs_f64());
}
