//! Runs one [`Core`] on its own thread and gives the rest of the daemon a [`Handle`].
//!
//! The thread is the only owner of the Raft node. Everything else sends it a
//! [`Msg`] over one channel. Each loop pass drains every queued message before
//! running the Ready pass, so all proposals that arrived meanwhile share one
//! log append and one fsync: that is the write batching. A thread, not a tokio
//! task, because the fsync blocks. A snapshot the node hands out is encoded
//! and written on a thread of its own, which reports back over the same
//! channel ([`super::snapshot`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use raft::eraftpb::{Message, Snapshot};
use tokio::sync::{mpsc as tmpsc, oneshot};

use super::codec::MemberInfo;
use super::kv::{Command, KeyValue, KvStore, Lease, LeaseId, Outcome, Revision};
use super::node::{Core, LeaseRenewal, RequestError, Status, WatchMsg};
use super::protocol::{GET_KEYS_MAX, PAGE_BYTES, PAGE_KEYS};
use super::storage::{DiskError, Durable};
use crate::metrics::METRICS;

/// A request to the node thread.
pub enum Msg {
    /// Propose a command and answer with its outcome.
    Propose {
        /// The command.
        command: Command,
        /// The agent it is proposed for (see [`Core::propose_for`]).
        agent: Option<String>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<Outcome, RequestError>>,
    },
    /// Read one lease.
    Lease {
        /// The lease.
        id: LeaseId,
        /// Confirm leadership first (ReadIndex); false serves local state.
        linearizable: bool,
        /// Where the lease goes (`None`: no such lease).
        reply: oneshot::Sender<Result<Option<Lease>, RequestError>>,
    },
    /// Read one key or a prefix.
    Range {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// Confirm leadership first (ReadIndex); false serves local state.
        linearizable: bool,
        /// When it was sent, for [`METRICS`]' queue timing.
        sent: Instant,
        /// Where the keys and the revision they were read at go.
        reply: oneshot::Sender<Result<RangeRead, RequestError>>,
    },
    /// Read one page of a key or prefix ([`read_page`]).
    RangePage {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// The last key of the previous page, if any.
        after: Option<String>,
        /// The most keys wanted (clamped by [`read_page`]).
        limit: u32,
        /// Confirm leadership first (ReadIndex); false serves local state.
        linearizable: bool,
        /// Where the page, its revision and whether more follow go.
        reply: oneshot::Sender<Result<Page, RequestError>>,
    },
    /// Read several keys at one point ([`read_keys`]).
    GetKeys {
        /// The keys.
        keys: Vec<String>,
        /// Confirm leadership first (ReadIndex); false serves local state.
        linearizable: bool,
        /// Where the keys found and the revision go.
        reply: oneshot::Sender<Result<RangeRead, RequestError>>,
    },
    /// Stream changes under a prefix from a revision.
    Watch {
        /// Key prefix.
        prefix: String,
        /// First revision wanted.
        from: Revision,
        /// Where events go; the watch ends when it is dropped.
        events: tmpsc::UnboundedSender<WatchMsg>,
    },
    /// Add (with its info) or remove a member.
    MemberChange {
        /// The member's Raft id.
        id: u64,
        /// Its info when adding.
        add: Option<MemberInfo>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<Outcome, RequestError>>,
    },
    /// When each lease was last renewed, as this member saw it.
    LeaseRenewals {
        /// Where they go.
        reply: oneshot::Sender<Vec<LeaseRenewal>>,
    },
    /// This member's view of the cluster.
    Status {
        /// Where it goes.
        reply: oneshot::Sender<Status>,
    },
    /// A backup file of the state machine, read at a linearizable point
    /// ([`super::backup`]).
    Backup {
        /// Where the file's bytes go.
        reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
    },
    /// A message from a peer.
    Raft(Message),
    /// A peer could not be reached.
    Unreachable(u64),
    /// How sending a snapshot ended: true once the receiver has all of it.
    SnapshotSent {
        /// The receiver.
        to: u64,
        /// Whether it got the whole snapshot.
        delivered: bool,
    },
    /// How writing a snapshot off the Raft thread ended ([`super::snapshot`]).
    SnapshotWritten(Result<Snapshot, DiskError>),
    /// Stop the member: the thread exits after this message.
    Stop,
}

