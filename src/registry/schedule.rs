//! The scheduler's side of the registry: the world it reads and the
//! proposals it writes.
//!
//! The scheduler on the Raft leader ([`crate::scheduler`]) decides with a pure
//! pass ([`crate::scheduler::plan`]) over a [`World`] kept by a
//! [`super::view::View`] (or read once, [`read_world`]), and hands back
//! [`Change`]s, which are written here as guarded transactions: every change
//! carries the revisions it was decided from and fails, changing nothing, when
//! the store moved on. Reading and writing both speak the key layout of
//! [`super::keys`], so the scheduler itself never sees a key.
//!
//! The scheduler's reason for each unit it cannot place is stored too
//! ([`record_reasons`]), written only when it changes, so `list-units`, the
//! API and `explain` can show it on any host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::bodies::BodyCache;
use super::keys;
use super::records::{self, Proposal, ReportedState};
use super::view::View;
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, Op, Revision};
use crate::units::placement::Machine;
use crate::units::{Requirements, UnitName};

/// How many changes share one transaction.
const BATCH: usize = 1024;
/// How many transactions of one [`apply`] may fail their compares before it
/// leaves the rest of its changes to the next pass.
const STALE_TRANSACTIONS: usize = 64;

/// A unit that should run (loaded or launched), as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// The proposal every machine running it should have.
    pub proposal: Proposal,
    /// Its `[X-Fleet]` rules.
    pub requirements: Requirements,
}

/// A proposal as read, with its revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The proposal.
    pub proposal: Proposal,
    /// Its key's mod revision.
    pub mod_revision: Revision,
}

/// The cluster as one pass sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct World {
    /// Units that should run, by name.
    pub wanted: BTreeMap<UnitName, Wanted>,
    /// Machines that may take work: alive and not drained.
    pub machines: Vec<Machine>,
    /// Every proposal: unit → machine → proposal.
    pub proposals: BTreeMap<UnitName, BTreeMap<String, Seen>>,
    /// Every claim: unit → machines holding one.
    pub claims: BTreeMap<UnitName, BTreeSet<String>>,
    /// Placement pointers of non-global units: unit → (machine, mod revision).
    pub placed: BTreeMap<UnitName, (String, Revision)>,
    /// Unclaimed proposals older than the claim bound: (unit, machine).
    pub stale: BTreeSet<(UnitName, String)>,
    /// Machines alive but drained: their units move make-before-break.
    pub draining: BTreeSet<String>,
    /// systemd's states as reported, by (unit, machine); make-before-break
    /// off a draining machine counts a replacement once it is in its target
    /// state.
    pub reported: BTreeMap<(UnitName, String), ReportedState>,
}

/// What changed in a [`World`] since the last pass, so that the next one
/// decides only the units whose decision may have changed
/// ([`crate::scheduler::plan::plan_touched`]) instead of all of them: at
/// 30,000 units a pass over everything cost the leader B-tree lookups of
/// every unit's name on every change (issue 14). The [`View`] records it
/// from the store's events; the scheduler adds what it alone changes (the
/// `stale` marks) and what its last pass left undone ([`Touched::note_pair`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Everything may have changed (a freshly read world): decide every unit.
    pub all: bool,
    /// Units whose wanted entry came, went or changed (record, body, rules).
    pub wanted: BTreeSet<UnitName>,
    /// Units whose placement pointer, `stale` marks or reported states changed.
    pub units: BTreeSet<UnitName>,
    /// (unit, machine) pairs whose proposal or claim came, went or changed.
    pub pairs: BTreeSet<(UnitName, String)>,
    /// Machines that came or went, or whose drain mark or metadata changed.
    pub machines: BTreeSet<String>,
}

impl Touched {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.wanted.is_empty()
            && self.units.is_empty()
            && self.pairs.is_empty()
            && self.machines.is_empty()
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: Touched) {
        self.all |= other.all;
        self.wanted.extend(other.wanted);
        self.units.extend(other.units);
        self.pairs.extend(other.pairs);
        self.machines.extend(other.machines);
    }

    /// Notes a change of the proposal or claim of `unit` on `machine`.
    pub fn note_pair(&mut self, unit: &UnitName, machine: &str) {
        if !self.all {
            self.pairs.insert((unit.clone(), machine.to_string()));
        }
    }

    /// Notes a change of the placement pointer, marks or states of `unit`.
    pub fn note_unit(&mut self, unit: &UnitName) {
        if !self.all {
            self.units.insert(unit.clone());
        }
    }

    /// Notes a change of whether and how `unit` is wanted.
    pub fn note_wanted(&mut self, unit: &UnitName) {
        if !self.all {
            self.wanted.insert(unit.clone());
        }
    }

    /// Notes a change of `machine`'s presence, drain mark or metadata.
    pub fn note_machine(&mut self, machine: &str) {
        if !self.all {
            self.machines.insert(machine.to_string());
        }
    }
}

