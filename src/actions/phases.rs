//! The real phases this build can run, in pipeline order, and the removers that
//! undo them. Each phase is a thin adapter from the plan to a host module; the
//! runner reports any phase missing from the list.

use std::path::PathBuf;

use super::teardown::Remover;
use super::{Action, Phase, RunCtx};
use crate::error::{Error, Result};
use crate::host::net::{LinuxNet, NetError, NetHost, NetworkSpec};
use crate::plan::LabPlan;

/// Options that reach the phases from the command line.
#[derive(Debug, Clone)]
pub struct PhaseOptions {
    pub connect: String,
    pub state_dir: PathBuf,
}

pub fn actions(_plan: &LabPlan, opts: &PhaseOptions) -> Vec<Box<dyn Action>> {
    vec![Box::new(NetworkPhase {
        net: LinuxNet::new(&opts.state_dir),
    })]
}

/// Everything that removes a lab's things, consumers first.
pub fn removers(opts: &PhaseOptions) -> Vec<Box<dyn Remover>> {
    vec![Box::new(NetworkRemover {
        net: LinuxNet::new(&opts.state_dir),
    })]
}

pub(crate) fn net_error(e: NetError) -> Error {
    Error::Provision {
        what: "the lab network on the host".into(),
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

struct NetworkPhase {
    net: LinuxNet,
}

impl Action for NetworkPhase {
    fn phase(&self) -> Phase {
        Phase::Network
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let spec = NetworkSpec::from_plan(cx.plan);
        let line = cx.progress.line(&spec.bridge, "bridge, addresses, NAT");
        match self.net.ensure_network(&spec) {
            Ok(report) => {
                for w in &report.warnings {
                    cx.progress.println(&format!("warning: {w}"));
                }
                if let Some(u) = &report.uplink {
                    cx.note("uplink", u.clone());
                }
                line.done(if report.changed() {
                    "created"
                } else {
                    "already in place"
                });
                Ok(())
            }
            Err(e) => {
                line.fail(&e.to_string());
                Err(net_error(e))
            }
        }
    }
}

struct NetworkRemover {
    net: LinuxNet,
}

impl Remover for NetworkRemover {
    fn what(&self) -> &'static str {
        "network"
    }

    fn remove(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let r = self.net.remove_network(lab).map_err(net_error)?;
        let mut out: Vec<String> = r
            .bridges_removed
            .iter()
            .map(|b| format!("bridge {b}"))
            .collect();
        out.extend(r.tables_removed.iter().map(|t| format!("nft table {t}")));
        if !r.routes_removed.is_empty() {
            out.push(format!("{} pod routes", r.routes_removed.len()));
        }
        if r.ip_forward_restored {
            out.push("ip_forward restored to 0".into());
        }
        Ok(out)
    }

    fn residue(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let s = self.net.observe(lab).map_err(net_error)?;
        let mut out: Vec<String> = s
            .bridges
            .iter()
            .map(|b| format!("bridge {}", b.name))
            .collect();
        out.extend(s.tables.iter().map(|t| format!("nft table {t}")));
        Ok(out)
    }
}
