//! The benches' one store watch: every change under a prefix, each with the
//! moment this process received it, kept across member kills.
//!
//! `sim` and `idle-faults` read lease expiries from it (the presence records
//! the store deletes; `sim` keeps its killed hosts' only), `lab-failover`
//! also the renewal stamps, the scheduler's proposals and the agents'
//! reported states. The client's
//! [`Watch`](flotilla::consensus::client::Watch) already moves to another
//! member when one fails; when it gives up (every member down for a while,
//! as when a leader is killed and the others are slow to answer), this
//! subscribes again from the first revision it has not delivered.
//!
//! A watch of a quiet prefix does not advance while nothing under it
//! changes (members' heartbeats carry no revision), so after a member kill
//! its resume point may have left the members' history (50,000 events: 40 s
//! of 1,000 hosts' renewal stamps at TTL 5 s) and the member answers
//! "compacted". Then the prefix is listed again and compared with what the
//! recorder knew: a key gone, or there again with a newer creation
//! revision, was deleted unseen, and is recorded as a deletion marked
//! [`Seen::listed`] (it happened at or before its `at`); watching resumes
//! after the listing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::consensus::client::{Client, ClientError};
use flotilla::consensus::kv::{Event, EventKind, KeyValue, Revision};
use flotilla::registry::keys;
use flotilla::tls::stream::ClientTls;

/// One change and when it arrived here.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The change.
    pub event: Event,
    /// When this process received it.
    pub at: Instant,
    /// Read from a listing, not received as it happened: the keys there when
    /// the recorder started, and what changed while its watch was behind the
    /// history (then it happened at or before `at`).
    pub listed: bool,
}

/// What the watch task shares with the [`Recorder`].
#[derive(Default)]
struct Shared {
    seen: Vec<Seen>,
    /// Times the watch fell behind the history and the prefix was listed.
    resyncs: usize,
}

/// A running watch and everything it has received; stops when dropped.
pub struct Recorder {
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Lists `prefix` (every key there becomes a [`Seen::listed`] put) and
    /// watches it from that listing on, through `endpoints` tried in order
    /// (put a member about to be killed last: a watch through it notices
    /// only after the members' heartbeat silence, and its events arrive that
    /// much late), as `tls`'s identity (`None`: plaintext).
    pub async fn start(
        endpoints: Vec<String>,
        tls: Option<Arc<ClientTls>>,
        prefix: &str,
    ) -> Result<Recorder, ClientError> {
        let client = Client::connect_with(&endpoints, tls.clone()).await?;
        let (kvs, revision) = client.range(prefix, true, false).await?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut known = BTreeMap::new();
        note_listing(&shared, &mut known, kvs, revision);
        let task = tokio::spawn(record(
            endpoints,
            tls,
            prefix.to_string(),
            revision + 1,
            known,
            shared.clone(),
        ));
        Ok(Recorder { shared, task })
    }

    /// Everything received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().expect("recorder lock").seen.clone()
    }

    /// How many times the watch fell behind the history and was resumed
    /// from a new listing.
    pub fn resyncs(&self) -> usize {
        self.shared.lock().expect("recorder lock").resyncs
    }

    /// How many of [`Recorder::expiries`] a listing found (the watch was
    /// behind the history then): each happened at or before its time.
    pub fn expiries_found_by_listing(&self) -> usize {
        self.shared
            .lock()
            .expect("recorder lock")
            .seen
            .iter()
            .filter(|s| s.listed && s.event.kind == EventKind::Delete)
            .filter(|s| s.event.kv.key.starts_with(keys::MACHINES))
            .count()
    }

    /// Every presence record deleted so far (a lease that expired, or an
    /// agent that left): the machine id and when the deletion arrived (or
    /// was found by a listing).
    pub fn expiries(&self) -> Vec<(String, Instant)> {
        self.shared
            .lock()
            .expect("recorder lock")
            .seen
            .iter()
            .filter(|s| s.event.kind == EventKind::Delete)
            .filter_map(|s| {
                let id = s.event.kv.key.strip_prefix(keys::MACHINES)?;
                Some((id.to_string(), s.at))
            })
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records a listing at `revision` against `known` (each key's creation
/// revision): keys gone or created again since were deleted unseen; new or
/// recreated keys are puts. The first listing records every key as a put.
fn note_listing(
    shared: &Mutex<Shared>,
    known: &mut BTreeMap<String, Revision>,
    kvs: Vec<KeyValue>,
    revision: Revision,
) {
    let at = Instant::now();
    let now: BTreeMap<String, KeyValue> = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    let mut found = Vec::new();
    for (key, created) in known.iter() {
        if now.get(key).is_none_or(|kv| kv.create_revision != *created) {
            let kv = KeyValue {
                key: key.clone(),
                value: Vec::new(),
                create_revision: *created,
                mod_revision: revision,
                version: 0,
                lease: None,
            };
            found.push(Event {
                kind: EventKind::Delete,
                kv,
            });
        }
    }
    for (key, kv) in &now {
        if known.get(key) != Some(&kv.create_revision) {
            found.push(Event {
                kind: EventKind::Put,
                kv: kv.clone(),
            });
        }
    }
    *known = now
        .into_iter()
        .map(|(key, kv)| (key, kv.create_revision))
        .collect();
    let mut shared = shared.lock().expect("recorder lock");
    shared.seen.extend(found.into_iter().map(|event| Seen {
        event,
        at,
        listed: true,
    }));
}

/// The watch loop of [`Recorder::start`]: subscribes, records, and when the
/// watch gives up, subscribes again where it left off, or after a new
/// listing when that is no longer in the history. Ends only on a refusal.
async fn record(
    endpoints: Vec<String>,
    tls: Option<Arc<ClientTls>>,
    prefix: String,
    mut from: Revision,
    mut known: BTreeMap<String, Revision>,
    shared: Arc<Mutex<Shared>>,
) {
    let pause = Duration::from_millis(200);
    loop {
        let Ok(client) = Client::connect_with(&endpoints, tls.clone()).await else {
            tokio::time::sleep(pause).await;
            continue;
        };
        let mut watch = client.watch(&prefix, from);
        let error = loop {
            match watch.next().await {
                Ok(events) => {
                    let at = Instant::now();
                    for event in &events {
                        match event.kind {
                            EventKind::Put => {
                                known.insert(event.kv.key.clone(), event.kv.create_revision)
                            }
                            EventKind::Delete => known.remove(&event.kv.key),
                        };
                    }
                    shared
                        .lock()
                        .expect("recorder lock")
                        .seen
                        .extend(events.into_iter().map(|event| Seen {
                            event,
                            at,
                            listed: false,
                        }));
                }
                Err(e) => break e,
            }
        };
        from = from.max(watch.next_revision());
        match error {
            ClientError::Compacted(_) => {
                if let Ok((kvs, revision)) = client.range(&prefix, true, false).await {
                    eprintln!(
                        "watch of {prefix}: revision {from} left the history; listed again at {revision}"
                    );
                    shared.lock().expect("recorder lock").resyncs += 1;
                    note_listing(&shared, &mut known, kvs, revision);
                    from = revision + 1;
                }
            }
            ClientError::Denied(e) => {
                eprintln!("watch of {prefix} refused: {e}");
                return;
            }
            _ => {}
        }
        tokio::time::sleep(pause).await;
    }
}
