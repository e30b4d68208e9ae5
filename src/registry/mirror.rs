//! The HTTP API's copy of the registry, kept current by a watch.
//!
//! Every `GET /fleet/v1/units` page used to read ten whole prefixes of the
//! store (every unit, claim, state, machine…) over the API's one store
//! connection, each a linearizable range served by the Raft thread: 2.3 s
//! at the 99th percentile with 1,000 hosts and 30,000 units placing, the
//! leader's Raft thread busy serving them (issue 14). A [`Mirror`] reads the
//! registry once (one range, one revision) and then applies the store's
//! events, so a request reads memory. The copy keeps the keys and, updated
//! with each event, their decoded [`Index`] (units by name, holders, states,
//! machines): a page of a list reads its page's rows and nothing else.
//!
//! Reads stay linearizable: [`Mirror::read`] first asks the store for its
//! current revision (a linearizable read of one absent key), then waits for
//! the copy to reach it. A change acknowledged before the request is
//! therefore in what it reads, as with a direct read. The watch covers the
//! whole store, not only the registry, because the barrier is the store's
//! revision and only a watch of everything sees every revision go by; keys
//! outside the registry, and unit bodies (read through the [`super::BodyCache`]
//! by hash), are not kept. While the copy is not loaded (starting, or
//! loading again after its watch failed), or does not catch up within
//! [`CATCH_UP`], the caller reads the store directly instead.
//!
//! The copy starts with the first read and stops once nobody read it for
//! [`IDLE`]: a host whose API nobody asks watches nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::index::{self, Index};
use super::keys;
use super::reader::Reader;
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Event, EventKind, KeyValue, Revision};
use crate::consensus::node::LeaseRenewal;

/// How long a read waits for a loaded copy to reach the store's revision
/// before reading the store directly (a copy that is not loaded, starting
/// or reloading after its watch failed, is not waited for).
const CATCH_UP: Duration = Duration::from_millis(500);
/// A copy nobody read for this long stops (at its next change).
pub const IDLE: Duration = Duration::from_secs(300);
/// The first pause before loading again after the watch failed; it doubles
/// while loads keep failing before any change arrives, up to [`MAX_RETRY`].
const RETRY: Duration = Duration::from_secs(1);
/// The longest pause between loads.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The registry as of one store revision, its keys and their [`Index`];
/// cheap to clone (persistent maps).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    kvs: imbl::OrdMap<String, KeyValue>,
    index: Index,
    revision: Revision,
}

/// Whether the copy keeps `key`: registry keys other than unit bodies.
fn kept(key: &str) -> bool {
    key.starts_with(keys::ROOT) && !key.starts_with(keys::BODIES)
}

impl Snapshot {
    /// The copy of a store read whole (`kvs`, any keys) at `revision`.
    pub fn from_kvs(kvs: impl IntoIterator<Item = KeyValue>, revision: Revision) -> Snapshot {
        let kvs: imbl::OrdMap<String, KeyValue> = kvs
            .into_iter()
            .filter(|kv| kept(&kv.key))
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        Snapshot {
            index: Index::from_kvs(kvs.values()),
            kvs,
            revision,
        }
    }

    /// Applies a batch of watch events (whole revisions, in order).
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            if kept(&event.kv.key) {
                match event.kind {
                    EventKind::Put => {
                        self.index.put(&event.kv);
                        self.kvs.insert(event.kv.key.clone(), event.kv.clone());
                    }
                    EventKind::Delete => {
                        self.index.delete(&event.kv.key);
                        self.kvs.remove(&event.kv.key);
                    }
                }
            }
            self.revision = self.revision.max(event.revision());
        }
    }

    /// The store revision this copy reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Every key starting with `prefix`, in key order.
    pub fn prefix(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect()
    }

    /// One key, if the copy holds it.
    pub fn key(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).cloned()
    }
}

/// A registry read for one request: the mirror's snapshot, or the store
/// itself when the mirror could not catch up.
pub enum Registry<'a> {
    /// The mirror, caught up with the store as of the request; what is in
    /// no key (lease renewals) is asked of the store through the client.
    Mirror(Box<Snapshot>, &'a Client),
    /// The store, read directly.
    Store(&'a Client),
}

impl Registry<'_> {
    /// The registry's [`Index`]: the copy's, kept with it, or one built
    /// from a read of the store now.
    pub async fn index(&self) -> Result<Index, ClientError> {
        match self {
            Registry::Mirror(snapshot, _) => Ok(snapshot.index.clone()),
            Registry::Store(client) => Index::read(*client, &index::PREFIXES).await,
        }
    }
}

impl Reader for Registry<'_> {
    async fn read_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, ClientError> {
        match self {
            Registry::Mirror(snapshot, _) => Ok(snapshot.prefix(prefix)),
            Registry::Store(client) => client.read_prefix(prefix).await,
        }
    }

    async fn read_key(&self, key: &str) -> Result<Option<KeyValue>, ClientError> {
        match self {
            Registry::Mirror(snapshot, _) => Ok(snapshot.key(key)),
            Registry::Store(client) => client.read_key(key).await,
        }
    }

    async fn lease_renewals(&self) -> Result<Vec<LeaseRenewal>, ClientError> {
        match self {
            Registry::Mirror(_, client) | Registry::Store(client) => {
                Client::lease_renewals(client).await
            }
        }
    }
}

