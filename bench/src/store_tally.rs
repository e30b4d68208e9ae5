//! Who writes the store, and what: `sim`'s idle phase runs one of these.
//!
//! Entries per second alone could not say why an idle cluster sometimes
//! wrote 20 times more than usual (issue 14). Two views answer it:
//! * [`Tally`]: a watch of the whole registry (`/flotilla/`), counted over
//!   a window of revisions, each change counted by the kind of key it touched (as
//!   [`flotilla::registry::keys`] lays them out: a claim, a reported state,
//!   a proposal, ...), and by the machine and the unit it belongs to, so a
//!   few agents or units writing over and over stand out;
//! * [`entry_kinds`]: each member's own count of the Raft entries it
//!   applied by kind (`flotilla_raft_entries_applied_total`), which also
//!   sees what no watch does: keep-alives, lease checkpoints, transactions
//!   whose compare failed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use flotilla::consensus::client::Client;
use flotilla::consensus::kv::{EventKind, Revision};
use flotilla::registry::keys::{self, MachineKey};
use serde_json::{Value, json};

/// One change as the tally keeps it: its revision, the kind of key and
/// put or delete, and the machine and unit it belongs to.
type Change = (Revision, String, Option<String>, Option<String>);

/// A running watch of `/flotilla/` that keeps every change from its start;
/// [`Tally::finish`] counts those in a window of revisions. Stops when
/// dropped.
pub struct Tally {
    seen: Arc<Mutex<Vec<Change>>>,
    task: tokio::task::JoinHandle<()>,
    /// Where the watch has got to: the revision after the last it delivered.
    reached: Arc<Mutex<Revision>>,
}

/// The kind of registry key `key` is, with the machine and the unit it
/// belongs to where it names them.
pub fn classify(key: &str) -> (&'static str, Option<String>, Option<String>) {
    if let Some(parsed) = keys::parse_machine_key(key) {
        return match parsed {
            MachineKey::Proposal(id, unit) => ("proposal", Some(id), Some(unit.to_string())),
            MachineKey::Claim(id, unit) => ("claim", Some(id), Some(unit.to_string())),
            MachineKey::Generation(id) => ("generation", Some(id), None),
        };
    }
    if let Some((unit, id)) = keys::parse_state_key(key) {
        return ("state", Some(id), Some(unit.to_string()));
    }
    let after = |prefix: &str| key.strip_prefix(prefix).map(str::to_string);
    let unit_after = |prefix: &str| keys::unit_after(prefix, key).map(|u| u.to_string());
    let families: [(&str, &'static str, bool); 10] = [
        (keys::UNITS, "unit", true),
        (keys::PLACED, "placed", true),
        (keys::REASONS, "reason", true),
        (keys::MACHINES, "machine", false),
        (keys::DRAIN, "drain", false),
        (keys::RENEWALS, "renewal", false),
        (keys::BODIES, "body", false),
        (keys::LOCKS, "lock", false),
        (keys::REBOOTS, "reboot_mark", false),
        (keys::METADATA, "metadata", false),
    ];
    for (prefix, kind, of_unit) in families {
        if key.starts_with(prefix) {
            return match (kind, of_unit) {
                (_, true) => (kind, None, unit_after(prefix)),
                ("machine" | "drain" | "renewal", _) => (kind, after(prefix), None),
                ("metadata", _) => (
                    kind,
                    keys::parse_metadata_key(key).map(|(id, _)| id.to_string()),
                    None,
                ),
                _ => (kind, None, None),
            };
        }
    }
    if key.starts_with("/flotilla/raft/") {
        return ("raft_member", None, None);
    }
    ("other", None, None)
}

impl Tally {
    /// Starts watching from the store's current revision, through
    /// `endpoints`.
    pub async fn start(endpoints: &[String]) -> anyhow::Result<Tally> {
        let client = Client::connect(endpoints).await?;
        // The root itself is no key: only the read's revision is wanted.
        let (_, from) = client.range(keys::ROOT, false, false).await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reached = Arc::new(Mutex::new(from + 1));
        let (shared, at) = (seen.clone(), reached.clone());
        let task = tokio::spawn(async move {
            let mut watch = client.watch(keys::ROOT, from + 1);
            while let Ok(events) = watch.next().await {
                let mut seen = shared.lock().expect("tally lock");
                for event in events {
                    let (kind, machine, unit) = classify(&event.kv.key);
                    let op = match event.kind {
                        EventKind::Put => "put",
                        EventKind::Delete => "delete",
                    };
                    let revision = event.kv.mod_revision;
                    seen.push((revision, format!("{kind} {op}"), machine, unit));
                    let mut reached = at.lock().expect("tally lock");
                    *reached = (*reached).max(revision + 1);
                }
            }
        });
        Ok(Tally {
            seen,
            task,
            reached,
        })
    }

    /// Waits (up to 5 s) until the watch has delivered revision `until`,
    /// stops it, and counts the changes after revision `from` up to `until`:
    /// per key kind, and the machines and units with the most changes (at
    /// most `top` of each).
    pub async fn finish(self, from: Revision, until: Revision, top: usize) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while *self.reached.lock().expect("tally lock") <= until
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.task.abort();
        let seen = self.seen.lock().expect("tally lock");
        let (mut by_kind, mut by_machine, mut by_unit) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let mut total = 0u64;
        for (revision, kind, machine, unit) in seen.iter() {
            if *revision <= from || *revision > until {
                continue;
            }
            total += 1;
            *by_kind.entry(kind.clone()).or_insert(0u64) += 1;
            if let Some(machine) = machine {
                *by_machine.entry(machine.clone()).or_insert(0u64) += 1;
            }
            if let Some(unit) = unit {
                *by_unit.entry(unit.clone()).or_insert(0u64) += 1;
            }
        }
        let most = |map: &BTreeMap<String, u64>| {
            let mut all: Vec<(&String, &u64)> = map.iter().collect();
            all.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            all.iter()
                .take(top)
                .map(|(k, n)| json!([k, n]))
                .collect::<Vec<_>>()
        };
        json!({
            "changes": total,
            "by_kind": by_kind,
            "machines_writing": by_machine.len(),
            "top_machines": most(&by_machine),
            "units_written": by_unit.len(),
            "top_units": most(&by_unit),
        })
    }
}

