//! The replicated state machine: keys with revisions, transactions, leases and
//! a bounded history of changes for watches.
//!
//! Every member applies the same committed [`Command`]s in the same order and so
//! reaches the same state: nothing here reads a clock, a random source or the
//! environment. Time enters only through commands the leader proposes
//! ([`Command::LeaseExpire`], [`Command::LeaseCheckpoint`], decided by the
//! leader's [`super::lessor`]), so every member agrees on when a lease ended.
//!
//! Revisions work as in etcd: one global counter, bumped once by each command
//! that changes at least one key; every key records the revision that created it
//! and the one that last changed it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use imbl::{OrdSet, Vector};
use serde::{Deserialize, Serialize};

/// A point in the store's history; 0 means "before anything was written".
pub type Revision = u64;

/// Identifies a lease; 0 is never a valid id.
pub type LeaseId = u64;

/// How many change events the history keeps by default.
pub const DEFAULT_HISTORY_LIMIT: usize = 50_000;

/// One key and its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (empty for a delete event).
    #[serde(with = "super::codec::bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after creation).
    pub version: u64,
    /// The lease the key is attached to; the key vanishes with it.
    pub lease: Option<LeaseId>,
}

/// What a [`Compare`] looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Whether the key exists (only `Equal`/`NotEqual` make sense).
    Exists(bool),
    /// The key's value; a missing key compares as absent (never equal).
    Value(Vec<u8>),
    /// The key's mod revision; a missing key has 0.
    ModRevision(Revision),
    /// The key's create revision; a missing key has 0.
    CreateRevision(Revision),
    /// The key's version; a missing key has 0.
    Version(u64),
}

/// How a [`Compare`] relates the key to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// Equal to the target.
    Equal,
    /// Not equal to the target.
    NotEqual,
    /// Less than the target (numbers; values byte-wise).
    Less,
    /// Greater than the target (numbers; values byte-wise).
    Greater,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The relation.
    pub op: CompareOp,
    /// What it is compared with.
    pub target: Target,
}

impl Compare {
    /// Whether the compare holds for `kv`, its key as read (`None`: absent):
    /// the store's own test at apply time, so that a writer that read the
    /// keys in the same transaction knows which of its compares failed.
    pub fn holds_for(&self, kv: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ordering = match &self.target {
            Target::Exists(wanted) => kv.is_some().cmp(wanted),
            Target::Value(wanted) => match kv {
                // A missing key has no value: only NotEqual holds.
                None => return self.op == CompareOp::NotEqual,
                Some(kv) => kv.value.as_slice().cmp(wanted.as_slice()),
            },
            Target::ModRevision(r) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            Target::CreateRevision(r) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            Target::Version(v) => kv.map_or(0, |kv| kv.version).cmp(v),
        };
        match self.op {
            CompareOp::Equal => ordering == Ordering::Equal,
            CompareOp::NotEqual => ordering != Ordering::Equal,
            CompareOp::Less => ordering == Ordering::Less,
            CompareOp::Greater => ordering == Ordering::Greater,
        }
    }

    /// Holds while `key`'s mod revision is `revision` (0: the key is absent).
    pub fn revision_is(key: &str, revision: Revision) -> Compare {
        Compare {
            key: key.to_string(),
            op: CompareOp::Equal,
            target: Target::ModRevision(revision),
        }
    }

    /// Holds while `key` is exactly as `read` found it (`None`: still absent).
    pub fn unchanged(key: &str, read: Option<&KeyValue>) -> Compare {
        Compare::revision_is(key, read.map_or(0, |kv| kv.mod_revision))
    }

    /// Holds while `key` exists with exactly `value`.
    pub fn value_is(key: &str, value: Vec<u8>) -> Compare {
        Compare {
            key: key.to_string(),
            op: CompareOp::Equal,
            target: Target::Value(value),
        }
    }

    /// Holds while `key` exists.
    pub fn exists(key: &str) -> Compare {
        Compare {
            key: key.to_string(),
            op: CompareOp::Equal,
            target: Target::Exists(true),
        }
    }
}

/// One operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set a key, optionally attached to a lease.
    Put {
        /// The key.
        key: String,
        /// The new value.
        #[serde(with = "super::codec::bytes")]
        value: Vec<u8>,
        /// Attach to this lease (it must exist).
        lease: Option<LeaseId>,
    },
    /// Delete one key, or every key starting with `key` when `prefix` is set.
    Delete {
        /// The key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
    /// Read one key, or every key starting with `key` when `prefix` is set.
    Get {
        /// The key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
}

impl Op {
    /// Sets `key` with no lease: it stays until deleted.
    pub fn put(key: String, value: Vec<u8>) -> Op {
        Op::Put {
            key,
            value,
            lease: None,
        }
    }

    /// Sets `key` on `lease`: it vanishes when the lease ends.
    pub fn put_on_lease(key: String, value: Vec<u8>, lease: LeaseId) -> Op {
        Op::Put {
            key,
            value,
            lease: Some(lease),
        }
    }

    /// Deletes the one key `key`.
    pub fn delete(key: String) -> Op {
        Op::Delete { key, prefix: false }
    }
}

/// The result of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put; `prev` is the key before it, if it existed.
    Put {
        /// The previous key-value.
        prev: Option<KeyValue>,
    },
    /// A delete; the keys it removed.
    Delete {
        /// The removed keys, as they were.
        deleted: Vec<KeyValue>,
    },
    /// A read; the keys found, in key order.
    Get {
        /// The keys found.
        kvs: Vec<KeyValue>,
    },
}