/// Where the node thread sends Raft messages and learns peer addresses.
pub trait Transport: Send + 'static {
    /// Sends messages to peers. MUST NOT block; may drop (Raft retransmits).
    /// Every `MsgSnapshot` MUST be followed by a [`Msg::SnapshotSent`]
    /// saying how its delivery ended (see `Core::report_snapshot`).
    fn send(&self, messages: Vec<Message>);
    /// The current address book, after a membership change; `at` is the
    /// log index at which it is in force ([`Core::members_at`]).
    fn set_peers(&self, peers: &BTreeMap<u64, MemberInfo>, at: u64);
}

/// The daemon's way to talk to its Raft member. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    /// The leader's id as of the thread's last pass (0: none known, or the
    /// thread exited): read without waking the thread.
    leader: Arc<AtomicU64>,
}

impl Handle {
    /// Sends a raw message to the node thread (used by the peer listener).
    pub fn send(&self, msg: Msg) -> Result<(), RequestError> {
        self.tx
            .send(msg)
            .map_err(|_| RequestError::Stopped("the Raft thread has exited".into()))
    }

    /// Sends a request and waits for its answer. A request the thread never
    /// took changed nothing ([`RequestError::Stopped`]); one the thread took
    /// and then dropped without an answer (it exited: disk failure, stop) may
    /// have been proposed, so its outcome is [`RequestError::Unknown`].
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, RequestError>>) -> Msg,
    ) -> Result<T, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.await.map_err(|_| RequestError::Unknown)?
    }

    /// The leader's id as of the Raft thread's last pass, 0 when none is
    /// known or the thread has exited. Costs the thread nothing: every
    /// require-leader watch asks it once a second ([`super::server`]), and
    /// asking the thread's [`Handle::status`] instead cost every member a
    /// wake-up and a directory read per agent per second.
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Relaxed)
    }

    /// Proposes a command and waits until this member applied it.
    pub async fn propose(&self, command: Command) -> Result<Outcome, RequestError> {
        self.propose_for(command, None).await
    }

    /// [`Handle::propose`] on behalf of the agent `agent` ([`Core::propose_for`]).
    pub async fn propose_for(
        &self,
        command: Command,
        agent: Option<String>,
    ) -> Result<Outcome, RequestError> {
        self.ask(|reply| Msg::Propose {
            command,
            agent,
            reply,
        })
        .await
    }

    /// Lease `id` as this member knows it; when it knows none, as the
    /// leader's latest state does (a member behind the one that granted a
    /// lease may not have applied the grant yet). `None`: no such lease.
    pub async fn lease(&self, id: LeaseId) -> Result<Option<Lease>, RequestError> {
        for linearizable in [false, true] {
            let found = self
                .ask(|reply| Msg::Lease {
                    id,
                    linearizable,
                    reply,
                })
                .await?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Reads a key or prefix; linearizable unless `linearizable` is false.
    /// The records are the store's own, shared ([`KvStore::range_shared`]).
    pub async fn range(
        &self,
        key: String,
        prefix: bool,
        linearizable: bool,
    ) -> Result<RangeRead, RequestError> {
        self.ask(|reply| Msg::Range {
            key,
            prefix,
            linearizable,
            sent: Instant::now(),
            reply,
        })
        .await
    }

    /// Reads one page of a key or prefix: the keys past `after`, at most
    /// `limit` (clamped to [`PAGE_KEYS`]) and about [`PAGE_BYTES`];
    /// linearizable unless `linearizable` is false.
    pub async fn range_page(
        &self,
        key: String,
        prefix: bool,
        after: Option<String>,
        limit: u32,
        linearizable: bool,
    ) -> Result<Page, RequestError> {
        self.ask(|reply| Msg::RangePage {
            key,
            prefix,
            after,
            limit,
            linearizable,
            reply,
        })
        .await
    }

    /// Reads several keys at one point, in one round: linearizable unless
    /// `linearizable` is false. More than [`GET_KEYS_MAX`] keys, or an
    /// answer past about [`PAGE_BYTES`], is refused ([`read_keys`]).
    pub async fn get_keys(
        &self,
        keys: Vec<String>,
        linearizable: bool,
    ) -> Result<RangeRead, RequestError> {
        if keys.len() > GET_KEYS_MAX {
            return Err(RequestError::Invalid(format!(
                "{} keys asked at once; at most {GET_KEYS_MAX} are read in one request: ask in \
                 several",
                keys.len()
            )));
        }
        self.ask(|reply| Msg::GetKeys {
            keys,
            linearizable,
            reply,
        })
        .await
    }

    /// Adds or removes a member.
    pub async fn member_change(
        &self,
        id: u64,
        add: Option<MemberInfo>,
    ) -> Result<Outcome, RequestError> {
        self.ask(|reply| Msg::MemberChange { id, add, reply }).await
    }

    /// A backup file of the state machine, as of now (linearizable).
    pub async fn backup(&self) -> Result<Vec<u8>, RequestError> {
        self.ask(|reply| Msg::Backup { reply }).await
    }

    /// When each lease was last renewed, as this member saw it
    /// ([`Core::lease_renewals`]).
    pub async fn lease_renewals(&self) -> Result<Vec<LeaseRenewal>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Msg::LeaseRenewals { reply })?;
        answer
            .await
            .map_err(|_| RequestError::Stopped("the Raft thread has exited".into()))
    }

    /// This member's view of the cluster.
    pub async fn status(&self) -> Result<Status, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(Msg::Status { reply })?;
        answer
            .await
            .map_err(|_| RequestError::Stopped("the Raft thread has exited".into()))
    }

    /// Streams changes under `prefix` from revision `from`.
    pub fn watch(
        &self,
        prefix: String,
        from: Revision,
    ) -> Result<tmpsc::UnboundedReceiver<WatchMsg>, RequestError> {
        let (events, rx) = tmpsc::unbounded_channel();
        self.send(Msg::Watch {
            prefix,
            from,
            events,
        })?;
        Ok(rx)
    }
}

