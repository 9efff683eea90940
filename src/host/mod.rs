//! Side effects on the host, behind coarse traits in domain terms.

pub mod facts;
pub mod nat;
pub mod net;
pub mod preflight;