/// A state change, as it is proposed to Raft and applied on every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// If every compare holds run `success`, else `failure`; atomically.
    /// A plain put or delete is a transaction without compares.
    Txn {
        /// Conditions, all of which must hold.
        compare: Vec<Compare>,
        /// Ops when they hold.
        success: Vec<Op>,
        /// Ops when one does not.
        failure: Vec<Op>,
    },
    /// Create a lease with this time to live.
    LeaseGrant {
        /// Time to live in milliseconds.
        ttl_ms: u64,
    },
    /// The lease's holder is alive: its full TTL starts again.
    ///
    /// Replicated (not leader-local as in etcd) so that whichever member leads
    /// next knows when each lease was last renewed. What a client sends; a
    /// member holds it until its next tick and proposes it with the others
    /// that arrived meanwhile, as one [`Command::LeaseKeepAlives`] once the
    /// whole group reads those.
    LeaseKeepAlive {
        /// The lease.
        id: LeaseId,
    },
    /// End a lease now, deleting its keys.
    LeaseRevoke {
        /// The lease.
        id: LeaseId,
    },
    /// The leader saw these leases run out; delete them and their keys.
    LeaseExpire {
        /// The leases.
        ids: Vec<LeaseId>,
    },
    /// The leader's view of how long each lease has left, so a new leader
    /// neither expires leases at once nor grants them a whole new TTL.
    LeaseCheckpoint {
        /// `(lease, remaining milliseconds)` pairs.
        remaining: Vec<(LeaseId, u64)>,
    },
    /// Many leases' holders are alive: each lease that exists gets its full
    /// TTL again, as [`Command::LeaseKeepAlive`] does for one. A member
    /// gathers the keep-alives its clients send during one tick into one of
    /// these ([`super::node::Core::propose_for`]), so a fleet's renewals
    /// cost a log entry per member per tick instead of one per renewal; its
    /// outcome ([`Outcome::LeasesKept`]) says, lease by lease, which were
    /// kept. Last of the variants: a release that does not know it cannot
    /// read it, so it is proposed only once every member can
    /// ([`super::node::KeepAliveBatches`]).
    LeaseKeepAlives {
        /// The leases, in the order their keep-alives arrived.
        ids: Vec<LeaseId>,
    },
}

impl Command {
    /// A transaction that puts one key.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> Self {
        Command::Txn {
            compare: Vec::new(),
            success: vec![Op::Put {
                key: key.into(),
                value: value.into(),
                lease,
            }],
            failure: Vec::new(),
        }
    }

    /// The leases this command uses: the one it keeps alive or revokes, or
    /// those its puts attach keys to (in either branch). Not the leases a
    /// grant makes, nor those the leader's lease clock expires or checkpoints.
    pub fn leases(&self) -> BTreeSet<LeaseId> {
        match self {
            Command::LeaseKeepAlive { id } | Command::LeaseRevoke { id } => BTreeSet::from([*id]),
            Command::LeaseKeepAlives { ids } => ids.iter().copied().collect(),
            Command::Txn {
                success, failure, ..
            } => success
                .iter()
                .chain(failure)
                .filter_map(|op| match op {
                    Op::Put { lease, .. } => *lease,
                    _ => None,
                })
                .collect(),
            Command::LeaseGrant { .. }
            | Command::LeaseExpire { .. }
            | Command::LeaseCheckpoint { .. } => BTreeSet::new(),
        }
    }

    /// A transaction that deletes one key, or a prefix.
    pub fn delete(key: impl Into<String>, prefix: bool) -> Self {
        Command::Txn {
            compare: Vec::new(),
            success: vec![Op::Delete {
                key: key.into(),
                prefix,
            }],
            failure: Vec::new(),
        }
    }
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    /// A put named a lease that does not exist (expired or revoked).
    #[error("lease {0:x} not found (it expired or was revoked); grant a new lease")]
    LeaseNotFound(LeaseId),
    /// A lease TTL of zero.
    #[error("a lease needs a TTL above zero")]
    ZeroTtl,
    /// An empty key.
    #[error("keys cannot be empty")]
    EmptyKey,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A transaction ran.
    Txn {
        /// Whether the compares held.
        succeeded: bool,
        /// One result per op of the branch that ran.
        results: Vec<OpResult>,
        /// The store's revision after the transaction.
        revision: Revision,
    },
    /// A lease was granted.
    LeaseGranted {
        /// Its id.
        id: LeaseId,
        /// Its TTL in milliseconds.
        ttl_ms: u64,
    },
    /// A lease was renewed.
    LeaseKept {
        /// Its id.
        id: LeaseId,
        /// Its TTL in milliseconds, counting from now.
        ttl_ms: u64,
    },
    /// Leases ended (revoke or expire); `ended` lists those that existed.
    LeasesEnded {
        /// Leases that existed and are now gone.
        ended: Vec<LeaseId>,
        /// The store's revision afterwards.
        revision: Revision,
    },
    /// A checkpoint was recorded.
    Checkpointed,
    /// The command was refused and changed nothing.
    Failed(KvError),
    /// A [`Command::LeaseKeepAlives`] ran: the leases it renewed, and those
    /// that no longer existed. Split per lease before any caller sees it.
    LeasesKept {
        /// `(lease, TTL in milliseconds)` of each lease renewed.
        kept: Vec<(LeaseId, u64)>,
        /// The leases named that did not exist (expired or revoked).
        missing: Vec<LeaseId>,
    },
}

