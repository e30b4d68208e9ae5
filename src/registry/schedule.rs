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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::task::JoinSet;

use super::bodies::BodyCache;
use super::keys;
use super::per_machine::{ByMachine, MachineIds};
use super::records::{self, Proposal, ReportedState};
use super::view::View;
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, Op, OpResult, Revision};
use crate::units::placement::Machine;
use crate::units::{Requirements, UnitName};

/// How many changes share one transaction, at most.
const BATCH: usize = 1024;

/// The most compares, operations and failure-branch reads one of the
/// scheduler's transactions carries: within the smallest `max_txn_ops` a
/// member accepts (4,096), as docs/configuration.md promises (a move is 9:
/// 3 compares, 3 writes, 3 reads).
const MOST_OPS: usize = 3072;

/// A unit that should run (loaded or launched), as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// The proposal every machine running it should have.
    pub proposal: Proposal,
    /// Its `[X-Fleet]` rules: shared by every unit whose body and name
    /// give the same rules ([`super::bodies::Body::requirements`]).
    pub requirements: Arc<Requirements>,
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
    pub proposals: BTreeMap<UnitName, ByMachine<Seen>>,
    /// Every claim: unit → machines holding one.
    pub claims: BTreeMap<UnitName, MachineIds>,
    /// Placement pointers of non-global units: unit → (machine, mod revision).
    pub placed: BTreeMap<UnitName, (String, Revision)>,
    /// Unclaimed proposals older than the claim bound: (unit, machine).
    pub stale: BTreeSet<(UnitName, String)>,
    /// Machines alive but drained: their units move make-before-break.
    pub draining: BTreeSet<String>,
    /// systemd's states as reported, by (unit, machine); make-before-break
    /// off a draining machine counts a replacement once it is in its target
    /// state. The records are the registry index's own
    /// ([`super::index::Index::state`]), shared, not copied.
    pub reported: BTreeMap<(UnitName, String), Arc<ReportedState>>,
}

impl World {
    /// Whether `unit` is claimed on `machine`.
    pub fn is_claimed(&self, unit: &UnitName, machine: &str) -> bool {
        self.claims.get(unit).is_some_and(|on| on.contains(machine))
    }
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
    stored: &imbl::OrdMap<UnitName, String>,
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

/// How many of the scheduler's transactions may be in flight at once: one
/// per store connection of its [`Writers`] (a member answers one
/// connection's requests in order). Raft then carries the transactions in
/// flight in the same log appends and fsyncs, instead of one round trip each.
pub const WINDOW: usize = 4;

/// The fewest changes a transaction carries when a pass's changes are spread
/// over the [`WINDOW`]: below this a transaction's round trip costs more than
/// its changes.
const SMALLEST: usize = 64;

/// The store connections the scheduler writes over, so that up to
/// [`WINDOW`] of its transactions are in flight at once ([`apply`]).
pub struct Writers {
    clients: Vec<Arc<Client>>,
}

impl Writers {
    /// Opens [`WINDOW`] connections to the cluster at `endpoints` (each moves
    /// to the leader, as every [`Client`] does).
    pub async fn connect(endpoints: &[String]) -> Result<Writers, ClientError> {
        let mut clients = Vec::with_capacity(WINDOW);
        for _ in 0..WINDOW {
            clients.push(Arc::new(Client::connect(endpoints).await?));
        }
        Ok(Writers { clients })
    }

    /// Writes over the given connections (at least one): one transaction in
    /// flight per connection.
    pub fn over(clients: Vec<Arc<Client>>) -> Writers {
        assert!(!clients.is_empty(), "Writers::over needs a connection");
        Writers { clients }
    }

    /// The first connection, for the writes that need no window.
    pub fn first(&self) -> &Client {
        &self.clients[0]
    }
}

/// What [`apply`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The highest revision of a successful write (0: none), which a
    /// [`View`] must reach before it shows the pass's own writes.
    pub revision: Revision,
    /// Transactions sent.
    pub transactions: usize,
    /// Changes skipped because a compare of theirs failed: the store moved
    /// on since the facts they were decided from.
    pub stale: usize,
}

