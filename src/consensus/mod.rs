//! The embedded Raft key-value store: the cluster's memory.
//!
//! Unit files, desired and current state, machine presence, claims and the
//! reboot semaphore all live here.
//!
//! * [`kv`]: the replicated state machine (revisions, transactions, leases,
//!   watch history). Deterministic: every member applies the same commands and
//!   reaches the same state.
//! * [`linearizable`]: checks recorded client histories for linearizability.

pub mod client;
pub mod codec;
pub mod keys;
pub mod kv;
pub mod linearizable;
pub mod log;
pub mod node;
pub mod protocol;
pub mod runner;
pub mod server;
mod sockets;
pub mod storage;
pub mod transport;
