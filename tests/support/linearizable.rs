//! A linearizability checker for recorded client histories of the key-value
//! store.
//!
//! The deterministic simulation drives the Raft store with concurrent clients,
//! crashes and partitions, records what every client asked and heard back, and
//! hands that history to [`check`]. The store promises linearizability: every
//! operation appears to take effect at one instant between its invocation and
//! its reply. [`check`] searches for such instants; if none exist, the store
//! broke its promise and the error names the operations that cannot be ordered.
//!
//! The model is one register per key, starting absent. Linearizability is
//! local (a history is linearizable exactly when each key's sub-history is), so
//! each key is checked on its own, which keeps the search small.
//!
//! The search is the Wing–Gong/Lowe one: depth-first over which operations have
//! been placed so far, remembering every (placed set, register value) pair
//! already explored so no state is searched twice. Only operations invoked no
//! later than the earliest reply among the unplaced ones may go next, since
//! anything invoked after that reply must follow it. Operations that can never
//! change the register (reads, compare-and-swaps reported as failed) are placed
//! as soon as they fit instead of being branched on: placing them early never
//! rules out an order that placing them later allows.
//!
//! Operations without a reply may take effect at any later point or never, so
//! each one left unplaced would double the states. Three rules keep that in
//! check, each dropping only orders that a kept order can stand in for: a state
//! is skipped when one with the same register value and the same answered ops
//! placed, but only a subset of the unanswered ones, was already explored; an
//! unanswered op is never followed straight away by a write or delete (it would
//! have influenced nothing); and unanswered ops with identical effects are
//! placed in invocation order.
//!
//! The search is bounded twice, and both bounds fail loudly rather than pass
//! a history nobody checked: [`Limits::max_ops_per_key`] refuses oversized keys
//! up front, and [`Limits::time_budget`] stops a search that runs too long.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// What one client operation on one key did, as the client saw it.
///
/// Exists so the simulation can record every verb the store offers in terms the
/// register model understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Read the key. `observed` is the value the reply carried, `None` when the
    /// key was absent. Ignored when the op has no reply: it taught nobody
    /// anything.
    Read {
        /// The value the read returned; `None` means the key was absent.
        observed: Option<Vec<u8>>,
    },
    /// Set the key to `value`.
    Write {
        /// The value written.
        value: Vec<u8>,
    },
    /// Remove the key, leaving it absent.
    Delete,
    /// Set the key to `new` if and only if it currently holds `expected`
    /// (`None` on either side means absent).
    Cas {
        /// The value the key must hold for the swap to happen.
        expected: Option<Vec<u8>>,
        /// The value the key holds after a successful swap.
        new: Option<Vec<u8>>,
        /// `Some(true)`: the reply said the swap happened. `Some(false)`: the
        /// reply said the key did not hold `expected`. `None`: the outcome is
        /// unknown; the swap may have happened or not. Must be `None` when
        /// the op has no reply.
        succeeded: Option<bool>,
    },
}

/// One client operation with the times it started and ended.
///
/// Exists as the unit of a recorded history. Timestamps come from one global
/// logical clock: `a` precedes `b` exactly when `a.completed < b.invoked`;
/// equal numbers count as concurrent.
///
/// Record only operations that may have taken effect: a request that was
/// refused for certain (say, rejected before it reached the leader) must be
/// left out, since the checker would otherwise demand it took effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which client issued the operation; used only to explain failures.
    pub client: u64,
    /// The key the operation touched.
    pub key: String,
    /// What the operation did and what the client heard back.
    pub kind: OpKind,
    /// When the client sent the request.
    pub invoked: u64,
    /// When the client got the reply. `None` when it never learned the outcome
    /// (timeout, crash): the op may take effect at any point after `invoked`,
    /// even long after, or never. With `Some`, an op with an unknown outcome
    /// (a [`OpKind::Cas`] with `succeeded: None`) still took effect before
    /// `completed` if at all; if it might take effect later, record `None`.
    pub completed: Option<u64>,
}

/// Bounds on the work [`check`] may do.
///
/// Exists because checking linearizability is NP-complete in general: a
/// pathological history must end the check with an error, not hang CI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most operations one key may have (after dropping reads without a reply,
    /// which cost nothing). Larger keys yield [`CheckError::TooManyOps`].
    pub max_ops_per_key: usize,
    /// Wall-clock time for the whole [`check`] call, over all keys. Running out
    /// yields [`CheckError::OutOfTime`].
    pub time_budget: Duration,
}

impl Default for Limits {
    /// Generous for simulation histories, which check in milliseconds: hitting
    /// either bound means the history is pathological, not that it is large.
    fn default() -> Self {
        Limits {
            max_ops_per_key: 1_000,
            time_budget: Duration::from_secs(5),
        }
    }
}

/// Why a history did not pass.
///
/// Exists so a simulation test can tell a store bug ([`NotLinearizable`]) from a
/// history the checker could not judge (the other variants); none of them is a
/// pass.
///
/// [`NotLinearizable`]: CheckError::NotLinearizable
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No order of `key`'s operations is consistent with both the register
    /// model and real time: the store is not linearizable.
    #[error("key {key:?} is not linearizable: {explanation}")]
    NotLinearizable {
        /// The key whose history fails.
        key: String,
        /// Every operation on `key`, sorted by invocation; `#n` in
        /// `explanation` is an index into this list.
        ops: Vec<Op>,
        /// What the longest consistent order looks like and which operations
        /// contradict it.
        explanation: String,
    },
    /// The key has more operations than [`Limits::max_ops_per_key`]; it was
    /// not checked.
    #[error(
        "key {key:?} has {count} operations, over the checker's limit of {limit}; \
         spread the workload over more keys, shorten the run or raise Limits::max_ops_per_key"
    )]
    TooManyOps {
        /// The oversized key.
        key: String,
        /// How many operations it has, not counting reads without a reply.
        count: usize,
        /// The limit in force.
        limit: usize,
    },
    /// [`Limits::time_budget`] ran out while `key` was being searched; the
    /// history was not fully checked.
    #[error(
        "ran out of time checking key {key:?} after {explored} search steps; the history \
         is probably too concurrent (many overlapping or unanswered operations on one key): \
         shorten it, spread it over more keys or raise Limits::time_budget"
    )]
    OutOfTime {
        /// The key being searched when time ran out.
        key: String,
        /// Search steps taken on that key.
        explored: u64,
    },
    /// The history contradicts itself and cannot have come from a real run.
    #[error("malformed history: {0}")]
    Malformed(String),
}