/// The records a range read found (the store's own, shared) and the
/// revision it read at.
pub type RangeRead = (Vec<Arc<KeyValue>>, Revision);

fn read(kv: &KvStore, key: &str, prefix: bool) -> RangeRead {
    let kvs = kv.range_shared(key, prefix).cloned().collect();
    (kvs, kv.revision())
}

/// One page of a paged read: its keys, the revision it was read at, and
/// whether keys follow its last one. The records are the store's own, shared,
/// as a [`RangeRead`]'s.
pub type Page = (Vec<Arc<KeyValue>>, Revision, bool);

/// The page of `key` (or of the prefix `key`) past `after`: at most `limit`
/// keys, clamped to 1..=[`PAGE_KEYS`] (the limit comes from the network),
/// and closed before a key that would take it past [`PAGE_BYTES`] (it holds
/// at least one key), so an answer never nears the frame limit.
pub fn read_page(
    kv: &super::kv::KvStore,
    key: &str,
    prefix: bool,
    after: Option<&str>,
    limit: u32,
) -> Page {
    if !prefix {
        let found = kv
            .range_shared(key, false)
            .filter(|_| after.is_none_or(|a| key > a));
        return (found.cloned().collect(), kv.revision(), false);
    }
    let limit = usize::try_from(limit.clamp(1, PAGE_KEYS)).unwrap_or(1);
    let mut kvs = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for found in kv.range_after(key, after) {
        let size = found.key.len() + found.value.len() + 64;
        if kvs.len() >= limit || (!kvs.is_empty() && bytes + size > PAGE_BYTES) {
            more = true;
            break;
        }
        bytes += size;
        kvs.push(found.clone());
    }
    (kvs, kv.revision(), more)
}

/// The records of `keys` that exist (in the order asked, each once), and
/// the revision they were read at; refused when the answer would pass about
/// [`PAGE_BYTES`] (the keys come from the network, their values may be
/// large), so an answer stays far below the frame limit.
pub fn read_keys(kv: &KvStore, keys: &[String]) -> Result<RangeRead, RequestError> {
    let mut kvs = Vec::new();
    let mut bytes = 0;
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        if !seen.insert(key.as_str()) {
            continue;
        }
        for found in kv.range_shared(key, false) {
            bytes += found.key.len() + found.value.len() + 64;
            if bytes > PAGE_BYTES {
                return Err(RequestError::Invalid(format!(
                    "the {} keys asked hold more than {} MiB; read them in smaller groups",
                    keys.len(),
                    PAGE_BYTES >> 20
                )));
            }
            kvs.push(found.clone());
        }
    }
    Ok((kvs, kv.revision()))
}

