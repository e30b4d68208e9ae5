//! The agent: on every host, runs the units the cluster assigns to it.
//!
//! * [`run`]: the loop: presence lease, claims, systemd, state reports.
//! * [`identity`]: machine id, instance id, host name, published address.
//! * [`claims`]: which proposals may be claimed together ([`crate::units::claim`], re-exported).
//! * [`files`]: the unit files the agent wrote, under /run/flotilla/units.
//! * [`notify`]: sd_notify without libsystemd (READY=1, STATUS=...).
//! * [`reconcile`]: desired unit states against what systemd reports, turned
//!   into an ordered list of actions. Pure, so every rule is unit-tested.
//! * [`systemd`]: the client for systemd's D-Bus API (link, reload, start,
//!   stop, unit states), over systemd's private socket or the system bus.

pub mod claims;
pub mod files;
pub mod identity;
pub mod notify;
pub mod reconcile;
pub mod run;
pub mod systemd;
