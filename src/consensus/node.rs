//! THE Ready loop: one Raft member, driven by ticks, messages and requests.
//!
//! [`Core`] owns the `RawNode`, the state machine and the disk, and nothing else
//! touches them. It is synchronous and deterministic: time arrives as a
//! millisecond count in [`Core::tick`], messages leave through the return value
//! of [`Core::handle_ready`], and answers go to callbacks. The daemon runs one
//! `Core` on its own thread ([`super::runner`]); the simulation runs several in
//! one process with a simulated network and disk.
//!
//! Each [`Core::handle_ready`] pass follows raft-rs's Ready contract:
//! 1. take `messages` (raft-rs would let a leader send them before its own
//!    append is durable, as etcd does; this loop does not: it returns them
//!    with the rest, after step 2), except a leader's heartbeats, which
//!    carry no entries and leave at once: every linearizable read waits for
//!    their answers;
//! 2. save the snapshot, entries and hard state in ONE disk batch (one fsync);
//! 3. take `persisted_messages` (votes and acks, which MUST wait for the fsync);
//! 4. serve reads whose ReadIndex came back and is already applied, then
//!    apply committed entries, answer their proposals, feed watchers (a
//!    membership change that removes this member, and what follows it, waits
//!    until after step 6: raft-rs cannot `advance` a leader that already
//!    left);
//! 5. serve reads whose ReadIndex is now applied;
//! 6. `advance`, and handle the light ready the same way.
//!
//! Messages leave through [`Core::handle_ready_with`]'s `send` at the step
//! boundaries above (a leader's heartbeats in step 1, the rest after step 3,
//! and after step 6 for the light ready), so no entry or vote is sent before
//! the pass's fsync, nor waits for the pass's apply; [`Core::handle_ready`]
//! collects them all and returns them at the end of the pass (the daemon's
//! driver, [`super::runner`], sends them at each step).
//!
//! A snapshot due at the end of a pass is, on a disk that keeps snapshots in
//! files, only a copy of the state handed to the driver as a
//! [`super::snapshot::Job`] to encode and write on another thread; the pass
//! after [`Core::snapshot_written`] records it and compacts the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{GetEntriesContext, RawNode, SnapshotStatus, StateRole};

use super::codec::{self, MemberInfo, SnapshotData};
use super::kv::{Command, Compacted, Event, KvError, KvStore, LeaseId, Outcome, Revision};
use super::lessor::{ClockBounds, Lessor};
use super::limits::{Limits, Refused};
use super::snapshot::Job;
use super::storage::{Batch, DiskError, Durable, LogStore};
use super::watchers::Watchers;
use crate::metrics::{EntryKind, METRICS};

/// A one-shot answer to a request, called exactly once.
pub type Callback<T> = Box<dyn FnOnce(T) + Send>;

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMsg {
    /// The events of one or more whole revisions, in order.
    Events(Vec<Event>),
    /// The watch cannot continue: its next revision left the history.
    Compacted(Compacted),
}

/// Serves a linearizable read once the state machine is current enough.
pub type ReadServe = Box<dyn for<'a> FnOnce(Result<&'a KvStore, RequestError>) + Send>;

/// A watcher's sink; returns false when the receiver is gone.
pub type WatchSink = Box<dyn FnMut(WatchMsg) -> bool + Send>;

/// Why a request got no answer from the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No leader is known: nothing was done. Retry after an election.
    #[error(
        "no leader is known (election in progress or quorum lost); nothing was changed, retry shortly"
    )]
    NoLeader,
    /// The leader changed, the request timed out after it was proposed, or
    /// the Raft thread exited with it in hand: it may or may not have been
    /// applied.
    #[error(
        "the request was not confirmed (leadership changed, it timed out or the member stopped); it may or may not have been applied, check before retrying"
    )]
    Unknown,
    /// The member is shutting down or its disk failed.
    #[error("this member is stopping: {0}")]
    Stopped(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A membership change named a member the cluster does not have.
    #[error("no member with raft id {0:x}; see flotilla member list")]
    NoSuchMember(u64),
    /// The request breaks a limit, or the store is over its quota; nothing
    /// was changed.
    #[error(transparent)]
    Limit(#[from] Refused),
}

/// The clock drift a leader allows for by default: 2% (NTP keeps real
/// clocks within a few hundred ppm; a VM's clock can stray further).
pub const DEFAULT_CLOCK_DRIFT_PER_MILLE: u64 = 20;

/// Bytes of applied entries between snapshots by default.
pub const DEFAULT_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;

/// Tuning for one member; times in ticks of `tick_ms`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This member's Raft id.
    pub id: u64,
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Ticks without a heartbeat before an election.
    pub election_ticks: usize,
    /// raft-rs waits a random `election_ticks..max_election_ticks` ticks before
    /// campaigning (default twice `election_ticks`, raft-rs's own default). It
    /// draws from the thread's OS-seeded generator, which would make `Core`
    /// nondeterministic; the simulation sets `election_ticks + 1`, so the draw
    /// is constant, and picks each member's `election_ticks` from its seed.
    pub max_election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (and log compactions).
    pub snapshot_entries: u64,
    /// Bytes of applied entries that also trigger a snapshot, once they
    /// also exceed the keys and values held: the log a restart reads back,
    /// and holds in memory, stays below about this or the state's own size,
    /// and a large state is not rewritten for every few MiB written.
    pub snapshot_bytes: u64,
    /// Applied log entries kept in memory when the disk can read older ones
    /// back ([`LogStore::reading_from`]); the rest of the log since the last
    /// snapshot is read from the disk when a lagging follower needs it.
    pub log_memory_entries: u64,
    /// Events kept for watches.
    pub history_limit: usize,
    /// Bytes of events kept for watches.
    pub history_bytes: usize,
    /// What a request may ask, and the store quota.
    pub limits: Limits,
    /// Ticks between lease checkpoints on the leader.
    pub checkpoint_ticks: u64,
    /// How much faster than real time this member's clock may run, in
    /// thousandths: the lessor stretches every span it measures by it.
    pub clock_drift_per_mille: u64,
    /// Ticks before a proposal or read without an answer is failed as unknown.
    pub request_ticks: u64,
    /// Where this start of the member begins numbering its requests. A
    /// proposal or read still in flight when the
    /// member stopped may come back after it restarts; numbering afresh from 1
    /// handed that old entry's outcome to a new request with the same number
    /// (found by tests/sim.rs). Defaults to the wall clock in microseconds;
    /// the simulation sets it from its seed.
    pub first_request: u64,
    /// A deliberate defect for the simulation's mutation runs (tests/sim.rs,
    /// RELIABILITY.md), which prove its checkers catch the bug it names.
    /// Always [`Mutation::None`] in the daemon.
    #[doc(hidden)]
    pub mutation: Mutation,
    /// How the keep-alives this member's clients send reach the log.
    pub keep_alive_batches: KeepAliveBatches,
}

/// How a member proposes its clients' lease keep-alives.
///
/// Every keep-alive is a log entry's worth of work for every member (an
/// append, an fsync, a replication round, an apply): a fleet renewing its
/// presence leases kept the leader busy doing nothing else. So a member
/// holds the keep-alives that arrive between two ticks and proposes them at
/// the next tick, before the lease clock runs: they share one Ready pass and
/// one fsync on every member and, once every member reads it, one
/// [`Command::LeaseKeepAlives`] entry. The lessor's guarantee is untouched:
/// a keep-alive is acknowledged only once its entry is applied, and the
/// lease clock counts from that apply, as before; a held keep-alive is one
/// not sent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepAliveBatches {
    /// Each keep-alive proposed when it arrives, one entry each (the first
    /// release's way).
    Immediate,
    /// Held until the next tick; then one [`Command::LeaseKeepAlives`]
    /// entry once every member of the group has announced that it reads
    /// them ([`super::keys::member_features`]), else one entry each.
    #[default]
    WhenAllMembersRead,
    /// Held until the next tick, then one entry for all of them (the
    /// simulation: its members all run this release).
    Always,
}

/// The most keep-alives one [`Command::LeaseKeepAlives`] entry carries (at
/// most 10 bytes each), and fewer when the request size limit is small.
const KEEP_ALIVES_PER_ENTRY: usize = 4096;

/// What a member announces, under [`super::keys::member_features`], when it
/// reads [`Command::LeaseKeepAlives`] entries.
pub const FEATURE_KEEP_ALIVE_BATCHES: &str = "lease-keep-alives";

/// Bugs the simulation can switch on in a [`Core`] to show that its checks
/// fail when the Ready contract is broken (see [`NodeConfig::mutation`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mutation {
    /// The Ready contract kept.
    #[default]
    None,
    /// Hand a pass's messages, votes and acknowledgements included, to
    /// `send` before the pass's fsync.
    SendBeforePersist,
    /// Go on as if saved when the disk refuses a pass's batch.
    IgnoreDiskErrors,
}

impl NodeConfig {
    /// Defaults for a member with this id and election timeout.
    pub fn new(id: u64, tick_ms: u64, election_ms: u64) -> Self {
        let election_ticks = (election_ms / tick_ms.max(1)).max(4) as usize;
        NodeConfig {
            id,
            tick_ms,
            election_ticks,
            max_election_ticks: election_ticks * 2,
            heartbeat_ticks: (election_ticks / 5).max(1),
            snapshot_entries: 100_000,
            snapshot_bytes: DEFAULT_SNAPSHOT_BYTES,
            log_memory_entries: super::storage::DEFAULT_LOG_MEMORY_ENTRIES,
            history_limit: super::kv::DEFAULT_HISTORY_LIMIT,
            history_bytes: super::kv::DEFAULT_HISTORY_BYTES,
            limits: Limits::default(),
            checkpoint_ticks: (1000 / tick_ms.max(1)).max(1),
            request_ticks: (10_000 / tick_ms.max(1)).max(10),
            clock_drift_per_mille: DEFAULT_CLOCK_DRIFT_PER_MILLE,
            first_request: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |since| since.as_micros() as u64),
            mutation: Mutation::None,
            keep_alive_batches: KeepAliveBatches::default(),
        }
    }

    fn election_ms(&self) -> u64 {
        self.election_ticks as u64 * self.tick_ms
    }
}