/// Checks that `history` is linearizable with respect to one register per key,
/// each starting absent.
///
/// Exists as the single entry point for the simulation's correctness check.
/// `Ok` means a valid order was found for every key; every error means the
/// history did NOT pass, including when a limit stopped the check.
pub fn check(history: &[Op], limits: &Limits) -> Result<(), CheckError> {
    validate(history)?;
    let deadline = Instant::now().checked_add(limits.time_budget);

    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys = Vec::with_capacity(by_key.len());
    for (key, mut ops) in by_key {
        ops.sort_by_key(|op| op.invoked);
        let model = KeyModel::new(ops);
        if model.steps.len() > limits.max_ops_per_key {
            return Err(CheckError::TooManyOps {
                key: key.to_owned(),
                count: model.steps.len(),
                limit: limits.max_ops_per_key,
            });
        }
        keys.push((key, model));
    }

    for (key, model) in keys {
        match model.search(deadline) {
            Outcome::Linearizable => {}
            Outcome::OutOfTime { explored } => {
                return Err(CheckError::OutOfTime {
                    key: key.to_owned(),
                    explored,
                });
            }
            Outcome::Violation { best } => {
                return Err(CheckError::NotLinearizable {
                    key: key.to_owned(),
                    explanation: model.explain(&best),
                    ops: model.ops.iter().map(|&op| op.clone()).collect(),
                });
            }
        }
    }
    Ok(())
}

/// Rejects histories no real run can produce, so the search may trust them.
fn validate(history: &[Op]) -> Result<(), CheckError> {
    for (index, op) in history.iter().enumerate() {
        if let Some(completed) = op.completed
            && completed < op.invoked
        {
            return Err(CheckError::Malformed(format!(
                "operation {index} (client {}, key {:?}) completed at {completed}, before it \
                     was invoked at {}; timestamps must come from one clock that never goes back",
                op.client, op.key, op.invoked
            )));
        }
        if let OpKind::Cas {
            succeeded: Some(succeeded),
            ..
        } = op.kind
            && op.completed.is_none()
        {
            return Err(CheckError::Malformed(format!(
                "operation {index} (client {}, key {:?}) is a compare-and-swap whose outcome \
                     is known (succeeded: {succeeded}) but that never completed; record when the \
                     client learned the outcome, or set succeeded to None",
                op.client, op.key
            )));
        }
    }
    Ok(())
}

/// A register value, interned: [`ABSENT`] or an index into
/// [`KeyModel::values`] plus one. Small ids keep memo keys cheap to hash.
type Value = u32;

/// The register value of a key that does not exist.
const ABSENT: Value = 0;

/// How often, in search steps, the clock is read.
const CLOCK_EVERY: u64 = 4096;

/// How many placed operations, and how many blocked ones, an explanation lists.
const EXPLAIN_OPS: usize = 8;

/// What an operation requires of the register and does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Effect {
    /// The register must hold this value; it stays.
    Observe(Value),
    /// The register takes this value, whatever it held.
    Set(Value),
    /// The register must hold `expected`; it then takes `new`.
    Swap { expected: Value, new: Value },
    /// The register must not hold this value; it stays.
    Refuse(Value),
}

impl Effect {
    /// The register after this effect, or `None` if it cannot happen from
    /// `state`.
    fn apply(self, state: Value) -> Option<Value> {
        match self {
            Effect::Observe(value) => (state == value).then_some(state),
            Effect::Set(value) => Some(value),
            Effect::Swap { expected, new } => (state == expected).then_some(new),
            Effect::Refuse(value) => (state != value).then_some(state),
        }
    }

    /// Whether the effect leaves the register as it was in every state it
    /// fits. Only such effects may be placed eagerly: a write that happens
    /// to rewrite the current value would, placed later, still change it.
    fn is_pure(self) -> bool {
        match self {
            Effect::Observe(_) | Effect::Refuse(_) => true,
            Effect::Set(_) => false,
            Effect::Swap { expected, new } => expected == new,
        }
    }

    /// Whether the effect ignores the register: whatever came just before it
    /// made no difference.
    fn is_blind(self) -> bool {
        matches!(self, Effect::Set(_))
    }
}

/// One operation as the search sees it.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Index into [`KeyModel::ops`], for explanations.
    origin: usize,
    invoked: u64,
    /// `u64::MAX` when the op never completed.
    completed: u64,
    /// Whether the op must be placed. Ops whose outcome is unknown may also be
    /// left out: they never happened.
    required: bool,
    effect: Effect,
    /// The latest earlier step with the same effect that also never
    /// completed. Such twins are interchangeable, so they are placed in
    /// invocation order: an order using this step while its twin is unplaced
    /// stays valid with the two swapped.
    twin: Option<usize>,
}

/// One key's operations, prepared for the search.
struct KeyModel<'a> {
    /// Every op on the key, sorted by invocation.
    ops: Vec<&'a Op>,
    /// The ops the search places, sorted by invocation.
    steps: Vec<Step>,
    /// Interned register values; value id `n` is `values[n - 1]`.
    values: Vec<&'a [u8]>,
    required: usize,
    /// Bit `i` set: step `i` is required.
    required_mask: Box<[u64]>,
    has_optional: bool,
    words: usize,
}

/// Gives each distinct register value a small id, so the memo hashes a
/// number instead of the bytes.
#[derive(Default)]
struct Interner<'a> {
    values: Vec<&'a [u8]>,
    ids: HashMap<&'a [u8], Value>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, value: Option<&'a [u8]>) -> Value {
        let Some(bytes) = value else {
            return ABSENT;
        };
        if let Some(&id) = self.ids.get(bytes) {
            return id;
        }
        self.values.push(bytes);
        let id = Value::try_from(self.values.len()).expect("a key has fewer than 2^32 values");
        self.ids.insert(bytes, id);
        id
    }
}

