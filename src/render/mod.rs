//! Pure renderers: plan in, text out. Nothing here touches the host.

pub mod cloudinit;
pub mod domain;