/// A member's view of the cluster, for `status` and the CLI.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// This member's id.
    pub id: u64,
    /// The leader's id, 0 when unknown.
    pub leader: u64,
    /// The current term.
    pub term: u64,
    /// Last applied log index.
    pub applied: u64,
    /// The state machine's revision.
    pub revision: Revision,
    /// Members by id.
    pub members: BTreeMap<u64, MemberInfo>,
    /// Where clients reach the leader, if it published that address.
    pub leader_client_addr: Option<String>,
    /// Keys in this member's state machine.
    pub keys: u64,
    /// Bytes this member's store takes on disk (log, database, snapshots).
    pub store_bytes: u64,
    /// The no-space alarm: the store is over its quota and refuses writes
    /// until space is freed (see [`super::limits`]).
    pub no_space: bool,
}

/// When a lease was last renewed, as one member saw it ([`Core::lease_renewals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRenewal {
    /// The lease.
    pub id: LeaseId,
    /// Its TTL in milliseconds.
    pub ttl_ms: u64,
    /// Milliseconds since this member applied its grant or last keep-alive;
    /// `None` when it has not applied one since it started (entries it
    /// read back from its own disk at start carry no time).
    pub renewed_ms_ago: Option<u64>,
}

/// Where this member's log stands, for metrics ([`Core::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The current term.
    pub term: u64,
    /// The highest index known committed.
    pub commit: u64,
    /// The highest index applied.
    pub applied: u64,
    /// The leader's id, 0 when unknown.
    pub leader: u64,
}

struct Pending {
    reply: Reply,
    deadline: u64,
}

/// Who waits for a proposal's outcome.
enum Reply {
    /// One caller.
    One(Callback<Result<Outcome, RequestError>>),
    /// The callers of the keep-alives one [`Command::LeaseKeepAlives`]
    /// carries, each with its lease: each gets its own lease's outcome.
    KeepAlives(Vec<(LeaseId, Callback<Result<Outcome, RequestError>>)>),
}

impl Reply {
    fn send(self, result: Result<Outcome, RequestError>) {
        match self {
            Reply::One(reply) => reply(result),
            Reply::KeepAlives(callers) => {
                let kept: HashMap<LeaseId, u64> = match &result {
                    Ok(Outcome::LeasesKept { kept, .. }) => kept.iter().copied().collect(),
                    _ => HashMap::new(),
                };
                for (id, reply) in callers {
                    reply(match &result {
                        Ok(Outcome::LeasesKept { .. }) => Ok(match kept.get(&id) {
                            Some(&ttl_ms) => Outcome::LeaseKept { id, ttl_ms },
                            None => Outcome::Failed(KvError::LeaseNotFound(id)),
                        }),
                        other => other.clone(),
                    });
                }
            }
        }
    }
}

/// Whether `message` is a leader's heartbeat (see [`Core::handle_ready_with`]).
fn is_heartbeat(message: &Message) -> bool {
    message.get_msg_type() == MessageType::MsgHeartbeat
}

struct PendingRead {
    /// The ReadIndex request it shares with every read that arrived in the
    /// same pass; `None` until the pass asks Raft ([`Core::ask_reads`]).
    ctx: Option<RequestId>,
    index: Option<u64>,
    /// When it was handed to Raft, and when its index came back (leadership
    /// confirmed): the two stages of [`METRICS`]' read timings. Wall clock
    /// for the metrics only; nothing decides by it.
    began: std::time::Instant,
    confirmed: Option<std::time::Instant>,
    /// The tick it was last asked of Raft: a leader that has not committed
    /// in its term yet drops ReadIndex requests, so they are asked again.
    asked: u64,
    deadline: u64,
    serve: ReadServe,
}

/// One Raft member. See the module documentation.
pub struct Core<D: Durable> {
    config: NodeConfig,
    raw: RawNode<LogStore>,
    store: LogStore,
    disk: D,
    kv: KvStore,
    members: BTreeMap<u64, MemberInfo>,
    /// The log index at which `members` is in force ([`Core::members_at`]).
    members_at: u64,
    conf_state: ConfState,
    applied: u64,
    leader: u64,
    ticks: u64,
    now_ms: u64,
    next_request: u64,
    pending: HashMap<RequestId, Pending>,
    reads: Vec<PendingRead>,
    watchers: Watchers,
    /// Leader only: the lease clock.
    lessor: Option<Lessor>,
    commit_dirty: bool,
    /// This member was removed from the group: it serves nothing more.
    removed: bool,
    /// Committed entries held back until the pass's `advance`.
    deferred: Vec<Entry>,
    /// A member was just added: snapshot and compact now, so the newcomer is
    /// sent a snapshot (which carries the membership) instead of a log that
    /// starts after the founding membership. The leader only: it is the one
    /// sending; see `snapshot_at` for the others.
    snapshot_now: bool,
    /// A member was added: this follower snapshots at this tick, so that it
    /// too holds a snapshot naming the newcomer should it lead (a leader
    /// whose snapshot lacks a member takes one at once). Staggered by member id,
    /// so the members do not all pause for a snapshot at once (a large
    /// store's snapshot cost a whole cluster three elections).
    snapshot_at: Option<u64>,
    /// Bytes of entries applied since the last snapshot.
    applied_bytes: u64,
    /// Keep-alives held until the next tick ([`KeepAliveBatches`]).
    keep_alives: Vec<(LeaseId, Callback<Result<Outcome, RequestError>>)>,
    /// When this member applied each lease's grant or last keep-alive, on
    /// its own clock ([`Core::lease_renewals`]).
    renewed_at: HashMap<LeaseId, u64>,
    /// The last log index its disk held at start: entries up to it are read
    /// back, not renewals happening now, and set no renewal time.
    replayed_until: u64,
    /// A snapshot for the driver to encode and write off this thread
    /// ([`Core::take_snapshot_job`]).
    snapshot_job: Option<Job>,
    /// The index of the snapshot being written off this thread, if one is:
    /// no other is started until [`Core::snapshot_written`] hears of it.
    snapshot_writing: Option<u64>,
}

/// Names one proposal or read of one member: the member's full Raft id in
/// the high half, its own counter in the low half, so no two members' ids
/// meet (a follower's proposal comes back to every member in the log).
type RequestId = u128;

fn ctx_bytes(id: RequestId) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// The request an entry or read state belongs to; `None` for entries that
/// answer nobody (the leader's empty entries, or ids of an older format).
fn ctx_id(bytes: &[u8]) -> Option<RequestId> {
    Some(RequestId::from_be_bytes(bytes.try_into().ok()?))
}

