//! Reproducible experiments on a lab: scripted faults on a schedule, probes sampled
//! on a timeline from the host, a Jepsen-style history check of etcd, and reports
//! (JSON, SVG, terminal) that compare runs.
//!
//! - [`model`]: the experiment file (decoded with `file:line:col` diagnostics).
//! - [`run`]: the run itself; faults go through [`crate::faults`].
//! - [`probes`] and [`etcd`]: what is sampled, and how.
//! - [`history`]: the register's history check (pure).
//! - [`report`] and [`chart`]: metrics, summary, comparison and the SVG (pure).

pub mod chart;
pub mod etcd;
pub mod history;
pub mod model;
pub mod probes;
pub mod report;
pub mod run;

pub use model::{load_str, Experiment, ExperimentFileError};
pub use report::Report;

/// The experiments shipped in `experiments/`, compiled in so that `experiment list`
/// and `experiment run LAB NAME` work from any directory.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "etcd-member-down",
        include_str!("../../experiments/etcd-member-down.yaml"),
    ),
    (
        "controller-crash",
        include_str!("../../experiments/controller-crash.yaml"),
    ),
    (
        "controller-partition",
        include_str!("../../experiments/controller-partition.yaml"),
    ),
    (
        "slow-controller-link",
        include_str!("../../experiments/slow-controller-link.yaml"),
    ),
    (
        "api-failover",
        include_str!("../../experiments/api-failover.yaml"),
    ),
];

/// The text of an experiment: a file, or the name of a shipped one.
pub fn read(arg: &std::path::Path) -> std::io::Result<(String, String)> {
    match std::fs::read_to_string(arg) {
        Ok(t) => Ok((arg.display().to_string(), t)),
        Err(e) => {
            let name = arg.to_string_lossy();
            let name = name.trim_end_matches(".yaml");
            SHIPPED
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(n, t)| (format!("experiments/{n}.yaml (shipped)"), t.to_string()))
                .ok_or(e)
        }
    }
}
