//! The daemon's measurements, in Prometheus's text format (`GET /metrics` on
//! the API, [`crate::api::scrape`]).
//!
//! One process-wide set of instruments ([`METRICS`]), recorded where the thing
//! happens: the Raft thread publishes its term and indexes and times each
//! proposal, the disk times each commit (its fsync), the scheduler counts the
//! placements it writes, the agent counts claims that lost a race and times
//! its systemd calls, the API times each request by route. Plain atomics and
//! fixed buckets, written by hand: a scrape is a few hundred lines of text and
//! recording costs one atomic add, so no metrics library is pulled in.
//!
//! What the store holds (units by desired state, reported states, machines)
//! is not counted here: the scrape reads it from the store then
//! ([`Cluster`]), so it is the cluster's truth, not this process's memory.
//! Everything else is this process's own: a counter starts at 0 when the
//! daemon starts, and an agent-only host has no Raft figures at all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s, enough
/// for an fsync on a fast disk and a systemd call on a loaded host alike.
const BOUNDS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that is set, and absent until it first is (a host without a Raft
/// member shows no Raft figures rather than zeros that look real).
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicU64,
    set: AtomicBool,
}

impl Gauge {
    const fn new() -> Gauge {
        Gauge {
            value: AtomicU64::new(0),
            set: AtomicBool::new(false),
        }
    }

    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.value.store(value, Ordering::Relaxed);
        self.set.store(true, Ordering::Relaxed);
    }

    /// The value, if it was ever set.
    pub fn get(&self) -> Option<u64> {
        self.set
            .load(Ordering::Relaxed)
            .then(|| self.value.load(Ordering::Relaxed))
    }
}

/// How long something took, in [`BOUNDS`] buckets (not cumulative here;
/// the exposition adds them up).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Durations recorded so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            let le = BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {total}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// A histogram family as the exposition writes it: every label set's series.
trait Series {
    fn write_series(&self, out: &mut String, name: &str);
}

impl Series for Histogram {
    fn write_series(&self, out: &mut String, name: &str) {
        self.write(out, name, "");
    }
}

impl Series for Family {
    fn write_series(&self, out: &mut String, name: &str) {
        self.write(out, name);
    }
}

/// Histograms by label set (API route, systemd method), created on first use.
#[derive(Debug, Default)]
pub struct Family {
    members: Mutex<BTreeMap<String, Histogram>>,
}

impl Family {
    const fn new() -> Family {
        Family {
            members: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one duration under `labels` (already `key="value",...`).
    pub fn observe(&self, labels: String, took: Duration) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.entry(labels).or_default().observe(took);
    }

    /// Durations recorded under `labels` so far.
    pub fn count(&self, labels: &str) -> u64 {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.get(labels).map_or(0, Histogram::count)
    }

    fn write(&self, out: &mut String, name: &str) {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, histogram) in members.iter() {
            histogram.write(out, name, labels);
        }
    }
}

/// What a Raft log entry did when this member applied it: the label of
/// `flotilla_raft_entries_applied_total`. Entries per second alone cannot
/// say who keeps an idle cluster busy (issue 14's idle runs at 115 and 236
/// entries/s against 5–10); these kinds can, with a store watch for the keys
/// the writes touched (`flotilla-bench sim`'s idle phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A new leader's empty entry.
    Empty,
    /// A membership change.
    Membership,
    /// A transaction that changed keys (made watch events).
    Write,
    /// A transaction that changed nothing: a compare failed, or its ops
    /// had nothing to do (deleting absent keys).
    Unchanged,
    /// One lease keep-alive ([`crate::consensus::kv::Command::LeaseKeepAlive`]).
    KeepAlive,
    /// A batch of keep-alives ([`crate::consensus::kv::Command::LeaseKeepAlives`]).
    KeepAlives,
    /// A lease granted.
    LeaseGrant,
    /// A lease revoked by its holder.
    LeaseRevoke,
    /// Leases the leader saw run out.
    LeaseExpire,
    /// The leader's record of the time each lease has left.
    LeaseCheckpoint,
}

