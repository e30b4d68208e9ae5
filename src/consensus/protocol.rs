//! The client protocol: what the CLI, agents and benchmarks send a member.
//!
//! Length-prefixed frames (see [`super::codec`]) holding a versioned
//! [`Request`] and answered with one [`Response`]; a `Watch` turns the
//! connection into a stream of `Events` frames until the client hangs up
//! (or, for `WatchRequireLeader`, until the member has no leader).
//! While a watch has nothing to say, the member sends an empty `Events`
//! frame every [`WATCH_HEARTBEAT`], so a client can tell a quiet watch from a
//! member that went silent (cut off or powered off: no reset ever comes).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kv::{Command, Event, KeyValue, Outcome, Revision};
use super::limits::Refused;
use super::node::{LeaseRenewal, RequestError, Status};

/// How often a member sends an empty `Events` frame on an idle watch.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a client waits on a silent watch before it gives the member up
/// and resumes the watch on another.
pub const WATCH_SILENCE: Duration = Duration::from_secs(3);

/// About how many bytes of events one `Events` frame carries: a watch's
/// backlog (up to the whole history) goes out in frames of this size, never
/// one frame that could outgrow the frame limit and so never get through.
pub const WATCH_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// The most keys one `RangePage` answer carries, whatever the request asks:
/// a request's `limit` comes from the network and is clamped to this.
pub const PAGE_KEYS: u32 = 10_000;

/// About how many bytes of keys and values one `RangePage` answer carries:
/// a page is closed before a key that would take it past this (a page holds
/// at least one key), so an answer stays far below the frame limit however
/// large the store grows.
pub const PAGE_BYTES: usize = 8 * 1024 * 1024;

/// The most keys one `GetKeys` request may name: a request names them, so
/// the member refuses more rather than work through an unbounded list.
pub const GET_KEYS_MAX: usize = 1_024;

