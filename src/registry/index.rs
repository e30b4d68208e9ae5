//! The registry decoded and indexed: units by name, who holds each unit,
//! the states reported per unit and machine, the machines by id with their
//! claims, drains, metadata and reasons. The records both the lists and the
//! scheduler read are decoded here and only here.
//!
//! `list-units`, `list-machines` and fleet's `/units`, `/state` and
//! `/machines` are this index read in key order, so a page of 100 costs its
//! 100 rows: the member's copy of the registry ([`super::mirror`]) keeps
//! one current, event by event, and a one-off read (the CLI asking the
//! store) builds one from the prefixes it read. What a row is (which units
//! show, with which machine and state) is decided here and only here. On the
//! Raft leader the scheduler's view ([`super::view`]) holds the copy's index
//! too (a clone of persistent maps, sharing every node), not one of its own.
//!
//! A value that does not decode is kept aside: every question asked of an
//! index holding one answers the same [`RecordError`] a direct decode gives
//! ([`Index::check`]), as the lists always did.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};

use super::keys::{self, MachineKey};
use super::liveness;
use super::ops::{MachineRow, UnitRow};
use super::reader::Reader;
use super::records::{
    self, Claim, DesiredState, MachineRecord, RecordError, Renewal, ReportedState, UnitRecord,
};
use super::{LeaseId, metadata};
use crate::consensus::client::ClientError;
use crate::consensus::kv::KeyValue;
use crate::consensus::node::LeaseRenewal;
use crate::units::{UnitKind, UnitName};

/// The prefixes an index is built from.
pub const PREFIXES: [&str; 8] = [
    keys::UNITS,
    keys::MACHINES,
    keys::DRAIN,
    keys::PER_MACHINE,
    keys::STATES,
    keys::METADATA,
    keys::REASONS,
    keys::RENEWALS,
];

/// The prefixes the machine rows need (see [`Index::machine_rows`]).
pub const MACHINE_PREFIXES: [&str; 5] = [
    keys::MACHINES,
    keys::DRAIN,
    keys::PER_MACHINE,
    keys::METADATA,
    keys::RENEWALS,
];

/// What a machine holds of a unit: a proposal, a claim, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hold {
    proposed: bool,
    claimed: bool,
}

/// A machine's presence: its record as it wrote it, and the lease it is on.
#[derive(Debug, Clone, PartialEq)]
struct Presence {
    record: MachineRecord,
    lease: Option<LeaseId>,
}

/// A (unit, machine) pair: the key of the per-pair maps.
type Pair = (UnitName, String);

/// See the module doc. Cheap to clone: persistent maps.
///
/// The per-pair maps are flat, keyed by (unit, machine), not a map per unit:
/// a persistent map's smallest node holds 16 entries, so a map per unit with
/// one machine in it cost 16 slots (2.5 KiB per unit for the states).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    units: OrdMap<UnitName, UnitRecord>,
    /// (unit, machine) → what the machine holds of the unit.
    holders: OrdMap<Pair, Hold>,
    /// (unit, machine) → what systemd reported there; shared (not copied)
    /// with the scheduler's world on the leader ([`super::view`]).
    states: OrdMap<Pair, Arc<ReportedState>>,
    machines: OrdMap<String, Presence>,
    /// Claims per machine.
    claims: OrdMap<String, usize>,
    drained: OrdSet<String>,
    /// Metadata set through the API, per machine.
    metadata: OrdMap<String, OrdMap<String, String>>,
    /// Renewal stamps of agents of the first release.
    stamps: OrdMap<String, Renewal>,
    reasons: OrdMap<UnitName, String>,
    /// Keys whose value does not decode, with the value.
    unreadable: OrdMap<String, Vec<u8>>,
}

