//! What the cluster stores about units and machines, and the operations on it.
//!
//! Every role meets here: the CLI submits and starts units, the scheduler on
//! the Raft leader writes proposals, agents claim them and report systemd's
//! states. Keeping the key layout ([`keys`]) and the records ([`records`]) in
//! one place means no role formats a key or a value on its own.
//!
//! * [`keys`]: one function per key family.
//! * [`access`]: which identity may write which keys (the store's policy).
//! * [`records`]: the JSON values stored under those keys.
//! * [`bodies`]: unit bodies by hash, read and parsed once ([`BodyCache`]).
//! * [`unit_state`]: systemd's LOAD/ACTIVE/SUB and the questions asked of them.
//! * [`error`]: [`RegistryError`], why an operation changed nothing.
//! * [`index`]: the registry decoded (the one home of decoding its
//!   records), by name, kept per change by the member's copy or built from
//!   one read.
//! * [`ops`]: the user-facing operations (submit, start, stop, destroy, list).
//! * [`schedule`]: the scheduler's reads of the world and writes of proposals.
//! * [`view`]: the scheduler's world, read once and kept current by
//!   following the member's copy, sharing its index.
//! * [`machine`]: one machine's presence, claims, releases and reports.
//! * [`semaphore`]: the reboot semaphore as pure operations on its one
//!   stored value (who may take a slot, and when one is refused).
//! * [`lock`]: the reboot semaphores' compare-and-swap transactions, reboot
//!   marks, and what a machine's reboot coordinator reads about itself.
//! * [`liveness`]: live machines, and those whose presence lease expired.
//! * [`metadata`]: machine metadata set through the API, merged with the
//!   machine's own wherever metadata is read.
//! * [`reader`]: where the read operations read from: the store, or
//! * [`mirror`]: the member's one copy of the registry, kept by one watch,
//!   read by the HTTP API after a linearizable barrier and followed by the
//!   scheduler.

pub mod access;
pub mod bodies;
pub mod error;
pub mod index;
pub mod keys;
pub mod liveness;
pub mod lock;
pub mod machine;
pub mod metadata;
pub mod mirror;
pub mod ops;
pub mod per_machine;
pub mod reader;
pub mod records;
pub mod schedule;
pub mod semaphore;
pub mod unit_state;
pub mod view;

pub use crate::consensus::kv::{LeaseId, Revision};
pub use bodies::BodyCache;
pub use error::RegistryError;
pub use unit_state::UnitState;