/// A point in the search: which steps are placed and what the register holds.
#[derive(Debug, Clone)]
struct Node {
    /// Bit `i` set: step `i` is placed.
    placed: Box<[u64]>,
    state: Value,
    /// Latest invocation among placed steps. An optional step that completed
    /// before it can no longer be placed (it would follow an op it precedes),
    /// so it is dropped.
    latest_invoked: u64,
    required_placed: usize,
    /// The last placed step that was required or changed the register was
    /// optional and changed it, so the next may not be blind: an optional
    /// step followed by a blind one, with only optional pure steps between,
    /// influenced nothing, and the same order without them is valid too and
    /// leaves them unplaced. Searching only orders free of that pattern loses
    /// nothing.
    after_optional: bool,
}

/// Real-time bounds on what may be placed next, derived from a node.
struct Frontier {
    /// Earliest completion among unplaced required steps: a step invoked
    /// after it must wait.
    required: u64,
    /// Like `required`, but also counting optional steps with a completion
    /// that are still placeable. A pure step invoked after it may not be
    /// placed eagerly, as that would drop such a step.
    live: u64,
}

/// How a key's search ended.
enum Outcome {
    Linearizable,
    /// No order exists; `best` is the order that placed the most required
    /// steps.
    Violation {
        best: Vec<usize>,
    },
    OutOfTime {
        explored: u64,
    },
}

/// A node on the depth-first stack with the choices not yet tried from it.
struct Frame {
    node: Node,
    choices: Vec<usize>,
    next: usize,
    /// Length of the search path when this node was reached.
    path_len: usize,
}

/// FxHash-style hasher for the memo: its keys are small and come from our own
/// search, so speed matters and resistance to crafted collisions does not.
#[derive(Default)]
struct MemoHasher(u64);

impl MemoHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for MemoHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// The nodes explored so far, for pruning.
///
/// Keyed by (placed required steps, register value); each entry lists the
/// sets of placed optional steps seen with that key, keeping only the minimal
/// ones. A node is pruned when a listed set is a subset of its own: the node
/// with fewer optional steps placed has every choice this one has (this one's
/// later latest invocation only forbids more), so if that node failed, so does
/// this one. [`Node::after_optional`] counts too: a node without it has more
/// choices. Without optional steps this is plain memoisation of (placed,
/// value); with them it stops each unanswered write from doubling the search.
#[derive(Default)]
struct Memo {
    seen: HashMap<(Box<[u64]>, Value), Vec<Unanswered>, FastHash>,
}

/// Builds [`MemoHasher`]s.
type FastHash = BuildHasherDefault<MemoHasher>;

/// The part of a node the memo compares by dominance rather than equality.
struct Unanswered {
    /// Bit `i` set: optional step `i` is placed.
    placed: Box<[u64]>,
    after_optional: bool,
}

impl Unanswered {
    /// Whether a node with `self` has every choice one with `other` has.
    fn dominates(&self, other: &Unanswered) -> bool {
        let subset = self
            .placed
            .iter()
            .zip(other.placed.iter())
            .all(|(mine, theirs)| mine & !theirs == 0);
        subset && (other.after_optional || !self.after_optional)
    }
}

impl Memo {
    /// Records `node`; false if it, or a node dominating it, was seen before.
    fn insert(&mut self, model: &KeyModel<'_>, node: &Node) -> bool {
        let masked = |keep_required: bool| -> Box<[u64]> {
            node.placed
                .iter()
                .zip(model.required_mask.iter())
                .map(|(placed, mask)| placed & if keep_required { *mask } else { !mask })
                .collect()
        };
        let current = Unanswered {
            placed: if model.has_optional {
                masked(false)
            } else {
                Box::default()
            },
            after_optional: node.after_optional,
        };
        let seen = self.seen.entry((masked(true), node.state)).or_default();
        if seen.iter().any(|earlier| earlier.dominates(&current)) {
            return false;
        }
        seen.retain(|earlier| !current.dominates(earlier));
        seen.push(current);
        true
    }
}

/// Whether bit `index` of `bits` is set.
fn is_set(bits: &[u64], index: usize) -> bool {
    bits[index / 64] & (1 << (index % 64)) != 0
}

/// Indices below `len` whose bit in `bits` is clear, in increasing order.
fn clear_bits(bits: &[u64], len: usize) -> impl Iterator<Item = usize> + '_ {
    bits.iter()
        .enumerate()
        .flat_map(|(word_index, &word)| {
            let mut clear = !word;
            std::iter::from_fn(move || {
                if clear == 0 {
                    return None;
                }
                let bit = clear.trailing_zeros() as usize;
                clear &= clear - 1;
                Some(word_index * 64 + bit)
            })
        })
        .take_while(move |&index| index < len)
}

impl<'a> KeyModel<'a> {
    /// Interns values and turns `ops` (one key's, sorted by invocation) into
    /// steps; reads without a reply are dropped, as they constrain nothing.
    fn new(ops: Vec<&'a Op>) -> Self {
        let mut interner = Interner::default();

        let mut steps = Vec::with_capacity(ops.len());
        for (origin, op) in ops.iter().enumerate() {
            let replied = op.completed.is_some();
            let (effect, required) = match &op.kind {
                OpKind::Read { .. } if !replied => continue,
                OpKind::Read { observed } => {
                    (Effect::Observe(interner.id(observed.as_deref())), true)
                }
                OpKind::Write { value } => (Effect::Set(interner.id(Some(value))), replied),
                OpKind::Delete => (Effect::Set(ABSENT), replied),
                OpKind::Cas {
                    expected,
                    new,
                    succeeded,
                } => {
                    let expected = interner.id(expected.as_deref());
                    match succeeded {
                        Some(true) => (
                            Effect::Swap {
                                expected,
                                new: interner.id(new.as_deref()),
                            },
                            true,
                        ),
                        Some(false) => (Effect::Refuse(expected), true),
                        // A failed swap changes nothing and needs only that the
                        // register differs from `expected`; leaving the op out
                        // needs nothing at all, so "failed" adds no order that
                        // "never happened" lacks.
                        None => (
                            Effect::Swap {
                                expected,
                                new: interner.id(new.as_deref()),
                            },
                            false,
                        ),
                    }
                }
            };
            steps.push(Step {
                origin,
                invoked: op.invoked,
                completed: op.completed.unwrap_or(u64::MAX),
                required,
                effect,
                twin: None,
            });
        }
        let mut latest_unanswered: HashMap<Effect, usize> = HashMap::new();
        for (index, step) in steps.iter_mut().enumerate() {
            if step.completed == u64::MAX {
                step.twin = latest_unanswered.insert(step.effect, index);
            }
        }

        let required = steps.iter().filter(|step| step.required).count();
        let words = steps.len().div_ceil(64);
        let mut required_mask = vec![0u64; words].into_boxed_slice();
        for (index, step) in steps.iter().enumerate() {
            if step.required {
                required_mask[index / 64] |= 1 << (index % 64);
            }
        }
        let has_optional = required < steps.len();
        KeyModel {
            ops,
            steps,
            values: interner.values,
            required,
            required_mask,
            has_optional,
            words,
        }
    }

