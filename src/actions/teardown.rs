//! Teardown: remove everything a lab owns, found by ownership markers (libvirt
//! metadata, the bridge's ifalias, the nft table name, the LB pid file), never only
//! from the plan, so half-built labs and labs whose state dir is gone go too.
//! Every remover runs even when an earlier one fails; then a residue check proves
//! what is left, and the state dir goes only when nothing is.

use std::time::Instant;

use super::Progress;
use crate::error::{Error, Result};
use crate::plan::LabPlan;

/// One kind of thing a lab owns.
pub trait Remover: Send + Sync {
    /// What it removes, e.g. "domains".
    fn what(&self) -> &'static str;
    /// Remove the lab's things; fine when already gone. Returns what was removed.
    fn remove(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>>;
    /// What of the lab's is still there (empty = clean).
    fn residue(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>>;
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct TeardownReport {
    pub removed: Vec<String>,
    pub residue: Vec<String>,
    pub failures: Vec<String>,
    /// What the failures' errors say to do (each once).
    #[serde(skip)]
    pub hints: Vec<String>,
    pub seconds: f64,
}

/// Run every remover (in order: they are listed consumers first — load balancer,
/// domains, disks, network), then check residue.
pub fn teardown(
    lab: &str,
    plan: Option<&LabPlan>,
    removers: &[Box<dyn Remover>],
    progress: &Progress,
) -> TeardownReport {
    let t0 = Instant::now();
    let mut report = TeardownReport::default();
    // Why each remover failed, so the residue check does not report the same cause
    // a second time (libvirt down fails both the same way).
    let mut failed: Vec<(&str, String)> = Vec::new();
    let hint = |report: &mut TeardownReport, e: &Error| {
        for h in e.hints() {
            if !report.hints.contains(&h) {
                report.hints.push(h);
            }
        }
    };
    for r in removers {
        let line = progress.line(r.what(), "removing");
        match r.remove(lab, plan) {
            Ok(items) => {
                line.done(&if items.is_empty() {
                    "nothing to remove".to_string()
                } else {
                    format!("removed {}", items.join(", "))
                });
                report.removed.extend(items);
            }
            Err(e) => {
                // The error at the end says why, once, with the others.
                line.fail("the error below says why");
                let why = chain(&e);
                report.failures.push(format!("{}: {why}", r.what()));
                hint(&mut report, &e);
                failed.push((r.what(), why));
            }
        }
    }
    for r in removers {
        match r.residue(lab, plan) {
            Ok(left) => report
                .residue
                .extend(left.into_iter().map(|x| format!("{}: {x}", r.what()))),
            Err(e) => {
                let why = chain(&e);
                if failed.iter().any(|(w, c)| *w == r.what() && *c == why) {
                    continue;
                }
                report
                    .failures
                    .push(format!("{} (checking what is left): {why}", r.what()));
                hint(&mut report, &e);
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

/// The error and its causes on one line, without the top-level "host provisioning
/// failed" the final error says once anyway.
fn chain(e: &Error) -> String {
    let mut s = match e {
        Error::Provision { what, .. } => what.clone(),
        other => other.to_string(),
    };
    let mut c = std::error::Error::source(e);
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

impl TeardownReport {
    pub fn clean(&self) -> bool {
        self.residue.is_empty() && self.failures.is_empty()
    }

    pub fn into_result(self, lab: &str) -> Result<TeardownReport> {
        if self.clean() {
            return Ok(self);
        }
        let mut problems = self.failures.clone();
        problems.extend(self.residue.iter().map(|r| format!("still there: {r}")));
        Err(Error::Provision {
            what: format!(
                "could not remove everything of lab `{lab}`: {}",
                problems.join("; ")
            ),
            hint: if self.hints.is_empty() {
                format!(
                    "fix the cause above and run `kthw-lab destroy {lab}` again; it removes only what the lab owns and is safe to repeat"
                )
            } else {
                format!(
                    "{}; then run `kthw-lab destroy {lab}` again: it removes only what the lab owns and is safe to repeat",
                    self.hints.join("; ")
                )
            },
            source: None,
        })
    }
}
