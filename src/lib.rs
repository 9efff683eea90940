//! kthw-lab: Kubernetes the Hard Way labs on one Linux host.
//!
//! Data flow of `create`: load + validate a scenario ([`scenario`]), plan it
//! ([`plan`], pure), check the host, record the plan, then run idempotent phases.

pub mod cli;
pub mod commands;
pub mod error;
pub mod host;
pub mod plan;
pub mod render;
pub mod scenario;
pub mod state;