    fn root(&self) -> Node {
        Node {
            placed: vec![0; self.words].into_boxed_slice(),
            state: ABSENT,
            latest_invoked: 0,
            required_placed: 0,
            after_optional: false,
        }
    }

    fn frontier(&self, node: &Node) -> Frontier {
        let mut frontier = Frontier {
            required: u64::MAX,
            live: u64::MAX,
        };
        for index in clear_bits(&node.placed, self.steps.len()) {
            let step = &self.steps[index];
            // Steps are sorted by invocation and complete after they are
            // invoked, so no later step can lower either bound.
            if step.invoked > frontier.required {
                break;
            }
            if step.required {
                frontier.required = frontier.required.min(step.completed);
                frontier.live = frontier.live.min(step.completed);
            } else if step.completed >= node.latest_invoked {
                frontier.live = frontier.live.min(step.completed);
            }
        }
        frontier
    }

    /// Whether step `index` (unplaced) may be placed next from `node`.
    fn may_go_next(&self, node: &Node, frontier: &Frontier, index: usize) -> bool {
        let step = &self.steps[index];
        step.invoked <= frontier.required
            && (step.required || step.completed >= node.latest_invoked)
    }

    fn place(&self, node: &mut Node, index: usize, state: Value) {
        let step = &self.steps[index];
        node.placed[index / 64] |= 1 << (index % 64);
        node.state = state;
        node.latest_invoked = node.latest_invoked.max(step.invoked);
        node.required_placed += usize::from(step.required);
        if step.required {
            node.after_optional = false;
        } else if !step.effect.is_pure() {
            node.after_optional = true;
        }
    }

    /// Places every pure step that may go next and fits the register,
    /// repeating until none is left. Safe because moving such a step earlier
    /// keeps any valid order valid: the step changes the register nowhere, so
    /// the register sequence is the same, and placing a step only loosens the
    /// frontier. The `live` bound keeps it from moving past an optional step
    /// that must precede it.
    fn absorb_pure(&self, node: &mut Node, path: &mut Vec<usize>, batch: &mut Vec<usize>) {
        loop {
            let frontier = self.frontier(node);
            batch.clear();
            for index in clear_bits(&node.placed, self.steps.len()) {
                let step = &self.steps[index];
                if step.invoked > frontier.required {
                    break;
                }
                if step.effect.is_pure()
                    && step.invoked <= frontier.live
                    && self.may_go_next(node, &frontier, index)
                    && step.effect.apply(node.state) == Some(node.state)
                {
                    batch.push(index);
                }
            }
            if batch.is_empty() {
                return;
            }
            for &index in batch.iter() {
                self.place(node, index, node.state);
                path.push(index);
            }
        }
    }

    /// The steps to branch on from `node`: every one that may go next and
    /// fits the register, earliest deadline first, so that histories from a
    /// correct store usually pass without backtracking.
    fn choices(&self, node: &Node) -> Vec<usize> {
        let frontier = self.frontier(node);
        let mut choices: Vec<usize> = clear_bits(&node.placed, self.steps.len())
            .take_while(|&index| self.steps[index].invoked <= frontier.required)
            .filter(|&index| {
                let step = &self.steps[index];
                self.may_go_next(node, &frontier, index)
                    && step.effect.apply(node.state).is_some()
                    && !(node.after_optional && step.effect.is_blind())
                    && step.twin.is_none_or(|twin| is_set(&node.placed, twin))
            })
            .collect();
        choices.sort_by_key(|&index| self.steps[index].completed);
        choices
    }

    /// Depth-first search for an order placing every required step.
    fn search(&self, deadline: Option<Instant>) -> Outcome {
        let mut memo = Memo::default();
        let mut path = Vec::new();
        let mut batch = Vec::new();

        let mut root = self.root();
        self.absorb_pure(&mut root, &mut path, &mut batch);
        if root.required_placed == self.required {
            return Outcome::Linearizable;
        }
        let mut best = (root.required_placed, path.clone());
        memo.insert(self, &root);
        let mut stack = vec![Frame {
            choices: self.choices(&root),
            node: root,
            next: 0,
            path_len: path.len(),
        }];

        let mut explored: u64 = 0;
        while let Some(frame) = stack.last_mut() {
            let Some(&index) = frame.choices.get(frame.next) else {
                stack.pop();
                continue;
            };
            frame.next += 1;
            if explored.is_multiple_of(CLOCK_EVERY)
                && deadline.is_some_and(|end| Instant::now() >= end)
            {
                return Outcome::OutOfTime { explored };
            }
            explored += 1;

            path.truncate(frame.path_len);
            path.push(index);
            let mut child = frame.node.clone();
            let state = self.steps[index]
                .effect
                .apply(child.state)
                .expect("choices only holds steps that fit the register");
            self.place(&mut child, index, state);
            self.absorb_pure(&mut child, &mut path, &mut batch);

            if child.required_placed == self.required {
                return Outcome::Linearizable;
            }
            if !memo.insert(self, &child) {
                continue;
            }
            if child.required_placed > best.0 {
                best = (child.required_placed, path.clone());
            }
            stack.push(Frame {
                choices: self.choices(&child),
                node: child,
                next: 0,
                path_len: path.len(),
            });
        }
        Outcome::Violation { best: best.1 }
    }

