//! Two labs side by side in one namespace (real VMs inside `scripts/netns-run`;
//! `#[ignore]`d as a real-VM test, which `make test` runs): distinct names, bridges and subnets, created at the same time
//! up to `routes` (etcd running, host routes to both pod ranges). `status` of each is
//! OK; destroying one leaves nothing of it and the other fully working (status,
//! SSH, its bridge, NAT table, balancer and host routes); then the other goes too
//! and nothing of either is left.

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use support::lab::{
    destroy_leaves_nothing, enter, kthw, plan_json, residue, sh, stand_in_uplink, state_dir,
};
use support::text;

/// (lab, bridge, third octet of its node subnet, second octet of its pod range)
const LABS: [(&str, &str, u8, u8); 2] = [("sa", "sbr0", 1, 233), ("sb", "sbr1", 2, 234)];

fn scenario(tmp: &Path, (lab, bridge, net, pods): (&str, &str, u8, u8)) -> PathBuf {
    let f = tmp.join(format!("{lab}.yaml"));
    std::fs::write(
        &f,
        format!(
            "name: {lab}\nnetwork:\n  bridge: {bridge}\n  subnet: 10.230.{net}.0/24\n  gateway: 10.230.{net}.1\n  uplink: upl0\naccelerator: auto\ncontrollers: {{count: 1, names: [c1], memory_mib: 512, disk_gib: 4}}\nworkers: {{count: 1, names: [w1], memory_mib: 512, disk_gib: 4}}\nload_balancer: {{name: api, address: 10.230.{net}.15}}\ncluster: {{pod_cidr: 10.{pods}.0.0/16, service_cidr: 10.{}.0.0/24}}\nfrom_image: [etcd, containerd, runc, cni-plugins]\n",
            pods + 10
        ),
    )
    .unwrap();
    f
}

fn status_ok(state: &Path, lab: &str) {
    let o = kthw(state, &["status", lab, "-o", "json"]);
    assert!(o.status.success(), "status of {lab} is not OK");
    let st: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["etcd_healthy"], true, "{st}");
    assert_eq!(st["last_phase"], "routes", "{st}");
}

fn works(state: &Path, lab: &str, plan: &Value) {
    status_ok(state, lab);
    for node in ["c1", "w1"] {
        let o = kthw(state, &["ssh", lab, node, "--", "hostname"]);
        assert!(o.status.success(), "ssh {lab} {node}");
        assert_eq!(text(&o.stdout).trim(), node);
    }
    let bridge = plan["network"]["bridge"].as_str().unwrap();
    assert!(sh(&format!("ip -o link show {bridge}")).contains(bridge));
    let table = plan["network"]["nft_table"].as_str().unwrap();
    assert!(
        sh("nft list tables").contains(table),
        "no nft table {table}"
    );
    assert!(kthw(state, &["lb", "status", lab]).status.success());
    let pod = plan["nodes"][1]["pod_cidr"].as_str().unwrap();
    let via = plan["nodes"][1]["ip"].as_str().unwrap();
    assert!(
        sh("ip route").contains(&format!("{pod} via {via}")),
        "host route to {lab}'s pods"
    );
}

#[test]
#[ignore = "real VMs: run by make test (--run-ignored all)"]
fn two_labs_side_by_side_and_destroying_one_leaves_the_other_working() {
    if !enter("two_labs_side_by_side_and_destroying_one_leaves_the_other_working") {
        return;
    }
    let t0 = Instant::now();
    stand_in_uplink();
    let tmp = tempfile::tempdir().unwrap();
    let state = state_dir(tmp.path());
    let files: Vec<String> = LABS
        .iter()
        .map(|l| scenario(tmp.path(), *l).to_str().unwrap().to_string())
        .collect();
    let plans: Vec<Value> = files.iter().map(|f| plan_json(&state, f)).collect();

    // Both at once: each create is its own process, as two users would run them.
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|f| {
                let state = &state;
                s.spawn(move || kthw(state, &["create", f, "--until", "routes"]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (o, (lab, ..)) in outs.iter().zip(LABS) {
        assert!(o.status.success(), "create {lab} failed");
    }
    let created = t0.elapsed().as_secs_f64();
    let list = text(&kthw(&state, &["list"]).stdout);
    assert!(list.contains("sa") && list.contains("sb"), "{list}");
    for (i, (lab, ..)) in LABS.iter().enumerate() {
        works(&state, lab, &plans[i]);
    }

    // One goes; the other keeps working.
    let s1 = destroy_leaves_nothing(&state, &plans[0]);
    works(&state, "sb", &plans[1]);
    let left = residue(&plans[1], &state);
    assert!(!left.is_empty(), "the residue check must see a running lab");

    let s2 = destroy_leaves_nothing(&state, &plans[1]);
    let left = residue(&plans[0], &state);
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        sh("virsh -q -c qemu:///system list --all --name").trim(),
        ""
    );
    println!(
        "both created in {created:.0} s; destroy sa {s1:.1} s, sb {s2:.1} s; whole test {:.0} s",
        t0.elapsed().as_secs_f64()
    );
}
