//! The agent: on every host, runs the units the cluster assigns to it.
//!
//! * [`reconcile`]: desired unit states against what systemd reports, turned
//!   into an ordered list of actions. Pure, so every rule is unit-tested.

pub mod reconcile;
