//! Reporting systemd's LOAD/ACTIVE/SUB of this host's units into the store.
//!
//! Each report carries the target the agent last applied to the unit, which
//! is fleet's `currentState` (see [`ReportedState::current_state`]).
//!
//! Only what changed since the last report is written, in one transaction on
//! the presence lease (so a dead host's reports vanish with it); a unit gone
//! from here has its report deleted. A unit the agent refused to load
//! (its name is the host's own) is reported failed, with the reason. The loop reports after every pass, and
//! systemd's signals make sure a pass's states are fresh.

use std::collections::BTreeMap;

use super::execute::Host;
use crate::registry::UnitState;
use crate::registry::machine::MachineStore;
use crate::registry::records::{ReportedState, Target};
use crate::units::{UnitHash, UnitName};

/// What was last written to the store, per unit.
#[derive(Debug, Default)]
pub struct Reports {
    reported: BTreeMap<UnitName, ReportedState>,
    /// Units claimed here that the agent refused to load: their body and why.
    refused: BTreeMap<UnitName, (UnitHash, String)>,
}

impl Reports {
    /// The units the last pass refused to load (replacing the previous set):
    /// each is reported failed with its reason until it is no longer refused,
    /// and logged when first refused.
    pub fn refuse(&mut self, refused: BTreeMap<UnitName, (UnitHash, String)>) {
        for (unit, (_, why)) in &refused {
            if !self.refused.contains_key(unit) {
                tracing::warn!("agent: not loading {unit}: {why}");
            }
        }
        self.refused = refused;
    }

    /// Forgets `unit`'s report (its claim and report were just released).
    pub fn forget(&mut self, unit: &UnitName) {
        self.reported.remove(unit);
    }

    /// Writes the states of changed units into the store, on the lease, each
    /// with the target the agent last `applied` to it. False when the write
    /// failed: every state goes again at the next report, which should come
    /// soon.
    pub async fn report(
        &mut self,
        store: &MachineStore,
        host: &mut Host,
        applied: &BTreeMap<UnitName, Target>,
    ) -> bool {
        if store.lease().is_none() {
            return true;
        }
        let local = host.local().await;
        host.read_states(local.keys()).await;
        let mut changed = Vec::new();
        for (unit, found) in &local {
            let (Some(found), Some(state)) = (found, host.state(unit)) else {
                continue;
            };
            let record = ReportedState {
                hash: found.hash,
                state: state.clone(),
                target: applied.get(unit).copied(),
                reason: None,
            };
            if self.reported.get(unit) != Some(&record) {
                self.reported.insert(unit.clone(), record.clone());
                changed.push((unit.clone(), Some(record)));
            }
        }
        for (unit, (hash, why)) in &self.refused {
            if local.contains_key(unit) {
                continue;
            }
            let record = ReportedState {
                hash: *hash,
                state: UnitState::refused(),
                target: None,
                reason: Some(why.clone()),
            };
            if self.reported.get(unit) != Some(&record) {
                self.reported.insert(unit.clone(), record.clone());
                changed.push((unit.clone(), Some(record)));
            }
        }
        let gone: Vec<UnitName> = self
            .reported
            .keys()
            .filter(|u| !local.contains_key(*u) && !self.refused.contains_key(*u))
            .cloned()
            .collect();
        for unit in gone {
            self.reported.remove(&unit);
            changed.push((unit, None));
        }
        if let Err(e) = store.report(&changed).await {
            tracing::debug!("agent: cannot report states: {e}");
            self.reported.clear();
            return false;
        }
        true
    }
}
