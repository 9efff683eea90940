//! kthw-lab: Kubernetes the Hard Way labs on one Linux host.
//!
//! Data flow of `create`: load + validate a scenario ([`scenario`]), plan it
//! ([`plan`], pure), check the host, record the plan, then run idempotent phases.

pub mod actions;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod components;
pub mod error;
pub mod experiment;
pub mod faults;
pub mod host;
pub mod kube;
pub mod lb;
pub mod pki;
pub mod plan;
pub mod remote;
pub mod render;
pub mod scenario;
pub mod state;
