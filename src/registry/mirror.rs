//! The member's one decoded copy of the registry, kept current by one watch:
//! the HTTP API reads it, and the scheduler on the Raft leader follows it.
//!
//! Every `GET /fleet/v1/units` page used to read ten whole prefixes of the
//! store (every unit, claim, state, machine…) over the API's one store
//! connection, each a linearizable range served by the Raft thread: 2.3 s
//! at the 99th percentile with 1,000 hosts and 30,000 units placing, the
//! leader's Raft thread busy serving them (issue 14). A [`Mirror`] reads the
//! registry once and then applies the store's events, so a request reads
//! memory. The registry is read page by page (one answer of 100,000 units
//! would outgrow the frame limit), each page at its own revision; the watch
//! replays the changes made meanwhile before the copy is shown
//! ([`load_and_watch`]). The copy is the registry's decoded
//! [`Index`] (units by name, holders, states, machines), updated with each
//! event: a page of a list reads its page's rows and nothing else, and the
//! raw keys are not kept.
//!
//! Reads stay linearizable: [`Mirror::read`] first asks the store for its
//! current revision (a linearizable read of one absent key), then waits for
//! the copy to reach it. A change acknowledged before the request is
//! therefore in what it reads, as with a direct read. The watch covers the
//! whole store, not only the registry, because the barrier is the store's
//! revision and only a watch of everything sees every revision go by; keys
//! outside the registry, and unit bodies (read through the [`super::BodyCache`]
//! by hash), are not kept. A read waits for a copy being loaded (the
//! member's first read starts it) until the load ends; while the copy is
//! not loaded and no load is under way (pausing after its watch failed), or
//! it does not catch up within [`CATCH_UP`], the index is read from the
//! store instead (a linearizable range per indexed prefix,
//! [`index::PREFIXES`]).
//!
//! The copy starts with the first read (or follower) and stops once nobody
//! read it for [`IDLE`] and nobody follows it: a host whose API nobody asks
//! and whose member does not lead watches nothing.
//!
//! It is the member's one decoded registry. The scheduler on the Raft leader
//! follows it ([`Mirror::follow`]) instead of watching and decoding the store
//! a second time: every update of the copy (its load, and each batch of
//! events with the index after it, [`Update`]) is handed to each follower,
//! whose [`super::view::View`] adopts the index (persistent maps: shared,
//! not copied) and keeps only what the scheduler alone needs. The copy does
//! not stop while anyone follows it. Updates a follower has not taken yet are
//! merged into one ([`Following`]): the events queue, but only the newest
//! index is held, since each index a queue held would keep alive the map
//! nodes its batch replaced (a scheduler busy writing a bulk start's
//! proposals fell thousands of batches behind).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::index::{self, Index};
use super::keys;
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Event, EventKind, KeyValue, Revision};
use crate::consensus::protocol::PAGE_KEYS;

/// How long a read waits for a loaded copy to reach the store's revision
/// before reading the store directly (a copy being loaded is waited for
/// until its load ends; one pausing between attempts after its watch
/// failed is not waited for).
const CATCH_UP: Duration = Duration::from_millis(500);
/// A copy nobody read for this long stops (at its next change).
pub const IDLE: Duration = Duration::from_secs(300);
/// The first pause before loading again after the watch failed; it doubles
/// while loads keep failing before any change arrives, up to [`MAX_RETRY`].
const RETRY: Duration = Duration::from_secs(1);
/// The longest pause between loads.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The registry's [`Index`] as of one store revision; cheap to clone
/// (persistent maps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    index: Index,
    revision: Revision,
}

/// Whether the copy keeps `key`: registry keys other than unit bodies.
fn kept(key: &str) -> bool {
    key.starts_with(keys::ROOT) && !key.starts_with(keys::BODIES)
}

impl Snapshot {
    /// The copy of a store read whole (`kvs`, any keys) at `revision`.
    pub fn from_kvs<'a>(
        kvs: impl IntoIterator<Item = &'a KeyValue>,
        revision: Revision,
    ) -> Snapshot {
        Snapshot {
            index: Index::from_kvs(kvs.into_iter().filter(|kv| kept(&kv.key))),
            revision,
        }
    }

    /// Applies a batch of watch events (whole revisions, in order).
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            if kept(&event.kv.key) {
                match event.kind {
                    EventKind::Put => self.index.put(&event.kv),
                    EventKind::Delete => self.index.delete(&event.kv.key),
                }
            }
            self.revision = self.revision.max(event.revision());
        }
    }

    /// The store revision this copy reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The registry's index at [`Snapshot::revision`].
    pub fn index(&self) -> &Index {
        &self.index
    }
}

