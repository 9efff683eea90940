//! Collisions between labs on one host, found before anything is created.

use std::path::{Path, PathBuf};

use kthw_lab::host::preflight::lab_conflicts;
use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::scenario::{load_str, HostLimits, Sources};

fn plan_of(text: &str) -> LabPlan {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let s = load_str(
        text,
        "s.yaml",
        &Sources { roots: vec![root] },
        &HostLimits { memory_mib: 65536 },
    )
    .unwrap_or_else(|e| panic!("{:#?}", e.diagnostics));
    plan(&s, text, Path::new("/var/lib/kthw-lab"))
}

fn shipped(stem: &str) -> LabPlan {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    plan_of(&std::fs::read_to_string(root.join(format!("scenarios/{stem}.yaml"))).unwrap())
}

#[test]
fn shipped_side_by_side_lab_coexists_with_the_default_one() {
    let a = shipped("2m2w");
    let b = shipped("side-by-side");
    assert_eq!(lab_conflicts(&a, std::slice::from_ref(&b)), vec![]);
    assert_eq!(lab_conflicts(&b, &[a]), vec![]);
}

#[test]
fn two_labs_on_the_same_network_collide_with_a_clear_message() {
    let a = shipped("2m2w");
    let b = shipped("3m3w");
    let found = lab_conflicts(&b, &[a]);
    let problems: Vec<&str> = found.iter().map(|f| f.problem.as_str()).collect();
    assert!(
        problems.contains(&"lab `k2m2w` already uses bridge br0"),
        "{problems:#?}"
    );
    assert!(
        problems.contains(&"lab `k2m2w` has node subnet 10.200.1.0/24, which overlaps this lab's node subnet 10.200.1.0/24"),
        "{problems:#?}"
    );
    assert!(
        problems.contains(&"lab `k2m2w` has pod range 10.100.0.0/16, which overlaps this lab's pod range 10.100.0.0/16"),
        "{problems:#?}"
    );
    assert!(found
        .iter()
        .all(|f| f.hint.contains("destroy `k2m2w` first")));
}

#[test]
fn a_pod_range_inside_another_labs_node_subnet_collides() {
    let a = shipped("side-by-side");
    let b = plan_of(
        "name: x\nnetwork: {bridge: br7, subnet: 10.77.0.0/24, gateway: 10.77.0.1}\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.77.0.15}\ncluster: {pod_cidr: 10.201.0.0/16, service_cidr: 10.34.0.0/24}\n",
    );
    let found = lab_conflicts(&b, &[a]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0].problem,
        "lab `side` has node subnet 10.201.1.0/24, which overlaps this lab's pod range 10.201.0.0/16"
    );
}

#[test]
fn service_ranges_may_repeat_across_labs() {
    let a = shipped("side-by-side");
    let b = plan_of(
        "name: x\nnetwork: {bridge: br7, subnet: 10.77.0.0/24, gateway: 10.77.0.1}\ncontrollers: {count: 1}\nworkers: {count: 1}\nload_balancer: {address: 10.77.0.15}\ncluster: {pod_cidr: 10.120.0.0/16, service_cidr: 10.33.0.0/24}\n",
    );
    assert_eq!(lab_conflicts(&b, &[a]), vec![]);
}
