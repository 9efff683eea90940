//! Side effects on the host, behind coarse traits in domain terms.

pub mod accel;
pub mod disks;
pub mod facts;
pub mod libvirt;
pub mod nat;
pub mod net;
pub mod preflight;
pub mod seed;
pub mod ssh;
