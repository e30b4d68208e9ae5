//! locksmith-style reboot coordination: hosts that need a reboot take turns,
//! and move their units away before they go down.
//!
//! * [`semaphore`]: the reboot semaphore as pure operations on one value, which
//!   the cluster stores under one key and changes only by compare-and-swap
//!   (the transactions are in [`crate::registry::lock`]).
//! * [`window`]: reboot windows, durations and UTC dates, pure.
//! * [`step`]: what a host's coordinator does next, as a pure function.
//! * [`coordinator`]: the per-host loop inside `flotilla daemon` that gathers
//!   the facts and carries out each step.
//! * [`reboot`]: asking logind or systemd for the reboot, and the boot id.
//! * [`stale`]: freeing the slots of holders gone longer than `stale_after`.

pub mod coordinator;
pub mod reboot;
pub mod semaphore;
pub mod stale;
pub mod step;
pub mod window;
