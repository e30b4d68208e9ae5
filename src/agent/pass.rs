//! One pass of the agent: claim what may be claimed, bring systemd to what
//! is claimed, release what is no longer proposed.
//!
//! Claiming checks the rules of [`crate::units::claim`] against every unit present
//! here, and asks systemd whether a unit the candidate conflicts with runs
//! outside flotilla; the claim itself is one transaction of the registry
//! ([`MachineStore::claim`]). Bringing systemd along is [`reconcile`]'s
//! decision, carried out by [`super::execute`]. A claim is released only once
//! its unit is unloaded here. A claimed unit whose name the host's systemd
//! already has from elsewhere ([`super::execute::Host::taken`]) is not
//! loaded; it is reported failed, with the reason.

use std::collections::{BTreeMap, BTreeSet};

use super::files::LocalUnit;
use super::reconcile::{self, Activity, Actual, Desired};
use super::run::Agent;
use crate::consensus::client::ClientError;
use crate::registry::UnitState;
use crate::registry::machine::{MachineStore, OwnView};
use crate::registry::records::Target;
use crate::units::claim::{self, Ruled};
use crate::units::colocation;
use crate::units::{Requirements, UnitHash, UnitName};

/// How a pass ended, for the loop to choose when the next one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Passed {
    /// A claim raced: another pass should follow at once.
    pub(super) again: bool,
    /// Nothing is left that only a later pass would notice: every proposal
    /// here is claimed, systemd was asked for nothing, no claim was
    /// released and no unit is refused. Whatever changes next wakes the
    /// agent by itself (its watch, systemd's signals), so the backstop may
    /// wait longer ([`super::run`]).
    pub(super) settled: bool,
    /// A systemd call of this pass failed (a start refused, a link that
    /// failed): the next pass should retry soon, not at the backstop.
    pub(super) failed: bool,
}

impl Agent {
    /// One pass; says whether another should follow at once (a claim raced)
    /// and whether it left the host settled.
    pub(super) async fn pass(&mut self) -> Result<Passed, ClientError> {
        let mut view = self.store.own_view().await?;
        let local = self.host.local().await;
        let all_claimed = view
            .proposals
            .keys()
            .all(|unit| view.claims.contains_key(unit));
        let again = self.claim(&mut view, &local).await?;

        let mut desired = BTreeMap::new();
        for (unit, (proposal, _)) in &view.proposals {
            if view.claims.contains_key(unit) {
                // A fenced unit stays loaded but is not started until the
                // cluster is in reach again.
                let target = match proposal.target {
                    _ if self.presence.is_fenced(unit) => Target::Loaded,
                    target => target,
                };
                desired.insert(
                    unit.clone(),
                    Desired {
                        target,
                        hash: proposal.hash,
                    },
                );
            }
        }
        self.host.read_states(local.keys()).await;
        let actual: BTreeMap<UnitName, Actual> = local
            .iter()
            .map(|(unit, found)| {
                let have = Actual {
                    hash: found.as_ref().map(|f| f.hash),
                    activity: Activity::of(self.host.state(unit)),
                    applied: self.applied.get(unit).copied(),
                };
                (unit.clone(), have)
            })
            .collect();
        let absent: Vec<&UnitName> = desired.keys().filter(|u| !local.contains_key(*u)).collect();
        self.host.read_states(absent.iter().copied()).await;
        let held = absent
            .into_iter()
            .filter(|u| self.host.state(u).is_some_and(UnitState::is_held))
            .cloned()
            .collect();
        // A name the host's systemd has from elsewhere is never loaded over.
        let taken = self.host.taken(&held).await;
        let mut refused = BTreeMap::new();
        for (unit, why) in taken {
            if let Some(want) = desired.remove(&unit) {
                refused.insert(unit, (want.hash, why));
            }
        }
        let none_refused = refused.is_empty();
        self.reports.refuse(refused);
        let actions = reconcile::reconcile(&desired, &actual, &held);
        let mut failed = false;
        if !actions.is_empty() {
            tracing::debug!("agent: {} actions", actions.len());
            failed = !self.host.execute(&self.store, &actions).await;
        }
        // What the agent has now applied: fleet's currentState, reported
        // with each unit's states, and what decides a stop (reconcile).
        self.applied.retain(|unit, _| desired.contains_key(unit));
        for (unit, want) in &desired {
            self.applied.insert(unit.clone(), want.target);
        }
        let released = self.release(&view).await?;
        Ok(Passed {
            again,
            settled: all_claimed && none_refused && actions.is_empty() && released == 0,
            failed,
        })
    }