/// Why the node thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to ([`Msg::Stop`]), or every [`Handle`] was dropped.
    Stopped,
    /// A fatal error (the disk failed, the Raft thread panicked). The member
    /// cannot go on: the daemon MUST end with a failure status, so systemd
    /// restarts it from what it persisted, instead of staying up with its
    /// ports bound answering every request with an error.
    Failed(String),
}

/// Starts the node thread; it runs until [`Msg::Stop`], until every [`Handle`]
/// is dropped, or until a fatal error, and returns why it ended. `transport`
/// is built with a handle so it can report unreachable peers.
///
/// A panic on the thread is caught and returned as [`Exit::Failed`]: the
/// unwinding drops the requests in hand, whose callers read "outcome
/// unknown" (they may have been proposed), never "refused".
pub fn spawn<D: Durable + 'static, T: Transport>(
    core: Core<D>,
    tick: Duration,
    transport: impl FnOnce(Handle) -> T,
) -> (Handle, JoinHandle<Exit>) {
    let (tx, rx) = mpsc::channel::<Msg>();
    let leader = Arc::new(AtomicU64::new(0));
    let transport = transport(Handle {
        tx: tx.clone(),
        leader: leader.clone(),
    });
    let published_leader = leader.clone();
    let writer_tx = tx.clone();
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| {
                drive(core, tick, &rx, &writer_tx, &transport, &published_leader)
            });
            let exit = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                Exit::Failed(format!("the Raft thread panicked: {what}"))
            });
            published_leader.store(0, Ordering::Relaxed);
            if let Exit::Failed(why) = &exit {
                tracing::error!("this Raft member stopped: {why}");
            }
            exit
        })
        .expect("spawning the raft thread");
    (Handle { tx, leader }, thread)
}

/// What the node thread last published as metrics ([`crate::metrics`]).
#[derive(Default)]
struct Published {
    leader: Option<u64>,
    /// When the figures that cost a directory read or a walk of the
    /// leases were last published: at most once a second.
    slow: Option<Instant>,
}

impl Published {
    fn publish<D: Durable>(&mut self, core: &Core<D>) {
        let progress = core.progress();
        METRICS.raft_term.set(progress.term);
        METRICS.raft_commit_index.set(progress.commit);
        METRICS.raft_applied_index.set(progress.applied);
        METRICS.raft_is_leader.set(u64::from(core.is_leader()));
        if self.leader.is_some_and(|was| was != progress.leader) {
            METRICS.raft_leader_changes.add(1);
        }
        self.leader = Some(progress.leader);
        if self
            .slow
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.slow = Some(Instant::now());
            let status = core.status();
            METRICS.store_bytes.set(status.store_bytes);
            METRICS.store_quota_used_bytes.set(core.kv().data_bytes());
            METRICS.store_quota_bytes.set(core.limits().quota_bytes);
            METRICS.store_no_space.set(u64::from(status.no_space));
            METRICS.store_keys.set(status.keys);
            METRICS.leases.set(core.kv().leases().count() as u64);
        }
    }
}

