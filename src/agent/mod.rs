//! The agent: on every host, runs the units the cluster assigns to it.
//!
//! * [`reconcile`]: desired unit states against what systemd reports, turned
//!   into an ordered list of actions. Pure, so every rule is unit-tested.
//! * [`systemd`]: the client for systemd's D-Bus API (link, reload, start,
//!   stop, unit states), over systemd's private socket or the system bus.

pub mod reconcile;
pub mod systemd;