/// One update of the copy, as its followers get it: the events of the
/// batches since the follower last took one (none for a load) and the copy
/// after them.
#[derive(Debug, Clone)]
pub struct Update {
    /// The copy's revision before the events: the revision of its load for a
    /// load, so a follower at an older revision knows it missed events.
    pub since: Revision,
    /// The batches' events, in order, every key (not only the registry's).
    pub events: Vec<Arc<[Event]>>,
    /// The copy after them.
    pub copy: Snapshot,
}

impl Update {
    /// An update of no events: the copy as loaded at its revision.
    pub fn loaded(copy: Snapshot) -> Update {
        Update {
            since: copy.revision(),
            events: Vec::new(),
            copy,
        }
    }

    /// Every event, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().flat_map(|batch| batch.iter())
    }
}

/// One follower's mailbox: the updates it has not taken, merged.
#[derive(Default)]
struct Mailbox {
    pending: Mutex<Option<Update>>,
    ready: Notify,
    /// Set when the follower is dropped.
    gone: AtomicBool,
}

impl Mailbox {
    /// Posts a batch of events (`None`: a load) that took the copy from
    /// revision `since` to `copy`.
    fn post(&self, since: Revision, batch: Option<&Arc<[Event]>>, copy: &Snapshot) {
        let mut pending = self.pending.lock().expect("no mailbox holder panics");
        match (pending.as_mut(), batch) {
            (Some(update), Some(batch)) => {
                update.events.push(batch.clone());
                update.copy = copy.clone();
            }
            // A load replaces what was not taken: the follower sees `since`
            // jump past its revision and loads again.
            (_, None) => *pending = Some(Update::loaded(copy.clone())),
            (None, Some(batch)) => {
                *pending = Some(Update {
                    since,
                    events: vec![batch.clone()],
                    copy: copy.clone(),
                });
            }
        }
        drop(pending);
        self.ready.notify_one();
    }

    fn take(&self) -> Option<Update> {
        self.pending
            .lock()
            .expect("no mailbox holder panics")
            .take()
    }
}

/// Every update of the copy from [`Mirror::follow`] on, merged while not
/// taken; dropping it stops the following.
pub struct Following {
    mailbox: Arc<Mailbox>,
}

impl Following {
    /// The updates since the last call, waiting for one if there is none.
    pub async fn next(&self) -> Update {
        loop {
            if let Some(update) = self.mailbox.take() {
                return update;
            }
            self.mailbox.ready.notified().await;
        }
    }

    /// The updates since the last call, if any.
    pub fn try_next(&self) -> Option<Update> {
        self.mailbox.take()
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.mailbox.gone.store(true, Ordering::SeqCst);
    }
}

/// The copy and the task keeping it (see the module doc). Clones share the
/// one copy.
#[derive(Clone)]
pub struct Mirror {
    endpoints: Vec<String>,
    shared: Arc<Shared>,
}

struct Shared {
    /// The copy; `None` while it is not loaded (or stopped).
    copy: watch::Sender<Option<Snapshot>>,
    /// Who follows every update ([`Mirror::follow`]); a closed one is dropped
    /// at the next update.
    followers: Mutex<Vec<Arc<Mailbox>>>,
    /// Whether the task keeping it runs.
    running: AtomicBool,
    /// Whether a load is under way (from the task's start, or its next
    /// attempt after a failure, to the load's end): a read waits until it
    /// ends, instead of reading the store beside it.
    loading: watch::Sender<bool>,
    /// When it was last read, in ms since `epoch`.
    last_read_ms: AtomicU64,
    epoch: Instant,
    /// The most keys asked for in one page of the load.
    page_keys: u32,
}

impl Mirror {
    /// A mirror of the store at `endpoints`; nothing runs before the first read.
    pub fn new(endpoints: Vec<String>) -> Mirror {
        Mirror::with_page_keys(endpoints, PAGE_KEYS)
    }

    /// [`Mirror::new`] loading the registry in pages of at most `page_keys`
    /// keys (the member bounds pages too): small pages make a registry of a
    /// few units load in many pages, as one of 100,000 does.
    pub fn with_page_keys(endpoints: Vec<String>, page_keys: u32) -> Mirror {
        Mirror {
            endpoints,
            shared: Arc::new(Shared {
                copy: watch::Sender::new(None),
                followers: Mutex::new(Vec::new()),
                running: AtomicBool::new(false),
                loading: watch::Sender::new(false),
                last_read_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                page_keys,
            }),
        }
    }