/// The node thread's loop; see [`spawn`].
fn drive<D: Durable, T: Transport>(
    mut core: Core<D>,
    tick: Duration,
    rx: &mpsc::Receiver<Msg>,
    tx: &mpsc::Sender<Msg>,
    transport: &T,
    leader: &AtomicU64,
) -> Exit {
    let start = Instant::now();
    let mut next_tick = start + tick;
    let mut members = core.members().clone();
    let mut members_at = core.members_at();
    transport.set_peers(&members, members_at);
    let mut published = Published::default();
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let mut running = match rx.recv_timeout(wait) {
            Ok(msg) => handle(&mut core, msg),
            Err(RecvTimeoutError::Timeout) => Ok(true),
            Err(RecvTimeoutError::Disconnected) => Ok(false),
        };
        // Drain everything queued: one Ready pass (one fsync) for all of it.
        while running == Ok(true) {
            match rx.try_recv() {
                Ok(msg) => running = handle(&mut core, msg),
                Err(_) => break,
            }
        }
        match running {
            Ok(true) => {}
            Ok(false) => return Exit::Stopped,
            Err(e) => return Exit::Failed(format!("its storage failed: {e}")),
        }
        let now = Instant::now();
        while now >= next_tick {
            let ms = u64::try_from(next_tick.duration_since(start).as_millis()).unwrap_or(u64::MAX);
            core.tick(ms);
            next_tick += tick;
        }
        // Messages leave at each step of the pass that lets them (a
        // leader's heartbeats before its fsync, the rest after it), not
        // after the whole pass: a follower's answer to the heartbeat a
        // linearizable read waits for would otherwise also wait for the
        // follower to apply a bulk start's transactions.
        let sent = core.handle_ready_with(&mut |messages| {
            if !messages.is_empty() {
                transport.send(messages);
            }
        });
        if let Err(e) = sent {
            return Exit::Failed(format!("its storage failed: {e}"));
        }
        if let Some(job) = core.take_snapshot_job() {
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("snapshot".into())
                .spawn(move || {
                    let _ = tx.send(Msg::SnapshotWritten(job.write()));
                });
            if let Err(e) = spawned {
                return Exit::Failed(format!("cannot start the snapshot writer: {e}"));
            }
        }
        published.publish(&core);
        leader.store(core.progress().leader, Ordering::Relaxed);
        // Compared by reference each pass; cloned only when membership changed.
        if *core.members() != members || core.members_at() != members_at {
            members = core.members().clone();
            members_at = core.members_at();
            transport.set_peers(&members, members_at);
        }
    }
}