impl<D: Durable> Core<D> {
    /// Starts a member from whatever `disk` holds.
    ///
    /// A brand-new disk with `bootstrap` set founds a cluster of those members;
    /// with `bootstrap` empty the member waits to be added by an existing one.
    pub fn new(
        config: NodeConfig,
        disk: D,
        bootstrap: &BTreeMap<u64, MemberInfo>,
        logger: &slog::Logger,
    ) -> Result<Core<D>, DiskError> {
        let mut recovered = disk.load()?;
        let mut kv = KvStore::new(config.history_limit);
        kv.set_history_bytes(config.history_bytes);
        let mut members = BTreeMap::new();
        let mut members_at = 0;
        let mut applied = 0;
        let mut disk = disk;
        if recovered.is_empty() && !bootstrap.is_empty() {
            disk.save(&founding_batch(&kv, bootstrap))?;
            recovered = disk.load()?;
        }
        if let Some(snap) = &recovered.snapshot {
            let data = codec::decode_snapshot(&snap.data)?;
            kv = data.kv;
            kv.set_history_bytes(config.history_bytes);
            members = data.members;
            applied = snap.get_metadata().index;
            members_at = applied;
        }
        let conf_state = recovered.conf_state.clone();
        let last_on_disk = recovered.entries.last().map_or(0, |e| e.index);
        let replayed_until = recovered.hard_state.commit.max(last_on_disk);
        // Replay committed membership changes after the snapshot for the address book.
        for entry in &recovered.entries {
            if entry.index <= recovered.hard_state.commit
                && let Some((cc, info)) = decode_conf_change(entry)
            {
                apply_members(&mut members, &cc, info);
                members_at = entry.index;
            }
        }
        let mut store = LogStore::from_recovered(&recovered, disk.snapshot_dir().is_some())?;
        if let Some(reader) = disk.log_reader() {
            store = store.reading_from(reader, config.log_memory_entries);
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.max_election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        raft_config
            .validate()
            .map_err(|e| DiskError::Corrupt(format!("invalid raft config: {e}")))?;
        let raw = RawNode::new(&raft_config, store.clone(), logger)
            .map_err(|e| DiskError::Corrupt(e.to_string()))?;
        let first_request = config.first_request;
        // Restarted after its own removal: it still serves nothing. (A member
        // waiting to join has no membership at all yet.)
        let in_group = conf_state.voters.contains(&config.id)
            || conf_state.learners.contains(&config.id)
            || (conf_state.voters.is_empty() && conf_state.learners.is_empty());
        Ok(Core {
            config,
            raw,
            store,
            disk,
            kv,
            members,
            members_at,
            conf_state,
            applied,
            leader: 0,
            ticks: 0,
            now_ms: 0,
            next_request: first_request,
            pending: HashMap::new(),
            reads: Vec::new(),
            watchers: Watchers::default(),
            lessor: None,
            commit_dirty: false,
            snapshot_now: false,
            snapshot_at: None,
            applied_bytes: 0,
            keep_alives: Vec::new(),
            renewed_at: HashMap::new(),
            replayed_until,
            snapshot_job: None,
            snapshot_writing: None,
            removed: !in_group,
            deferred: Vec::new(),
        })
    }

    /// Gives a member that is joining an existing cluster the addresses of
    /// its peers, so it can answer them before it receives the membership.
    /// Ignored once the member knows the cluster from its own disk.
    pub fn set_address_book(&mut self, book: BTreeMap<u64, MemberInfo>) {
        if self.members.is_empty() {
            self.members = book;
        }
    }

    /// A fresh request id, never one still waiting for its answer (the
    /// counter wraps, and a restart may start it anywhere).
    fn request_id(&mut self) -> RequestId {
        loop {
            let id = RequestId::from(self.config.id) << 64 | RequestId::from(self.next_request);
            self.next_request = self.next_request.wrapping_add(1);
            if !self.pending.contains_key(&id) && !self.reads.iter().any(|r| r.ctx == Some(id)) {
                return id;
            }
        }
    }

    /// This member's view of the cluster.
    pub fn status(&self) -> Status {
        Status {
            id: self.config.id,
            leader: self.leader,
            term: self.raw.raft.term,
            applied: self.applied,
            revision: self.kv.revision(),
            members: self.members.clone(),
            leader_client_addr: self
                .members
                .get(&self.leader)
                .and_then(|m| self.kv.get(&super::keys::member_client_addr(&m.name)))
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            keys: self.kv.key_count() as u64,
            store_bytes: self.disk.size_bytes(),
            no_space: self.config.limits.over_quota(&self.kv),
        }
    }

    /// Term, commit and applied index and leader: what the daemon publishes
    /// as metrics after every pass, so cheap to read.
    pub fn progress(&self) -> Progress {
        Progress {
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            leader: self.leader,
        }
    }

    /// Members by Raft id: the address book the transport follows.
    pub fn members(&self) -> &BTreeMap<u64, MemberInfo> {
        &self.members
    }

    /// The log index at which [`Core::members`] is in force: that of the
    /// membership change (or snapshot) it was applied or replayed from; 0
    /// for a joining member's address book. Memberships of one cluster are
    /// ordered by it, which is how a member judges whether a peer's
    /// announced membership is newer than its own ([`super::announce`]).
    pub fn members_at(&self) -> u64 {
        self.members_at
    }

    /// The request limits and store quota this member enforces (the
    /// metrics publish the quota next to its use).
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The state machine, for serializable reads and tests.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// True when this member leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Why this member cannot take a request now, if it cannot.
    fn refusal(&self) -> Option<RequestError> {
        if self.removed {
            Some(RequestError::Stopped(
                "this member was removed from the cluster and serves no requests; \
                 use another member"
                    .into(),
            ))
        } else if self.leader == 0 {
            Some(RequestError::NoLeader)
        } else {
            None
        }
    }

    /// The voting members' Raft ids.
    pub fn voters(&self) -> &[u64] {
        &self.conf_state.voters
    }

    /// The learners' Raft ids: members that receive the log but do not vote
    /// until the leader promotes them.
    pub fn learners(&self) -> &[u64] {
        &self.conf_state.learners
    }

    /// When each lease was last renewed, as this member saw it: how
    /// `list-machines` and `cluster health` tell how long ago a machine was
    /// last heard of, without a log entry of the agent's own per renewal.
    /// Served from this member's state, like a serializable read: a member
    /// cut off from the quorum applies no keep-alives, so its leases look
    /// overdue, as they are from where it stands.
    pub fn lease_renewals(&self) -> Vec<LeaseRenewal> {
        self.kv
            .leases()
            .map(|lease| LeaseRenewal {
                id: lease.id,
                ttl_ms: lease.ttl_ms,
                renewed_ms_ago: self
                    .renewed_at
                    .get(&lease.id)
                    .map(|at| self.now_ms.saturating_sub(*at)),
            })
            .collect()
    }

    /// Notes the renewals (grants, keep-alives) and ends of leases that
    /// applying entry `index` made.
    fn note_renewals(&mut self, index: u64, outcome: &Outcome) {
        let now = self.now_ms;
        let live = index > self.replayed_until;
        match outcome {
            Outcome::LeaseGranted { id, .. } | Outcome::LeaseKept { id, .. } if live => {
                self.renewed_at.insert(*id, now);
            }
            Outcome::LeasesKept { kept, .. } if live => {
                self.renewed_at
                    .extend(kept.iter().map(|(id, _)| (*id, now)));
            }
            Outcome::LeasesEnded { ended, .. } => {
                for id in ended {
                    self.renewed_at.remove(id);
                }
            }
            _ => {}
        }
    }

    /// True once this member was removed from the group.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// Proposes a command; `reply` gets its outcome once applied here.
    ///
    /// A command that breaks this member's [`Limits`] is refused before it
    /// is proposed: it changes nothing and costs no log entry. A keep-alive
    /// waits for the next tick and goes with the others
    /// ([`KeepAliveBatches`]); its caller still gets its own lease's outcome.
    pub fn propose(&mut self, command: &Command, reply: Callback<Result<Outcome, RequestError>>) {
        self.propose_for(command, None, reply);
    }

    /// [`Core::propose`] on behalf of the agent `agent` (the machine id its
    /// certificate names): its log entry records the agent, so a lease it
    /// grants is that agent's on every member ([`super::kv::Lease::owner`]).
    pub fn propose_for(
        &mut self,
        command: &Command,
        agent: Option<&str>,
        reply: Callback<Result<Outcome, RequestError>>,
    ) {
        if let Some(refused) = self.refusal() {
            return reply(Err(refused));
        }
        if let Command::LeaseKeepAlive { id } = command
            && self.config.keep_alive_batches != KeepAliveBatches::Immediate
        {
            // Proposed with the others at the next tick.
            self.keep_alives.push((*id, reply));
            return;
        }
        self.propose_now(command, agent, Reply::One(reply));
    }

    /// Proposes `command` now (see [`Core::propose_for`]).
    fn propose_now(&mut self, command: &Command, agent: Option<&str>, reply: Reply) {
        let limits = &self.config.limits;
        if let Err(refused) = limits.check(command, &self.kv) {
            return reply.send(Err(refused.into()));
        }
        let data = codec::encode_entry(command, agent);
        if data.len() > limits.request_bytes {
            let refused = Refused::RequestTooLarge(data.len(), limits.request_bytes);
            return reply.send(Err(refused.into()));
        }
        let id = self.request_id();
        match self.raw.propose(ctx_bytes(id), data) {
            Ok(()) => self.track(id, reply),
            Err(_) => reply.send(Err(RequestError::NoLeader)),
        }
    }

    /// Proposes the keep-alives held since the last tick: one
    /// [`Command::LeaseKeepAlives`] entry (in chunks the request size
    /// limit allows) when [`Core::batches_keep_alives`], else one entry each.
    fn propose_keep_alives(&mut self) {
        if self.keep_alives.is_empty() {
            return;
        }
        let mut held = std::mem::take(&mut self.keep_alives);
        if let Some(refused) = self.refusal() {
            return Reply::KeepAlives(held).send(Err(refused));
        }
        if held.len() == 1 || !self.batches_keep_alives() {
            for (id, reply) in held {
                self.propose_now(&Command::LeaseKeepAlive { id }, None, Reply::One(reply));
            }
            return;
        }
        // A lease id takes at most 10 bytes in an entry: 16 leaves room for
        // the rest of it, so no chunk outgrows a small request size limit.
        let per_entry = (self.config.limits.request_bytes / 16).clamp(1, KEEP_ALIVES_PER_ENTRY);
        while !held.is_empty() {
            let rest = held.split_off(held.len().min(per_entry));
            let ids = held.iter().map(|(id, _)| *id).collect();
            let batch = Command::LeaseKeepAlives { ids };
            self.propose_now(&batch, None, Reply::KeepAlives(held));
            held = rest;
        }
    }

    /// Whether this member proposes [`Command::LeaseKeepAlives`]: see
    /// [`KeepAliveBatches`].
    fn batches_keep_alives(&self) -> bool {
        match self.config.keep_alive_batches {
            KeepAliveBatches::Immediate => false,
            KeepAliveBatches::Always => true,
            KeepAliveBatches::WhenAllMembersRead => {
                let reads = |id: &u64| {
                    self.members.get(id).is_some_and(|m| {
                        let key = super::keys::member_features(&m.name);
                        self.kv.get(&key).is_some_and(|kv| {
                            String::from_utf8_lossy(&kv.value)
                                .split(',')
                                .any(|f| f == FEATURE_KEEP_ALIVE_BATCHES)
                        })
                    })
                };
                let group = self.conf_state.voters.iter();
                group.chain(&self.conf_state.learners).all(reads)
            }
        }
    }

    /// Remembers a proposal until its entry is applied or its deadline passes.
    fn track(&mut self, id: RequestId, reply: Reply) {
        let deadline = self.ticks + self.config.request_ticks;
        self.pending.insert(id, Pending { reply, deadline });
    }

    /// Proposes adding or removing a member.
    ///
    /// A new member joins as a learner: it receives the log but does not
    /// vote, so a member that never starts (a wrong address) costs the group
    /// no quorum. The leader promotes it to a voter once it has caught up
    /// (see [`Core::promote_caught_up_learners`]), as etcd does.
    ///
    /// One change at a time: while one is in the log and not yet applied, a
    /// second is refused at once (raft-rs would silently turn it into an
    /// empty entry, leaving its caller to time out).
    pub fn propose_member_change(
        &mut self,
        id: u64,
        add: Option<MemberInfo>,
        reply: Callback<Result<Outcome, RequestError>>,
    ) {
        if let Some(refused) = self.refusal() {
            return reply(Err(refused));
        }
        if add.is_none() && !self.members.contains_key(&id) {
            return reply(Err(RequestError::NoSuchMember(id)));
        }
        if add.is_some() && self.members.contains_key(&id) {
            return reply(Err(RequestError::Invalid(
                "a member of that name is already in the cluster; see flotilla member list".into(),
            )));
        }
        if add.is_none() && self.conf_state.voters.len() == 1 && self.conf_state.voters[0] == id {
            return reply(Err(RequestError::Invalid(
                "this is the cluster's last voting member; add another before removing it".into(),
            )));
        }
        if self.change_pending() {
            return reply(Err(change_pending_refusal()));
        }
        let mut cc = ConfChangeV2::default();
        let kind = if add.is_some() {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::RemoveNode
        };
        cc.set_changes(vec![raft_proto::new_conf_change_single(id, kind)].into());
        if let Some(info) = &add {
            cc.context = codec::encode(info).into();
        }
        let rid = self.request_id();
        match self.raw.propose_conf_change(ctx_bytes(rid), cc) {
            Ok(()) => self.track(rid, Reply::One(reply)),
            Err(e) => reply(Err(RequestError::Invalid(format!(
                "membership change refused: {e} (one change at a time)"
            )))),
        }
    }

    /// Whether a membership change is in the log and not applied yet: the
    /// leader's own record, or one this member's log holds.
    fn change_pending(&self) -> bool {
        self.raw.raft.has_pending_conf()
            || self.unapplied_entries().is_none_or(|entries| {
                entries
                    .iter()
                    .any(|e| e.get_entry_type() != EntryType::EntryNormal)
            })
    }

    /// Leader only: promotes each learner whose log has caught up with the
    /// commit index, one change at a time.
    ///
    /// Caught up means, as in etcd, holding at least 90% of the committed
    /// log: under steady writes a learner is always a few entries behind.
    fn promote_caught_up_learners(&mut self) {
        if self.conf_state.learners.is_empty() || !self.is_leader() || self.change_pending() {
            return;
        }
        let committed = self.raw.raft.raft_log.committed;
        let ready = self.conf_state.learners.iter().copied().find(|id| {
            self.raw
                .raft
                .prs()
                .get(*id)
                .is_some_and(|p| p.matched.saturating_mul(10) >= committed.saturating_mul(9))
        });
        let Some(learner) = ready else {
            return;
        };
        let mut cc = ConfChangeV2::default();
        let promote = raft_proto::new_conf_change_single(learner, ConfChangeType::AddNode);
        cc.set_changes(vec![promote].into());
        let id = self.request_id();
        let _ = self.raw.propose_conf_change(ctx_bytes(id), cc);
    }

    /// Reads after confirming leadership (ReadIndex): linearizable.
    ///
    /// `serve` runs once the state machine has applied everything committed
    /// before the read began, and reads the state machine it is handed. The
    /// reads that arrive before a Ready pass share one ReadIndex request,
    /// asked at the start of that pass ([`Core::ask_reads`]): raft-rs sends
    /// every follower a heartbeat per request, and a leader serving the
    /// agents' reads during a bulk start was asked about 500 a second.
    pub fn read_index(&mut self, serve: ReadServe) {
        if let Some(refused) = self.refusal() {
            return serve(Err(refused));
        }
        self.reads.push(PendingRead {
            ctx: None,
            index: None,
            asked: self.ticks,
            deadline: self.ticks + self.config.request_ticks,
            began: std::time::Instant::now(),
            confirmed: None,
            serve,
        });
    }

    /// Asks Raft for one ReadIndex on behalf of every read not yet asked
    /// for. Each of them began before this request, so the index Raft
    /// confirms for it serves all of them linearizably.
    fn ask_reads(&mut self) {
        if !self.reads.iter().any(|r| r.ctx.is_none()) {
            return;
        }
        let ctx = self.request_id();
        for read in self.reads.iter_mut().filter(|r| r.ctx.is_none()) {
            read.ctx = Some(ctx);
            read.asked = self.ticks;
        }
        self.raw.read_index(ctx_bytes(ctx));
    }

    /// Registers a watcher for keys under `prefix` from revision `from`.
    ///
    /// History it can still serve arrives at once; later events as they apply.
    /// A revision beyond the current one waits until this member applies it.
    pub fn watch(&mut self, prefix: String, from: Revision, mut sink: WatchSink) {
        let from = from.max(1);
        match self.kv.events_since(&prefix, from) {
            Err(compacted) => {
                sink(WatchMsg::Compacted(compacted));
            }
            Ok(events) => {
                if !events.is_empty() && !sink(WatchMsg::Events(events)) {
                    return;
                }
                let next = from.max(self.kv.revision() + 1);
                self.watchers.add(prefix, next, sink);
            }
        }
    }

    /// Delivers a message from a peer.
    ///
    /// A membership change a follower forwards while another is pending is
    /// turned, on the leader, into an empty entry that keeps its request id:
    /// raft-rs would append it as an empty entry WITHOUT the id, so the
    /// follower's caller heard nothing until its deadline ("outcome
    /// unknown", found by tests/sim.rs); each member applies the kept entry
    /// as a refusal of that request (see `Core::apply_committed`).
    pub fn step(&mut self, mut message: Message) {
        if message.get_msg_type() == MessageType::MsgPropose
            && self.is_leader()
            && self.change_pending()
        {
            for entry in message.mut_entries().iter_mut() {
                if entry.get_entry_type() != EntryType::EntryNormal {
                    let context = std::mem::take(&mut entry.context);
                    *entry = Entry::default();
                    entry.context = context;
                }
            }
        }
        // Messages from removed or unknown members, or stale ones, are refused
        // by raft-rs itself; nothing to do about the error.
        let _ = self.raw.step(message);
    }

    /// Tells Raft how sending a snapshot to `to` ended. raft-rs replicates
    /// nothing more to a member it sent a snapshot until it hears this, so the
    /// transport MUST report every `MsgSnapshot` it was handed: delivered
    /// (the receiver has all of it) or failed (raft-rs then probes and sends
    /// a fresh one). Reporting at hand-off instead made a large snapshot's
    /// receiver refuse the appends that followed and get sent the snapshot
    /// again while the first was still on its way.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// Tells Raft a peer could not be reached, so it stops pipelining to it.
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Advances time to `now_ms` by one tick.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.ticks += 1;
        self.raw.tick();
        self.expire_requests();
        self.ask_reads_again();
        // Before the lease clock: a keep-alive held until now is in the log
        // ahead of any expiry or checkpoint this tick proposes.
        self.propose_keep_alives();
        self.run_lessor();
        self.promote_caught_up_learners();
        // A removed leader whose hand-over did not happen tries again.
        if self.removed
            && self.is_leader()
            && self.ticks.is_multiple_of(self.config.election_ticks as u64)
            && let Some(next) = self.most_caught_up_voter()
        {
            self.raw.transfer_leader(next);
        }
    }