/// Every `flotilla_raft_entries_applied_total{kind="..."}` in a member's
/// `/metrics` text: kind → entries applied.
pub fn entry_kinds(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("flotilla_raft_entries_applied_total{kind=\"") else {
            continue;
        };
        let Some((kind, count)) = rest.split_once("\"} ") else {
            continue;
        };
        if let Ok(n) = count.trim().parse() {
            out.insert(kind.to_string(), n);
        }
    }
    out
}

/// What each kind went up by between two [`entry_kinds`] readings.
pub fn entry_kinds_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(kind, n)| {
            let was = before.get(kind).copied().unwrap_or(0);
            (kind.clone(), n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla::units::UnitName;

    #[test]
    fn keys_are_told_apart_with_their_machine_and_unit() {
        let unit = UnitName::parse("web@1.service").unwrap();
        let of = |key: String| classify(&key);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            of(keys::claim("m1", &unit)),
            ("claim", some("m1"), some("web@1.service"))
        );
        assert_eq!(
            of(keys::proposal("m1", &unit)),
            ("proposal", some("m1"), some("web@1.service"))
        );
        assert_eq!(of(keys::generation("m1")), ("generation", some("m1"), None));
        assert_eq!(
            of(keys::state(&unit, "m2")),
            ("state", some("m2"), some("web@1.service"))
        );
        assert_eq!(of(keys::unit(&unit)), ("unit", None, some("web@1.service")));
        assert_eq!(
            of(keys::placed(&unit)),
            ("placed", None, some("web@1.service"))
        );
        assert_eq!(
            of(keys::reason(&unit)),
            ("reason", None, some("web@1.service"))
        );
        assert_eq!(of(keys::machine("m3")), ("machine", some("m3"), None));
        assert_eq!(of(keys::renewal("m3")), ("renewal", some("m3"), None));
        assert_eq!(
            of(keys::metadata("m3", "region")),
            ("metadata", some("m3"), None)
        );
        assert_eq!(of(keys::semaphore("default")), ("lock", None, None));
        assert_eq!(
            of("/flotilla/raft/members/m0/features".into()),
            ("raft_member", None, None)
        );
        assert_eq!(of("/elsewhere".into()), ("other", None, None));
    }

    #[test]
    fn entry_kinds_are_read_from_the_exposition_and_subtracted() {
        let before = entry_kinds(
            "# HELP x\nflotilla_raft_entries_applied_total{kind=\"unchanged\"} 3\n\
             flotilla_raft_entries_applied_total{kind=\"keep_alives\"} 10\n",
        );
        let after = entry_kinds(
            "flotilla_raft_entries_applied_total{kind=\"unchanged\"} 3\n\
             flotilla_raft_entries_applied_total{kind=\"keep_alives\"} 14\n\
             flotilla_raft_entries_applied_total{kind=\"write\"} 2\n",
        );
        let delta = entry_kinds_delta(&before, &after);
        assert_eq!(
            delta,
            BTreeMap::from([("keep_alives".to_string(), 4), ("write".to_string(), 2)])
        );
    }
}