/// Whether an event set or removed its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted (directly, by prefix, or with its lease).
    Delete,
}

/// One change to one key, as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, the key with an empty value and
    /// `mod_revision` set to the deleting revision.
    pub kv: KeyValue,
}

impl Event {
    /// The revision that made this change.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A watch asked for history the store no longer keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "revision {requested} was compacted (history starts after {compacted}); list the keys again and watch from that list's revision"
)]
pub struct Compacted {
    /// The revision asked for.
    pub requested: Revision,
    /// Every revision up to and including this one is gone.
    pub compacted: Revision,
}

/// A lease as the state machine knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// Time to live granted, in milliseconds.
    pub ttl_ms: u64,
    /// Time left at the last checkpoint (the TTL until the first one).
    pub remaining_ms: u64,
    /// Keys attached to it.
    pub keys: BTreeSet<String>,
    /// The agent (machine id) whose certificate granted it; `None` for a
    /// lease granted by a member, an admin, a caller without TLS, or by a
    /// release that did not record owners. Fixed at grant: an agent may keep
    /// alive, revoke and attach keys to its own leases only
    /// ([`crate::registry::access`]). Not in the snapshot's main body: it
    /// travels in the snapshot's extension ([`super::codec::encode_snapshot`]),
    /// which older releases skip.
    #[serde(skip)]
    pub owner: Option<String>,
}

/// How many bytes of change events the history keeps by default.
pub const DEFAULT_HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// The whole replicated state; serialisable as a snapshot.
///
/// The byte counts are not serialised (a snapshot's format is unchanged):
/// they are recounted when a store is decoded ([`KvState`]).
///
/// The keys are a persistent ordered set (`imbl::OrdSet`: a B-tree whose
/// nodes are shared between copies and copied only when a copy changes them)
/// of records behind `Arc`s, ordered and found by their key ([`Keys`]), and
/// the history a persistent vector (`imbl::Vector`) of
/// events behind `Arc`s. So a clone costs next to nothing: a member takes a consistent copy of a large state on its Raft
/// thread and encodes and writes the snapshot on another thread while the
/// original moves on ([`super::snapshot`]); the original then copies only the
/// nodes it changes while the copy lives. Both serialise as what they hold,
/// so the snapshot format is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "KvState")]
pub struct KvStore {
    revision: Revision,
    #[serde(serialize_with = "shared::keys")]
    keys: Keys,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    #[serde(serialize_with = "shared::seq")]
    history: Vector<Arc<Event>>,
    history_limit: usize,
    /// Every revision up to this one has left the history.
    compacted: Revision,
    /// Bytes of the keys and values held: what the quota counts.
    #[serde(skip)]
    data_bytes: u64,
    /// Bytes of the events the history holds.
    #[serde(skip)]
    history_bytes: usize,
    /// The most bytes of events the history keeps; a member's own setting.
    #[serde(skip)]
    history_byte_limit: usize,
}

/// One key's record in [`Keys`], ordered, compared and found by its key
/// alone: the key's text is kept once, in the record, where a map would
/// keep it a second time as the map's key (measured at 30,000 units by
/// `flotilla-bench store-memory`: 438 heap bytes per key with a map of
/// `String` to `Arc<KeyValue>`, for 139 bytes of key and value).
#[derive(Debug, Clone)]
struct Stored(Arc<KeyValue>);

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Stored {}

impl PartialOrd for Stored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

impl std::borrow::Borrow<str> for Stored {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

/// The keys of a [`KvStore`], in key order. Two are equal when they hold
/// the same records, values and revisions included (a [`Stored`] alone
/// compares by key).
#[derive(Debug, Clone, Default)]
struct Keys(OrdSet<Stored>);

impl PartialEq for Keys {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(other.0.iter()).all(|(a, b)| a.0 == b.0)
    }
}

impl Eq for Keys {}

/// Serde for the `Arc`s of [`KvStore`]: each written as the value it holds.
mod shared {
    use std::sync::Arc;

    use serde::Serializer;

    /// The keys as a map of key to record, as the snapshot format has them.
    pub fn keys<S: Serializer>(keys: &super::Keys, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(keys.0.iter().map(|stored| (&stored.0.key, &*stored.0)))
    }

    pub fn seq<T: serde::Serialize, S: Serializer>(
        seq: &imbl::Vector<Arc<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(seq.iter().map(|v| &**v))
    }
}