/// One write the pass asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Propose `unit` to `machine` (moving it from `from`, if set).
    Propose {
        /// The unit.
        unit: UnitName,
        /// Where it should run.
        machine: String,
        /// The proposal.
        proposal: Proposal,
        /// The machine whose unclaimed proposal this replaces, with its revision.
        from: Option<(String, Revision)>,
        /// The placement pointer's revision as read (0: none); `None` for a
        /// global unit, which has no pointer.
        placed_revision: Option<Revision>,
    },
    /// Rewrite a proposal whose body or target changed.
    Update {
        /// The unit.
        unit: UnitName,
        /// The machine.
        machine: String,
        /// The new proposal.
        proposal: Proposal,
        /// The proposal's revision as read.
        mod_revision: Revision,
    },
    /// Remove a proposal; the machine stops the unit and releases it.
    Withdraw {
        /// The unit.
        unit: UnitName,
        /// The machine.
        machine: String,
        /// The proposal's revision as read.
        mod_revision: Revision,
        /// The placement pointer to remove with it, with its revision.
        placed_revision: Option<Revision>,
    },
}

/// What one read of the store found: the world to plan over, and the units
/// that should run but cannot be scheduled at all, with the reason.
#[derive(Debug, Default, PartialEq)]
pub struct Reading {
    /// Everything the pass decides from; `stale` is left empty for the
    /// scheduler, which alone knows how long a proposal went unclaimed.
    pub world: World,
    /// Units left out of `world.wanted`: no stored body, or an invalid one.
    pub unschedulable: Vec<(UnitName, String)>,
    /// The reasons stored for units that could not be placed (see
    /// [`record_reasons`]).
    pub reasons: BTreeMap<UnitName, String>,
}

/// Reads units, machines (with the metadata set through the API merged in,
/// [`metadata::merge`]), drain marks, proposals, claims, placement pointers,
/// reported states and stored reasons, in one read at one revision, with the
/// `[X-Fleet]` rules of each unit from its stored body: a [`View`] loaded for
/// one use (the scheduler keeps its own current instead), parsing bodies
/// through `bodies` (the daemon's one cache).
pub async fn read_world(client: &Client, bodies: &Arc<BodyCache>) -> Result<Reading, ClientError> {
    Ok(View::load(client, bodies.clone()).await?.reading())
}

/// Stores the reason of every unit in `now` (units that cannot be placed)
/// whose stored reason differs, and deletes the reasons `stored` holds for
/// units no longer in `now`: nothing is written while the reasons stay the
/// same. Returns the revision of the last write (0: none).
pub async fn record_reasons(
    client: &Client,
    stored: &BTreeMap<UnitName, String>,
    now: &BTreeMap<&UnitName, &String>,
) -> Result<Revision, ClientError> {
    let mut ops = Vec::new();
    for (unit, reason) in now {
        if stored.get(*unit) != Some(*reason) {
            ops.push(Op::put(keys::reason(unit), reason.as_bytes().to_vec()));
        }
    }
    for unit in stored.keys() {
        if !now.contains_key(unit) {
            ops.push(Op::delete(keys::reason(unit)));
        }
    }
    let mut written = 0;
    for batch in ops.chunks(BATCH) {
        let (_, _, revision) = client.txn(Vec::new(), batch.to_vec(), Vec::new()).await?;
        written = revision;
    }
    Ok(written)
}