impl EntryKind {
    /// Every kind, in the exposition's order.
    pub const ALL: [EntryKind; 10] = [
        EntryKind::Empty,
        EntryKind::Membership,
        EntryKind::Write,
        EntryKind::Unchanged,
        EntryKind::KeepAlive,
        EntryKind::KeepAlives,
        EntryKind::LeaseGrant,
        EntryKind::LeaseRevoke,
        EntryKind::LeaseExpire,
        EntryKind::LeaseCheckpoint,
    ];

    /// The `kind` label's value.
    pub fn label(self) -> &'static str {
        match self {
            EntryKind::Empty => "empty",
            EntryKind::Membership => "membership",
            EntryKind::Write => "write",
            EntryKind::Unchanged => "unchanged",
            EntryKind::KeepAlive => "keep_alive",
            EntryKind::KeepAlives => "keep_alives",
            EntryKind::LeaseGrant => "lease_grant",
            EntryKind::LeaseRevoke => "lease_revoke",
            EntryKind::LeaseExpire => "lease_expire",
            EntryKind::LeaseCheckpoint => "lease_checkpoint",
        }
    }
}

/// Applied Raft entries by [`EntryKind`]: one counter each.
#[derive(Debug)]
pub struct EntryCounts([Counter; EntryKind::ALL.len()]);

impl EntryCounts {
    const fn new() -> EntryCounts {
        EntryCounts([const { Counter::new() }; EntryKind::ALL.len()])
    }

    /// Counts one applied entry of `kind`.
    pub fn add(&self, kind: EntryKind) {
        self.0[kind as usize].add(1);
    }

    /// Entries of `kind` applied so far.
    pub fn get(&self, kind: EntryKind) -> u64 {
        self.0[kind as usize].get()
    }
}

/// Every instrument of this process. See the module documentation.
#[derive(Debug)]
pub struct Metrics {
    /// The Raft term this member is in.
    pub raft_term: Gauge,
    /// The highest log index this member knows committed.
    pub raft_commit_index: Gauge,
    /// The highest log index this member applied.
    pub raft_applied_index: Gauge,
    /// 1 while this member leads.
    pub raft_is_leader: Gauge,
    /// Times this member saw the leader change (to another or to none).
    pub raft_leader_changes: Counter,
    /// Raft log entries this member applied, by what they did.
    pub raft_entries_applied: EntryCounts,
    /// From a proposal reaching the Raft thread to its outcome.
    pub raft_proposal_seconds: Histogram,
    /// One durable write of the Raft log (redb commit with its fsync).
    pub disk_fsync_seconds: Histogram,
    /// A linearizable read's wait in the Raft thread's queue, from its
    /// request to the thread taking it up (the thread is busy with a pass).
    pub raft_read_queue_seconds: Histogram,
    /// A linearizable read's ReadIndex: from asking Raft to the leader's
    /// leadership being confirmed by a quorum (a heartbeat round).
    pub raft_read_confirm_seconds: Histogram,
    /// A linearizable read's wait, once confirmed, for this member to
    /// apply up to its index.
    pub raft_read_apply_seconds: Histogram,
    /// Bytes the member's store takes on disk.
    pub store_bytes: Gauge,
    /// Bytes of keys and values the member holds: what the quota counts.
    pub store_quota_used_bytes: Gauge,
    /// The member's quota (`quota_bytes`), next to its use so one scrape
    /// gives the ratio an alert wants.
    pub store_quota_bytes: Gauge,
    /// 1 while the member's NOSPACE alarm is on (over its quota: writes
    /// that add data are refused).
    pub store_no_space: Gauge,
    /// Keys in the member's state machine.
    pub store_keys: Gauge,
    /// Leases alive in the member's state machine.
    pub leases: Gauge,
    /// Leases this member applied as expired (their holder stopped renewing).
    pub lease_expiries: Counter,
    /// Units the scheduler on this host proposed to a machine.
    pub placements: Counter,
    /// Claims by this host's agent that lost a race (another claim, or a
    /// changed proposal, came first) and are retried.
    pub claim_conflicts: Counter,
    /// API reads of the registry answered from the mirror
    /// (`registry::mirror`).
    pub api_mirror_reads: Counter,
    /// API reads of the registry that went to the store because the mirror
    /// was not loaded or had not caught up in time.
    pub api_store_reads: Counter,
    /// systemd D-Bus calls of this host's agent, by method.
    pub systemd_call_seconds: Family,
    /// API requests served by this host, by method and route.
    pub api_request_seconds: Family,
    /// The linearizable read of the store's revision that each API read of
    /// the registry starts with (`registry::mirror`'s barrier).
    pub api_barrier_seconds: Histogram,
    /// How long API reads then waited for the registry's copy to reach
    /// that revision.
    pub api_catch_up_seconds: Histogram,
}