impl Index {
    /// The index of `kvs` (keys outside [`PREFIXES`] are ignored).
    pub fn from_kvs<'a>(kvs: impl IntoIterator<Item = &'a KeyValue>) -> Index {
        let mut index = Index::default();
        for kv in kvs {
            index.put(kv);
        }
        index
    }

    /// Reads `prefixes` (of [`PREFIXES`]) from `registry` and indexes them.
    pub async fn read(registry: &impl Reader, prefixes: &[&str]) -> Result<Index, ClientError> {
        let mut index = Index::default();
        for prefix in prefixes {
            for kv in registry.read_prefix(prefix).await? {
                index.put(&kv);
            }
        }
        Ok(index)
    }

    /// Applies a put of `kv`.
    pub fn put(&mut self, kv: &KeyValue) {
        self.forget(&kv.key);
        if let Err(e) = self.index(kv) {
            tracing::warn!("{e}");
            self.unreadable.insert(kv.key.clone(), kv.value.clone());
        }
    }

    /// Applies a delete of `key`.
    pub fn delete(&mut self, key: &str) {
        self.forget(key);
    }

    fn index(&mut self, kv: &KeyValue) -> Result<(), RecordError> {
        let key = kv.key.as_str();
        if let Some(name) = keys::unit_after(keys::UNITS, key) {
            let mut record: UnitRecord = records::decode(key, &kv.value)?;
            if record.name == name {
                // One text for the key and the record's own name.
                record.name = name.clone();
            }
            self.units.insert(name, record);
        } else if let Some(id) = key.strip_prefix(keys::MACHINES) {
            let record: MachineRecord = records::decode(key, &kv.value)?;
            let presence = Presence {
                record,
                lease: kv.lease,
            };
            self.machines.insert(id.to_string(), presence);
        } else if let Some(id) = key.strip_prefix(keys::DRAIN) {
            self.drained.insert(id.to_string());
        } else if let Some(at) = keys::parse_machine_key(key) {
            match at {
                MachineKey::Proposal(id, unit) => {
                    let unit = self.shared_name(unit);
                    self.hold(unit, id, |h| h.proposed = true);
                }
                MachineKey::Claim(id, unit) => {
                    records::decode::<Claim>(key, &kv.value)?;
                    *self.claims.entry(id.clone()).or_default() += 1;
                    let unit = self.shared_name(unit);
                    self.hold(unit, id, |h| h.claimed = true);
                }
                MachineKey::Generation(_) => {}
            }
        } else if let Some((unit, id)) = keys::parse_state_key(key) {
            let state: ReportedState = records::decode(key, &kv.value)?;
            self.states
                .insert((self.shared_name(unit), id), Arc::new(state));
        } else if let Some((id, name)) = keys::parse_metadata_key(key) {
            let value = String::from_utf8_lossy(&kv.value).into_owned();
            let set = self.metadata.entry(id.to_string()).or_default();
            set.insert(name.to_string(), value);
        } else if let Some(unit) = keys::unit_after(keys::REASONS, key) {
            let reason = String::from_utf8_lossy(&kv.value).into_owned();
            self.reasons.insert(unit, reason);
        } else if let Some(id) = key.strip_prefix(keys::RENEWALS) {
            // Stamps were always read leniently: a bad one is no stamp.
            if let Ok(stamp) = records::decode::<Renewal>(key, &kv.value) {
                self.stamps.insert(id.to_string(), stamp);
            }
        }
        Ok(())
    }

    /// Removes whatever `key` put in the index.
    fn forget(&mut self, key: &str) {
        self.unreadable.remove(key);
        if let Some(name) = keys::unit_after(keys::UNITS, key) {
            self.units.remove(&name);
        } else if let Some(id) = key.strip_prefix(keys::MACHINES) {
            self.machines.remove(id);
        } else if let Some(id) = key.strip_prefix(keys::DRAIN) {
            self.drained.remove(id);
        } else if let Some(at) = keys::parse_machine_key(key) {
            match at {
                MachineKey::Proposal(id, unit) => self.hold(unit, id, |h| h.proposed = false),
                MachineKey::Claim(id, unit) => {
                    let held = self
                        .holders
                        .get(&(unit.clone(), id.clone()))
                        .is_some_and(|h| h.claimed);
                    if held {
                        let left = self.claims.get(&id).map_or(0, |n| n.saturating_sub(1));
                        if left == 0 {
                            self.claims.remove(&id);
                        } else {
                            self.claims.insert(id.clone(), left);
                        }
                    }
                    self.hold(unit, id, |h| h.claimed = false);
                }
                MachineKey::Generation(_) => {}
            }
        } else if let Some(at) = keys::parse_state_key(key) {
            self.states.remove(&at);
        } else if let Some((id, name)) = keys::parse_metadata_key(key) {
            if let Some(set) = self.metadata.get_mut(id) {
                set.remove(name);
                if set.is_empty() {
                    self.metadata.remove(id);
                }
            }
        } else if let Some(unit) = keys::unit_after(keys::REASONS, key) {
            self.reasons.remove(&unit);
        } else if let Some(id) = key.strip_prefix(keys::RENEWALS) {
            self.stamps.remove(id);
        }
    }

    /// Changes what `machine` holds of `unit`, dropping empty entries.
    fn hold(&mut self, unit: UnitName, machine: String, change: impl FnOnce(&mut Hold)) {
        let at = (unit, machine);
        let mut hold = self.holders.get(&at).copied().unwrap_or_default();
        change(&mut hold);
        if hold == Hold::default() {
            self.holders.remove(&at);
        } else {
            self.holders.insert(at, hold);
        }
    }

    /// The entries of `map` for `unit`, by machine.
    fn of_unit<'a, V>(
        map: &'a OrdMap<Pair, V>,
        unit: &'a UnitName,
    ) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
        let from = (unit.clone(), String::new());
        map.range((Bound::Included(from), Bound::Unbounded))
            .take_while(move |((u, _), _)| u == unit)
            .map(|((_, machine), v)| (machine, v))
    }

    /// Fails with the first unreadable value's error, if any: what reading
    /// the records directly would have failed with.
    pub fn check(&self) -> Result<(), RecordError> {
        let Some((key, value)) = self.unreadable.iter().next() else {
            return Ok(());
        };
        let fails = |result: Result<(), RecordError>| result.err();
        let error = if key.starts_with(keys::UNITS) {
            fails(records::decode::<UnitRecord>(key, value).map(drop))
        } else if key.starts_with(keys::MACHINES) {
            fails(records::decode::<MachineRecord>(key, value).map(drop))
        } else if key.starts_with(keys::STATES) {
            fails(records::decode::<ReportedState>(key, value).map(drop))
        } else {
            fails(records::decode::<Claim>(key, value).map(drop))
        };
        error.map_or(Ok(()), Err)
    }

    /// `name` as this index already keeps it (the key of its unit record),
    /// else `name` itself: maps keyed by the same unit then share one text
    /// ([`UnitName`] clones share it), where each parse of a key made one
    /// more (issue 14: the registry's index and the scheduler's world key
    /// several maps by every unit's name).
    pub fn shared_name(&self, name: UnitName) -> UnitName {
        match self.units.get_key_value(&name) {
            Some((kept, _)) => kept.clone(),
            None => name,
        }
    }

    /// Every submitted unit, templates included, by name.
    pub fn units(&self) -> impl Iterator<Item = &UnitRecord> {
        self.units.values()
    }

    /// How many units are submitted.
    pub fn unit_count(&self) -> usize {
        self.units.len()
    }

    /// The record of unit `name`.
    pub fn unit(&self, name: &UnitName) -> Option<&UnitRecord> {
        self.units.get(name)
    }

    /// Why the scheduler cannot place `name`, while it cannot.
    pub fn reason(&self, name: &UnitName) -> Option<&String> {
        self.reasons.get(name)
    }

    /// The rows of one unit: one per machine holding it (a global unit has
    /// several), one without machine while a wanted unit is unplaced, none
    /// for a template or an inactive unit no machine holds.
    pub fn rows_of(&self, record: &UnitRecord) -> Vec<UnitRow> {
        if record.name.kind() == UnitKind::Template {
            return Vec::new();
        }
        let on: Vec<(&String, &Hold)> = Index::of_unit(&self.holders, &record.name).collect();
        if on.is_empty() {
            // An inactive unit shows only while a machine still holds it: it
            // is being unloaded there, and its state says how far that got.
            if record.desired == DesiredState::Inactive {
                return Vec::new();
            }
            return vec![UnitRow {
                name: record.name.clone(),
                desired: record.desired,
                machine: None,
                ip: None,
                claimed: false,
                state: None,
            }];
        }
        on.into_iter()
            .map(|(id, hold)| UnitRow {
                name: record.name.clone(),
                desired: record.desired,
                ip: self.machines.get(id).map(|m| m.record.ip.clone()),
                state: self.state(&record.name, id).map(|s| (**s).clone()),
                machine: Some(id.clone()),
                claimed: hold.claimed,
            })
            .collect()
    }

    /// Every unit's rows ([`Index::rows_of`]), by unit name then machine.
    pub fn unit_rows(&self) -> impl Iterator<Item = UnitRow> + '_ {
        self.units().flat_map(|record| self.rows_of(record))
    }

    /// The rows with a reported state, by unit name then machine, only of
    /// unit `unit` and machine `machine` when given: `/state`'s entries.
    pub fn reported<'a>(
        &'a self,
        unit: Option<&UnitName>,
        machine: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a UnitRecord, &'a str, &'a ReportedState)> + 'a {
        type Entry<'e> = (&'e Pair, &'e Arc<ReportedState>);
        let states: Box<dyn Iterator<Item = Entry<'a>> + 'a> = match unit {
            Some(unit) => {
                let unit = unit.clone();
                let from = (unit.clone(), String::new());
                Box::new(
                    self.states
                        .range((Bound::Included(from), Bound::Unbounded))
                        .take_while(move |((u, _), _)| *u == unit),
                )
            }
            None => Box::new(self.states.iter()),
        };
        states
            .filter(move |((_, id), _)| machine.is_none_or(|m| m == id.as_str()))
            .filter(|(at, _)| self.holders.contains_key(*at))
            .filter_map(|((name, id), state)| {
                let record = self.units.get(name)?;
                (record.name.kind() != UnitKind::Template).then_some((
                    record,
                    id.as_str(),
                    &**state,
                ))
            })
    }

    /// What systemd reported of `unit` on `machine`, if anything.
    pub fn state(&self, unit: &UnitName, machine: &str) -> Option<&Arc<ReportedState>> {
        self.states.get(&(unit.clone(), machine.to_string()))
    }

    /// The presence records of the machines, by the id in their key.
    pub fn machine_records(&self) -> impl Iterator<Item = (&String, &MachineRecord)> {
        self.machines.iter().map(|(id, p)| (id, &p.record))
    }

    /// Whether machine `id` is marked drained.
    pub fn is_drained(&self, id: &str) -> bool {
        self.drained.contains(id)
    }

    /// Whether any machine is marked drained.
    pub fn any_drained(&self) -> bool {
        !self.drained.is_empty()
    }

    /// The metadata of `record` as every reader sees it: its own, with what
    /// was set through the API on top ([`metadata::merge`]).
    pub fn metadata_of(&self, record: &MachineRecord) -> BTreeMap<String, String> {
        let set: Option<BTreeMap<String, String>> = self
            .metadata
            .get(&record.id)
            .map(|set| set.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        metadata::merge(&record.metadata, set.as_ref())
    }

    /// The reasons the scheduler stored for units it cannot place.
    pub fn reasons(&self) -> &OrdMap<UnitName, String> {
        &self.reasons
    }

    /// How many units each machine has claimed (machines with none left out).
    pub fn claims_per_machine(&self) -> &OrdMap<String, usize> {
        &self.claims
    }

    /// How many machines have a live presence.
    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    /// The leases the machines' presences are on.
    pub fn presence_leases(&self) -> impl Iterator<Item = LeaseId> + '_ {
        self.machines.values().filter_map(|m| m.lease)
    }

    /// Every machine with a live presence, by id, as `list-machines` shows
    /// it, with when it last renewed as `seen` (the member's view of the
    /// leases, [`crate::consensus::client::Client::lease_renewals`]) and the
    /// stamps say at `now_ms`.
    pub fn machine_rows<'a>(
        &'a self,
        seen: &'a BTreeMap<LeaseId, LeaseRenewal>,
        now_ms: u64,
    ) -> impl Iterator<Item = MachineRow> + 'a {
        self.machines.iter().map(move |(id, presence)| {
            let mut record = presence.record.clone();
            record.metadata = self.metadata_of(&presence.record);
            let lease = presence.lease.and_then(|l| seen.get(&l));
            MachineRow {
                drained: self.drained.contains(record.id.as_str()),
                units: self.claims.get(&record.id).copied().unwrap_or(0),
                renewal: liveness::renewal_of(lease, self.stamps.get(id).copied(), now_ms),
                record,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::UnitState;
    use crate::units::UnitHash;

    fn kv(key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: Some(7),
        }
    }

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).unwrap()
    }

    fn unit(n: &str, desired: DesiredState) -> KeyValue {
        let record = UnitRecord {
            name: name(n),
            hash: UnitHash::of_text(n),
            desired,
        };
        kv(keys::unit(&name(n)), records::encode(&record))
    }

    fn machine(id: &str) -> KeyValue {
        let record = MachineRecord {
            id: id.to_string(),
            instance: "i".to_string(),
            hostname: format!("host-{id}"),
            ip: format!("10.0.0.{}", id.len()),
            metadata: BTreeMap::from([("region".to_string(), "eu".to_string())]),
            api: None,
        };
        kv(keys::machine(id), records::encode(&record))
    }

    fn claim(id: &str, n: &str) -> KeyValue {
        let claim = Claim {
            instance: "i".to_string(),
        };
        kv(keys::claim(id, &name(n)), records::encode(&claim))
    }

    fn state(n: &str, id: &str, active: &str) -> KeyValue {
        let state = ReportedState {
            hash: UnitHash::of_text(n),
            state: UnitState {
                load: "loaded".to_string(),
                active: active.to_string(),
                sub: "running".to_string(),
            },
            target: None,
            reason: None,
        };
        kv(keys::state(&name(n), id), records::encode(&state))
    }

    fn shown(index: &Index) -> Vec<(String, Option<String>, bool, Option<String>)> {
        index
            .unit_rows()
            .map(|r| {
                let active = r.state.map(|s| s.state.active);
                (r.name.to_string(), r.machine, r.claimed, active)
            })
            .collect()
    }

    #[test]
    fn rows_follow_puts_and_deletes_as_a_fresh_read_would() {
        let proposal = kv(
            keys::proposal("m2", &name("b.service")),
            b"{\"hash\":\"00\",\"target\":\"launched\"}".to_vec(),
        );
        let kvs = vec![
            unit("a.service", DesiredState::Launched),
            unit("b.service", DesiredState::Launched),
            unit("c.service", DesiredState::Inactive),
            unit("t@.service", DesiredState::Inactive),
            unit("u.service", DesiredState::Launched),
            machine("m1"),
            machine("m2"),
            claim("m1", "a.service"),
            state("a.service", "m1", "active"),
            proposal.clone(),
            claim("m1", "c.service"),
            // A state where no machine holds the unit any more: not shown.
            state("u.service", "m2", "failed"),
        ];
        let mut index = Index::from_kvs(&kvs);
        assert_eq!(
            shown(&index),
            [
                (
                    "a.service".into(),
                    Some("m1".into()),
                    true,
                    Some("active".into())
                ),
                ("b.service".into(), Some("m2".into()), false, None),
                ("c.service".into(), Some("m1".into()), true, None),
                ("u.service".into(), None, false, None),
            ]
        );
        let reported: Vec<_> = index
            .reported(None, None)
            .map(|(r, id, _)| (r.name.to_string(), id.to_string()))
            .collect();
        assert_eq!(reported, [("a.service".to_string(), "m1".to_string())]);
        assert_eq!(index.claims.get("m1"), Some(&2));

        // m2 claims b, c is unloaded from m1, a's state goes.
        index.put(&claim("m2", "b.service"));
        index.delete(&proposal.key);
        index.delete(&claim("m1", "c.service").key);
        index.delete(&state("a.service", "m1", "").key);
        // Deleting twice changes nothing.
        index.delete(&claim("m1", "c.service").key);
        assert_eq!(
            shown(&index),
            [
                ("a.service".into(), Some("m1".into()), true, None),
                ("b.service".into(), Some("m2".into()), true, None),
                ("u.service".into(), None, false, None),
            ]
        );
        assert_eq!(index.claims.get("m1"), Some(&1));
        assert_eq!(index.claims.get("m2"), Some(&1));
        let fresh: Vec<KeyValue> = vec![
            unit("a.service", DesiredState::Launched),
            unit("b.service", DesiredState::Launched),
            unit("c.service", DesiredState::Inactive),
            unit("t@.service", DesiredState::Inactive),
            unit("u.service", DesiredState::Launched),
            machine("m1"),
            machine("m2"),
            claim("m1", "a.service"),
            claim("m2", "b.service"),
            state("u.service", "m2", "failed"),
        ];
        assert_eq!(index, Index::from_kvs(&fresh));
    }

    #[test]
    fn machines_show_claims_drains_metadata_and_renewals() {
        let mut index = Index::from_kvs(&[
            machine("m1"),
            machine("m2"),
            claim("m1", "a.service"),
            claim("m1", "b.service"),
            kv(keys::drain("m2"), Vec::new()),
            kv(keys::metadata("m1", "region"), b"us".to_vec()),
        ]);
        let seen = BTreeMap::from([(
            7,
            LeaseRenewal {
                id: 7,
                ttl_ms: 9_000,
                renewed_ms_ago: Some(1_000),
            },
        )]);
        let rows: Vec<MachineRow> = index.machine_rows(&seen, 50_000).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].units, rows[0].drained), (2, false));
        assert_eq!(rows[0].record.metadata["region"], "us");
        assert_eq!(rows[0].renewal.map(|r| r.at_ms), Some(49_000));
        assert_eq!((rows[1].units, rows[1].drained), (0, true));
        assert_eq!(rows[1].record.metadata["region"], "eu");
        index.delete(&keys::metadata("m1", "region"));
        index.delete(&keys::drain("m2"));
        let rows: Vec<MachineRow> = index.machine_rows(&seen, 50_000).collect();
        assert_eq!(rows[0].record.metadata["region"], "eu");
        assert!(!rows[1].drained);
    }

    #[test]
    fn an_unreadable_value_fails_the_questions_until_it_is_replaced() {
        let bad = kv(keys::unit(&name("a.service")), b"{nope".to_vec());
        let mut index = Index::from_kvs([&bad]);
        let err = index.check().unwrap_err();
        assert_eq!(err.key, bad.key);
        index.put(&unit("a.service", DesiredState::Launched));
        assert!(index.check().is_ok());
        assert_eq!(index.unit_count(), 1);
    }
}
