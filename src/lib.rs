//! flotilla: a fleet scheduler for systemd hosts.
//!
//! Users hand flotilla ordinary systemd unit files with an optional `[X-Fleet]`
//! section; the cluster keeps them running on the right machines. One binary
//! holds the daemon and the CLI.
//!
//! * [`units`]: the pure unit model: names, the unit-file parser, `[X-Fleet]`
//!   rules, hashing, which units may share a machine, the placement decision
//!   and the claim check. No I/O.
//! * [`consensus`]: the embedded Raft store; today its state machine.
//! * [`tls`]: the cluster CA, certificates naming a role, mutual TLS on the
//!   store's ports.
//! * [`agent`]: the per-host agent: presence, claims, systemd over D-Bus.
//! * [`registry`]: the cluster's records of units and machines, and every
//!   transaction on them: the user's, the scheduler's and each machine's.
//! * [`scheduler`]: on the Raft leader, proposes units to machines.
//! * [`lock`]: reboot coordination: the semaphore, reboot windows, and each
//!   host's reboot coordinator (drain make-before-break, reboot, release).
//! * [`config`]: the daemon's configuration loader (file, environment, flags).
//! * [`duration`]: durations as settings and messages write them (`1h30m`).
//! * [`daemon`]: `flotilla daemon`, wiring the roles together.
//! * [`allocator`]: the daemon gives the memory glibc's malloc has freed back to the kernel.
//! * [`health`]: `flotilla cluster health`: members, leader, lag, quorum, machines.
//! * [`metrics`]: the daemon's counters, gauges and latency histograms, as `/metrics` serves them.
//! * [`logging`]: log lines for journald or for people; the filter reloadable on SIGHUP.
//! * [`api`]: the daemon's HTTP JSON API, fleet's `/fleet/v1` with fleet's semantics
//!   and flotilla's `/flotilla/v1` (explain, drain, status, journal), on a unix socket and TCP.
//! * [`cli`]: the command line, as clap types.
//! * [`client`]: the CLI's HTTP client of the API (unix socket, http(s), ssh tunnel).
//! * [`cli_docs`]: shell completions and manual pages generated from [`cli`].
//! * [`verify`]: `flotilla verify`, checking unit files on disk.
//! * [`lab`]: `flotilla lab`, N real-systemd hosts on one machine for end-to-end tests.

pub mod agent;
pub mod allocator;
pub mod api;
pub mod cli;
pub mod cli_docs;
pub mod client;
pub mod config;
pub mod consensus;
pub mod daemon;
pub mod duration;
pub mod health;
pub mod lab;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod roles;
pub mod scheduler;
pub mod tls;
pub mod units;
pub mod verify;