/// The process's instruments.
pub static METRICS: Metrics = Metrics {
    raft_term: Gauge::new(),
    raft_commit_index: Gauge::new(),
    raft_applied_index: Gauge::new(),
    raft_is_leader: Gauge::new(),
    raft_leader_changes: Counter::new(),
    raft_entries_applied: EntryCounts::new(),
    raft_proposal_seconds: Histogram::new(),
    disk_fsync_seconds: Histogram::new(),
    raft_read_queue_seconds: Histogram::new(),
    raft_read_confirm_seconds: Histogram::new(),
    raft_read_apply_seconds: Histogram::new(),
    store_bytes: Gauge::new(),
    store_quota_used_bytes: Gauge::new(),
    store_quota_bytes: Gauge::new(),
    store_no_space: Gauge::new(),
    store_keys: Gauge::new(),
    leases: Gauge::new(),
    lease_expiries: Counter::new(),
    placements: Counter::new(),
    claim_conflicts: Counter::new(),
    api_mirror_reads: Counter::new(),
    api_store_reads: Counter::new(),
    systemd_call_seconds: Family::new(),
    api_request_seconds: Family::new(),
    api_barrier_seconds: Histogram::new(),
    api_catch_up_seconds: Histogram::new(),
};

/// Times a systemd call of `method` (D-Bus name, e.g. `StartUnit`).
pub async fn time_systemd<T>(method: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let result = call.await;
    METRICS
        .systemd_call_seconds
        .observe(format!("method=\"{method}\""), started.elapsed());
    result
}

/// The label set of one API request.
pub fn api_labels(method: &str, route: &str) -> String {
    format!("method=\"{}\",route=\"{}\"", escape(method), escape(route))
}

/// What the store says, read at scrape time; `None` fields when the store
/// did not answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Units (not templates) by desired state.
    pub units_by_desired: BTreeMap<String, u64>,
    /// Reported systemd ACTIVE states, one per unit and machine.
    pub units_by_active: BTreeMap<String, u64>,
    /// Units claimed by a machine (placed and taken).
    pub claimed: u64,
    /// Machines with a live presence.
    pub machines: u64,
}