    /// Describes why the search failed, from the order that got furthest.
    fn explain(&self, best: &[usize]) -> String {
        let mut node = self.root();
        for &index in best {
            let state = self.steps[index]
                .effect
                .apply(node.state)
                .expect("the best path was built from steps that fit");
            self.place(&mut node, index, state);
        }
        let held = self.shown(node.state);

        let mut text = String::new();
        if best.is_empty() {
            let _ = write!(
                text,
                "no operation can go first: the key starts {held}, but every operation that \
                 must be ordered and may go first needs otherwise: "
            );
        } else {
            let _ = write!(
                text,
                "the longest valid order found places {} of the {} operations that must be \
                 ordered: ",
                node.required_placed, self.required
            );
            let skipped = best.len().saturating_sub(EXPLAIN_OPS);
            if skipped > 0 {
                let _ = write!(text, "{skipped} earlier operations, then ");
            }
            let listed: Vec<String> = best[skipped..]
                .iter()
                .map(|&index| self.described(index))
                .collect();
            let _ = write!(
                text,
                "{}; after that the key holds {held}, but every operation that must be ordered \
                 and may go next needs otherwise: ",
                listed.join(", then ")
            );
        }

        let frontier = self.frontier(&node);
        let blocked: Vec<String> = clear_bits(&node.placed, self.steps.len())
            .take_while(|&index| self.steps[index].invoked <= frontier.required)
            .filter(|&index| self.steps[index].required)
            .filter_map(|index| {
                let need = match self.steps[index].effect {
                    Effect::Observe(value)
                    | Effect::Swap {
                        expected: value, ..
                    } => format!("needs {}", self.shown(value)),
                    Effect::Refuse(value) => format!("needs anything but {}", self.shown(value)),
                    Effect::Set(_) => return None,
                };
                Some(format!("{} {need}", self.described(index)))
            })
            .collect();
        if blocked.is_empty() {
            // The step completing first always may go next, and at the best
            // node none that fits is left (it would have made a better node).
            text.push_str("none found, which is a bug in the checker");
        }
        let more = blocked.len().saturating_sub(EXPLAIN_OPS);
        text.push_str(&blocked[..blocked.len() - more].join("; "));
        if more > 0 {
            let _ = write!(text, "; and {more} more");
        }
        if self.steps.iter().any(|step| !step.required) {
            text.push_str(
                "; operations without a known outcome were tried both taking effect and not, \
                 at every point they could",
            );
        }
        text
    }

    fn described(&self, step: usize) -> String {
        let origin = self.steps[step].origin;
        Described {
            index: origin,
            op: self.ops[origin],
        }
        .to_string()
    }

    fn shown(&self, value: Value) -> String {
        match value {
            ABSENT => Shown(None).to_string(),
            id => Shown(Some(self.values[id as usize - 1])).to_string(),
        }
    }
}

/// An op in an explanation: `#index (client … verb … at invoked..completed)`.
struct Described<'a> {
    index: usize,
    op: &'a Op,
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.op;
        write!(f, "#{} (client {} ", self.index, op.client)?;
        match &op.kind {
            OpKind::Read { .. } if op.completed.is_none() => write!(f, "read")?,
            OpKind::Read { observed } => write!(f, "read {}", Shown(observed.as_deref()))?,
            OpKind::Write { value } => write!(f, "write {}", Shown(Some(value)))?,
            OpKind::Delete => write!(f, "delete")?,
            OpKind::Cas {
                expected,
                new,
                succeeded,
            } => {
                let outcome = match succeeded {
                    Some(true) => "succeeded",
                    Some(false) => "failed",
                    None => "outcome unknown",
                };
                write!(
                    f,
                    "cas {} -> {} {outcome}",
                    Shown(expected.as_deref()),
                    Shown(new.as_deref())
                )?;
            }
        }
        match op.completed {
            Some(completed) => write!(f, " at {}..{completed})", op.invoked),
            None => write!(f, " at {}.., no reply)", op.invoked),
        }
    }
}

