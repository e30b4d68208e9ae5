//! What the cluster stores about units and machines, and the operations on it.
//!
//! Every role meets here: the CLI submits and starts units, the scheduler on
//! the Raft leader writes proposals, agents claim them and report systemd's
//! states. Keeping the key layout ([`keys`]) and the records ([`records`]) in
//! one place means no role formats a key or a value on its own.
//!
//! * [`keys`]: one function per key family.
//! * [`records`]: the JSON values stored under those keys.
//! * [`ops`]: the user-facing operations (submit, start, stop, destroy, list).
//! * [`lock`]: the reboot semaphores and reboot marks, and what a machine's
//!   reboot coordinator reads about itself.

pub mod keys;
pub mod lock;
pub mod ops;
pub mod records;