/// [`KvStore`] as a snapshot holds it: the fields it serialises, in order.
#[derive(Deserialize)]
struct KvState {
    revision: Revision,
    keys: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<Event>,
    history_limit: usize,
    compacted: Revision,
}

impl From<KvState> for KvStore {
    fn from(state: KvState) -> Self {
        KvStore {
            data_bytes: state.keys.values().map(data_size).sum(),
            history_bytes: state.history.iter().map(event_size).sum(),
            history_byte_limit: DEFAULT_HISTORY_BYTES,
            revision: state.revision,
            keys: Keys(
                state
                    .keys
                    .into_iter()
                    // The map's key is the record's: written from one place.
                    .map(|(key, kv)| Stored(Arc::new(KeyValue { key, ..kv })))
                    .collect(),
            ),
            leases: state.leases,
            next_lease: state.next_lease,
            history: state.history.into_iter().map(Arc::new).collect(),
            history_limit: state.history_limit,
            compacted: state.compacted,
        }
    }
}

/// The bytes one key takes against the quota.
fn data_size(kv: &KeyValue) -> u64 {
    (kv.key.len() + kv.value.len()) as u64
}

/// The bytes one event takes in the history (its key, value and metadata).
fn event_size(event: &Event) -> usize {
    event.kv.key.len() + event.kv.value.len() + 64
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::new(DEFAULT_HISTORY_LIMIT)
    }
}

impl KvStore {
    /// An empty store keeping about `history_limit` events for watches.
    pub fn new(history_limit: usize) -> Self {
        KvStore {
            revision: 0,
            keys: Keys::default(),
            leases: BTreeMap::new(),
            next_lease: 1,
            history: Vector::new(),
            history_limit: history_limit.max(1),
            compacted: 0,
            data_bytes: 0,
            history_bytes: 0,
            history_byte_limit: DEFAULT_HISTORY_BYTES,
        }
    }

    /// Bounds the history in bytes as well as in events (this member's
    /// setting; a store decoded from a snapshot starts with the default).
    /// Takes effect with the next change.
    pub fn set_history_bytes(&mut self, limit: usize) {
        self.history_byte_limit = limit.max(1);
    }

    /// Bytes of the keys and values held: what the store quota counts.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// How many leases exist.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The revision of the last change.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The oldest revision a watch can still start from.
    pub fn oldest_watchable(&self) -> Revision {
        self.compacted + 1
    }

    /// How many keys there are.
    pub fn key_count(&self) -> usize {
        self.keys.0.len()
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.keys.0.get(key).map(|stored| &*stored.0)
    }