/// A register value for people: quoted text when it is printable, hex
/// otherwise, cut short when long.
struct Shown<'a>(Option<&'a [u8]>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LONGEST: usize = 32;
        let Some(bytes) = self.0 else {
            return write!(f, "absent");
        };
        let head = &bytes[..bytes.len().min(LONGEST)];
        match std::str::from_utf8(head) {
            Ok(text) if !text.chars().any(char::is_control) => {
                write!(f, "\"{}\"", text.escape_debug())?;
            }
            _ => {
                write!(f, "0x")?;
                for byte in head {
                    write!(f, "{byte:02x}")?;
                }
            }
        }
        if bytes.len() > LONGEST {
            write!(f, "… ({} bytes)", bytes.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(client: u64, kind: OpKind, invoked: u64, completed: Option<u64>) -> Op {
        Op {
            client,
            key: "k".to_owned(),
            kind,
            invoked,
            completed,
        }
    }

    fn bytes(text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    fn read(client: u64, observed: Option<&str>, invoked: u64, completed: u64) -> Op {
        let observed = observed.map(bytes);
        op(client, OpKind::Read { observed }, invoked, Some(completed))
    }

    fn write(client: u64, value: &str, invoked: u64, completed: Option<u64>) -> Op {
        let value = bytes(value);
        op(client, OpKind::Write { value }, invoked, completed)
    }

    fn cas(
        client: u64,
        expected: Option<&str>,
        new: Option<&str>,
        succeeded: Option<bool>,
        invoked: u64,
        completed: Option<u64>,
    ) -> Op {
        let kind = OpKind::Cas {
            expected: expected.map(bytes),
            new: new.map(bytes),
            succeeded,
        };
        op(client, kind, invoked, completed)
    }

    fn run(history: &[Op]) -> Result<(), CheckError> {
        check(history, &Limits::default())
    }

    /// Asserts `history` passes, printing the checker's message otherwise.
    fn assert_passes(history: &[Op]) {
        if let Err(error) = run(history) {
            panic!("expected a pass: {error}");
        }
    }

    fn explanation(history: &[Op]) -> String {
        match run(history) {
            Err(CheckError::NotLinearizable { explanation, .. }) => explanation,
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn empty_history_passes() {
        assert_passes(&[]);
    }

    #[test]
    fn sequential_history_passes() {
        let history = [
            read(1, None, 1, 2),
            write(1, "a", 3, Some(4)),
            read(2, Some("a"), 5, 6),
            cas(1, Some("a"), Some("b"), Some(true), 7, Some(8)),
            cas(2, Some("a"), Some("c"), Some(false), 9, Some(10)),
            read(2, Some("b"), 11, 12),
            op(1, OpKind::Delete, 13, Some(14)),
            read(2, None, 15, 16),
        ];
        assert_passes(&history);
    }

    #[test]
    fn stale_read_after_completed_write_fails_naming_ops() {
        let history = [write(1, "a", 1, Some(2)), read(2, None, 3, 4)];
        let text = explanation(&history);
        assert!(text.contains("#0 (client 1 write \"a\" at 1..2)"), "{text}");
        assert!(
            text.contains("#1 (client 2 read absent at 3..4) needs absent"),
            "{text}"
        );
        assert!(text.contains("holds \"a\""), "{text}");
    }

    #[test]
    fn concurrent_write_and_read_pass_in_either_order() {
        for observed in [None, Some("a")] {
            let history = [write(1, "a", 1, Some(10)), read(2, observed, 2, 5)];
            assert_passes(&history);
        }
    }

    #[test]
    fn read_new_then_read_old_fails() {
        let history = [
            write(1, "a", 0, Some(10)),
            read(2, Some("a"), 1, 2),
            read(3, None, 3, 4),
        ];
        let text = explanation(&history);
        assert!(
            text.contains("#2 (client 3 read absent at 3..4) needs absent"),
            "{text}"
        );
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let history = [
            write(1, "a", 1, Some(2)),
            write(1, "b", 3, Some(4)),
            read(2, Some("b"), 5, 6),
            read(2, Some("a"), 7, 8),
        ];
        let text = explanation(&history);
        assert!(text.contains("places 3 of the 4"), "{text}");
        assert!(
            text.contains("#3 (client 2 read \"a\" at 7..8) needs \"a\""),
            "{text}"
        );
    }

    #[test]
    fn lost_write_error_displays_key_and_reason() {
        let history = [write(1, "a", 1, Some(2)), read(2, None, 3, 4)];
        let error = run(&history).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("key \"k\" is not linearizable: "),
            "{message}"
        );
        let CheckError::NotLinearizable { key, ops, .. } = error else {
            unreachable!("checked above");
        };
        assert_eq!(key, "k");
        assert_eq!(ops, history);
    }

    #[test]
    fn unknown_write_may_take_effect_or_not() {
        let unknown = write(1, "a", 1, None);
        let took_effect = [unknown.clone(), read(2, Some("a"), 5, 6)];
        let never = [unknown.clone(), read(2, None, 5, 6)];
        let late = [
            unknown.clone(),
            read(2, None, 5, 6),
            read(2, Some("a"), 90, 91),
        ];
        assert_passes(&took_effect);
        assert_passes(&never);
        assert_passes(&late);
    }

    #[test]
    fn unknown_write_cannot_take_effect_before_invocation_or_twice() {
        let early = [read(2, Some("a"), 1, 2), write(1, "a", 5, None)];
        assert!(run(&early).is_err());
        let flicker = [
            write(1, "a", 1, None),
            read(2, Some("a"), 5, 6),
            read(2, None, 7, 8),
        ];
        let text = explanation(&flicker);
        assert!(text.contains("without a known outcome"), "{text}");
    }

    #[test]
    fn unknown_reads_are_ignored() {
        let history = [
            write(1, "a", 1, Some(2)),
            op(
                2,
                OpKind::Read {
                    observed: Some(bytes("never")),
                },
                3,
                None,
            ),
        ];
        assert_passes(&history);
    }

    #[test]
    fn cas_success_and_failure_follow_the_register() {
        let good = [
            cas(1, None, Some("a"), Some(true), 1, Some(2)),
            cas(2, None, Some("b"), Some(false), 3, Some(4)),
            cas(1, Some("a"), None, Some(true), 5, Some(6)),
            read(2, None, 7, 8),
        ];
        assert_passes(&good);

        let false_success = [
            write(1, "a", 1, Some(2)),
            cas(2, Some("b"), Some("c"), Some(true), 3, Some(4)),
        ];
        let text = explanation(&false_success);
        assert!(
            text.contains("cas \"b\" -> \"c\" succeeded at 3..4) needs \"b\""),
            "{text}"
        );

        let false_failure = [
            write(1, "a", 1, Some(2)),
            cas(2, Some("a"), Some("c"), Some(false), 3, Some(4)),
        ];
        let text = explanation(&false_failure);
        assert!(text.contains("needs anything but \"a\""), "{text}");
    }

    #[test]
    fn cas_with_unknown_outcome_may_apply_or_not() {
        for observed in [None, Some("a")] {
            let history = [
                cas(1, None, Some("a"), None, 1, None),
                read(2, observed, 5, 6),
            ];
            assert_passes(&history);
        }
    }

    #[test]
    fn answered_cas_with_unknown_outcome_applies_only_before_its_reply() {
        let within = [
            cas(1, None, Some("a"), None, 1, Some(3)),
            read(2, Some("a"), 10, 11),
        ];
        assert_passes(&within);
        let after = [
            cas(1, None, Some("a"), None, 1, Some(3)),
            read(2, None, 4, 5),
            read(2, Some("a"), 6, 7),
        ];
        assert!(run(&after).is_err());
    }

    #[test]
    fn equal_timestamps_count_as_concurrent() {
        let tie = [
            write(1, "a", 1, Some(2)),
            write(1, "b", 3, Some(5)),
            read(2, Some("a"), 5, 6),
        ];
        assert_passes(&tie);
        let after = [
            write(1, "a", 1, Some(2)),
            write(1, "b", 3, Some(5)),
            read(2, Some("a"), 6, 7),
        ];
        assert!(run(&after).is_err());
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut other = write(1, "b", 1, Some(2));
        other.key = "other".to_owned();
        let history = [write(1, "a", 1, Some(2)), other, read(2, Some("a"), 3, 4)];
        assert_passes(&history);
    }

    #[test]
    fn too_many_ops_is_an_error() {
        let history: Vec<Op> = (0..10)
            .map(|i| write(1, "a", 2 * i, Some(2 * i + 1)))
            .collect();
        let limits = Limits {
            max_ops_per_key: 9,
            ..Limits::default()
        };
        let error = check(&history, &limits).unwrap_err();
        assert_eq!(
            error,
            CheckError::TooManyOps {
                key: "k".to_owned(),
                count: 10,
                limit: 9,
            }
        );
        assert!(error.to_string().contains("max_ops_per_key"), "{error}");
    }

    #[test]
    fn running_out_of_time_is_an_error() {
        let history: Vec<Op> = (0..20)
            .map(|i| write(i, &format!("v{i}"), i, Some(100 + i)))
            .collect();
        let limits = Limits {
            time_budget: Duration::ZERO,
            ..Limits::default()
        };
        let error = check(&history, &limits).unwrap_err();
        assert!(
            matches!(&error, CheckError::OutOfTime { key, .. } if key == "k"),
            "{error:?}"
        );
        assert!(error.to_string().contains("time_budget"), "{error}");
    }

    #[test]
    fn malformed_histories_are_rejected() {
        let backwards = [write(1, "a", 5, Some(4))];
        let error = run(&backwards).unwrap_err();
        assert!(matches!(error, CheckError::Malformed(_)), "{error:?}");
        assert!(error.to_string().contains("completed at 4"), "{error}");

        let known_but_unanswered = [cas(1, None, Some("a"), Some(true), 1, None)];
        let error = run(&known_but_unanswered).unwrap_err();
        assert!(matches!(error, CheckError::Malformed(_)), "{error:?}");
    }

    /// A linear congruential generator standing in for the simulation's randomness.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % bound
        }

        /// `count` random plans over `keys` keys and `clients` clients, one op in
        /// `no_reply_odds` left unanswered.
        fn plans(
            &mut self,
            count: usize,
            keys: u64,
            clients: u64,
            no_reply_odds: u64,
        ) -> Vec<Plan> {
            (0..count)
                .map(|_| Plan {
                    client: self.next(clients),
                    key: self.next(keys) as usize,
                    kind: self.next(5) as u8,
                    value: self.next(4) as u8,
                    expected: self.next(4) as u8,
                    gap: self.next(6),
                    to_effect: self.next(4),
                    to_reply: self.next(4),
                    no_reply: self.next(no_reply_odds) == 0,
                    ambiguous: self.next(30) == 0,
                    applied: self.next(2) == 0,
                })
                .collect()
        }
    }

    #[test]
    fn long_mostly_sequential_history_is_fast() {
        let plans = Lcg(0x2545_f491_4f6c_dd1d).plans(1_000, 5, 4, 30);
        let history = simulate(&plans);
        assert_passes(&history);
    }

    /// One simulated client operation before its outcome is known.
    #[derive(Debug, Clone)]
    struct Plan {
        client: u64,
        key: usize,
        /// 0 read, 1 write, 2 delete, 3 and 4 compare-and-swap.
        kind: u8,
        /// 0 absent, else `v1`..`v3` (writes use `v1` for 0).
        value: u8,
        expected: u8,
        /// Time between the client's previous reply and this invocation.
        gap: u64,
        to_effect: u64,
        to_reply: u64,
        /// The client never hears back.
        no_reply: bool,
        /// A compare-and-swap's reply does not say whether it succeeded.
        ambiguous: bool,
        /// Whether an op with an unknown outcome took effect.
        applied: bool,
    }

    fn plan() -> impl Strategy<Value = Plan> {
        (
            (0..4u64, 0..2usize, 0..5u8, 0..4u8, 0..4u8),
            (0..3u64, 0..6u64, 0..6u64, 0..20u8, any::<bool>()),
        )
            .prop_map(
                |(
                    (client, key, kind, value, expected),
                    (gap, to_effect, to_reply, fate, applied),
                )| Plan {
                    client,
                    key,
                    kind,
                    value,
                    expected,
                    gap,
                    to_effect,
                    to_reply,
                    no_reply: fate == 0,
                    ambiguous: fate == 1,
                    applied,
                },
            )
    }

    fn value_of(index: u8) -> Option<Vec<u8>> {
        (index != 0).then(|| format!("v{index}").into_bytes())
    }

    /// Runs `plans` against a real atomic register per key: each op takes
    /// effect at one instant strictly inside its window (for unanswered ops,
    /// possibly after the client gave up), and records what clients saw.
    fn simulate(plans: &[Plan]) -> Vec<Op> {
        let mut clocks: HashMap<u64, u64> = HashMap::new();
        let mut history = Vec::with_capacity(plans.len());
        let mut effects = Vec::new();
        for (index, plan) in plans.iter().enumerate() {
            let clock = clocks.entry(plan.client).or_insert(0);
            let invoked = *clock + plan.gap;
            let is_cas = plan.kind >= 3;
            let answered = !plan.no_reply;
            let (effect, completed) = if answered {
                let effect = invoked + 1 + plan.to_effect;
                (effect, effect + 1 + plan.to_reply)
            } else {
                // The client times out; the op may still land much later.
                (
                    invoked + 1 + 3 * plan.to_effect,
                    invoked + 1 + plan.to_reply,
                )
            };
            *clock = completed;
            let certain = answered && !(is_cas && plan.ambiguous);
            if certain || plan.applied {
                effects.push((effect, index));
            }
            let kind = match plan.kind {
                0 => OpKind::Read { observed: None },
                1 => OpKind::Write {
                    value: value_of(plan.value.max(1)).expect("nonzero index"),
                },
                2 => OpKind::Delete,
                _ => OpKind::Cas {
                    expected: value_of(plan.expected),
                    new: value_of(plan.value),
                    succeeded: None,
                },
            };
            history.push(Op {
                client: plan.client,
                key: format!("key{}", plan.key),
                kind,
                invoked,
                completed: answered.then_some(completed),
            });
        }

        effects.sort_unstable();
        let mut registers: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        for (_, index) in effects {
            let plan = &plans[index];
            let op = &mut history[index];
            let register = registers.entry(op.key.clone()).or_default();
            match &mut op.kind {
                OpKind::Read { observed } => *observed = register.clone(),
                OpKind::Write { value } => *register = Some(value.clone()),
                OpKind::Delete => *register = None,
                OpKind::Cas {
                    expected,
                    new,
                    succeeded,
                } => {
                    let swapped = *register == *expected;
                    if swapped {
                        *register = new.clone();
                    }
                    if op.completed.is_some() && !plan.ambiguous {
                        *succeeded = Some(swapped);
                    }
                }
            }
        }
        history
    }

    #[test]
    fn corrupted_long_histories_are_caught_within_the_budget() {
        // The simulation's mutation test in miniature: long histories with
        // concurrency and unanswered ops, one read corrupted.
        for seed in 0..10u64 {
            let mut rng = Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let plans = rng.plans(100, 1, 5, 10);
            let mut history = simulate(&plans);
            assert_passes(&history);
            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| {
                    matches!(history[i].kind, OpKind::Read { .. }) && history[i].completed.is_some()
                })
                .collect();
            let target = reads[reads.len() / 2 + rng.next(reads.len() as u64 / 2) as usize];
            history[target].kind = OpKind::Read {
                observed: Some(bytes("never written")),
            };
            match run(&history) {
                Err(CheckError::NotLinearizable { .. }) => {}
                other => panic!("seed {seed}: expected NotLinearizable, got {other:?}"),
            }
        }
    }

    /// Decides one key's history straight from the definition: some subset of
    /// the ops, containing every op that must have happened, has an order that
    /// respects real time and the register. Exponential; tiny histories only.
    fn brute_force(history: &[Op]) -> bool {
        let ops: Vec<&Op> = history
            .iter()
            .filter(|op| op.completed.is_some() || !matches!(op.kind, OpKind::Read { .. }))
            .collect();
        let mut placed = Vec::new();
        brute_force_from(&ops, &mut placed, None)
    }

    fn brute_force_from(ops: &[&Op], placed: &mut Vec<usize>, register: Option<Vec<u8>>) -> bool {
        let must_happen = |op: &Op| {
            op.completed.is_some()
                && !matches!(
                    op.kind,
                    OpKind::Cas {
                        succeeded: None,
                        ..
                    }
                )
        };
        let done = (0..ops.len()).all(|i| placed.contains(&i) || !must_happen(ops[i]));
        if done {
            return true;
        }
        for (i, op) in ops.iter().enumerate() {
            let precedes_placed = placed.iter().any(|&p| {
                op.completed
                    .is_some_and(|completed| completed < ops[p].invoked)
            });
            if placed.contains(&i) || precedes_placed {
                continue;
            }
            let mut afterwards = Vec::new();
            match &op.kind {
                OpKind::Read { observed } => {
                    if *observed == register {
                        afterwards.push(register.clone());
                    }
                }
                OpKind::Write { value } => afterwards.push(Some(value.clone())),
                OpKind::Delete => afterwards.push(None),
                OpKind::Cas {
                    expected,
                    new,
                    succeeded,
                } => {
                    let matched = *expected == register;
                    if matched && *succeeded != Some(false) {
                        afterwards.push(new.clone());
                    }
                    if !matched && *succeeded != Some(true) {
                        afterwards.push(register.clone());
                    }
                }
            }
            for next in afterwards {
                placed.push(i);
                if brute_force_from(ops, placed, next) {
                    return true;
                }
                placed.pop();
            }
        }
        false
    }

    /// Arbitrary small one-key histories, most of them not linearizable.
    fn arbitrary_op() -> impl Strategy<Value = Op> {
        let value = || prop_oneof![Just(None), Just(Some(bytes("a"))), Just(Some(bytes("b")))];
        let kind = prop_oneof![
            value().prop_map(|observed| OpKind::Read { observed }),
            value().prop_map(|value| OpKind::Write {
                value: value.unwrap_or_default()
            }),
            Just(OpKind::Delete),
            (
                value(),
                value(),
                prop_oneof![Just(None), any::<bool>().prop_map(Some)]
            )
                .prop_map(|(expected, new, succeeded)| OpKind::Cas {
                    expected,
                    new,
                    succeeded
                }),
        ];
        (0..3u64, kind, 0..8u64, 0..5u64, 0..5u8).prop_map(
            |(client, kind, invoked, length, fate)| {
                let answered = fate != 0;
                let kind = match kind {
                    OpKind::Cas { expected, new, .. } if !answered => OpKind::Cas {
                        expected,
                        new,
                        succeeded: None,
                    },
                    kind => kind,
                };
                Op {
                    client,
                    key: "k".to_owned(),
                    kind,
                    invoked,
                    completed: answered.then_some(invoked + length),
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn histories_of_an_atomic_register_pass(
            plans in prop::collection::vec(plan(), 1..60),
        ) {
            let history = simulate(&plans);
            let result = run(&history);
            prop_assert!(result.is_ok(), "expected a pass: {}", result.unwrap_err());
        }

        #[test]
        fn a_read_of_a_value_never_written_fails(
            plans in prop::collection::vec(plan(), 1..60),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut plans = plans;
            plans[0].kind = 0;
            plans[0].no_reply = false;
            let mut history = simulate(&plans);
            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| {
                    matches!(history[i].kind, OpKind::Read { .. })
                        && history[i].completed.is_some()
                })
                .collect();
            let target = reads[pick.index(reads.len())];
            history[target].kind = OpKind::Read { observed: Some(bytes("never written")) };
            let result = run(&history);
            prop_assert!(
                matches!(result, Err(CheckError::NotLinearizable { .. })),
                "{:?}",
                result
            );
        }

        #[test]
        fn verdicts_match_brute_force(history in prop::collection::vec(arbitrary_op(), 1..7)) {
            let verdict = run(&history);
            prop_assert!(
                matches!(verdict, Ok(()) | Err(CheckError::NotLinearizable { .. })),
                "{:?}",
                verdict
            );
            prop_assert_eq!(verdict.is_ok(), brute_force(&history), "{:#?}", history);
        }
    }
}
