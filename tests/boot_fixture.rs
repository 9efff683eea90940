//! Shared fixture of the boot tests: plans built from scenario text through the real
//! loader and planner. Included by the boot*/vm* tests with `#[path]`; also compiled
//! on its own (then it has no tests).
#![allow(dead_code)]

use std::path::Path;

use kthw_lab::plan::{plan, LabPlan};
use kthw_lab::scenario::{load_str, HostLimits, Sources};

/// A small lab: controllers m1.. and workers n1.. on 10.200.1.0/24 (bridge br0).
pub fn scenario_text(lab: &str, controllers: u32, workers: u32, memory_mib: u64) -> String {
    let names = |p: &str, n: u32| {
        (1..=n)
            .map(|i| format!("{p}{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (cn, wn) = (names("m", controllers), names("n", workers));
    format!(
        "name: {lab}\n\
         network: default\n\
         image: kthw-debian12\n\
         accelerator: tcg\n\
         ssh_user: kthw\n\
         controllers:\n\
         \x20 count: {controllers}\n\
         \x20 names: [{cn}]\n\
         \x20 vcpus: 1\n\
         \x20 memory_mib: {memory_mib}\n\
         \x20 disk_gib: 4\n\
         \x20 first_ip: 10.200.1.10\n\
         workers:\n\
         \x20 count: {workers}\n\
         \x20 names: [{wn}]\n\
         \x20 vcpus: 1\n\
         \x20 memory_mib: {memory_mib}\n\
         \x20 disk_gib: 4\n\
         \x20 first_ip: 10.200.1.20\n\
         load_balancer:\n\
         \x20 name: lb\n\
         \x20 address: 10.200.1.15\n"
    )
}

pub fn lab_plan(
    lab: &str,
    controllers: u32,
    workers: u32,
    memory_mib: u64,
    state_dir: &Path,
) -> LabPlan {
    let text = scenario_text(lab, controllers, workers, memory_mib);
    let s = load_str(
        &text,
        "test-scenario.yaml",
        &Sources::default(),
        &HostLimits {
            memory_mib: 24 * 1024,
        },
    )
    .unwrap_or_else(|e| panic!("scenario: {e}: {:#?}", e.diagnostics));
    plan(&s, &text, state_dir)
}
