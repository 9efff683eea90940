//! Experiments and checkpoints on real VMs (TCG here) inside `scripts/netns-run`,
//! on control-plane-only labs (`workers.count: 0`), one test so the VMs boot once
//! per lab:
//!
//! - **3 controllers**: a checkpoint saved, a key written, the checkpoint restored:
//!   the key is gone and etcd is healthy on every member. `etcd-member-down` from
//!   that checkpoint: writes go on through the outage window (availability >= 0.8)
//!   after a leader change the report records, and the history check passes; run
//!   again from the same checkpoint it has the same steps and an availability
//!   within a stated tolerance. `controller-partition`: the isolated member loses
//!   leadership and the majority keeps writing.
//! - **Cleanup**: a run SIGKILLed in the middle of a partition, a paused node and a
//!   unit held down leaves them recorded; `status` says so; the next `experiment
//!   run` undoes every one. Killed again, `destroy` leaves nothing (the partition
//!   table included). (A delay is proven on its own in `tests/net.rs`, where the
//!   kernel has netem.)
//! - **2 controllers**: the same `etcd-member-down`: writes fail through the outage
//!   window (quorum lost) and recover after the member restarts. `experiment
//!   compare` shows the two runs side by side. A checkpoint restored after `stop` and
//!   `start` takes the lab back too.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use serde_json::Value;

use support::lab::{
    destroy_leaves_nothing, enter, kthw, kthw_cmd, plan_json, sh, stand_in_uplink, state_dir,
};
use support::text;

fn scenario(tmp: &Path, lab: &str, controllers: usize) -> PathBuf {
    let names: Vec<String> = (1..=controllers).map(|i| format!("c{i}")).collect();
    let f = tmp.join(format!("{lab}.yaml"));
    std::fs::write(
        &f,
        format!(
            "name: {lab}\nnetwork:\n  bridge: xbr0\n  subnet: 10.236.1.0/24\n  gateway: 10.236.1.1\n  uplink: upl0\naccelerator: auto\ncontrollers: {{count: {controllers}, names: [{}], memory_mib: 640, disk_gib: 4}}\nworkers: {{count: 0}}\nload_balancer: {{name: api, address: 10.236.1.5}}\ncluster: {{pod_cidr: 10.237.0.0/16, service_cidr: 10.238.0.0/24}}\nfrom_image: [etcd, containerd, runc, cni-plugins]\n",
            names.join(", ")
        ),
    )
    .unwrap();
    f
}

/// A shipped experiment, started from checkpoint `cp` when given.
fn shipped(tmp: &Path, name: &str, cp: Option<&str>) -> PathBuf {
    let text =
        std::fs::read_to_string(support::root().join(format!("experiments/{name}.yaml"))).unwrap();
    let text = match cp {
        Some(cp) => text.replacen(
            "\nduration:",
            &format!("\nfrom_checkpoint: {cp}\nduration:"),
            1,
        ),
        None => text,
    };
    let f = tmp.join(format!("{name}.yaml"));
    std::fs::write(&f, text).unwrap();
    f
}

/// `experiment run LAB FILE -o json`: the report, which must say `completed`.
fn run_experiment(state: &Path, lab: &str, file: &Path) -> Value {
    let t = Instant::now();
    let o = kthw(
        state,
        &[
            "experiment",
            "run",
            lab,
            file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    assert!(
        o.status.success(),
        "experiment run {} failed",
        file.display()
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["result"], "completed", "{}", r["result"]);
    println!(
        "{} on {lab}: {:.0} s",
        r["experiment"]["name"],
        t.elapsed().as_secs_f64()
    );
    r
}

fn window<'a>(r: &'a Value, probe: &str, w: &str) -> &'a Value {
    r["probes"][probe]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["window"] == w)
        .unwrap_or_else(|| panic!("no window {w} of {probe}"))
}

fn avail(r: &Value, probe: &str, w: &str) -> f64 {
    window(r, probe, w)["availability"].as_f64().unwrap()
}

