//! locksmith-style reboot coordination: hosts that need a reboot take turns,
//! and move their units away before they go down. The semaphore they take
//! turns on is a record of the store, so it lives in the registry
//! ([`crate::registry::semaphore`], its transactions in
//! [`crate::registry::lock`]).
//!
//! * [`settings`]: the coordinator's `reboot_*` settings, as the config builds them.
//! * [`window`]: reboot windows, durations and UTC dates, pure.
//! * [`step`]: what a host's coordinator does next, as a pure function.
//! * [`coordinator`]: the per-host loop inside `flotilla daemon` that gathers
//!   the facts and carries out each step.
//! * [`reboot`]: asking logind or systemd for the reboot, and the boot id.
//! * [`stale`]: freeing the slots of holders gone longer than `stale_after`.

pub mod coordinator;
pub mod reboot;
pub mod settings;
pub mod stale;
pub mod step;
pub mod window;