    /// Claims what it may (one transaction); true if the claim raced.
    async fn claim(
        &mut self,
        view: &mut OwnView,
        local: &BTreeMap<UnitName, Option<LocalUnit>>,
    ) -> Result<bool, ClientError> {
        let unclaimed: Vec<(UnitName, UnitHash)> = view
            .proposals
            .iter()
            .filter(|(u, _)| !view.claims.contains_key(*u))
            .map(|(u, (p, _))| (u.clone(), p.hash))
            .collect();
        if unclaimed.is_empty() {
            self.waiting.clear();
            return Ok(false);
        }
        // Rules of every unit present here and of every candidate.
        let mut rules: BTreeMap<UnitName, Requirements> = BTreeMap::new();
        for (unit, found) in local {
            if let Some(found) = found {
                rules.insert(unit.clone(), found.unit.requirements().clone());
            }
        }
        for unit in view.claims.keys() {
            if !rules.contains_key(unit)
                && let Some((proposal, _)) = view.proposals.get(unit)
                && let Some(found) = requirements(&self.store, unit, &proposal.hash).await
            {
                rules.insert(unit.clone(), found);
            }
        }
        let mut candidate_rules = BTreeMap::new();
        for (unit, hash) in &unclaimed {
            match requirements(&self.store, unit, hash).await {
                Some(found) => {
                    candidate_rules.insert(unit.clone(), found);
                }
                None => tracing::warn!("agent: cannot read the body of {unit}; not claiming it"),
            }
        }
        let present: Vec<Ruled<'_>> = rules
            .iter()
            .filter(|(u, _)| local.contains_key(*u) || view.claims.contains_key(*u))
            .collect();
        let claimed: Vec<&UnitName> = view.claims.keys().collect();
        let candidates: Vec<Ruled<'_>> = candidate_rules.iter().collect();
        let (chosen, waiting) = claim::choose(&present, &claimed, &candidates);

        let mut chosen_now = Vec::new();
        let managed: BTreeSet<String> = local.keys().map(|u| u.to_string()).collect();
        for unit in chosen {
            let rules = &candidate_rules[unit];
            let patterns: Vec<String> = colocation::excluded_globs(rules)
                .map(str::to_string)
                .collect();
            match self.host.foreign_units_matching(&patterns, &managed).await {
                Ok(foreign) if foreign.is_empty() => chosen_now.push(unit.clone()),
                Ok(foreign) => self.waiting.note(
                    unit,
                    format!(
                        "systemd here runs {} which it conflicts with",
                        foreign.join(", ")
                    ),
                ),
                Err(e) => self.waiting.note(unit, format!("cannot ask systemd: {e}")),
            }
        }
        for (unit, why) in waiting {
            let why = match why {
                claim::Wait::Peer(peer) => format!("waiting for MachineOf peer {peer} here"),
                claim::Wait::Excludes(other) => format!("may not run beside {other}"),
            };
            self.waiting.note(unit, why);
        }
        if chosen_now.is_empty() {
            return Ok(false);
        }
        let claiming: Vec<(&UnitName, &Requirements)> = chosen_now
            .iter()
            .map(|unit| (unit, &candidate_rules[unit]))
            .collect();
        if !self.store.claim(view, &claiming).await? {
            crate::metrics::METRICS.claim_conflicts.add(1);
            return Ok(true);
        }
        for unit in &chosen_now {
            self.waiting.claimed(unit);
        }
        Ok(false)
    }

    /// Drops claims whose proposal is gone, once the unit is unloaded here;
    /// returns how many it asked to drop.
    async fn release(&mut self, view: &OwnView) -> Result<usize, ClientError> {
        let local = self.host.local().await;
        let released: Vec<&UnitName> = view
            .claims
            .keys()
            .filter(|unit| !view.proposals.contains_key(*unit) && !local.contains_key(*unit))
            .collect();
        for unit in &released {
            self.reports.forget(unit);
        }
        self.store.release(view, &released).await?;
        Ok(released.len())
    }
}

/// The `[X-Fleet]` rules of unit `unit` with body `hash`, if the body is
/// stored and valid.
async fn requirements(
    store: &MachineStore,
    unit: &UnitName,
    hash: &UnitHash,
) -> Option<Requirements> {
    let body = store.body(hash).await.ok()??;
    body.requirements(unit)
        .ok()
        .map(|rules| Requirements::clone(&rules))
}