    /// Asks Raft again for the ReadIndex of reads still without one after a
    /// heartbeat interval. raft-rs drops a ReadIndex request, without a word,
    /// that reaches a leader before it committed an entry in its term (right
    /// after an election); asked once, such a read waited for its deadline.
    /// A second answer for the same read is harmless: any index at or after
    /// the read began serves it linearizably.
    fn ask_reads_again(&mut self) {
        if self.leader == 0 {
            return;
        }
        let every = self.config.heartbeat_ticks as u64;
        let mut again = Vec::new();
        for read in &mut self.reads {
            if read.index.is_none() && self.ticks >= read.asked + every {
                read.asked = self.ticks;
                if let Some(ctx) = read.ctx
                    && !again.contains(&ctx)
                {
                    again.push(ctx);
                }
            }
        }
        for ctx in again {
            self.raw.read_index(ctx_bytes(ctx));
        }
    }

    fn expire_requests(&mut self) {
        let now = self.ticks;
        let expired: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                p.reply.send(Err(RequestError::Unknown));
            }
        }
        let (late, keep): (Vec<_>, Vec<_>) = self.reads.drain(..).partition(|r| r.deadline <= now);
        self.reads = keep;
        for read in late {
            (read.serve)(Err(RequestError::NoLeader));
        }
    }

    /// Leader only: proposes what the lease clock asks for this tick.
    ///
    /// Only the leader of the lessor's own term proposes: raft-rs steps down
    /// while it steps a message, before the next Ready pass reports it, and a
    /// follower's proposal is forwarded to the new leader, where an expiry
    /// from the old leader's clock would overtake keep-alives it never saw.
    fn run_lessor(&mut self) {
        let term = self.raw.raft.term;
        if !self.is_leader() {
            self.lessor = None;
            return;
        }
        if self.lessor.as_ref().is_some_and(|l| l.term() != term) {
            self.start_lessor();
        }
        let Some(mut lessor) = self.lessor.take() else {
            return;
        };
        let checkpoint_due = self.ticks.is_multiple_of(self.config.checkpoint_ticks);
        let retry_after = self.config.election_ticks as u64;
        let proposals = lessor.tick(self.now_ms, self.ticks, retry_after, checkpoint_due, || {
            self.renewing_leases()
        });
        self.lessor = Some(lessor);
        for command in proposals {
            let id = self.request_id();
            let _ = self.raw.propose(ctx_bytes(id), codec::encode(&command));
        }
    }

    fn start_lessor(&mut self) {
        let (term, now, grace) = (self.raw.raft.term, self.now_ms, self.config.election_ms());
        let clock = ClockBounds {
            tick_ms: self.config.tick_ms,
            drift_per_mille: self.config.clock_drift_per_mille,
        };
        let lessor = Lessor::promote(&self.kv, term, now, grace, clock);
        self.lessor = Some(lessor);
    }

    /// The entries in this member's log after the last applied one; `None`
    /// if the log cannot be read.
    fn unapplied_entries(&self) -> Option<Vec<Entry>> {
        let log = &self.raw.raft.raft_log;
        log.entries(self.applied + 1, None, GetEntriesContext::empty(false))
            .ok()
    }

    /// Leases with a keep-alive in this member's log that is not applied yet;
    /// `None` if the log cannot be read.
    fn renewing_leases(&self) -> Option<BTreeSet<LeaseId>> {
        let entries = self.unapplied_entries()?;
        let mut renewing = BTreeSet::new();
        for entry in entries {
            if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                match codec::decode(&entry.data) {
                    Ok(Command::LeaseKeepAlive { id }) => {
                        renewing.insert(id);
                    }
                    Ok(Command::LeaseKeepAlives { ids }) => renewing.extend(ids),
                    _ => {}
                }
            }
        }
        Some(renewing)
    }

    /// Runs one Ready pass; returns the messages to send to peers.
    pub fn handle_ready(&mut self) -> Result<Vec<Message>, DiskError> {
        let mut out = Vec::new();
        self.handle_ready_with(&mut |messages| out.extend(messages))?;
        Ok(out)
    }

    /// Runs one Ready pass, handing messages to `send` at the step where the
    /// Ready contract lets them leave: a leader's heartbeats at once, the
    /// rest never before the pass's fsync (see the module documentation). The
    /// simulation crashes a member between those steps; on an error, what
    /// `send` was given already left.
    pub fn handle_ready_with(
        &mut self,
        send: &mut dyn FnMut(Vec<Message>),
    ) -> Result<(), DiskError> {
        self.ask_reads();
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        let mut messages = ready.take_messages();
        if self.config.mutation == Mutation::SendBeforePersist {
            send(std::mem::take(&mut messages));
            send(ready.take_persisted_messages());
        }
        // A leader's heartbeats leave at once: they carry no entries, only
        // its term and a commit index a quorum already persisted, and the
        // ReadIndex of every linearizable read waits for their answers.
        // Held until after this pass's fsync (and, before, its apply), each
        // read waited for two of the leader's passes instead of none.
        if self.is_leader() && messages.iter().any(is_heartbeat) {
            let (beats, rest) = std::mem::take(&mut messages)
                .into_iter()
                .partition(is_heartbeat);
            messages = rest;
            send(beats);
        }

        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }

        let mut batch = Batch::default();
        let mut installed = None;
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            installed = Some(codec::decode_snapshot(&snap.data)?);
            batch.conf_state = Some(snap.get_metadata().get_conf_state().clone());
            batch.installed = Some(snap);
        }
        batch.entries = ready.take_entries();
        batch.hard_state = ready.hs().cloned();
        let needs_disk =
            ready.must_sync() || batch.installed.is_some() || !batch.entries.is_empty();
        if needs_disk {
            if self.commit_dirty && batch.hard_state.is_none() {
                batch.hard_state = Some(self.store_hard_state());
            }
            self.commit_dirty = false;
            match self.disk.save(&batch) {
                Err(_) if self.config.mutation == Mutation::IgnoreDiskErrors => {}
                saved => saved?,
            }
        } else if batch.hard_state.is_some() {
            // Only the commit index moved: raft-rs says no sync is needed (a
            // quorum can always recompute it). Keep it in memory and let the
            // next batch carry it, instead of paying an fsync per commit.
            self.commit_dirty = true;
        }
        self.store
            .apply(&batch)
            .map_err(|e| DiskError::Corrupt(format!("log view rejected a saved batch: {e}")))?;
        if let (Some(data), Some(snap)) = (installed, &batch.installed) {
            self.install(data, snap.get_metadata());
        }
        send(messages);
        let mut persisted = ready.take_persisted_messages();
        self.drop_stale_acks(&mut persisted);
        send(persisted);

        // Reads whose index is confirmed are answered before this pass
        // applies what it committed: one already applied up to its index
        // waits for no apply (a bulk start commits transactions of
        // thousands of operations), and a state past its index serves it
        // linearizably all the same.
        for rs in ready.take_read_states() {
            let Some(ctx) = ctx_id(&rs.request_ctx) else {
                continue;
            };
            let now = std::time::Instant::now();
            for read in self.reads.iter_mut().filter(|r| r.ctx == Some(ctx)) {
                read.index = Some(rs.index);
                if read.confirmed.is_none() {
                    METRICS.raft_read_confirm_seconds.observe(now - read.began);
                    read.confirmed = Some(now);
                }
            }
        }
        self.serve_reads();
        self.apply_entries(ready.take_committed_entries())?;

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store_set_commit(commit);
        }
        send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.apply_deferred()?;
        self.raw.advance_apply();
        self.store.evict(self.applied);
        self.serve_reads();
        self.maybe_snapshot()
    }

    /// Drops acknowledgements of appends made in an older term than this
    /// member's current one. A member that steps both an old leader's
    /// append and a newer leader's conflicting one before its Ready pass
    /// acknowledges the first (index and all) and then truncates it: the
    /// pass persists only the newer entries, yet raft-rs would still send
    /// the old leader an acknowledgement of entries this member never
    /// persisted, which that leader could count toward a commit the new
    /// leader does not hold (found by tests/sim.rs: lease seed 1352). A
    /// leader never overwrites its own term's entries, so an ack in the
    /// current term is true; a dropped message is one Raft retransmits.
    fn drop_stale_acks(&self, messages: &mut Vec<Message>) {
        let term = self.raw.raft.term;
        messages.retain(|m| {
            m.get_msg_type() != MessageType::MsgAppendResponse || m.reject || m.term >= term
        });
    }

    fn store_hard_state(&self) -> HardState {
        raft::Storage::initial_state(&self.store)
            .map(|s| s.hard_state)
            .unwrap_or_default()
    }

    fn store_set_commit(&mut self, commit: u64) {
        let mut hs = self.store_hard_state();
        hs.commit = commit;
        let batch = Batch {
            hard_state: Some(hs),
            ..Batch::default()
        };
        // In memory now; on disk with the next batch (the commit index can be
        // recomputed from a quorum, so this needs no fsync of its own).
        let _ = self.store.apply(&batch);
        self.commit_dirty = true;
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        if leader != self.leader {
            // Proposals forwarded to the old leader may be lost or may commit:
            // their outcome is unknown to us now.
            for (_, p) in self.pending.drain() {
                p.reply.send(Err(RequestError::Unknown));
            }
            for read in self.reads.drain(..) {
                (read.serve)(Err(RequestError::NoLeader));
            }
            self.leader = leader;
        }
        if role == StateRole::Leader && self.snapshot_lacks_members() {
            // Leading now: a newcomer may need this member's snapshot, and
            // refuses one that does not name it (found by tests/sim.rs).
            self.snapshot_now = true;
        }
        if role == StateRole::Leader && self.lessor.is_none() {
            self.start_lessor();
        } else if role != StateRole::Leader {
            self.lessor = None;
        }
    }

    /// Takes a snapshot received from the leader as this member's state,
    /// membership included: the snapshots this member takes later, and
    /// sends if it leads, record the membership it holds (a stale one here
    /// gave a restarted member or a newcomer a group without its newest
    /// members; found by tests/sim.rs).
    fn install(&mut self, data: SnapshotData, meta: &raft::eraftpb::SnapshotMetadata) {
        self.kv = data.kv;
        self.kv.set_history_bytes(self.config.history_bytes);
        self.members = data.members;
        self.members_at = meta.index;
        self.applied = meta.index;
        self.applied_bytes = 0;
        self.conf_state = meta.get_conf_state().clone();
        let me = self.config.id;
        self.removed =
            !self.conf_state.voters.contains(&me) && !self.conf_state.learners.contains(&me);
        if let Some(lessor) = &mut self.lessor {
            lessor.installed(&self.kv);
        }
        let kv = &self.kv;
        self.renewed_at.retain(|id, _| kv.lease(*id).is_some());
        let kv = &self.kv;
        self.watchers
            .resume(kv.revision(), |prefix, from| kv.events_since(prefix, from));
    }

    /// Applies committed entries in order. Before the pass's `advance`, a
    /// membership change that removes this member, and everything after it,
    /// waits in `deferred` (see [`Core::apply_deferred`]).
    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), DiskError> {
        self.apply_committed(entries, false)
    }

    fn apply_committed(&mut self, entries: Vec<Entry>, advanced: bool) -> Result<(), DiskError> {
        let mut events = Vec::new();
        let mut entries = entries.into_iter();
        while let Some(entry) = entries.next() {
            if entry.index <= self.applied {
                continue;
            }
            if !advanced && (!self.deferred.is_empty() || self.removes_me(&entry)) {
                self.deferred.push(entry);
                self.deferred.extend(entries);
                break;
            }
            self.applied = entry.index;
            self.applied_bytes += entry.data.len() as u64;
            let request = ctx_id(&entry.context);
            match entry.get_entry_type() {
                // A leader's own empty entry answers nobody; one that kept a
                // request id is a membership change refused (see `step`).
                EntryType::EntryNormal if entry.data.is_empty() => {
                    METRICS.raft_entries_applied.add(EntryKind::Empty);
                    self.answer(request, Err(change_pending_refusal()));
                }
                EntryType::EntryNormal => {
                    let (command, agent) = codec::decode_entry(&entry.data)?;
                    if let Command::LeaseExpire { ids } = &command {
                        let live = ids.iter().filter(|id| self.kv.lease(**id).is_some());
                        METRICS.lease_expiries.add(live.count() as u64);
                    }
                    let (outcome, made) = self.kv.apply_for(&command, agent.as_deref());
                    METRICS
                        .raft_entries_applied
                        .add(entry_kind(&command, !made.is_empty()));
                    self.note_renewals(entry.index, &outcome);
                    if let Some(lessor) = &mut self.lessor {
                        lessor.applied(&command, &outcome, self.now_ms);
                    }
                    events.extend(made);
                    self.answer(request, Ok(outcome));
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    METRICS.raft_entries_applied.add(EntryKind::Membership);
                    let result = self.apply_conf_change(&entry)?;
                    self.answer(request, result);
                }
            }
        }
        if !events.is_empty() {
            self.notify(&events);
        }
        Ok(())
    }

    /// Whether `entry` is a membership change that removes this member.
    fn removes_me(&self, entry: &Entry) -> bool {
        decode_conf_change(entry).is_some_and(|(cc, _)| {
            cc.get_changes().iter().any(|c| {
                c.node_id == self.config.id && c.get_change_type() == ConfChangeType::RemoveNode
            })
        })
    }

    /// Applies the entries held back by [`Core::apply_entries`], once the
    /// pass's entries are persisted and `advance` has run. raft-rs panics
    /// when a leader applies its own removal and then `advance` reports the
    /// persistence of entries it appended before (it looks up its own,
    /// removed, progress); found by tests/sim.rs.
    fn apply_deferred(&mut self) -> Result<(), DiskError> {
        let entries = std::mem::take(&mut self.deferred);
        self.apply_committed(entries, true)
    }

    fn answer(&mut self, request: Option<RequestId>, result: Result<Outcome, RequestError>) {
        if let Some(p) = request.and_then(|id| self.pending.remove(&id)) {
            p.reply.send(result);
        }
    }

    /// Applies a committed membership change. The outer error is the disk's
    /// and fatal: a member that changed its membership in memory but could
    /// not record it must not go on (it would restart with the old one).
    fn apply_conf_change(
        &mut self,
        entry: &Entry,
    ) -> Result<Result<Outcome, RequestError>, DiskError> {
        let Some((cc, info)) = decode_conf_change(entry) else {
            return Ok(Err(RequestError::Invalid(
                "malformed membership change".into(),
            )));
        };
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                return Ok(Err(RequestError::Invalid(format!(
                    "membership change refused: {e}"
                ))));
            }
        };
        // A newcomer is sent a snapshot (which carries the membership)
        // instead of a log that starts after the founding membership.
        let known = |id: u64| {
            self.conf_state.voters.contains(&id) || self.conf_state.learners.contains(&id)
        };
        let newcomer = cc
            .get_changes()
            .iter()
            .any(|c| c.get_change_type() != ConfChangeType::RemoveNode && !known(c.node_id));
        if newcomer && self.is_leader() {
            self.snapshot_now = true;
        } else if newcomer {
            let stagger = self.config.election_ticks as u64 * (1 + self.config.id % 5);
            self.snapshot_at = Some(self.ticks + stagger);
        }
        apply_members(&mut self.members, &cc, info);
        self.members_at = self.members_at.max(entry.index);
        self.conf_state = cs.clone();
        let batch = Batch {
            conf_state: Some(cs),
            ..Batch::default()
        };
        self.disk.save(&batch)?;
        self.store
            .apply(&batch)
            .map_err(|e| DiskError::Corrupt(format!("log view rejected a membership: {e}")))?;
        let me = self.config.id;
        if !self.conf_state.voters.contains(&me) && !self.conf_state.learners.contains(&me) {
            self.removed = true;
            // raft-rs keeps a removed leader leading (it only stops being
            // promotable): hand leadership to the voter furthest along, who
            // takes over at once, instead of leading a group it left.
            if self.is_leader()
                && let Some(next) = self.most_caught_up_voter()
            {
                self.raw.transfer_leader(next);
            }
        }
        Ok(Ok(Outcome::Checkpointed))
    }

    /// Whether the latest snapshot leaves out a current member (it was taken
    /// before that member was added, or this member restarted before its
    /// staggered snapshot was due).
    fn snapshot_lacks_members(&self) -> bool {
        let taken = self.store.snapshot_conf_state();
        let known = |id: &u64| taken.voters.contains(id) || taken.learners.contains(id);
        !self
            .conf_state
            .voters
            .iter()
            .chain(&self.conf_state.learners)
            .all(known)
    }

    /// The voter (not this member) whose log matches the leader's furthest.
    fn most_caught_up_voter(&self) -> Option<u64> {
        let me = self.config.id;
        self.conf_state
            .voters
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| Some((self.raw.raft.prs().get(*id)?.matched, *id)))
            .max()
            .map(|(_, id)| id)
    }

    fn notify(&mut self, events: &[Event]) {
        self.watchers.feed(events);
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .reads
            .drain(..)
            .partition(|r| r.index.is_some_and(|i| i <= applied));
        self.reads = waiting;
        for read in ready {
            if let Some(confirmed) = read.confirmed {
                METRICS.raft_read_apply_seconds.observe(confirmed.elapsed());
            }
            (read.serve)(Ok(&self.kv));
        }
    }

    /// Takes a snapshot when one is due. On a disk that keeps snapshots in
    /// files (the daemon's), only a copy of the state is taken here, as a
    /// [`Job`] for the driver to write off this thread; on one that does not
    /// (the simulation's, which must stay on one thread to stay
    /// deterministic) the snapshot is encoded and saved at once.
    fn maybe_snapshot(&mut self) -> Result<(), DiskError> {
        if self.snapshot_writing.is_some() {
            return Ok(());
        }
        let last = self.store.snapshot_index();
        // Members snapshot at different points (up to a tenth of the interval
        // apart, by id), so they never all pause for a snapshot at once.
        let stagger = self.config.id % (self.config.snapshot_entries / 10).max(1);
        // Writing a snapshot costs the whole state: after as many bytes of
        // log as it holds at least, so each written byte is rewritten about
        // once more, not once per snapshot_bytes.
        let bytes = self.config.snapshot_bytes.max(self.kv.data_bytes());
        let byte_stagger = bytes / 100 * (self.config.id % 10);
        let due = self.applied >= last + self.config.snapshot_entries + stagger
            || self.applied_bytes >= bytes.saturating_add(byte_stagger);
        let asked = self.snapshot_now || self.snapshot_at.is_some_and(|at| self.ticks >= at);
        if !(due || asked && self.applied > last) {
            return Ok(());
        }
        self.snapshot_now = false;
        self.snapshot_at = None;
        self.applied_bytes = 0;
        let Some(term) = self.store.term_of(self.applied) else {
            return Ok(());
        };
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = self.applied;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(self.conf_state.clone());
        if let Some(dir) = self.disk.snapshot_dir() {
            let job = Job::new(snap.take_metadata(), &self.kv, &self.members, dir.into());
            self.snapshot_writing = Some(job.index());
            self.snapshot_job = Some(job);
            return Ok(());
        }
        snap.data = codec::encode_snapshot(&self.kv, &self.members).into();
        self.save_taken(snap, false)
    }

    /// Saves a snapshot this member took and compacts the log up to it.
    fn save_taken(&mut self, snap: Snapshot, written: bool) -> Result<(), DiskError> {
        let batch = Batch {
            taken: Some(snap),
            taken_written: written,
            // The membership as of now: a change applied while the snapshot
            // was being written is newer than the one the snapshot records.
            conf_state: Some(self.conf_state.clone()),
            ..Batch::default()
        };
        self.disk.save(&batch)?;
        self.store
            .apply(&batch)
            .map_err(|e| DiskError::Corrupt(format!("compaction failed: {e}")))
    }

    /// The snapshot the driver is to encode and write off this thread
    /// ([`Job::write`]), then report with [`Core::snapshot_written`].
    pub fn take_snapshot_job(&mut self) -> Option<Job> {
        self.snapshot_job.take()
    }

    /// How writing the snapshot of a [`Job`] ended: once written, it is
    /// recorded and the log compacted up to it (unless a snapshot installed
    /// from the leader meanwhile is newer). A failed write is the disk's
    /// failure, fatal as any other.
    pub fn snapshot_written(
        &mut self,
        written: Result<Snapshot, DiskError>,
    ) -> Result<(), DiskError> {
        self.snapshot_writing = None;
        let snap = written?;
        if snap.get_metadata().index <= self.store.snapshot_index() {
            return Ok(());
        }
        self.save_taken(snap, true)
    }
}

