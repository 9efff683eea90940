//! Phases of `create`. The runner lives on main; this branch adds the bootstrap phases.

pub mod bootstrap;