    /// What a request reads: the copy's index once it reflects every change
    /// the store acknowledged before this call (asked of `client`), or an
    /// index read from the store now if the copy is not loaded or does not
    /// get there within [`CATCH_UP`].
    pub async fn read(&self, client: &Client) -> Result<Index, ClientError> {
        self.shared.touch();
        self.run();
        let metrics = &crate::metrics::METRICS;
        // The store's revision now: the key never exists.
        let asked = Instant::now();
        let (_, barrier) = client.range(keys::ROOT, false, false).await?;
        metrics.api_barrier_seconds.observe(asked.elapsed());
        let waited = Instant::now();
        let mut copy = self.shared.copy.subscribe();
        // A copy being loaded is waited for (each of the load's pages is
        // bounded by the client's timeout): a member's first read, which starts the
        // copy, read the whole index from the store beside the load, one
        // linearizable range per prefix, while the load took the same.
        let mut loading = self.shared.loading.subscribe();
        let _ = loading.wait_for(|l| !l).await;
        let loaded = copy.borrow().is_some();
        // The copy's index, taken out so no borrow of the copy outlives this.
        let mirrored = if loaded {
            let reached = copy.wait_for(|c| c.as_ref().is_some_and(|c| c.revision >= barrier));
            match tokio::time::timeout(CATCH_UP, reached).await {
                Ok(Ok(snapshot)) => snapshot.as_ref().map(|s| s.index.clone()),
                _ => None,
            }
        } else {
            None
        };
        metrics.api_catch_up_seconds.observe(waited.elapsed());
        if let Some(index) = mirrored {
            metrics.api_mirror_reads.add(1);
            return Ok(index);
        }
        tracing::debug!("the API's registry copy is behind revision {barrier}");
        metrics.api_store_reads.add(1);
        Index::read(client, &index::PREFIXES).await
    }

    /// Whether the task keeping the copy runs (for tests).
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Every update of the copy from now on, until the receiver is dropped;
    /// the copy keeps running meanwhile. A follower that needs the registry
    /// as of now loads it after this call, and takes the updates past its
    /// revision ([`super::view::View::apply_copy`]).
    pub fn follow(&self) -> Following {
        let mailbox = Arc::new(Mailbox::default());
        self.shared
            .followers
            .lock()
            .expect("no follower list holder panics")
            .push(mailbox.clone());
        self.run();
        Following { mailbox }
    }

    /// The copy as it is, if loaded.
    pub fn current(&self) -> Option<Snapshot> {
        self.shared.copy.borrow().clone()
    }

    /// Waits until the copy is loaded, at most `within`.
    pub async fn loaded(&self, within: Duration) {
        let mut copy = self.shared.copy.subscribe();
        let _ = tokio::time::timeout(within, copy.wait_for(Option::is_some)).await;
    }