/// What a brand-new cluster's disk first holds: the founding membership,
/// with the state machine `kv` (empty, or restored from a backup), as the
/// snapshot at index 0, so a member that restarts before anything is
/// written still knows its peers.
pub fn founding_batch(kv: &KvStore, members: &BTreeMap<u64, MemberInfo>) -> Batch {
    let cs = ConfState {
        voters: members.keys().copied().collect(),
        ..ConfState::default()
    };
    let mut snap = Snapshot::default();
    snap.mut_metadata().set_conf_state(cs.clone());
    snap.data = codec::encode_snapshot(kv, members).into();
    Batch {
        installed: Some(snap),
        conf_state: Some(cs),
        ..Batch::default()
    }
}

/// The answer to a membership change asked while another is pending.
fn change_pending_refusal() -> RequestError {
    RequestError::Invalid(
        "another membership change is still being applied; nothing was changed, \
         retry in a moment (flotilla member list shows the current members)"
            .into(),
    )
}

fn decode_conf_change(entry: &Entry) -> Option<(ConfChangeV2, Option<MemberInfo>)> {
    let cc = match entry.get_entry_type() {
        EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&entry.data).ok()?,
        EntryType::EntryConfChange => {
            let v1 = raft::eraftpb::ConfChange::parse_from_bytes(&entry.data).ok()?;
            raft_proto::ConfChangeI::into_v2(v1)
        }
        EntryType::EntryNormal => return None,
    };
    let info = if cc.context.is_empty() {
        None
    } else {
        codec::decode(&cc.context).ok()
    };
    Some((cc, info))
}

