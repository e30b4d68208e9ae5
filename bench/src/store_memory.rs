//! `flotilla-bench store-memory FILE`: where a member's state machine keeps
//! its bytes, measured on a real state.
//!
//! FILE is a backup (`flotilla snapshot save`) of a live cluster, for
//! example of `flotilla-bench sim` after its bulk start. The tool decodes it
//! as a member does when it installs a snapshot, and measures the heap each
//! part takes with glibc's own counters (`mallinfo2`: every byte malloc
//! handed out, its per-allocation overhead included), one part at a time:
//!
//! - the whole store as decoded;
//! - the keys alone (a store of the same keys and values with no history
//!   and no leases);
//! - the watch history alone (the same events, as the store keeps them);
//! - the leases' key sets alone.
//!
//! It prints one JSON line: the counts, the payload bytes (keys and values as
//! the quota counts them) and the heap bytes of each part, per key or event.
//! Single-threaded, so every allocation lands in malloc's main arena, which
//! is what `mallinfo2` reports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use flotilla::consensus::backup;
use flotilla::consensus::kv::{Command, Event, KvStore};
use serde_json::json;

/// Options of `flotilla-bench store-memory`.
#[derive(clap::Args, Debug)]
pub struct StoreMemoryArgs {
    /// A backup file (`flotilla snapshot save`).
    pub file: PathBuf,
}

/// glibc's `struct mallinfo2` (glibc 2.33 and later).
#[repr(C)]
#[derive(Default)]
struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

unsafe extern "C" {
    fn mallinfo2() -> Mallinfo2;
}

/// Bytes malloc has handed out and not had back: small chunks in the main
/// arena plus chunks it mapped on their own.
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads malloc's counters; it takes no arguments.
    let info = unsafe { mallinfo2() };
    info.uordblks + info.hblkhd
}

/// Heap bytes `make` leaves allocated, with what it made (kept alive
/// until the measurement is taken).
fn measured<T>(make: impl FnOnce() -> T) -> (T, usize) {
    let before = heap_in_use();
    let made = make();
    (made, heap_in_use().saturating_sub(before))
}

/// The registry prefix a key counts under: `/flotilla/<kind>/`, with the
/// per-machine keys told apart (proposal, claim, generation).
fn kind(key: &str) -> String {
    let Some(rest) = key.strip_prefix("/flotilla/") else {
        return "other".into();
    };
    let (top, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if top == "m" {
        let sub = rest.split('/').nth(1).unwrap_or("");
        return format!("m/*/{sub}");
    }
    top.to_string()
}

/// Runs the measurement.
pub fn run(args: StoreMemoryArgs) -> Result<()> {
    let file = std::fs::read(&args.file)
        .with_context(|| format!("reading the backup {}", args.file.display()))?;
    let (store, store_heap) = measured(|| backup::decode(&file).map(|data| data.kv));
    let store = store.with_context(|| format!("decoding {}", args.file.display()))?;
    drop(file);

    let mut kinds: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for kv in store.range("") {
        let entry = kinds.entry(kind(&kv.key)).or_default();
        entry.0 += 1;
        entry.1 += kv.key.len();
        entry.2 += kv.value.len();
    }
    let keys = store.key_count();
    let payload = store.data_bytes() as usize;

    // The keys alone: the same keys and values put into a store that keeps
    // one event of history and no leases.
    let (keys_only, keys_heap) = measured(|| {
        let mut only = KvStore::new(1);
        only.set_history_bytes(1);
        for kv in store.range("") {
            only.apply(&Command::put(kv.key.clone(), kv.value.clone(), None));
        }
        only
    });
    // What a history of one event costs, to take it out again.
    let one_event = keys_only
        .events_since("", keys_only.revision())
        .map(|e| e.len())
        .unwrap_or(0);

    // The watch history alone, as the store holds it: events behind Arcs in
    // a persistent vector.
    // (Read back inside the measurement: the events' keys and values are
    // allocated there, and the vector they are read into is freed again.)
    let (history, history_heap) = measured(|| {
        store
            .events_since("", store.oldest_watchable())
            .map(|events| {
                events
                    .into_iter()
                    .map(Arc::new)
                    .collect::<imbl::Vector<Arc<Event>>>()
            })
    });
    let history = history.context("reading the history back")?;
    let history_events = history.len();
    let history_payload: usize = history
        .iter()
        .map(|e| e.kv.key.len() + e.kv.value.len())
        .sum();

    // The leases' key sets, as the store holds them.
    let (lease_keys, lease_heap) = measured(|| {
        store
            .leases()
            .map(|l| (l.id, l.keys.clone()))
            .collect::<BTreeMap<u64, BTreeSet<String>>>()
    });
    let leased_keys: usize = lease_keys.values().map(BTreeSet::len).sum();

    let per = |bytes: usize, n: usize| (bytes as f64 / n.max(1) as f64).round();
    let kinds: BTreeMap<String, serde_json::Value> = kinds
        .into_iter()
        .map(|(kind, (n, key_bytes, value_bytes))| {
            (
                kind,
                json!({"keys": n, "avg_key_bytes": per(key_bytes, n),
                    "avg_value_bytes": per(value_bytes, n)}),
            )
        })
        .collect();
    println!(
        "{}",
        json!({
            "revision": store.revision(),
            "store_heap_mib": mib(store_heap),
            "keys": keys,
            "payload_mib": mib(payload),
            "keys_heap_mib": mib(keys_heap),
            "keys_heap_bytes_per_key": per(keys_heap, keys),
            "payload_bytes_per_key": per(payload, keys),
            "history_events": history_events,
            "history_payload_mib": mib(history_payload),
            "history_heap_mib": mib(history_heap),
            "history_heap_bytes_per_event": per(history_heap, history_events),
            "leases": store.lease_count(),
            "leased_keys": leased_keys,
            "lease_key_sets_heap_mib": mib(lease_heap),
            "one_event_kept_by_keys_only": one_event,
            "by_kind": kinds,
        })
    );
    drop((keys_only, history, lease_keys));
    Ok(())
}

fn mib(bytes: usize) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}