/// The whole exposition: this process's instruments and, if read, the
/// cluster's figures (`None`: the store did not answer;
/// `flotilla_store_reachable` says so).
pub fn render(cluster: Option<&Cluster>) -> String {
    let m = &METRICS;
    let mut out = String::new();
    let name = "flotilla_store_reachable";
    header(
        &mut out,
        name,
        "1 when the scrape could read the store, else 0.",
        "gauge",
    );
    let _ = writeln!(out, "{name} {}", u64::from(cluster.is_some()));
    let gauges: [(&str, &str, &Gauge); 10] = [
        (
            "flotilla_raft_term",
            "The Raft term this member is in.",
            &m.raft_term,
        ),
        (
            "flotilla_raft_commit_index",
            "The highest Raft log index this member knows committed.",
            &m.raft_commit_index,
        ),
        (
            "flotilla_raft_applied_index",
            "The highest Raft log index this member applied.",
            &m.raft_applied_index,
        ),
        (
            "flotilla_raft_is_leader",
            "1 while this member is the Raft leader.",
            &m.raft_is_leader,
        ),
        (
            "flotilla_store_size_bytes",
            "Bytes this member's store takes on disk (log, database, snapshots).",
            &m.store_bytes,
        ),
        (
            "flotilla_store_quota_used_bytes",
            "Bytes of keys and values this member holds: what its quota counts.",
            &m.store_quota_used_bytes,
        ),
        (
            "flotilla_store_quota_bytes",
            "This member's store quota (quota_bytes).",
            &m.store_quota_bytes,
        ),
        (
            "flotilla_store_nospace_alarm",
            "1 while this member's NOSPACE alarm is on (over its quota: writes are refused).",
            &m.store_no_space,
        ),
        (
            "flotilla_store_keys",
            "Keys in this member's state machine.",
            &m.store_keys,
        ),
        (
            "flotilla_leases",
            "Leases alive in this member's state machine.",
            &m.leases,
        ),
    ];
    for (name, help, gauge) in gauges {
        if let Some(value) = gauge.get() {
            header(&mut out, name, help, "gauge");
            let _ = writeln!(out, "{name} {value}");
        }
    }
    let counters: [(&str, &str, &Counter); 6] = [
        (
            "flotilla_raft_leader_changes_total",
            "Times this member saw the Raft leader change.",
            &m.raft_leader_changes,
        ),
        (
            "flotilla_lease_expiries_total",
            "Leases this member applied as expired.",
            &m.lease_expiries,
        ),
        (
            "flotilla_placements_total",
            "Units the scheduler on this host proposed to a machine.",
            &m.placements,
        ),
        (
            "flotilla_claim_conflicts_total",
            "Claims by this host's agent that lost a race and were retried.",
            &m.claim_conflicts,
        ),
        (
            "flotilla_api_mirror_reads_total",
            "API reads of the registry answered from the API's copy of it.",
            &m.api_mirror_reads,
        ),
        (
            "flotilla_api_store_reads_total",
            "API reads of the registry sent to the store: its copy was behind.",
            &m.api_store_reads,
        ),
    ];
    for (name, help, counter) in counters {
        header(&mut out, name, help, "counter");
        let _ = writeln!(out, "{name} {}", counter.get());
    }
    if m.raft_applied_index.get().is_some() {
        let name = "flotilla_raft_entries_applied_total";
        header(
            &mut out,
            name,
            "Raft log entries this member applied, by what they did.",
            "counter",
        );
        for kind in EntryKind::ALL {
            let n = m.raft_entries_applied.get(kind);
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {n}", kind.label());
        }
    }
    let histograms: [(&str, &str, &dyn Series); 9] = [
        (
            "flotilla_raft_proposal_duration_seconds",
            "From a proposal reaching the Raft thread to its outcome.",
            &m.raft_proposal_seconds,
        ),
        (
            "flotilla_disk_fsync_duration_seconds",
            "One durable write of the Raft log (commit and fsync).",
            &m.disk_fsync_seconds,
        ),
        (
            "flotilla_raft_read_queue_duration_seconds",
            "Linearizable reads waiting for the Raft thread to take them up.",
            &m.raft_read_queue_seconds,
        ),
        (
            "flotilla_raft_read_confirm_duration_seconds",
            "Linearizable reads from asking Raft to leadership confirmed (ReadIndex).",
            &m.raft_read_confirm_seconds,
        ),
        (
            "flotilla_raft_read_apply_duration_seconds",
            "Linearizable reads, once confirmed, waiting for this member to apply.",
            &m.raft_read_apply_seconds,
        ),
        (
            "flotilla_systemd_call_duration_seconds",
            "systemd D-Bus calls of this host's agent, by method.",
            &m.systemd_call_seconds,
        ),
        (
            "flotilla_api_request_duration_seconds",
            "API requests served by this host, by method and route.",
            &m.api_request_seconds,
        ),
        (
            "flotilla_api_barrier_duration_seconds",
            "The linearizable read of the store's revision each API read starts with.",
            &m.api_barrier_seconds,
        ),
        (
            "flotilla_api_catch_up_duration_seconds",
            "API reads waiting for the registry's copy to reach that revision.",
            &m.api_catch_up_seconds,
        ),
    ];
    for (name, help, histogram) in histograms {
        header(&mut out, name, help, "histogram");
        histogram.write_series(&mut out, name);
    }
    if let Some(cluster) = cluster {
        write_cluster(&mut out, cluster);
    }
    out
}

