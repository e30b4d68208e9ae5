//! The client protocol: what the CLI, agents and benchmarks send a member.
//!
//! Length-prefixed frames (see [`super::codec`]) holding a versioned
//! [`Request`] and answered with one [`Response`]; a `Watch` turns the
//! connection into a stream of `Events` frames until the client hangs up
//! (or, for `WatchRequireLeader`, until the member has no leader).
//! While a watch has nothing to say, the member sends an empty `Events`
//! frame every [`WATCH_HEARTBEAT`], so a client can tell a quiet watch from a
//! member that went silent (cut off or powered off: no reset ever comes).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kv::{Command, Event, KeyValue, Outcome, Revision};
use super::node::{RequestError, Status};

/// How often a member sends an empty `Events` frame on an idle watch.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a client waits on a silent watch before it gives the member up
/// and resumes the watch on another.
pub const WATCH_SILENCE: Duration = Duration::from_secs(3);

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Propose a state change (put, delete, txn, lease operations).
    Command(Command),
    /// Read a key or a prefix.
    Range {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// Serve from this member's state without confirming leadership.
        serializable: bool,
    },
    /// Stream changes under `prefix` from revision `from` on.
    Watch {
        /// Key prefix.
        prefix: String,
        /// First revision wanted (the list's revision + 1).
        from: Revision,
    },
    /// The member's view of the cluster.
    Status,
    /// Add a member.
    MemberAdd {
        /// Its name.
        name: String,
        /// Its peer address.
        peer_addr: String,
    },
    /// Remove a member.
    MemberRemove {
        /// Its name.
        name: String,
    },
    /// A `Watch` the member ends with a `NoLeader` error when it has no
    /// leader (checked when it registers the watch and at each heartbeat),
    /// so the client resumes it on a member in the majority. etcd's
    /// require-leader watch. Last of the variants, so older clients' requests
    /// still decode.
    WatchRequireLeader {
        /// Key prefix.
        prefix: String,
        /// First revision wanted (the list's revision + 1).
        from: Revision,
    },
    /// A backup file of the state machine, read at a linearizable point
    /// ([`super::backup`]). After the older variants, so their encodings
    /// do not change.
    Snapshot,
}

/// Broad classes of failure, so a client can decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Nothing happened; retrying is safe.
    NoLeader,
    /// It may or may not have happened.
    Unknown,
    /// The member is stopping.
    Stopped,
    /// The request is wrong; retrying will not help.
    Invalid,
    /// A watch asked for history that is gone: list again.
    Compacted,
    /// The caller's identity may not make this request; nothing changed.
    /// Last of the variants, so older members' answers still decode.
    Denied,
}

/// A member's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The outcome of a command.
    Outcome(Outcome),
    /// Keys read, and the revision they were read at.
    Range {
        /// The keys.
        kvs: Vec<KeyValue>,
        /// The revision of the read.
        revision: Revision,
    },
    /// Events of whole revisions, in order.
    Events(Vec<Event>),
    /// The member's status.
    Status(Status),
    /// The request failed.
    Error {
        /// Whether retrying can help.
        kind: ErrorKind,
        /// What happened and what to do.
        message: String,
    },
    /// A backup file's bytes. Last, so older encodings do not change.
    Snapshot(Vec<u8>),
}

impl From<RequestError> for Response {
    fn from(e: RequestError) -> Self {
        let kind = match &e {
            RequestError::NoLeader => ErrorKind::NoLeader,
            RequestError::Unknown => ErrorKind::Unknown,
            RequestError::Stopped(_) => ErrorKind::Stopped,
            RequestError::Invalid(_) | RequestError::NoSuchMember(_) => ErrorKind::Invalid,
        };
        Response::Error {
            kind,
            message: e.to_string(),
        }
    }
}