    /// Starts the task keeping the copy unless it runs.
    fn run(&self) {
        if !self.shared.running.swap(true, Ordering::SeqCst) {
            self.shared.loading.send_replace(true);
            tokio::spawn(keep(self.endpoints.clone(), self.shared.clone()));
        }
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_read_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// Whether nobody read the copy for `idle` and nobody follows it.
    fn idle(&self, idle: Duration) -> bool {
        let last = self.last_read_ms.load(Ordering::SeqCst);
        Duration::from_millis(self.now_ms().saturating_sub(last)) > idle && !self.followed()
    }

    /// Whether anyone follows the copy.
    fn followed(&self) -> bool {
        let mut followers = self
            .followers
            .lock()
            .expect("no follower list holder panics");
        followers.retain(|f| !f.gone.load(Ordering::SeqCst));
        !followers.is_empty()
    }

    /// Publishes `copy` to readers and posts the update to followers.
    /// (`events` is `None` for a load.)
    fn publish(&self, since: Revision, events: Option<Vec<Event>>, copy: &Snapshot) {
        self.copy.send_replace(Some(copy.clone()));
        let mut followers = self
            .followers
            .lock()
            .expect("no follower list holder panics");
        followers.retain(|f| !f.gone.load(Ordering::SeqCst));
        if followers.is_empty() {
            return;
        }
        let batch: Option<Arc<[Event]>> = events.map(Into::into);
        for follower in followers.iter() {
            follower.post(since, batch.as_ref(), copy);
        }
    }
}

/// Loads the copy and applies the store's changes to it, loading again
/// when the watch fails, until nobody read it for [`IDLE`].
async fn keep(endpoints: Vec<String>, shared: Arc<Shared>) {
    let mut pause = RETRY;
    loop {
        keep_while_used(&endpoints, &shared, &mut pause).await;
        shared.copy.send_replace(None);
        shared.loading.send_replace(false);
        shared.running.store(false, Ordering::SeqCst);
        // A follower that came after the last check, while no task ran,
        // must still be fed.
        if !shared.followed() || shared.running.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// Loads and follows until nobody read the copy for [`IDLE`] and nobody
/// follows it.
async fn keep_while_used(endpoints: &[String], shared: &Shared, pause: &mut Duration) {
    loop {
        shared.loading.send_replace(true);
        let kept = load_and_watch(endpoints, shared).await;
        shared.loading.send_replace(false);
        if let Err((e, followed)) = kept {
            tracing::debug!("the registry copy: {e}; loading it again");
            shared.copy.send_replace(None);
            if followed {
                *pause = RETRY;
            }
            tokio::time::sleep(*pause).await;
            *pause = (*pause * 2).min(MAX_RETRY);
        }
        if shared.idle(IDLE) {
            return;
        }
    }
}

/// One load and the watch after it; returns Ok when the copy went idle,
/// else why it stopped and whether any change had arrived by then.
///
/// The registry is read page by page ([`Client::range_all`]), the pages at
/// the revisions of their moments; the watch starts after the lowest, and
/// the copy is published only once its events have reached the highest
/// (every change made while the pages were read then applied, a key's
/// last event winning): never half loaded. A watch whose history was
/// compacted past the first page fails, and the copy is loaded again.
async fn load_and_watch(endpoints: &[String], shared: &Shared) -> Result<(), (ClientError, bool)> {
    let client = Client::connect(endpoints).await.map_err(|e| (e, false))?;
    let paged = client
        .range_all_with(keys::ROOT, false, shared.page_keys)
        .await
        .map_err(|e| (e, false))?;
    let mut copy = Snapshot::from_kvs(&paged.kvs, paged.revision);
    let whole_at = paged.last_revision;
    drop(paged);
    let mut published = copy.revision() >= whole_at;
    if published {
        shared.publish(copy.revision(), None, &copy);
        shared.loading.send_replace(false);
    }
    let mut watch = client.watch("", copy.revision() + 1);
    let mut followed = false;
    loop {
        let events = watch.next().await.map_err(|e| (e, followed))?;
        followed = true;
        let since = copy.revision();
        copy.apply(&events);
        if published {
            shared.publish(since, Some(events), &copy);
        } else if copy.revision() >= whole_at {
            // The pages and the changes made while they were read: whole.
            published = true;
            shared.publish(copy.revision(), None, &copy);
            shared.loading.send_replace(false);
        }
        if shared.idle(IDLE) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, revision: Revision) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: None,
        }
    }

    fn event(kind: EventKind, key: &str, value: &str, revision: Revision) -> Event {
        Event {
            kind,
            kv: kv(key, value, revision),
        }
    }

    #[test]
    fn the_copy_indexes_registry_keys_but_bodies_and_counts_every_revision() {
        let unit = "/flotilla/units/a.service";
        let body = "/flotilla/bodies/00ff";
        let record = |n: &str| {
            format!(
                r#"{{"name":"{n}","hash":"{}","desired":"launched"}}"#,
                "0".repeat(64)
            )
        };
        let mut copy = Snapshot::from_kvs(
            &[
                kv(unit, &record("a.service"), 2),
                kv(body, "b", 2),
                kv("/other", "x", 3),
            ],
            3,
        );
        assert_eq!(copy.index().unit_count(), 1);
        // A change outside the registry still moves the revision on: the
        // barrier is the store's revision.
        copy.apply(&[event(EventKind::Put, "/other", "v", 4)]);
        assert_eq!(copy.revision(), 4);
        copy.apply(&[
            event(
                EventKind::Put,
                "/flotilla/units/b.service",
                &record("b.service"),
                5,
            ),
            event(EventKind::Delete, unit, "", 6),
        ]);
        let names: Vec<String> = copy.index().units().map(|r| r.name.to_string()).collect();
        assert_eq!(names, ["b.service"]);
        assert_eq!(copy.revision(), 6);
        assert!(copy.index().check().is_ok());
    }

    /// Updates a follower has not taken merge into one holding the newest
    /// copy only; a load replaces them, so the follower sees the gap.
    #[test]
    fn updates_not_taken_merge_and_a_load_replaces_them() {
        let mailbox = Arc::new(Mailbox::default());
        let following = Following {
            mailbox: mailbox.clone(),
        };
        assert!(following.try_next().is_none());
        let mut copy = Snapshot::from_kvs(&[], 1);
        for revision in [2, 3] {
            let since = copy.revision();
            let batch = vec![event(EventKind::Put, "/other", "v", revision)];
            copy.apply(&batch);
            mailbox.post(since, Some(&batch.into()), &copy);
        }
        let update = following.try_next().unwrap();
        assert_eq!((update.since, update.copy.revision()), (1, 3));
        let revisions: Vec<Revision> = update.events().map(Event::revision).collect();
        assert_eq!(revisions, [2, 3]);
        assert!(following.try_next().is_none(), "taken");
        let batch: Arc<[Event]> = vec![event(EventKind::Put, "/other", "v", 4)].into();
        mailbox.post(3, Some(&batch), &Snapshot::from_kvs(&[], 4));
        mailbox.post(9, None, &Snapshot::from_kvs(&[], 9));
        let update = following.try_next().unwrap();
        assert_eq!((update.since, update.events().count()), (9, 0));
        drop(following);
        assert!(mailbox.gone.load(Ordering::SeqCst));
    }
}
