//! The embedded Raft key-value store: the cluster's memory.
//!
//! Unit files, desired and current state, machine presence, claims and the
//! reboot semaphore all live here.
//!
//! * [`kv`]: the replicated state machine (revisions, transactions, leases,
//!   watch history). Deterministic: every member applies the same commands and
//!   reaches the same state.
//! * [`lessor`]: the leader's clock for leases: when each one runs out, and
//!   the expiries and checkpoints the leader proposes.
//! * [`node`]: THE Ready loop around raft-rs; [`runner`] runs it on a thread;
//!   [`watchers`]: its watchers, found by prefix for each applied event.
//! * [`storage`]: the Raft log and snapshots on redb, fsynced before any ack;
//!   [`snapshot`]: snapshots encoded and written off the Raft thread.
//! * [`transport`]: peer messages over TCP, and [`announce`]: members
//!   telling each other their membership so one behind still reaches all; [`server`], [`protocol`] and
//!   [`client`]: the client port; [`listener`]: what both listeners share
//!   (mutual TLS, connection and frame limits).
//! * [`limits`]: what one request may ask, and the store quota (no-space alarm).
//! * [`member`]: what a valid member name and address are.
//! * [`codec`]: versioned encodings on disk and on the wire.
//! * [`backup`]: backup files, restoring one into a new cluster, and forcing
//!   a new cluster from a survivor's disk.

pub mod announce;
pub mod backup;
pub mod client;
pub mod codec;
pub mod keys;
pub mod kv;
pub mod lessor;
pub mod limits;
pub mod listener;
pub mod log;
pub mod member;
pub mod node;
pub mod protocol;
pub mod runner;
pub mod server;
pub mod snapshot;
mod sockets;
pub mod storage;
pub mod transport;
pub mod watchers;