    /// The records of [`KvStore::get`] and [`KvStore::range`] themselves,
    /// shared, not copied: what a range read served to a client holds until
    /// it is encoded (a deep copy of every key and value read cost the
    /// serving member 111–133 MiB per read of the whole registry at 100,000
    /// units, by heaptrack; issue 14).
    pub fn range_shared<'a>(
        &'a self,
        key: &'a str,
        prefix: bool,
    ) -> impl Iterator<Item = &'a Arc<KeyValue>> + 'a {
        use std::ops::Bound;
        let to = if prefix { None } else { Some(key) };
        self.keys
            .0
            .range::<_, str>((Bound::Included(key), Bound::Unbounded))
            .take_while(move |stored| match to {
                None => stored.0.key.starts_with(key),
                Some(exact) => stored.0.key == exact,
            })
            .map(|stored| &stored.0)
    }

    /// Every key starting with `prefix`, in key order.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        use std::ops::Bound;
        self.keys
            .0
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |stored| stored.0.key.starts_with(prefix))
            .map(|stored| &*stored.0)
    }

    /// Every key starting with `prefix` and past `after` (all of them when
    /// `None`), in key order: where the next page of a paged read starts.
    pub fn range_after<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<KeyValue>> + 'a {
        use std::ops::Bound;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.keys
            .0
            .range::<_, str>((start, Bound::Unbounded))
            .take_while(move |stored| stored.0.key.starts_with(prefix))
            .map(|stored| &stored.0)
    }

    /// One lease.
    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// All leases, by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The owner of every lease that has one: what a snapshot's extension
    /// carries ([`super::codec::encode_snapshot`]).
    pub fn lease_owners(&self) -> BTreeMap<LeaseId, String> {
        self.leases
            .values()
            .filter_map(|l| Some((l.id, l.owner.clone()?)))
            .collect()
    }

    /// Restores the owners a snapshot's extension carried; a lease it does
    /// not name keeps no owner.
    pub fn set_lease_owners(&mut self, owners: BTreeMap<LeaseId, String>) {
        for (id, owner) in owners {
            if let Some(lease) = self.leases.get_mut(&id) {
                lease.owner = Some(owner);
            }
        }
    }

    /// The events for keys starting with `prefix` from revision `from` on.
    pub fn events_since(&self, prefix: &str, from: Revision) -> Result<Vec<Event>, Compacted> {
        if from <= self.compacted {
            return Err(Compacted {
                requested: from,
                compacted: self.compacted,
            });
        }
        let start = self
            .history
            .binary_search_by(|e| match e.revision() < from {
                true => std::cmp::Ordering::Less,
                false => std::cmp::Ordering::Greater,
            })
            .unwrap_or_else(|at| at);
        Ok(self
            .history
            .skip(start)
            .iter()
            .filter(|e| e.kv.key.starts_with(prefix))
            .map(|e| Event::clone(e))
            .collect())
    }

    /// Applies one committed command; returns its outcome and the events it made.
    pub fn apply(&mut self, command: &Command) -> (Outcome, Vec<Event>) {
        self.apply_for(command, None)
    }

    /// Applies one committed command proposed for the agent `agent` (its
    /// log entry says so): a lease it grants is that agent's.
    pub fn apply_for(&mut self, command: &Command, agent: Option<&str>) -> (Outcome, Vec<Event>) {
        let mut events = Vec::new();
        let outcome = match command {
            Command::Txn {
                compare,
                success,
                failure,
            } => self.txn(compare, success, failure, &mut events),
            Command::LeaseGrant { ttl_ms } => self.grant(*ttl_ms, agent),
            Command::LeaseKeepAlive { id } => match self.keep_alive(*id) {
                Some(ttl_ms) => Outcome::LeaseKept { id: *id, ttl_ms },
                None => Outcome::Failed(KvError::LeaseNotFound(*id)),
            },
            Command::LeaseKeepAlives { ids } => {
                let (mut kept, mut missing) = (Vec::new(), Vec::new());
                for id in ids {
                    match self.keep_alive(*id) {
                        Some(ttl_ms) => kept.push((*id, ttl_ms)),
                        None => missing.push(*id),
                    }
                }
                Outcome::LeasesKept { kept, missing }
            }
            Command::LeaseRevoke { id } => self.end_leases(&[*id], &mut events),
            Command::LeaseExpire { ids } => self.end_leases(ids, &mut events),
            Command::LeaseCheckpoint { remaining } => {
                for (id, left) in remaining {
                    if let Some(lease) = self.leases.get_mut(id) {
                        lease.remaining_ms = (*left).min(lease.ttl_ms);
                    }
                }
                Outcome::Checkpointed
            }
        };
        self.record(&events);
        (outcome, events)
    }

    /// Renews lease `id`: its full TTL is left again. Its TTL, or `None`
    /// when there is no such lease.
    fn keep_alive(&mut self, id: LeaseId) -> Option<u64> {
        let lease = self.leases.get_mut(&id)?;
        lease.remaining_ms = lease.ttl_ms;
        Some(lease.ttl_ms)
    }

    fn txn(
        &mut self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
        events: &mut Vec<Event>,
    ) -> Outcome {
        let succeeded = compare.iter().all(|c| self.holds(c));
        let ops = if succeeded { success } else { failure };
        if let Err(err) = self.check_ops(ops) {
            return Outcome::Failed(err);
        }
        let next = self.revision + 1;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Op::Put { key, value, lease } => self.put(key, value, *lease, next, events),
                Op::Delete { key, prefix } => OpResult::Delete {
                    deleted: self.delete(key, *prefix, next, events),
                },
                Op::Get { key, prefix } => OpResult::Get {
                    kvs: if *prefix {
                        self.range(key).cloned().collect()
                    } else {
                        self.get(key).cloned().into_iter().collect()
                    },
                },
            });
        }
        if !events.is_empty() {
            self.revision = next;
        }
        Outcome::Txn {
            succeeded,
            results,
            revision: self.revision,
        }
    }

    /// Refuses a branch before it changes anything, so a failed txn has no effect.
    fn check_ops(&self, ops: &[Op]) -> Result<(), KvError> {
        for op in ops {
            match op {
                Op::Put { key, .. } if key.is_empty() => return Err(KvError::EmptyKey),
                Op::Put {
                    lease: Some(id), ..
                } if !self.leases.contains_key(id) => return Err(KvError::LeaseNotFound(*id)),
                Op::Delete { key, prefix: false } if key.is_empty() => {
                    return Err(KvError::EmptyKey);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn holds(&self, compare: &Compare) -> bool {
        compare.holds_for(self.get(&compare.key))
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        revision: Revision,
        events: &mut Vec<Event>,
    ) -> OpResult {
        let prev = self.keys.0.get(key).map(|stored| stored.0.clone());
        if let Some(old) = prev.as_ref().and_then(|p| p.lease)
            && Some(old) != lease
            && let Some(l) = self.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        if let Some(id) = lease {
            self.leases
                .get_mut(&id)
                .expect("check_ops verified the lease exists")
                .keys
                .insert(key.to_string());
        }
        let kv = KeyValue {
            key: key.to_string(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        events.push(Event {
            kind: EventKind::Put,
            kv: kv.clone(),
        });
        self.data_bytes += data_size(&kv);
        self.data_bytes -= prev.as_ref().map_or(0, |p| data_size(p));
        self.keys.0.insert(Stored(Arc::new(kv)));
        OpResult::Put {
            prev: prev.map(Arc::unwrap_or_clone),
        }
    }

    fn delete(
        &mut self,
        key: &str,
        prefix: bool,
        revision: Revision,
        events: &mut Vec<Event>,
    ) -> Vec<KeyValue> {
        let doomed: Vec<String> = if prefix {
            self.range(key).map(|kv| kv.key.clone()).collect()
        } else {
            self.get(key).map(|kv| kv.key.clone()).into_iter().collect()
        };
        let mut deleted = Vec::with_capacity(doomed.len());
        for key in doomed {
            let removed = self.keys.0.remove(key.as_str());
            let kv = Arc::unwrap_or_clone(removed.expect("collected from the set").0);
            self.data_bytes -= data_size(&kv);
            if let Some(l) = kv.lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(&key);
            }
            events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.clone(),
                    value: Vec::new(),
                    create_revision: kv.create_revision,
                    mod_revision: revision,
                    version: 0,
                    lease: None,
                },
            });
            deleted.push(kv);
        }
        deleted
    }

    fn grant(&mut self, ttl_ms: u64, owner: Option<&str>) -> Outcome {
        if ttl_ms == 0 {
            return Outcome::Failed(KvError::ZeroTtl);
        }
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                id,
                ttl_ms,
                remaining_ms: ttl_ms,
                keys: BTreeSet::new(),
                owner: owner.map(str::to_string),
            },
        );
        Outcome::LeaseGranted { id, ttl_ms }
    }

    fn end_leases(&mut self, ids: &[LeaseId], events: &mut Vec<Event>) -> Outcome {
        let next = self.revision + 1;
        let mut ended = Vec::new();
        for id in ids {
            let Some(lease) = self.leases.remove(id) else {
                continue;
            };
            for key in &lease.keys {
                self.delete(key, false, next, events);
            }
            ended.push(*id);
        }
        if !events.is_empty() {
            self.revision = next;
        }
        Outcome::LeasesEnded {
            ended,
            revision: self.revision,
        }
    }

    /// Appends events to the history, dropping whole old revisions past
    /// either limit (events or bytes).
    fn record(&mut self, events: &[Event]) {
        self.history.extend(events.iter().cloned().map(Arc::new));
        self.history_bytes += events.iter().map(event_size).sum::<usize>();
        while self.history.len() > self.history_limit
            || self.history_bytes > self.history_byte_limit
        {
            let oldest = self.history[0].revision();
            // Never split a revision: a watcher resumes at revision boundaries.
            if oldest == self.revision {
                break;
            }
            while self.history.front().is_some_and(|e| e.revision() == oldest) {
                if let Some(gone) = self.history.pop_front() {
                    self.history_bytes -= event_size(&gone);
                }
            }
            self.compacted = oldest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut KvStore, key: &str, value: &str) -> Outcome {
        store.apply(&Command::put(key, value, None)).0
    }

    fn grant(store: &mut KvStore, ttl_ms: u64) -> LeaseId {
        match store.apply(&Command::LeaseGrant { ttl_ms }).0 {
            Outcome::LeaseGranted { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revisions_count_changes_and_keys_remember_them() {
        let mut s = KvStore::default();
        put(&mut s, "a", "1");
        put(&mut s, "b", "1");
        put(&mut s, "a", "2");
        assert_eq!(s.revision(), 3);
        let a = s.get("a").unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
        assert_eq!(a.value, b"2");
    }

    #[test]
    fn stores_are_equal_only_with_equal_records_and_a_key_is_found_by_its_text() {
        let mut one = KvStore::default();
        let mut two = KvStore::default();
        for (key, value) in [("/b", "1"), ("/a", "1"), ("/a/x", "1")] {
            put(&mut one, key, value);
            put(&mut two, key, value);
        }
        assert_eq!(one, two);
        put(&mut one, "/a", "2");
        put(&mut two, "/a", "3");
        assert_ne!(one, two, "same keys and revisions, other values");
        assert_eq!(one.get("/a").unwrap().value, b"2");
        assert_eq!(one.get("/a").unwrap().key, "/a");
        let keys: Vec<&str> = one.range("/a").map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/a", "/a/x"]);
        assert_eq!(one.range("").count(), 3);
        assert!(one.range("/c").next().is_none());
        let bytes = crate::consensus::codec::encode(&one);
        let decoded: KvStore = crate::consensus::codec::decode(&bytes).unwrap();
        assert_eq!(decoded, one);
        assert_eq!(decoded.get("/a/x").unwrap().key, "/a/x");
    }

    #[test]
    fn a_delete_of_nothing_does_not_bump_the_revision() {
        let mut s = KvStore::default();
        put(&mut s, "a", "1");
        s.apply(&Command::delete("missing", false));
        assert_eq!(s.revision(), 1);
        s.apply(&Command::delete("a", false));
        assert_eq!(s.revision(), 2);
        assert!(s.get("a").is_none());
    }

    #[test]
    fn prefix_range_and_delete() {
        let mut s = KvStore::default();
        for k in ["/u/a", "/u/b", "/ua", "/v/a"] {
            put(&mut s, k, "x");
        }
        let keys: Vec<_> = s.range("/u/").map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/u/a", "/u/b"]);
        let (outcome, events) = s.apply(&Command::delete("/u/", true));
        let Outcome::Txn {
            results, revision, ..
        } = outcome
        else {
            panic!()
        };
        assert_eq!(revision, 5, "one revision for the whole prefix delete");
        assert!(matches!(&results[0], OpResult::Delete { deleted } if deleted.len() == 2));
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.revision() == 5));
        assert_eq!(s.range("/u").count(), 1);
    }

    #[test]
    fn transactions_compare_then_run_one_branch_atomically() {
        let mut s = KvStore::default();
        put(&mut s, "gen", "1");
        let claim = |expected_rev| Command::Txn {
            compare: vec![
                Compare {
                    key: "gen".into(),
                    op: CompareOp::Equal,
                    target: Target::ModRevision(expected_rev),
                },
                Compare {
                    key: "claim".into(),
                    op: CompareOp::Equal,
                    target: Target::Exists(false),
                },
            ],
            success: vec![
                Op::Put {
                    key: "gen".into(),
                    value: b"2".to_vec(),
                    lease: None,
                },
                Op::Put {
                    key: "claim".into(),
                    value: b"m1".to_vec(),
                    lease: None,
                },
            ],
            failure: vec![Op::Get {
                key: "claim".into(),
                prefix: false,
            }],
        };
        let (outcome, _) = s.apply(&claim(1));
        assert!(matches!(
            outcome,
            Outcome::Txn {
                succeeded: true,
                revision: 2,
                ..
            }
        ));
        assert_eq!(s.get("gen").unwrap().mod_revision, 2);
        assert_eq!(
            s.get("claim").unwrap().mod_revision,
            2,
            "both writes share a revision"
        );
        // The same claim again: the generation moved on, so the else-branch runs.
        let (outcome, events) = s.apply(&claim(1));
        let Outcome::Txn {
            succeeded,
            results,
            revision,
        } = outcome
        else {
            panic!()
        };
        assert!(!succeeded);
        assert_eq!(revision, 2);
        assert!(events.is_empty());
        assert!(matches!(&results[0], OpResult::Get { kvs } if kvs[0].value == b"m1"));
    }

    #[test]
    fn compare_targets_and_operators() {
        let mut s = KvStore::default();
        put(&mut s, "k", "b");
        let holds = |s: &KvStore, op, target| {
            s.holds(&Compare {
                key: "k".into(),
                op,
                target,
            })
        };
        assert!(holds(&s, CompareOp::Equal, Target::Value(b"b".to_vec())));
        assert!(holds(&s, CompareOp::Greater, Target::Value(b"a".to_vec())));
        assert!(holds(&s, CompareOp::Less, Target::Value(b"c".to_vec())));
        assert!(holds(&s, CompareOp::Equal, Target::Version(1)));
        assert!(holds(&s, CompareOp::Equal, Target::CreateRevision(1)));
        assert!(holds(&s, CompareOp::Less, Target::ModRevision(2)));
        assert!(holds(&s, CompareOp::Equal, Target::Exists(true)));
        let missing = |op, target| {
            s.holds(&Compare {
                key: "nope".into(),
                op,
                target,
            })
        };
        assert!(missing(CompareOp::Equal, Target::Exists(false)));
        assert!(missing(CompareOp::Equal, Target::ModRevision(0)));
        assert!(!missing(CompareOp::Equal, Target::Value(Vec::new())));
        assert!(missing(CompareOp::NotEqual, Target::Value(Vec::new())));
    }

    #[test]
    fn a_put_with_a_missing_lease_changes_nothing() {
        let mut s = KvStore::default();
        let cmd = Command::Txn {
            compare: vec![],
            success: vec![
                Op::Put {
                    key: "a".into(),
                    value: vec![],
                    lease: None,
                },
                Op::Put {
                    key: "b".into(),
                    value: vec![],
                    lease: Some(42),
                },
            ],
            failure: vec![],
        };
        assert_eq!(s.apply(&cmd).0, Outcome::Failed(KvError::LeaseNotFound(42)));
        assert!(s.get("a").is_none());
        assert_eq!(s.revision(), 0);
    }

    #[test]
    fn leases_take_their_keys_with_them() {
        let mut s = KvStore::default();
        let lease = grant(&mut s, 3000);
        s.apply(&Command::put("/m/1", "up", Some(lease)));
        s.apply(&Command::put("/c/1", "x", Some(lease)));
        put(&mut s, "/keep", "x");
        assert_eq!(s.lease(lease).unwrap().keys.len(), 2);
        let (outcome, events) = s.apply(&Command::LeaseExpire {
            ids: vec![lease, 999],
        });
        assert_eq!(
            outcome,
            Outcome::LeasesEnded {
                ended: vec![lease],
                revision: 4
            }
        );
        assert_eq!(events.len(), 2);
        assert!(s.get("/m/1").is_none() && s.get("/c/1").is_none());
        assert!(s.get("/keep").is_some());
        assert!(s.lease(lease).is_none());
        // Expiring again (a late duplicate proposal) is harmless.
        let (outcome, _) = s.apply(&Command::LeaseExpire { ids: vec![lease] });
        assert_eq!(
            outcome,
            Outcome::LeasesEnded {
                ended: vec![],
                revision: 4
            }
        );
    }

    #[test]
    fn moving_a_key_to_another_lease_or_none_detaches_it() {
        let mut s = KvStore::default();
        let a = grant(&mut s, 1000);
        let b = grant(&mut s, 1000);
        s.apply(&Command::put("k", "1", Some(a)));
        s.apply(&Command::put("k", "2", Some(b)));
        assert!(s.lease(a).unwrap().keys.is_empty());
        s.apply(&Command::put("k", "3", None));
        assert!(s.lease(b).unwrap().keys.is_empty());
        s.apply(&Command::LeaseRevoke { id: b });
        assert_eq!(s.get("k").unwrap().value, b"3");
    }

    #[test]
    fn checkpoints_record_remaining_time_capped_at_ttl() {
        let mut s = KvStore::default();
        let id = grant(&mut s, 9000);
        assert_eq!(s.lease(id).unwrap().remaining_ms, 9000);
        s.apply(&Command::LeaseCheckpoint {
            remaining: vec![(id, 4000), (77, 1)],
        });
        assert_eq!(s.lease(id).unwrap().remaining_ms, 4000);
        s.apply(&Command::LeaseCheckpoint {
            remaining: vec![(id, 99_000)],
        });
        assert_eq!(s.lease(id).unwrap().remaining_ms, 9000);
        assert_eq!(
            s.apply(&Command::LeaseGrant { ttl_ms: 0 }).0,
            Outcome::Failed(KvError::ZeroTtl)
        );
    }

    #[test]
    fn history_serves_watches_by_prefix_and_revision() {
        let mut s = KvStore::default();
        put(&mut s, "/a/1", "x");
        put(&mut s, "/b/1", "x");
        put(&mut s, "/a/2", "x");
        s.apply(&Command::delete("/a/1", false));
        let events = s.events_since("/a/", 2).unwrap();
        let seen: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str(), e.revision()))
            .collect();
        assert_eq!(
            seen,
            [(EventKind::Put, "/a/2", 3), (EventKind::Delete, "/a/1", 4)]
        );
        assert!(s.events_since("/a/", 5).unwrap().is_empty());
    }

    #[test]
    fn history_is_bounded_and_says_compacted() {
        let mut s = KvStore::new(3);
        for i in 0..5 {
            put(&mut s, &format!("k{i}"), "x");
        }
        assert_eq!(s.oldest_watchable(), 3);
        let err = s.events_since("", 2).unwrap_err();
        assert_eq!(
            err,
            Compacted {
                requested: 2,
                compacted: 2
            }
        );
        assert!(err.to_string().contains("list the keys again"));
        assert_eq!(s.events_since("", 3).unwrap().len(), 3);
    }

    #[test]
    fn history_never_splits_a_revision() {
        let mut s = KvStore::new(2);
        put(&mut s, "/p/a", "x");
        put(&mut s, "/p/b", "x");
        put(&mut s, "/p/c", "x");
        // One revision deleting three keys: kept whole even though it exceeds the limit.
        s.apply(&Command::delete("/p/", true));
        assert_eq!(s.events_since("", 4).unwrap().len(), 3);
        assert_eq!(s.oldest_watchable(), 4);
    }

    #[test]
    fn identical_commands_give_identical_state_and_snapshots_round_trip() {
        let commands = vec![
            Command::LeaseGrant { ttl_ms: 500 },
            Command::put("a", "1", Some(1)),
            Command::put("b", "2", None),
            Command::LeaseCheckpoint {
                remaining: vec![(1, 100)],
            },
            Command::delete("b", false),
            Command::LeaseExpire { ids: vec![1] },
        ];
        let mut one = KvStore::default();
        let mut two = KvStore::default();
        for c in &commands {
            assert_eq!(one.apply(c), two.apply(c));
        }
        assert_eq!(one, two);
        let bytes = postcard::to_stdvec(&one).unwrap();
        let restored: KvStore = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(restored, one);
    }

    #[test]
    fn the_history_is_bounded_in_bytes_and_byte_counts_survive_a_snapshot() {
        let mut s = KvStore::new(1000);
        s.set_history_bytes(4 * 1024);
        for i in 0..10 {
            put(&mut s, &format!("k{i}"), &"x".repeat(1000));
        }
        assert!(s.history.len() <= 4, "{} events kept", s.history.len());
        assert!(s.oldest_watchable() > 1);
        assert_eq!(s.events_since("", s.revision()).unwrap().len(), 1);
        assert_eq!(s.data_bytes(), 10 * (2 + 1000));
        s.apply(&Command::delete("k0", false));
        assert_eq!(s.data_bytes(), 9 * (2 + 1000));
        let bytes = crate::consensus::codec::encode(&s);
        let decoded: KvStore = crate::consensus::codec::decode(&bytes).unwrap();
        assert_eq!(decoded.data_bytes(), s.data_bytes());
        assert_eq!(decoded.history_bytes, s.history_bytes);
    }
}