/// Splits events into batches of about `max_bytes` each, at revision
/// boundaries only (a client resumes a watch after the last revision it
/// received, so a batch MUST end with a whole revision): a batch is closed
/// before a revision that would start past `max_bytes`, so it exceeds that
/// by at most its last revision.
pub fn batches(events: Vec<Event>, max_bytes: usize) -> Vec<Vec<Event>> {
    let mut out = Vec::new();
    let mut batch: Vec<Event> = Vec::new();
    let mut bytes = 0;
    for event in events {
        let size = event.kv.key.len() + event.kv.value.len() + 64;
        let new_revision = batch
            .last()
            .is_some_and(|e| e.revision() != event.revision());
        if new_revision && bytes + size > max_bytes {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(event);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

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
    /// When each lease was last renewed, as the member asked saw it
    /// ([`super::node::Core::lease_renewals`]). Last, like `Snapshot`; a
    /// member of the first release cannot read it and answers `Invalid`.
    LeaseRenewals,
    /// One page of a `Range`: the keys past `after` (all from the first
    /// when `None`), in key order, at most `limit` of them (clamped to
    /// [`PAGE_KEYS`]) and about [`PAGE_BYTES`]. A whole prefix too large
    /// for one frame is read page by page
    /// ([`super::client::Client::range_all`]). Last, like `LeaseRenewals`:
    /// a member that predates it answers `Invalid` and hangs up.
    RangePage {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// Serve from this member's state without confirming leadership.
        serializable: bool,
        /// The last key of the previous page (exclusive start), if any.
        after: Option<String>,
        /// The most keys wanted (clamped to [`PAGE_KEYS`]; 0 counts as 1).
        limit: u32,
    },
    /// Several keys read at one point, in one round (one ReadIndex when
    /// linearizable), answered as a `Range` of the keys found: a start call
    /// of twenty units reads its twenty records at once instead of one
    /// round each. At most [`GET_KEYS_MAX`] keys, and an answer of at most
    /// about [`PAGE_BYTES`]; more is refused (`Invalid`). Last, like
    /// `RangePage`: a member that predates it answers `Invalid` and hangs up.
    GetKeys {
        /// The keys, each read on its own (no prefixes).
        keys: Vec<String>,
        /// Serve from this member's state without confirming leadership.
        serializable: bool,
    },
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
    Denied,
    /// The store is over its quota (the no-space alarm): writes that add
    /// data are refused until space is freed; nothing was changed. New
    /// variants go last, so older members' answers still decode.
    NoSpace,
}

/// A member's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The outcome of a command.
    Outcome(Outcome),
    /// Keys read, and the revision they were read at.
    Range {
        /// The keys: on the serving member, the store's own records
        /// (encoded as the records themselves, so the bytes are those of
        /// a `Vec<KeyValue>`, as older releases read them).
        kvs: Vec<Arc<KeyValue>>,
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
    /// A backup file's bytes. After the older variants, so their encodings
    /// do not change.
    Snapshot(Vec<u8>),
    /// The answer to `Request::LeaseRenewals`, lease by lease.
    LeaseRenewals(Vec<LeaseRenewal>),
    /// The answer to `Request::RangePage`. Last.
    RangePage {
        /// The page's keys, in key order: on the serving member the store's
        /// own records, as in `Range` (the same bytes as a `Vec<KeyValue>`).
        kvs: Vec<Arc<KeyValue>>,
        /// The revision this page was read at.
        revision: Revision,
        /// Whether keys follow the page's last one: ask again after it.
        more: bool,
    },
}

impl From<RequestError> for Response {
    fn from(e: RequestError) -> Self {
        let kind = match &e {
            RequestError::NoLeader => ErrorKind::NoLeader,
            RequestError::Unknown => ErrorKind::Unknown,
            RequestError::Stopped(_) => ErrorKind::Stopped,
            RequestError::Limit(Refused::NoSpace { .. }) => ErrorKind::NoSpace,
            RequestError::Invalid(_) | RequestError::NoSuchMember(_) | RequestError::Limit(_) => {
                ErrorKind::Invalid
            }
        };
        Response::Error {
            kind,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::codec;
    use crate::consensus::kv::{EventKind, KeyValue, KvStore};

    /// A range answer holding the store's own records encodes to the bytes
    /// of one holding copies (what older members send and read), and reads
    /// back as such; a read of one key finds that key only.
    #[test]
    fn range_answers_of_shared_records_are_the_same_bytes() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        enum Copied {
            Outcome(Outcome),
            Range {
                kvs: Vec<KeyValue>,
                revision: Revision,
            },
        }
        let mut kv = KvStore::default();
        for key in ["a", "ab", "abc", "b"] {
            kv.apply(&Command::put(key, format!("value of {key}"), None));
        }
        let shared: Vec<Arc<KeyValue>> = kv.range_shared("a", true).cloned().collect();
        assert_eq!(shared.len(), 3);
        let one: Vec<&str> = kv
            .range_shared("ab", false)
            .map(|r| r.key.as_str())
            .collect();
        assert_eq!(one, ["ab"]);
        assert_eq!(kv.range_shared("x", false).count(), 0);
        let copies: Vec<KeyValue> = kv.range("a").cloned().collect();
        let ours = codec::encode(&Response::Range {
            kvs: shared,
            revision: kv.revision(),
        });
        let theirs = codec::encode(&Copied::Range {
            kvs: copies.clone(),
            revision: kv.revision(),
        });
        assert_eq!(ours, theirs);
        match codec::decode::<Response>(&theirs).unwrap() {
            Response::Range { kvs, revision } => {
                assert_eq!(revision, kv.revision());
                let kvs: Vec<KeyValue> = kvs.into_iter().map(Arc::unwrap_or_clone).collect();
                assert_eq!(kvs, copies);
            }
            other => panic!("{other:?}"),
        }
    }

    fn event(revision: Revision, bytes: usize) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: format!("k{revision}"),
                value: vec![0; bytes],
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: None,
            },
        }
    }

    #[test]
    fn batches_stay_near_the_size_and_keep_revisions_whole() {
        let events = vec![
            event(1, 400),
            event(2, 400),
            event(2, 400),
            event(3, 2000),
            event(4, 10),
        ];
        let got: Vec<Vec<Revision>> = batches(events, 1000)
            .iter()
            .map(|b| b.iter().map(Event::revision).collect())
            .collect();
        // A batch is closed before a revision that would take it past the
        // size, never inside one.
        assert_eq!(got, [vec![1, 2, 2], vec![3], vec![4]]);
        assert!(batches(Vec::new(), 1000).is_empty());
    }
}