fn etcdctl(state: &Path, lab: &str, node: &str, args: &str) -> String {
    // One argument: ssh hands the remote shell its arguments joined by spaces.
    let cmd = format!(
        "sudo env ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/etc/etcd/ca.pem --cert=/etc/etcd/etcd-{node}.pem --key=/etc/etcd/etcd-{node}-key.pem {args}"
    );
    let o = kthw(state, &["ssh", lab, node, "--", &cmd]);
    assert!(o.status.success(), "etcdctl {args} on {node} failed");
    text(&o.stdout)
}

/// Start a run in the background and SIGKILL it once `trigger` shows on its output.
fn kill_run_at(state: &Path, lab: &str, file: &Path, trigger: &str) {
    let mut child = kthw_cmd(state, &["experiment", "run", lab, file.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = false;
    for line in err.lines() {
        let line = line.unwrap();
        eprintln!("  | {line}");
        if line.contains(trigger) {
            seen = true;
            break;
        }
    }
    assert!(seen, "the run never printed `{trigger}`");
    child.kill().unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success(), "the run ended before the kill");
}

fn faults_file(tmp: &Path) -> PathBuf {
    let steps =
        "  - {id: cut, at: 2s, action: partition, groups: [[controller:0], [others]]}\n  - {id: freeze, at: 3s, action: pause-node, node: controller:1}\n  - {id: down, at: 4s, action: kill-unit, node: controller:2, unit: etcd}\n";
    let f = tmp.join("many-faults.yaml");
    std::fs::write(
        &f,
        format!("name: many-faults\nrequires: {{phase: etcd, controllers: 3}}\nduration: 60s\nprobes:\n  - {{name: write, kind: etcd-write}}\nsteps:\n{steps}  - {{id: last, at: 6s, action: wait}}\n"),
    )
    .unwrap();
    f
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn experiments_and_checkpoints_on_two_and_three_controllers() {
    if !enter("experiments_and_checkpoints_on_two_and_three_controllers") {
        return;
    }
    stand_in_uplink();
    let tmp = tempfile::tempdir().unwrap();
    let state = state_dir(tmp.path());

    // ------------------------------------------------------------ 3 controllers
    let f3 = scenario(tmp.path(), "ex3", 3);
    let plan3 = plan_json(&state, f3.to_str().unwrap());
    let o = kthw(&state, &["create", f3.to_str().unwrap(), "--until", "etcd"]);
    assert!(o.status.success(), "create ex3 failed");

    // Checkpoint: save, write a key, restore: the key is gone, etcd healthy.
    let o = kthw(&state, &["checkpoint", "save", "ex3", "base"]);
    assert!(o.status.success(), "checkpoint save failed");
    let o = kthw(&state, &["checkpoint", "list", "ex3", "-o", "json"]);
    assert!(o.status.success());
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "base", "{list}");
    assert_eq!(list[0]["phase"], "etcd", "{list}");
    assert!(list[0]["disk_bytes"].as_u64().unwrap() > 0, "{list}");
    assert!(list[0]["problem"].is_null(), "{list}");
    let o = kthw(&state, &["checkpoint", "save", "ex3", "base"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a second save of a name must be refused"
    );

    etcdctl(&state, "ex3", "c1", "put kthw-after-base written");
    assert!(etcdctl(&state, "ex3", "c2", "get kthw-after-base").contains("written"));
    let t = Instant::now();
    let o = kthw(&state, &["checkpoint", "restore", "ex3", "base"]);
    assert!(o.status.success(), "checkpoint restore failed");
    println!(
        "checkpoint restore of 3 controllers: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for n in ["c1", "c2", "c3"] {
        assert_eq!(
            etcdctl(&state, "ex3", n, "get kthw-after-base").trim(),
            "",
            "the key written after the checkpoint is still there on {n}"
        );
    }
    let o = kthw(&state, &["status", "ex3", "-o", "json"]);
    assert!(o.status.success(), "status after restore is not OK");
    let st: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["etcd_healthy"], true, "{st}");

    // etcd-member-down on 3 members, twice from the same checkpoint.
    let md = shipped(tmp.path(), "etcd-member-down", Some("base"));
    let a = run_experiment(&state, "ex3", &md);
    let leader = a["steps"][0]["nodes"][0].as_str().unwrap().to_string();
    assert_eq!(
        a["steps"][1]["nodes"][0],
        leader.as_str(),
        "step:kill resolves to the same node"
    );
    let kill3 = avail(&a, "write", "kill");
    assert!(
        kill3 >= 0.8,
        "writes through a member down of three: {kill3}"
    );
    assert!(
        a["events"].as_array().unwrap().iter().any(|e| e["what"]
            .as_str()
            .unwrap()
            .starts_with(&format!("etcd leader changed from {leader}"))),
        "no leader change recorded: {}",
        a["events"]
    );
    assert_eq!(a["history"]["verdict"], "ok", "{}", a["history"]);
    for x in a["expect"].as_array().unwrap() {
        if x["skipped"].is_null() {
            assert_eq!(x["pass"], true, "{x}");
        }
    }
    let b = run_experiment(&state, "ex3", &md);
    let steps = |r: &Value| -> Vec<(String, String)> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().into(),
                    s["written"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(
        steps(&a),
        steps(&b),
        "the same checkpoint gives the same steps"
    );
    const TOLERANCE: f64 = 0.15;
    let kill3b = avail(&b, "write", "kill");
    assert!(
        (kill3 - kill3b).abs() <= TOLERANCE,
        "two runs from one checkpoint differ by more than {TOLERANCE}: {kill3} and {kill3b}"
    );
    println!(
        "etcd-member-down, 3 members: write availability while down {kill3:.3} and {kill3b:.3}"
    );

    // A partition of one member from the others.
    let pf = shipped(tmp.path(), "controller-partition", Some("base"));
    let p = run_experiment(&state, "ex3", &pf);
    let detail = p["steps"][0]["detail"].as_str().unwrap();
    let isolated = detail
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap()
        .to_string();
    assert!(!isolated.contains(','), "{detail}");
    let cut = window(&p, "leader", "cut");
    let (from, to) = (
        cut["from_s"].as_f64().unwrap(),
        cut["to_s"].as_f64().unwrap(),
    );
    let late: Vec<&str> = p["probes"]["leader"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let t = s["t_s"].as_f64().unwrap();
            s["ok"] == true && t > from + 8.0 && t < to
        })
        .map(|s| s["value"].as_str().unwrap())
        .collect();
    assert!(!late.is_empty(), "no leader samples late in the partition");
    assert!(
        late.iter().all(|l| *l != isolated),
        "the isolated member {isolated} still leads: {late:?}"
    );
    assert!(
        avail(&p, "write", "cut") >= 0.7,
        "the majority did not keep writing"
    );
    assert_eq!(p["history"]["verdict"], "ok", "{}", p["history"]);

    // Killed in the middle of its faults: recorded, shown, undone by the next run.
    let mf = faults_file(tmp.path());
    kill_run_at(&state, "ex3", &mf, "last: ");
    let o = kthw(&state, &["status", "ex3"]);
    assert!(!o.status.success(), "status must fail with faults in force");
    let out = text(&o.stdout);
    assert!(
        out.contains("FAULTS IN FORCE") && out.contains("c2 paused"),
        "{out}"
    );
    assert!(sh("nft list tables").contains("kthw_ex3_faults"));
    let quick = tmp.path().join("quick.yaml");
    std::fs::write(
        &quick,
        "name: quick\nrequires: {phase: etcd, controllers: 1}\nduration: 3s\nprobes: [{kind: etcd-leader}]\n",
    )
    .unwrap();
    let o = kthw(
        &state,
        &["experiment", "run", "ex3", quick.to_str().unwrap()],
    );
    assert!(o.status.success(), "the next run failed");
    let err = text(&o.stderr);
    for f in ["partition", "c2 paused", "etcd down on c3"] {
        assert!(
            err.contains(&format!("undone from an earlier run: {f}")),
            "{f} not undone:\n{err}"
        );
    }
    assert!(!sh("nft list tables").contains("kthw_ex3_faults"));
    assert!(!sh("virsh -c qemu:///system list --state-paused --name").contains("ex3-"));
    let o = kthw(&state, &["status", "ex3"]);
    assert!(o.status.success(), "status after the cleanup is not OK");

    // Killed again, then destroyed: nothing left, partition table included.
    kill_run_at(&state, "ex3", &mf, "last: ");
    assert!(sh("nft list tables").contains("kthw_ex3_faults"));
    destroy_leaves_nothing(&state, &plan3);
    assert!(!sh("nft list tables").contains("kthw_ex3_faults"));
    // The reports outlive the lab.
    for r in [&a, &b, &p] {
        let id = r["manifest"]["run_id"].as_str().unwrap();
        assert!(
            state
                .join("reports/ex3")
                .join(id)
                .join("report.json")
                .is_file(),
            "{id} was lost"
        );
    }

    // ------------------------------------------------------------ 2 controllers
    let f2 = scenario(tmp.path(), "ex2", 2);
    let plan2 = plan_json(&state, f2.to_str().unwrap());
    let o = kthw(&state, &["create", f2.to_str().unwrap(), "--until", "etcd"]);
    assert!(o.status.success(), "create ex2 failed");
    assert!(kthw(&state, &["checkpoint", "save", "ex2", "base"])
        .status
        .success());
    let md2 = shipped(tmp.path(), "etcd-member-down", None);
    let c = run_experiment(&state, "ex2", &md2);
    let kill2 = avail(&c, "write", "kill");
    assert!(kill2 <= 0.2, "writes went on without quorum: {kill2}");
    let rec = window(&c, "write", "restart")["recovery_s"].as_f64();
    assert!(
        rec.is_some_and(|r| r < 15.0),
        "no recovery after the restart: {rec:?}"
    );
    assert_eq!(c["history"]["verdict"], "ok", "{}", c["history"]);
    println!("etcd-member-down: write availability while one member is down: 3 members {kill3:.3}, 2 members {kill2:.3}");
    let o = kthw(
        &state,
        &[
            "experiment",
            "compare",
            a["manifest"]["run_id"].as_str().unwrap(),
            c["manifest"]["run_id"].as_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    let cmp = text(&o.stdout);
    assert!(
        cmp.contains("(3 controllers") && cmp.contains("(2 controllers"),
        "{cmp}"
    );
    let o = kthw(
        &state,
        &[
            "experiment",
            "show",
            c["manifest"]["run_id"].as_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    assert!(text(&o.stdout).contains("history: ok"));
    // A restore after the lab was stopped and started again.
    etcdctl(&state, "ex2", "c1", "put kthw-after-base written");
    let t = Instant::now();
    assert!(
        kthw(&state, &["stop", "ex2"]).status.success(),
        "stop failed"
    );
    println!("stop of 2 controllers: {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        kthw(&state, &["start", "ex2"]).status.success(),
        "start failed"
    );
    assert!(etcdctl(&state, "ex2", "c2", "get kthw-after-base").contains("written"));
    let o = kthw(&state, &["checkpoint", "restore", "ex2", "base"]);
    assert!(o.status.success(), "restore after stop and start failed");
    assert_eq!(
        etcdctl(&state, "ex2", "c2", "get kthw-after-base").trim(),
        ""
    );
    assert!(
        kthw(&state, &["status", "ex2"]).status.success(),
        "status after the restore"
    );
    let dir = state
        .join("labs/ex2/experiments")
        .join(c["manifest"]["run_id"].as_str().unwrap());
    let svg = std::fs::read_to_string(dir.join("timeline.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("write"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    destroy_leaves_nothing(&state, &plan2);
}
