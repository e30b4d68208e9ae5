//! The benches' one store watch: every change under a prefix from a revision
//! on, each with the moment this process received it, kept across member
//! kills.
//!
//! `sim` and `idle-faults` read lease expiries from it (the presence records
//! the store deletes; `sim` keeps its killed hosts' only), `lab-failover`
//! also the scheduler's proposals and the agents' reported states. The
//! client's [`Watch`](flotilla::consensus::client::Watch) already moves to
//! another member when one fails; when it gives up (every member down for a
//! while, as when a leader is killed and the others are slow to answer), this
//! subscribes again from the first revision it has not delivered, so no
//! change is missed or recorded twice.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::consensus::client::{Client, ClientError};
use flotilla::consensus::kv::{Event, EventKind, Revision};
use flotilla::registry::keys;
use flotilla::tls::stream::ClientTls;

/// One change and when it arrived here.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The change.
    pub event: Event,
    /// When this process received it.
    pub at: Instant,
}

/// A running watch and everything it has received; stops when dropped.
pub struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Watches `prefix` from revision `from` through `endpoints`, tried in
    /// order (put a member about to be killed last: a watch through it
    /// notices only after the members' heartbeat silence, and its events
    /// arrive that much late), as `tls`'s identity (`None`: plaintext).
    pub fn start(
        endpoints: Vec<String>,
        tls: Option<Arc<ClientTls>>,
        prefix: &str,
        from: Revision,
    ) -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(record(
            endpoints,
            tls,
            prefix.to_string(),
            from,
            seen.clone(),
        ));
        Recorder { seen, task }
    }

    /// Everything received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("recorder lock").clone()
    }

    /// Every presence record deleted so far (a lease that expired, or an
    /// agent that left): the machine id and when the deletion arrived.
    pub fn expiries(&self) -> Vec<(String, Instant)> {
        self.seen
            .lock()
            .expect("recorder lock")
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

/// The watch loop of [`Recorder::start`]: subscribes, records, and when the
/// watch gives up, subscribes again where it left off. Ends only on
/// compaction (the revisions it missed are gone) or a refusal.
async fn record(
    endpoints: Vec<String>,
    tls: Option<Arc<ClientTls>>,
    prefix: String,
    mut from: Revision,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let pause = Duration::from_millis(200);
    loop {
        let client = match Client::connect_with(&endpoints, tls.clone()).await {
            Ok(client) => client,
            Err(_) => {
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let mut watch = client.watch(&prefix, from);
        let error = loop {
            match watch.next().await {
                Ok(events) => {
                    let at = Instant::now();
                    seen.lock()
                        .expect("recorder lock")
                        .extend(events.into_iter().map(|event| Seen { event, at }));
                }
                Err(e) => break e,
            }
        };
        from = from.max(watch.next_revision());
        if matches!(error, ClientError::Compacted(_) | ClientError::Denied(_)) {
            eprintln!("watch of {prefix} from revision {from} ended: {error}");
            return;
        }
        tokio::time::sleep(pause).await;
    }
}
