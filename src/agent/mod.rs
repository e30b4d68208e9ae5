//! The agent: on every host, runs the units the cluster assigns to it.
//!
//! It speaks to the store only in the registry's terms
//! ([`crate::registry::machine`]: presence, claims, releases, reports) and to
//! systemd only through [`execute::Host`], over a [`backend::Backend`].
//!
//! * [`run`]: the loop: what wakes the agent and what it does each time.
//! * [`presence`]: join, keep the lease alive, fence, leave.
//! * [`pass`]: one pass: claim, bring systemd to the claims, release.
//! * [`backend`]: the seam to the service manager: what the agent asks of
//!   systemd, as a trait ([`systemd`] implements it over D-Bus; the scale
//!   simulator swaps in a model).
//! * [`execute`]: this host's systemd and unit files; actions carried out.
//! * [`report`]: systemd's states of local units, written into the store.
//! * [`identity`]: machine id, instance id, host name, published address.
//! * [`files`]: the unit files the agent wrote, under /run/flotilla/units.
//! * [`notify`]: sd_notify without libsystemd (READY=1, STATUS=...).
//! * [`reconcile`]: desired unit states against what systemd reports, turned
//!   into an ordered list of actions, reload decision included. Pure, so
//!   every rule is unit-tested.
//! * [`systemd`]: the client for systemd's D-Bus API (link, reload, start,
//!   stop, unit states), over systemd's private socket or the system bus.

pub mod backend;
pub mod execute;
pub mod files;
pub mod identity;
pub mod notify;
pub mod pass;
pub mod presence;
pub mod reconcile;
pub mod report;
pub mod run;
pub mod systemd;