/// Writes the changes, in parts of up to [`BATCH`] changes (and
/// [`MOST_OPS`] operations), one transaction each, with up to [`WINDOW`] transactions in flight over `writers`; a pass
/// with fewer changes is spread over the window in parts of at least
/// [`SMALLEST`].
///
/// A part whose compares fail reads, in the same transaction (its failure
/// branch), every key it compared, so the store says at that one revision
/// which changes are stale: those are skipped, and the rest of the part is
/// written again as one transaction, still with all its compares. (Halving a
/// failed part down to single changes, as before, cost about 2·log₂(part)
/// transactions per stale change: in a bulk start where hundreds of moves
/// went stale because the hosts claimed meanwhile, one pass wrote for 13 s.)
/// Each failure drops at least one change; should a failure show none stale
/// (an answer without the reads), the part is split in halves instead.
///
/// Once a change is skipped as stale, no later proposal of its unit is
/// written: a proposal may count on an earlier change of its unit (the plan
/// withdraws a unit's proposal and proposes it elsewhere; with the
/// withdrawal not written, the proposal would leave the unit proposed on
/// two machines). Updates and withdrawals after it are still written: they
/// never add a machine.
///
/// Parts in flight together never share a unit, and a part starts only
/// after every earlier part (in the order planned, retried remainders
/// included) that shares a unit with it has finished: every key a change
/// compares or writes is its unit's own (its proposal on a machine, its
/// claim there, its placement pointer), so transactions in flight together
/// touch disjoint keys and commute, and the store ends exactly as if the
/// parts had been written one after the other in plan order. Every compare
/// is the one a lone write would carry: a deposed leader's stale write still
/// fails.
pub async fn apply(writers: &Writers, changes: &[Change]) -> Result<Written, ClientError> {
    let part = changes
        .len()
        .div_ceil(writers.clients.len())
        .clamp(SMALLEST, BATCH);
    apply_in_parts(writers, changes, part).await
}

/// [`apply`] with parts of up to `part` changes (tests write small worlds in
/// many parts this way).
#[doc(hidden)]
pub async fn apply_in_parts(
    writers: &Writers,
    changes: &[Change],
    part: usize,
) -> Result<Written, ClientError> {
    let part = part.max(1);
    // Parts still to write, as indices into `changes`, in the order planned:
    // a failed part's remainder goes back to the front.
    let mut queue: VecDeque<Vec<usize>> = VecDeque::new();
    let (mut current, mut weight) = (Vec::new(), 0);
    for (i, change) in changes.iter().enumerate() {
        let (compare, writes) = transaction(change);
        // Each compare is read back on failure too.
        let size = 2 * compare.len() + writes.len();
        if !current.is_empty() && (current.len() == part || weight + size > MOST_OPS) {
            queue.push_back(std::mem::take(&mut current));
            weight = 0;
        }
        current.push(i);
        weight += size;
    }
    if !current.is_empty() {
        queue.push_back(current);
    }
    let mut free: Vec<usize> = (0..writers.clients.len()).rev().collect();
    // How many changes of each unit the parts in flight hold.
    let mut busy: HashMap<&UnitName, usize> = HashMap::new();
    // Units one of whose changes was skipped: none of their later proposals
    // is written (see `apply`).
    let mut cut: HashSet<&UnitName> = HashSet::new();
    let mut flight = JoinSet::new();
    let mut written = Written::default();
    loop {
        while let (Some(next), Some(&slot)) = (queue.front(), free.last()) {
            if next.iter().any(|&i| busy.contains_key(changes[i].unit())) {
                // Wait for the earlier part that holds one of its units.
                break;
            }
            let mut next = queue.pop_front().expect("looked at the front");
            next.retain(|&i| {
                let cut_off = after_cut(&cut, &changes[i]);
                if cut_off {
                    skip(&changes[i], &mut written, &mut cut);
                }
                !cut_off
            });
            if next.is_empty() {
                continue;
            }
            free.pop();
            let (mut compare, mut ops) = (Vec::new(), Vec::new());
            for &i in &next {
                *busy.entry(changes[i].unit()).or_default() += 1;
                let (c, o) = transaction(&changes[i]);
                compare.extend(c);
                ops.extend(o);
            }
            let reads = compare
                .iter()
                .map(|c| Op::Get {
                    key: c.key.clone(),
                    prefix: false,
                })
                .collect();
            let client = writers.clients[slot].clone();
            written.transactions += 1;
            flight.spawn(async move { (slot, next, client.txn(compare, ops, reads).await) });
        }
        let Some(done) = flight.join_next().await else {
            break;
        };
        let (slot, part, outcome) =
            done.map_err(|e| ClientError::Unknown(format!("a scheduler write task ended: {e}")))?;
        free.push(slot);
        for &i in &part {
            if let Some(count) = busy.get_mut(changes[i].unit()) {
                *count -= 1;
                if *count == 0 {
                    busy.remove(changes[i].unit());
                }
            }
        }
        // Any error ends the pass; the writes still in flight are dropped
        // with their outcome unknown, as a lone write's would be.
        let (ok, results, revision) = outcome?;
        if ok {
            count_placements(part.iter().map(|&i| &changes[i]));
            written.revision = written.revision.max(revision);
            continue;
        }
        let fresh = still_fresh(changes, &part, &results);
        if fresh.len() < part.len() {
            // In plan order: a proposal after a stale change of its unit goes too.
            let mut kept = Vec::with_capacity(fresh.len());
            for &i in &part {
                if fresh.binary_search(&i).is_ok() && !after_cut(&cut, &changes[i]) {
                    kept.push(i);
                } else {
                    skip(&changes[i], &mut written, &mut cut);
                }
            }
            if !kept.is_empty() {
                queue.push_front(kept);
            }
        } else if let [i] = part[..] {
            skip(&changes[i], &mut written, &mut cut);
        } else {
            let (first, second) = part.split_at(part.len() / 2);
            queue.push_front(second.to_vec());
            queue.push_front(first.to_vec());
        }
    }
    Ok(written)
}

