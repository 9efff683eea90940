//! kthw-lab: Kubernetes the Hard Way labs on one Linux host.
pub mod lb;