fn write_cluster(out: &mut String, cluster: &Cluster) {
    let name = "flotilla_units";
    header(out, name, "Units in the store by desired state.", "gauge");
    for state in ["inactive", "loaded", "launched"] {
        let n = cluster.units_by_desired.get(state).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}{{desired_state=\"{state}\"}} {n}");
    }
    let name = "flotilla_unit_states";
    header(
        out,
        name,
        "Units as systemd reports them, one per unit and machine, by ACTIVE state.",
        "gauge",
    );
    for (state, n) in &cluster.units_by_active {
        let _ = writeln!(out, "{name}{{active_state=\"{}\"}} {n}", escape(state));
    }
    for (name, help, value) in [
        (
            "flotilla_units_claimed",
            "Units a machine has claimed.",
            cluster.claimed,
        ),
        (
            "flotilla_machines",
            "Machines with a live presence.",
            cluster.machines,
        ),
    ] {
        header(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {value}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn histograms_are_cumulative_and_count_everything() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn unset_gauges_are_left_out_and_the_cluster_only_when_read() {
        let text = render(None);
        assert!(text.contains("flotilla_store_reachable 0\n"), "{text}");
        assert!(!text.contains("flotilla_units{"), "{text}");
        let cluster = Cluster {
            units_by_desired: BTreeMap::from([("launched".into(), 2)]),
            units_by_active: BTreeMap::from([("active".into(), 2)]),
            claimed: 2,
            machines: 3,
        };
        let text = render(Some(&cluster));
        assert!(text.contains("flotilla_store_reachable 1\n"), "{text}");
        assert!(
            text.contains("flotilla_units{desired_state=\"launched\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("flotilla_units{desired_state=\"loaded\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("flotilla_unit_states{active_state=\"active\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("flotilla_machines 3\n"), "{text}");
        // Every line is a comment or `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn applied_entries_are_counted_by_kind_and_shown_with_the_raft_figures() {
        let counts = EntryCounts::new();
        counts.add(EntryKind::Unchanged);
        counts.add(EntryKind::Unchanged);
        counts.add(EntryKind::KeepAlives);
        assert_eq!(counts.get(EntryKind::Unchanged), 2);
        assert_eq!(counts.get(EntryKind::KeepAlives), 1);
        assert_eq!(counts.get(EntryKind::Write), 0);
        let labels: BTreeSet<&str> = EntryKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), EntryKind::ALL.len(), "labels must differ");
        for (i, kind) in EntryKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "ALL is in declaration order");
        }
        METRICS.raft_applied_index.set(7);
        METRICS.raft_entries_applied.add(EntryKind::LeaseCheckpoint);
        let text = render(None);
        assert!(
            text.contains("flotilla_raft_entries_applied_total{kind=\"lease_checkpoint\"} "),
            "{text}"
        );
        assert!(
            text.contains("flotilla_raft_entries_applied_total{kind=\"unchanged\"} "),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            api_labels("GET", "/a\"b\\c\n"),
            "method=\"GET\",route=\"/a\\\"b\\\\c\\n\""
        );
    }
}