/// Whether `change` is a proposal of a unit one of whose earlier changes was
/// skipped (`cut`): it is not written (see [`apply`]).
fn after_cut(cut: &HashSet<&UnitName>, change: &Change) -> bool {
    change.is_proposal() && cut.contains(change.unit())
}

/// Skips `change`, found stale or after a stale change of its unit: counted,
/// logged, and its unit's later proposals cut off.
fn skip<'c>(change: &'c Change, written: &mut Written, cut: &mut HashSet<&'c UnitName>) {
    tracing::debug!("scheduler: stale change skipped: {change:?}");
    written.stale += 1;
    cut.insert(change.unit());
}

/// The changes of `part` whose compares all hold for the keys as the failed
/// transaction read them (`reads`: one `Get` per compare, in order), in
/// `part`'s order (indices rising). All of `part` when the reads are
/// missing, which the caller treats as no news.
fn still_fresh(changes: &[Change], part: &[usize], reads: &[OpResult]) -> Vec<usize> {
    let mut reads = reads.iter();
    let mut fresh = Vec::with_capacity(part.len());
    for &i in part {
        let (compares, _) = transaction(&changes[i]);
        let mut holds = true;
        for compare in &compares {
            match reads.next() {
                Some(OpResult::Get { kvs }) => {
                    let kv = kvs.iter().find(|kv| kv.key == compare.key);
                    holds &= compare.holds_for(kv);
                }
                _ => return part.to_vec(),
            }
        }
        if holds {
            fresh.push(i);
        }
    }
    fresh
}

impl Change {
    /// Whether the change proposes its unit to a machine.
    fn is_proposal(&self) -> bool {
        matches!(self, Change::Propose { .. })
    }

    /// The unit the change is about: every key it compares or writes is
    /// this unit's.
    pub fn unit(&self) -> &UnitName {
        match self {
            Change::Propose { unit, .. }
            | Change::Update { unit, .. }
            | Change::Withdraw { unit, .. } => unit,
        }
    }
}

/// Counts the proposals among written `changes` ([`crate::metrics`]).
fn count_placements<'c>(changes: impl Iterator<Item = &'c Change>) {
    let placed = changes
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