/// Handles one message; false means stop, an error that the disk failed.
fn handle<D: Durable>(core: &mut Core<D>, msg: Msg) -> Result<bool, String> {
    match msg {
        Msg::Propose {
            command,
            agent,
            reply,
        } => {
            let started = Instant::now();
            core.propose_for(
                &command,
                agent.as_deref(),
                Box::new(move |r| {
                    METRICS.raft_proposal_seconds.observe(started.elapsed());
                    let _ = reply.send(r);
                }),
            )
        }
        Msg::Lease {
            id,
            linearizable: false,
            reply,
        } => {
            let _ = reply.send(Ok(core.kv().lease(id).cloned()));
        }
        Msg::Lease { id, reply, .. } => core.read_index(Box::new(move |r| {
            let _ = reply.send(r.map(|kv| kv.lease(id).cloned()));
        })),
        Msg::Range {
            key,
            prefix,
            linearizable: false,
            reply,
            ..
        } => {
            let _ = reply.send(Ok(read(core.kv(), &key, prefix)));
        }
        Msg::Range {
            key,
            prefix,
            reply,
            sent,
            ..
        } => {
            METRICS.raft_read_queue_seconds.observe(sent.elapsed());
            core.read_index(Box::new(move |r| {
                let _ = reply.send(r.map(|kv| read(kv, &key, prefix)));
            }));
        }
        Msg::RangePage {
            key,
            prefix,
            after,
            limit,
            linearizable: false,
            reply,
        } => {
            let _ = reply.send(Ok(read_page(
                core.kv(),
                &key,
                prefix,
                after.as_deref(),
                limit,
            )));
        }
        Msg::RangePage {
            key,
            prefix,
            after,
            limit,
            reply,
            ..
        } => core.read_index(Box::new(move |r| {
            let _ = reply.send(r.map(|kv| read_page(kv, &key, prefix, after.as_deref(), limit)));
        })),
        Msg::GetKeys {
            keys,
            linearizable: false,
            reply,
        } => {
            let _ = reply.send(read_keys(core.kv(), &keys));
        }
        Msg::GetKeys { keys, reply, .. } => core.read_index(Box::new(move |r| {
            let _ = reply.send(r.and_then(|kv| read_keys(kv, &keys)));
        })),
        Msg::Watch {
            prefix,
            from,
            events,
        } => core.watch(prefix, from, Box::new(move |m| events.send(m).is_ok())),
        Msg::MemberChange { id, add, reply } => core.propose_member_change(
            id,
            add,
            Box::new(move |r| {
                let _ = reply.send(r);
            }),
        ),
        Msg::Status { reply } => {
            let _ = reply.send(core.status());
        }
        Msg::LeaseRenewals { reply } => {
            let _ = reply.send(core.lease_renewals());
        }
        Msg::Backup { reply } => {
            let members = core.members().clone();
            // The copy is cheap (values are shared); encoding a large
            // state is not, so it happens off this thread.
            core.read_index(Box::new(move |r| match r {
                Ok(kv) => {
                    let kv = kv.clone();
                    std::thread::spawn(move || {
                        let _ = reply.send(Ok(super::backup::encode(&kv, &members)));
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }));
        }
        Msg::Raft(m) => core.step(m),
        Msg::Unreachable(id) => core.report_unreachable(id),
        Msg::SnapshotSent { to, delivered } => core.report_snapshot(to, delivered),
        Msg::SnapshotWritten(written) => {
            core.snapshot_written(written).map_err(|e| e.to_string())?;
        }
        Msg::Stop => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::node::NodeConfig;
    use crate::consensus::storage::{Batch, DiskError, MemDisk, Recovered};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A single member sends nothing.
    struct Nowhere;

    impl Transport for Nowhere {
        fn send(&self, _: Vec<Message>) {}
        fn set_peers(&self, _: &BTreeMap<u64, MemberInfo>, _: u64) {}
    }

    #[tokio::test]
    async fn a_request_in_hand_when_the_thread_dies_has_an_unknown_outcome() {
        let disk = MemDisk::new();
        let members = BTreeMap::from([(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        )]);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let core = Core::new(NodeConfig::new(1, 5, 50), disk.clone(), &members, &logger).unwrap();
        let (handle, thread) = spawn(core, Duration::from_millis(5), |_| Nowhere);
        while handle.status().await.unwrap().leader == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle.propose(Command::put("k", "v", None)).await.unwrap();
        disk.fail_after(0);
        // Proposed, then the thread fails to save it and exits: it may or may
        // not have been applied, as far as the caller can know.
        let in_hand = handle.propose(Command::put("k", "w", None)).await;
        assert_eq!(in_hand, Err(RequestError::Unknown));
        let exit = thread.join().unwrap();
        assert!(
            matches!(&exit, Exit::Failed(why) if why.contains("storage failed")),
            "{exit:?}"
        );
        // Sent after the thread is gone: certainly not applied.
        let after = handle.propose(Command::put("k", "x", None)).await;
        assert!(matches!(after, Err(RequestError::Stopped(_))), "{after:?}");
    }

    /// A disk whose driver panics once armed (a bug, not an I/O error).
    struct PanickingDisk {
        inner: MemDisk,
        armed: Arc<AtomicBool>,
    }

    impl Durable for PanickingDisk {
        fn load(&self) -> Result<Recovered, DiskError> {
            self.inner.load()
        }

        fn save(&mut self, batch: &Batch) -> Result<(), DiskError> {
            assert!(
                !self.armed.load(Ordering::SeqCst),
                "a bug in the disk layer"
            );
            self.inner.save(batch)
        }
    }

    #[tokio::test]
    async fn a_panic_on_the_raft_thread_ends_it_as_failed_and_in_flight_requests_read_unknown() {
        let armed = Arc::new(AtomicBool::new(false));
        let disk = PanickingDisk {
            inner: MemDisk::new(),
            armed: armed.clone(),
        };
        let members = BTreeMap::from([(
            1,
            MemberInfo {
                name: "n1".into(),
                peer_addr: "127.0.0.1:1".into(),
            },
        )]);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let core = Core::new(NodeConfig::new(1, 5, 50), disk, &members, &logger).unwrap();
        let (handle, thread) = spawn(core, Duration::from_millis(5), |_| Nowhere);
        while handle.status().await.unwrap().leader == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        armed.store(true, Ordering::SeqCst);
        let in_hand = handle.propose(Command::put("k", "w", None)).await;
        assert_eq!(in_hand, Err(RequestError::Unknown));
        let exit = thread.join().expect("the panic is caught on the thread");
        assert!(
            matches!(&exit, Exit::Failed(why) if why.contains("panicked: a bug in the disk layer")),
            "{exit:?}"
        );
        assert!(matches!(
            handle.status().await,
            Err(RequestError::Stopped(_))
        ));
    }
}
