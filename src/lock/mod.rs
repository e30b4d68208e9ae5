//! locksmith-style reboot coordination: hosts that need a reboot take turns.
//!
//! * [`semaphore`]: the reboot semaphore as pure operations on one value, which
//!   the cluster stores under one key and changes only by compare-and-swap.

pub mod semaphore;
