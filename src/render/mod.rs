//! Pure renderers: plan in, text out. Nothing here touches the host.

pub mod cloudinit;
pub mod domain;
pub mod encryption;
pub mod kubeconfig;
pub mod manifests;
pub mod units;