/// Writes the changes: a batch per transaction; when a batch fails its
/// compares, each half of it is written the same way, down to single
/// changes, so a few stale changes among a thousand cost a few dozen
/// transactions. (One by one, a batch with one stale change cost a thousand
/// transactions: minutes on a loaded leader, with the scheduler waiting.)
/// Once [`STALE_TRANSACTIONS`] have failed, the plan is out of date (the
/// store moved on while it was made or written: agents claimed what it
/// moves), and the rest of it is left to the next pass, which decides every
/// change of this plan again ([`crate::scheduler::plan::Plan::carried`])
/// from a view that shows why they failed. What is written stays a prefix
/// of the plan, less the changes that failed on their own, as it always
/// was: a later change may count on an earlier one (a proposal made
/// elsewhere after the unit's old proposal was withdrawn in the same pass),
/// so none is written after one left untried. Halved to the end, one such
/// plan at 30,000 units failed ~19,000 transactions over 50 s, each a Raft
/// entry, well into an idle cluster (issue 14).
/// Returns the revision of the last successful write (0: none), which a
/// [`View`] must reach before it shows the pass's own writes.
pub async fn apply(client: &Client, changes: &[Change]) -> Result<Revision, ClientError> {
    apply_with(changes, |compare, ops| async move {
        let (ok, _, revision) = client.txn(compare, ops, Vec::new()).await?;
        Ok((ok, revision))
    })
    .await
}

/// [`apply`] through `write`, which runs one guarded transaction and says
/// whether its compares held and at which revision.
async fn apply_with<W, F>(changes: &[Change], mut write: W) -> Result<Revision, ClientError>
where
    W: FnMut(Vec<Compare>, Vec<Op>) -> F,
    F: std::future::Future<Output = Result<(bool, Revision), ClientError>>,
{
    let (mut written, mut failed, mut tried) = (0, 0, 0);
    for batch in changes.chunks(BATCH) {
        // Halves still to write, the next on top: in the order planned.
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            let (mut compare, mut ops) = (Vec::new(), Vec::new());
            for change in part {
                let (c, o) = transaction(change);
                compare.extend(c);
                ops.extend(o);
            }
            let (ok, revision) = write(compare, ops).await?;
            if ok {
                count_placements(part);
                written = revision;
                tried += part.len();
                continue;
            }
            failed += 1;
            if failed >= STALE_TRANSACTIONS {
                tracing::debug!(
                    "scheduler: {failed} writes failed, the plan is stale: {} of its {} \
                     changes left to the next pass",
                    changes.len() - tried,
                    changes.len()
                );
                return Ok(written);
            }
            if let [change] = part {
                tracing::debug!("scheduler: stale change skipped: {change:?}");
                tried += 1;
            } else {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
            }
        }
    }
    Ok(written)
}

/// Counts the proposals among written `changes` ([`crate::metrics`]).
fn count_placements(changes: &[Change]) {
    let placed = changes
        .iter()
        .filter(|c| matches!(c, Change::Propose { .. }))
        .count();
    crate::metrics::METRICS.placements.add(placed as u64);
}