/// The copy and the task keeping it (see the module doc).
pub struct Mirror {
    endpoints: Vec<String>,
    shared: Arc<Shared>,
}

struct Shared {
    /// The copy; `None` while it is not loaded (or stopped).
    copy: watch::Sender<Option<Snapshot>>,
    /// Whether the task keeping it runs.
    running: AtomicBool,
    /// When it was last read, in ms since `epoch`.
    last_read_ms: AtomicU64,
    epoch: Instant,
}

impl Mirror {
    /// A mirror of the store at `endpoints`; nothing runs before the first read.
    pub fn new(endpoints: Vec<String>) -> Mirror {
        Mirror {
            endpoints,
            shared: Arc::new(Shared {
                copy: watch::Sender::new(None),
                running: AtomicBool::new(false),
                last_read_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// What a request reads: the copy once it reflects every change the
    /// store acknowledged before this call (asked of `client`), or the store
    /// itself if the copy is not loaded or does not get there within
    /// [`CATCH_UP`].
    pub async fn read<'a>(&self, client: &'a Client) -> Result<Registry<'a>, ClientError> {
        self.shared.touch();
        if !self.shared.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(keep(self.endpoints.clone(), self.shared.clone()));
        }
        // The store's revision now: the key never exists.
        let (_, barrier) = client.range(keys::ROOT, false, false).await?;
        let mut copy = self.shared.copy.subscribe();
        let loaded = copy.borrow().is_some();
        let caught_up = if loaded {
            tokio::time::timeout(
                CATCH_UP,
                copy.wait_for(|c| c.as_ref().is_some_and(|c| c.revision >= barrier)),
            )
            .await
            .ok()
        } else {
            None
        };
        let metrics = &crate::metrics::METRICS;
        Ok(match caught_up {
            Some(Ok(snapshot)) => {
                metrics.api_mirror_reads.add(1);
                Registry::Mirror(
                    Box::new(
                        snapshot
                            .clone()
                            .expect("wait_for returned a loaded snapshot"),
                    ),
                    client,
                )
            }
            _ => {
                tracing::debug!("the API's registry copy is behind revision {barrier}");
                metrics.api_store_reads.add(1);
                Registry::Store(client)
            }
        })
    }

    /// Whether the task keeping the copy runs (for tests).
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_read_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    fn idle(&self, idle: Duration) -> bool {
        let last = self.last_read_ms.load(Ordering::SeqCst);
        Duration::from_millis(self.now_ms().saturating_sub(last)) > idle
    }
}

/// Loads the copy and applies the store's changes to it, loading again
/// when the watch fails, until nobody read it for [`IDLE`].
async fn keep(endpoints: Vec<String>, shared: Arc<Shared>) {
    let mut pause = RETRY;
    loop {
        if let Err((e, followed)) = follow(&endpoints, &shared).await {
            tracing::debug!("the API's registry copy: {e}; loading it again");
            shared.copy.send_replace(None);
            if followed {
                pause = RETRY;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY);
        }
        if shared.idle(IDLE) {
            break;
        }
    }
    shared.copy.send_replace(None);
    shared.running.store(false, Ordering::SeqCst);
}

/// One load and the watch after it; returns Ok when the copy went idle,
/// else why it stopped and whether any change had arrived by then.
async fn follow(endpoints: &[String], shared: &Shared) -> Result<(), (ClientError, bool)> {
    let client = Client::connect(endpoints).await.map_err(|e| (e, false))?;
    let (kvs, revision) = client
        .range(keys::ROOT, true, false)
        .await
        .map_err(|e| (e, false))?;
    let mut copy = Snapshot::from_kvs(kvs, revision);
    shared.copy.send_replace(Some(copy.clone()));
    let mut watch = client.watch("", revision + 1);
    let mut followed = false;
    loop {
        let events = watch.next().await.map_err(|e| (e, followed))?;
        followed = true;
        copy.apply(&events);
        shared.copy.send_replace(Some(copy.clone()));
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

    fn event(kind: EventKind, key: &str, revision: Revision) -> Event {
        Event {
            kind,
            kv: kv(key, "v", revision),
        }
    }

    #[test]
    fn the_copy_keeps_registry_keys_but_bodies_and_counts_every_revision() {
        let unit = "/flotilla/units/a.service";
        let body = "/flotilla/bodies/00ff";
        let mut copy = Snapshot::from_kvs(
            [kv(unit, "1", 2), kv(body, "b", 2), kv("/other", "x", 3)],
            3,
        );
        assert_eq!(copy.prefix(keys::ROOT).len(), 1);
        assert!(copy.key(body).is_none());
        // A change outside the registry still moves the revision on: the
        // barrier is the store's revision.
        copy.apply(&[event(EventKind::Put, "/other", 4)]);
        assert_eq!(copy.revision(), 4);
        copy.apply(&[
            event(EventKind::Put, "/flotilla/units/b.service", 5),
            event(EventKind::Delete, unit, 6),
        ]);
        let units = copy.prefix(keys::UNITS);
        let names: Vec<&str> = units.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(names, ["/flotilla/units/b.service"]);
        assert_eq!(copy.revision(), 6);
    }
}