fn apply_members(
    members: &mut BTreeMap<u64, MemberInfo>,
    cc: &ConfChangeV2,
    info: Option<MemberInfo>,
) {
    for change in cc.get_changes() {
        match change.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Some(info) = &info {
                    members.insert(change.node_id, info.clone());
                }
            }
            ConfChangeType::RemoveNode => {
                members.remove(&change.node_id);
            }
        }
    }
}

/// A stable Raft id for a member name, so every member derives the same ids
/// from the same `initial_cluster` without coordinating.
pub fn member_id(name: &str) -> u64 {
    // 0 is reserved by raft-rs.
    stable_hash(name).max(1)
}

/// FNV-1a (64-bit) of `text`: the same on every host and in every release,
/// for what must be derived from a name alike everywhere (a member's Raft id,
/// the member an agent's watch starts on).
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What an applied `command` was, for the metrics; `changed`: it made watch
/// events (only a transaction may make none).
fn entry_kind(command: &Command, changed: bool) -> EntryKind {
    match command {
        Command::Txn { .. } if changed => EntryKind::Write,
        Command::Txn { .. } => EntryKind::Unchanged,
        Command::LeaseGrant { .. } => EntryKind::LeaseGrant,
        Command::LeaseKeepAlive { .. } => EntryKind::KeepAlive,
        Command::LeaseKeepAlives { .. } => EntryKind::KeepAlives,
        Command::LeaseRevoke { .. } => EntryKind::LeaseRevoke,
        Command::LeaseExpire { .. } => EntryKind::LeaseExpire,
        Command::LeaseCheckpoint { .. } => EntryKind::LeaseCheckpoint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::storage::MemDisk;
    use std::sync::{Arc, Mutex};

    #[test]
    fn applied_entries_are_told_apart_by_what_they_did() {
        let put = Command::put("k", "v", None);
        assert_eq!(entry_kind(&put, true), EntryKind::Write);
        // A failed compare, or a delete of nothing: a Raft entry all the same.
        assert_eq!(entry_kind(&put, false), EntryKind::Unchanged);
        let kinds = [
            (Command::LeaseGrant { ttl_ms: 1 }, EntryKind::LeaseGrant),
            (Command::LeaseKeepAlive { id: 1 }, EntryKind::KeepAlive),
            (
                Command::LeaseKeepAlives { ids: vec![1] },
                EntryKind::KeepAlives,
            ),
            (Command::LeaseRevoke { id: 1 }, EntryKind::LeaseRevoke),
            (
                Command::LeaseExpire { ids: vec![1] },
                EntryKind::LeaseExpire,
            ),
            (
                Command::LeaseCheckpoint {
                    remaining: vec![(1, 1)],
                },
                EntryKind::LeaseCheckpoint,
            ),
        ];
        for (command, kind) in kinds {
            assert_eq!(entry_kind(&command, true), kind, "{command:?}");
        }
    }

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    /// A one-member cluster of member 1 on `disk`, set up by `config`.
    fn single_with(disk: MemDisk, config: NodeConfig) -> Core<MemDisk> {
        let mut members = BTreeMap::new();
        members.insert(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        );
        Core::new(config, disk, &members, &logger()).unwrap()
    }

    fn single(disk: MemDisk) -> Core<MemDisk> {
        single_with(disk, NodeConfig::new(1, 10, 100))
    }

    fn run(core: &mut Core<MemDisk>, ticks: u64) {
        for _ in 0..ticks {
            let now = core.now_ms + 10;
            core.tick(now);
            assert!(
                core.handle_ready().unwrap().is_empty(),
                "a single member sends nothing"
            );
        }
    }

    #[test]
    fn a_single_member_elects_itself_applies_and_survives_restart() {
        let disk = MemDisk::new();
        let mut core = single(disk.clone());
        run(&mut core, 30);
        assert!(core.is_leader());
        let answer = Arc::new(Mutex::new(None));
        let slot = answer.clone();
        core.propose(
            &Command::put("k", "v", None),
            Box::new(move |r| *slot.lock().unwrap() = Some(r)),
        );
        run(&mut core, 1);
        let got = answer.lock().unwrap().take().unwrap().unwrap();
        assert!(matches!(
            got,
            Outcome::Txn {
                succeeded: true,
                revision: 1,
                ..
            }
        ));

        let read = Arc::new(Mutex::new(None));
        let slot = read.clone();
        core.read_index(Box::new(move |r| {
            *slot.lock().unwrap() = Some(r.map(|kv| kv.get("k").map(|kv| kv.value.clone())));
        }));
        run(&mut core, 2);
        assert_eq!(
            read.lock().unwrap().take().unwrap().unwrap(),
            Some(b"v".to_vec())
        );

        drop(core);
        let mut again = single(disk);
        run(&mut again, 30);
        assert_eq!(again.kv().get("k").unwrap().value, b"v");
    }

    #[test]
    fn reads_of_one_pass_share_one_read_index_and_later_ones_ask_again() {
        let mut core = single(MemDisk::new());
        run(&mut core, 30);
        assert!(core.is_leader());
        core.propose(&Command::put("k", "v", None), Box::new(|_| {}));
        run(&mut core, 1);
        let served = Arc::new(Mutex::new(Vec::new()));
        let read = |core: &mut Core<MemDisk>| {
            let served = served.clone();
            core.read_index(Box::new(move |r| {
                let value = r.map(|kv| kv.get("k").map(|kv| kv.value.clone()));
                served.lock().unwrap().push(value);
            }));
        };
        for _ in 0..3 {
            read(&mut core);
        }
        assert!(core.reads.iter().all(|r| r.ctx.is_none()), "not asked yet");
        core.ask_reads();
        let first: Vec<_> = core.reads.iter().map(|r| r.ctx).collect();
        assert!(first[0].is_some() && first.iter().all(|c| *c == first[0]));
        // One that arrives after that request began needs a request of its own.
        read(&mut core);
        core.ask_reads();
        let ctxs: Vec<_> = core.reads.iter().map(|r| r.ctx).collect();
        assert_eq!(&ctxs[..3], &first[..]);
        assert!(ctxs[3].is_some() && ctxs[3] != first[0]);
        run(&mut core, 2);
        assert!(core.reads.is_empty());
        assert_eq!(*served.lock().unwrap(), vec![Ok(Some(b"v".to_vec())); 4]);
    }

    #[test]
    fn leases_expire_on_the_leader_and_take_their_keys() {
        let mut core = single(MemDisk::new());
        core.config.limits.min_lease_ttl_ms = 100;
        run(&mut core, 30);
        let granted = Arc::new(Mutex::new(None));
        let slot = granted.clone();
        core.propose(
            &Command::LeaseGrant { ttl_ms: 200 },
            Box::new(move |r| *slot.lock().unwrap() = Some(r)),
        );
        run(&mut core, 1);
        let Ok(Outcome::LeaseGranted { id, .. }) = granted.lock().unwrap().take().unwrap() else {
            panic!()
        };
        core.propose(&Command::put("/m/1", "up", Some(id)), Box::new(|_| {}));
        run(&mut core, 10);
        assert!(core.kv().get("/m/1").is_some(), "alive before the TTL");
        run(&mut core, 20);
        assert!(core.kv().get("/m/1").is_none(), "gone after the TTL");
        assert!(core.kv().lease(id).is_none());
    }

    /// Proposes `command` on `core`; its outcome after one more tick.
    fn answer_after_a_tick(
        core: &mut Core<MemDisk>,
        command: Command,
    ) -> Result<Outcome, RequestError> {
        let slot = Arc::new(Mutex::new(None));
        let reply = slot.clone();
        core.propose(
            &command,
            Box::new(move |r| *reply.lock().unwrap() = Some(r)),
        );
        run(core, 1);
        let answer = slot.lock().unwrap().take();
        answer.expect("answered within a tick")
    }

    #[test]
    fn keep_alives_of_one_tick_share_one_entry_once_every_member_reads_it() {
        let mut config = NodeConfig::new(1, 10, 100);
        config.checkpoint_ticks = u64::MAX;
        let mut core = single_with(MemDisk::new(), config);
        core.config.limits.min_lease_ttl_ms = 100;
        run(&mut core, 30);
        let mut grant = || match answer_after_a_tick(&mut core, Command::LeaseGrant { ttl_ms: 500 })
        {
            Ok(Outcome::LeaseGranted { id, .. }) => id,
            other => panic!("{other:?}"),
        };
        let (a, b) = (grant(), grant());
        let gone = 999;
        // Three keep-alives in one tick, one of a lease that does not exist:
        // each caller gets its own lease's outcome.
        let keep_all = |core: &mut Core<MemDisk>| {
            let slots: Vec<_> = [a, gone, b]
                .into_iter()
                .map(|id| {
                    let slot = Arc::new(Mutex::new(None));
                    let reply = slot.clone();
                    core.propose(
                        &Command::LeaseKeepAlive { id },
                        Box::new(move |r| *reply.lock().unwrap() = Some(r)),
                    );
                    slot
                })
                .collect();
            let before = core.raw.raft.raft_log.last_index();
            run(core, 1);
            let entries = core.raw.raft.raft_log.last_index() - before;
            let answers: Vec<_> = slots
                .iter()
                .map(|s| s.lock().unwrap().take().expect("answered"))
                .collect();
            (entries, answers)
        };
        let expected = vec![
            Ok(Outcome::LeaseKept { id: a, ttl_ms: 500 }),
            Ok(Outcome::Failed(KvError::LeaseNotFound(gone))),
            Ok(Outcome::LeaseKept { id: b, ttl_ms: 500 }),
        ];
        // Until every member announced that it reads batches: one entry each,
        // all proposed at the same tick.
        assert_eq!(keep_all(&mut core), (3, expected.clone()));
        let features = super::super::keys::member_features("n1");
        let publish = Command::put(features, FEATURE_KEEP_ALIVE_BATCHES, None);
        assert!(answer_after_a_tick(&mut core, publish).is_ok());
        assert_eq!(keep_all(&mut core), (1, expected));
        // A lone keep-alive needs no batch.
        let before = core.raw.raft.raft_log.last_index();
        let lone = answer_after_a_tick(&mut core, Command::LeaseKeepAlive { id: a });
        assert_eq!(lone, Ok(Outcome::LeaseKept { id: a, ttl_ms: 500 }));
        assert_eq!(core.raw.raft.raft_log.last_index() - before, 1);
    }

    #[test]
    fn a_member_tells_how_long_ago_it_applied_each_leases_last_renewal() {
        let disk = MemDisk::new();
        let mut core = single(disk.clone());
        core.config.limits.min_lease_ttl_ms = 100;
        run(&mut core, 30);
        let Ok(Outcome::LeaseGranted { id, .. }) =
            answer_after_a_tick(&mut core, Command::LeaseGrant { ttl_ms: 5_000 })
        else {
            panic!("granted")
        };
        run(&mut core, 10);
        let seen = |ago| {
            vec![LeaseRenewal {
                id,
                ttl_ms: 5_000,
                renewed_ms_ago: ago,
            }]
        };
        assert_eq!(core.lease_renewals(), seen(Some(100)), "since the grant");
        let kept = answer_after_a_tick(&mut core, Command::LeaseKeepAlive { id });
        assert!(matches!(kept, Ok(Outcome::LeaseKept { .. })), "{kept:?}");
        run(&mut core, 3);
        assert_eq!(
            core.lease_renewals(),
            seen(Some(30)),
            "since the keep-alive"
        );
        // Restarted, it reads the grant and keep-alive back from its disk:
        // they happened at some time before, not now.
        drop(core);
        let mut again = single(disk);
        run(&mut again, 30);
        assert_eq!(again.lease_renewals(), seen(None));
        let kept = answer_after_a_tick(&mut again, Command::LeaseKeepAlive { id });
        assert!(matches!(kept, Ok(Outcome::LeaseKept { .. })), "{kept:?}");
        assert_eq!(again.lease_renewals(), seen(Some(0)));
        // Gone with its lease.
        let revoked = answer_after_a_tick(&mut again, Command::LeaseRevoke { id });
        assert!(
            matches!(revoked, Ok(Outcome::LeasesEnded { .. })),
            "{revoked:?}"
        );
        assert!(again.lease_renewals().is_empty());
        assert!(again.renewed_at.is_empty());
    }

    #[test]
    fn a_small_request_limit_splits_a_batch_and_every_caller_is_answered() {
        let mut config = NodeConfig::new(1, 10, 100);
        config.checkpoint_ticks = u64::MAX;
        config.keep_alive_batches = KeepAliveBatches::Always;
        let mut core = single_with(MemDisk::new(), config);
        core.config.limits.min_lease_ttl_ms = 100;
        run(&mut core, 30);
        let Ok(Outcome::LeaseGranted { id, .. }) =
            answer_after_a_tick(&mut core, Command::LeaseGrant { ttl_ms: 500 })
        else {
            panic!("granted")
        };
        core.config.limits.request_bytes = 40;
        let answered = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..5 {
            let answered = answered.clone();
            core.propose(
                &Command::LeaseKeepAlive { id },
                Box::new(move |r| answered.lock().unwrap().push(r)),
            );
        }
        let before = core.raw.raft.raft_log.last_index();
        run(&mut core, 1);
        assert_eq!(core.raw.raft.raft_log.last_index() - before, 3, "2 + 2 + 1");
        let kept = Ok(Outcome::LeaseKept { id, ttl_ms: 500 });
        assert_eq!(*answered.lock().unwrap(), vec![kept; 5]);
    }

    #[test]
    fn held_keep_alives_are_refused_when_the_member_has_no_leader() {
        let mut core = single(MemDisk::new());
        run(&mut core, 30);
        let slot = Arc::new(Mutex::new(None));
        let reply = slot.clone();
        core.propose(
            &Command::LeaseKeepAlive { id: 1 },
            Box::new(move |r| *reply.lock().unwrap() = Some(r)),
        );
        // The leader is gone before the tick that would propose it.
        core.leader = 0;
        core.tick(core.now_ms + 10);
        assert_eq!(
            slot.lock().unwrap().take(),
            Some(Err(RequestError::NoLeader))
        );
    }

    #[test]
    fn snapshots_compact_the_log_and_restore() {
        let disk = MemDisk::new();
        let mut config = NodeConfig::new(1, 10, 100);
        config.snapshot_entries = 5;
        let mut core = single_with(disk.clone(), config.clone());
        run(&mut core, 30);
        for i in 0..20 {
            core.propose(&Command::put(format!("k{i}"), "v", None), Box::new(|_| {}));
            run(&mut core, 1);
        }
        assert!(core.store.snapshot_index() >= 15);
        assert!(
            disk.load().unwrap().entries.len() < 10,
            "the log was compacted"
        );
        drop(core);
        let mut again = Core::new(config, disk, &BTreeMap::new(), &logger()).unwrap();
        run(&mut again, 30);
        assert_eq!(again.kv().range("k").count(), 20);
    }

    /// Ticks a single member on a real disk `ticks` times.
    fn run_on<D: Durable>(core: &mut Core<D>, ticks: u64) {
        for _ in 0..ticks {
            let now = core.now_ms + 10;
            core.tick(now);
            core.handle_ready().unwrap();
        }
    }

    /// Puts `k<from>..` until the member hands out a snapshot job.
    fn put_until_a_job<D: Durable>(core: &mut Core<D>, from: &mut usize) -> Job {
        for _ in 0..50 {
            core.propose(
                &Command::put(format!("k{from:03}"), "v", None),
                Box::new(|_| {}),
            );
            *from += 1;
            run_on(core, 1);
            if let Some(job) = core.take_snapshot_job() {
                return job;
            }
        }
        panic!("no snapshot became due");
    }

    fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot-"))
            .collect();
        names.sort();
        names
    }

    /// Few entries of large values still snapshot and compact the log once
    /// their bytes pass `snapshot_bytes`, so a restart reads back a bounded
    /// log whatever the entry count.
    #[test]
    fn snapshots_are_taken_by_bytes_as_well_as_by_entries() {
        let disk = MemDisk::new();
        let mut config = NodeConfig::new(1, 10, 100);
        config.snapshot_entries = 1_000_000;
        config.snapshot_bytes = 64 * 1024;
        let mut core = single_with(disk.clone(), config);
        run(&mut core, 30);
        let value = vec![b'x'; 8 * 1024];
        // One key rewritten: the state stays at one value, the log grows.
        let put = |core: &mut Core<MemDisk>| {
            core.propose(&Command::put("big", value.clone(), None), Box::new(|_| {}));
            run(core, 1);
        };
        for _ in 0..6 {
            put(&mut core);
        }
        assert_eq!(core.store.snapshot_index(), 0, "48 KiB is under 64 KiB");
        for _ in 0..4 {
            put(&mut core);
        }
        assert!(core.store.snapshot_index() > 0, "80 KiB passed 64 KiB");
        assert!(
            disk.load().unwrap().entries.len() < 5,
            "the log was compacted"
        );
    }

    #[test]
    fn a_snapshot_written_off_the_thread_counts_once_recorded_and_a_crash_before_loses_nothing() {
        use crate::consensus::storage::RedbDisk;
        let dir = tempfile::tempdir().unwrap();
        let members = BTreeMap::from([(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "x:1".into(),
            },
        )]);
        let mut config = NodeConfig::new(1, 10, 100);
        config.snapshot_entries = 5;
        let open = |bootstrap: &BTreeMap<u64, MemberInfo>| {
            let disk = RedbDisk::open(dir.path()).unwrap();
            let mut core = Core::new(config.clone(), disk, bootstrap, &logger()).unwrap();
            run_on(&mut core, 30);
            assert!(core.is_leader());
            core
        };
        let mut core = open(&members);
        let mut next = 0;
        let job = put_until_a_job(&mut core, &mut next);
        let first = job.index();
        // The member goes on while the job is out, and starts no other.
        for _ in 0..12 {
            core.propose(
                &Command::put(format!("k{next:03}"), "v", None),
                Box::new(|_| {}),
            );
            next += 1;
            run_on(&mut core, 1);
            assert!(core.take_snapshot_job().is_none());
        }
        let snap = job.write().unwrap();
        assert_eq!(snap.get_metadata().index, first);
        assert!(snap.data.is_empty(), "the data is in its file only");
        // A crash now: the file is written, the database does not name it.
        let before = core.kv().clone();
        drop(core);
        let mut core = open(&BTreeMap::new());
        assert_eq!(core.kv().range("k").count(), next, "nothing lost");
        assert_eq!(core.kv().revision(), before.revision());
        assert!(
            core.store.snapshot_index() < first,
            "the unnamed file was not used"
        );

        // Recorded this time: the log is compacted, the leftover removed, and
        // a restart starts from the new snapshot.
        let job = put_until_a_job(&mut core, &mut next);
        let second = job.index();
        core.snapshot_written(job.write()).unwrap();
        assert_eq!(core.store.snapshot_index(), second);
        let files = snapshot_files(dir.path());
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(
            files[0].ends_with(&format!("-{second:016x}.bin")),
            "{files:?}"
        );
        let log_len = core.disk.load().unwrap().entries.len();
        assert!(log_len < 5, "the log was compacted: {log_len} entries");
        let revision = core.kv().revision();
        drop(core);
        let core = open(&BTreeMap::new());
        assert_eq!(core.store.snapshot_index(), second);
        assert_eq!(core.kv().range("k").count(), next);
        assert_eq!(core.kv().revision(), revision);
    }

    #[test]
    fn request_ids_carry_the_whole_member_id_and_skip_ids_in_use() {
        let mut core = single(MemDisk::new());
        core.config.id = 1 | 1 << 40;
        core.next_request = 7;
        let first = core.request_id();
        assert_eq!(first >> 64, 1 | 1 << 40, "members 1 and 1 + 2^40 differ");
        assert_eq!(first as u64, 7);
        // A request still waiting under the next number is never reused.
        let taken = RequestId::from(core.config.id) << 64 | 8;
        core.track(taken, Reply::One(Box::new(|_| {})));
        assert_eq!(core.request_id() as u64, 9);
    }

    #[test]
    fn a_disk_error_while_applying_a_membership_change_stops_the_member() {
        let disk = MemDisk::new();
        let mut core = single(disk.clone());
        run(&mut core, 30);
        let info = MemberInfo {
            name: "n2".into(),
            peer_addr: "127.0.0.1:2".into(),
        };
        core.propose_member_change(2, Some(info), Box::new(|_| {}));
        // The change's entry is saved; recording the new membership fails.
        disk.fail_after(1);
        core.tick(core.now_ms + 10);
        let failed = core.handle_ready();
        assert!(
            matches!(failed, Err(DiskError::Failed(_))),
            "the member went on: {failed:?}"
        );
    }

    #[test]
    fn members_at_follows_membership_changes_not_other_entries_and_survives_restart() {
        let disk = MemDisk::new();
        let mut core = single(disk.clone());
        let founded = core.members_at();
        run(&mut core, 30);
        core.propose(&Command::put("k", "v", None), Box::new(|_| {}));
        run(&mut core, 2);
        assert!(core.progress().applied > founded);
        assert_eq!(core.members_at(), founded, "a put changes no membership");
        let info = MemberInfo {
            name: "n2".into(),
            peer_addr: "127.0.0.1:2".into(),
        };
        core.propose_member_change(2, Some(info), Box::new(|_| {}));
        for _ in 0..5 {
            core.tick(core.now_ms + 10);
            core.handle_ready().unwrap();
        }
        assert!(core.members().contains_key(&2));
        let added = core.members_at();
        assert!(
            added > founded,
            "the addition is newer: {added} vs {founded}"
        );
        assert!(added <= core.progress().applied);
        drop(core);
        let again = single(disk);
        assert!(again.members().contains_key(&2), "replayed or restored");
        assert!(
            again.members_at() >= added,
            "restarted at {} before {added}",
            again.members_at()
        );
    }

    #[test]
    fn member_ids_are_stable_and_nonzero() {
        assert_eq!(member_id("n1"), member_id("n1"));
        assert_ne!(member_id("n1"), member_id("n2"));
        assert_ne!(member_id(""), 0);
    }
}