/// The guarded writes of one change.
fn transaction(change: &Change) -> (Vec<Compare>, Vec<Op>) {
    match change {
        Change::Propose {
            unit,
            machine,
            proposal,
            from,
            placed_revision,
        } => {
            let target = keys::proposal(machine, unit);
            let mut compare = Vec::new();
            let mut ops = vec![Op::put(target.clone(), records::encode(proposal))];
            match placed_revision {
                Some(revision) => {
                    compare.push(Compare::revision_is(&keys::placed(unit), *revision));
                    ops.push(Op::put(keys::placed(unit), machine.as_bytes().to_vec()));
                }
                None => compare.push(Compare::unchanged(&target, None)),
            }
            if let Some((old, revision)) = from {
                compare.push(Compare::revision_is(&keys::proposal(old, unit), *revision));
                compare.push(Compare::unchanged(&keys::claim(old, unit), None));
                ops.push(Op::delete(keys::proposal(old, unit)));
            }
            (compare, ops)
        }
        Change::Update {
            unit,
            machine,
            proposal,
            mod_revision,
        } => {
            let key = keys::proposal(machine, unit);
            (
                vec![Compare::revision_is(&key, *mod_revision)],
                vec![Op::put(key, records::encode(proposal))],
            )
        }
        Change::Withdraw {
            unit,
            machine,
            mod_revision,
            placed_revision,
        } => {
            let key = keys::proposal(machine, unit);
            let mut compare = vec![Compare::revision_is(&key, *mod_revision)];
            let mut ops = vec![Op::delete(key)];
            if let Some(revision) = placed_revision {
                compare.push(Compare::revision_is(&keys::placed(unit), *revision));
                ops.push(Op::delete(keys::placed(unit)));
            }
            (compare, ops)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::records::Target;
    use crate::units::UnitFile;
    use std::cell::RefCell;

    /// `n` moves of unit i from machine "old" to "new", each guarded by the
    /// old proposal's revision i + 1.
    fn moves(n: usize) -> Vec<Change> {
        let hash = UnitFile::parse("[Service]\nExecStart=/bin/true\n")
            .unwrap()
            .hash();
        (0..n)
            .map(|i| Change::Propose {
                unit: UnitName::parse(&format!("u@{i}.service")).unwrap(),
                machine: "new".to_string(),
                proposal: Proposal {
                    hash,
                    target: Target::Launched,
                },
                from: Some(("old".to_string(), i as Revision + 1)),
                placed_revision: Some(i as Revision + 1),
            })
            .collect()
    }

    /// A store in which the old proposals whose revision `stale` picks moved
    /// on: a transaction holds when none of the old proposals it compares did.
    fn store(stale: impl Fn(Revision) -> bool) -> impl Fn(&[Compare]) -> bool {
        move |compare: &[Compare]| {
            !compare.iter().any(|c| {
                let old_proposal = matches!(
                    keys::parse_machine_key(&c.key),
                    Some(keys::MachineKey::Proposal(machine, _)) if machine == "old"
                );
                old_proposal
                    && matches!(c.target, crate::consensus::kv::Target::ModRevision(r) if stale(r))
            })
        }
    }

    /// [`apply_with`] against `holds`: the revision it returns, the
    /// transactions it tried and how many of them failed.
    async fn run(
        changes: &[Change],
        holds: impl Fn(&[Compare]) -> bool,
    ) -> (Revision, usize, usize) {
        let tried = RefCell::new((0, 0));
        let written = apply_with(changes, |compare, _ops| {
            let ok = holds(&compare);
            let mut t = tried.borrow_mut();
            t.0 += 1;
            if !ok {
                t.1 += 1;
            }
            let revision = t.0 as Revision;
            async move { Ok((ok, revision)) }
        })
        .await
        .unwrap();
        let (all, failed) = tried.into_inner();
        (written, all, failed)
    }

    #[tokio::test]
    async fn a_few_stale_changes_cost_a_few_transactions() {
        let changes = moves(1000);
        let (written, tried, failed) = run(&changes, store(|r| r == 500)).await;
        assert!(written > 0);
        // Halving down to the one stale change: ten levels, two halves each.
        assert!(tried <= 21, "{tried} transactions");
        assert!(failed <= 11, "{failed} failed");
    }

    /// A plan made long ago (most of its moves raced with claims) must not
    /// be written change by change, each failing: at 30,000 units one such
    /// pass failed ~19,000 transactions over 50 s, each a Raft entry, into
    /// what should have been an idle cluster (issue 14).
    #[tokio::test]
    async fn a_plan_gone_stale_is_left_to_the_next_pass() {
        let changes = moves(3000);
        let (_, tried, failed) = run(&changes, store(|r| r % 3 != 0)).await;
        assert_eq!(failed, STALE_TRANSACTIONS, "{failed} transactions failed");
        assert!(tried <= 2 * STALE_TRANSACTIONS, "{tried} transactions");
    }

    /// What is written is a prefix of the plan less what failed on its own:
    /// once the budget is spent, no later change is written, however good
    /// (it may count on an earlier one left untried).
    #[tokio::test]
    async fn nothing_after_a_change_left_untried_is_written() {
        let changes = moves(3 * BATCH);
        // Every change of the first batch stale, none of the others.
        let first = BATCH as Revision;
        let later = RefCell::new(false);
        let holds = store(|r| r <= first);
        let (written, _, failed) = run(&changes, |compare: &[Compare]| {
            let mine = |c: &Compare| {
                matches!(c.target, crate::consensus::kv::Target::ModRevision(r) if r > first)
            };
            *later.borrow_mut() |= compare.iter().any(mine);
            holds(compare)
        })
        .await;
        assert_eq!(failed, STALE_TRANSACTIONS);
        assert_eq!(written, 0);
        assert!(!later.into_inner(), "a later batch was tried");
    }
}
