//! The real phases this build can run, in pipeline order. Each phase module adds
//! its action here as it lands; the runner reports any phase missing from this list.

use super::Action;
use crate::plan::LabPlan;

/// Options that reach the phases from the command line.
#[derive(Debug, Clone)]
pub struct PhaseOptions {
    pub connect: String,
    pub state_dir: std::path::PathBuf,
}

pub fn actions(_plan: &LabPlan, _opts: &PhaseOptions) -> Vec<Box<dyn Action>> {
    Vec::new()
}

/// Everything that removes a lab's things, consumers first.
pub fn removers(_opts: &PhaseOptions) -> Vec<Box<dyn super::teardown::Remover>> {
    Vec::new()
}
