//! The lessor: the leader's clock for leases, as etcd's lessor is.
//!
//! Lease *state* (which leases exist, their TTLs, their keys, the time left at
//! the last checkpoint) is replicated in [`super::kv`]; lease *time* is not,
//! because the state machine must not read a clock. Only the leader keeps
//! time: this module holds, for each lease, the moment it runs out on the
//! leader's clock, and decides which [`Command`]s the leader proposes about
//! time: [`Command::LeaseExpire`] for leases that ran out and, now and then, a
//! [`Command::LeaseCheckpoint`] recording how long each lease has left, so a
//! new leader neither expires leases at once nor grants them a whole new TTL.
//!
//! GUARANTEE: a lease never ends before its TTL has passed since the last
//! keep-alive that was acknowledged to its holder was sent, and a keep-alive
//! ordered in the log before an expiry always wins over it. How:
//! - only the leader of the current term proposes expiries and checkpoints
//!   (a member that stepped down, or leads a later term, starts afresh);
//! - an expiry or a checkpoint is computed from what the leader applied, so
//!   it leaves out every lease with a keep-alive in the leader's log that is
//!   not applied yet: everything before the new entry in the log is either
//!   applied (and so counted) or left out (Raft keeps a leader's log prefix
//!   intact under its entries). A checkpoint can therefore never overwrite a
//!   newer keep-alive, and an expiry never follows one it did not see;
//! - a deadline counts from the tick before the apply, plus one tick, since
//!   the leader's clock moves only at ticks;
//! - a new leader adds one election timeout to the checkpointed time left.
//!
//! Clocks: members' clocks are not in step, and need not run at the same
//! rate either, within a bound: every span the leader measures (a TTL, the
//! time left at a checkpoint) is stretched by [`ClockBounds::drift_per_mille`],
//! so a leader whose clock runs that much fast still waits the whole TTL of
//! real time. A faster clock than that ends leases early (tests/sim.rs runs
//! members at different rates, and catches a lessor without the stretch).

use std::collections::{BTreeMap, BTreeSet};

use super::kv::{Command, KvStore, LeaseId, Outcome};

/// What the leader knows of its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockBounds {
    /// Its resolution: the clock is read at ticks only.
    pub tick_ms: u64,
    /// How much faster than real time it may run, in thousandths.
    pub drift_per_mille: u64,
}

impl ClockBounds {
    /// `ms` of real time, measured on a clock that may run fast.
    fn stretch(&self, ms: u64) -> u64 {
        ms.saturating_add(ms.saturating_mul(self.drift_per_mille).div_ceil(1000))
    }
}

/// The leader's lease deadlines; exists only while this member leads.
#[derive(Debug, Clone)]
pub struct Lessor {
    /// The term this member leads; the lessor is valid in it only.
    term: u64,
    /// Its clock's resolution and drift.
    clock: ClockBounds,
    /// When each lease runs out, in the node's milliseconds.
    deadlines: BTreeMap<LeaseId, u64>,
    /// Leases whose expiry was proposed, with the tick it was proposed at.
    expiring: BTreeMap<LeaseId, u64>,
}

impl Lessor {
    /// The lessor of a member that just became leader: every lease gets its
    /// checkpointed remaining time plus `grace_ms` (one election timeout),
    /// never a fresh TTL and never an instant expiry.
    pub fn promote(
        kv: &KvStore,
        term: u64,
        now_ms: u64,
        grace_ms: u64,
        clock: ClockBounds,
    ) -> Lessor {
        Lessor {
            term,
            clock,
            deadlines: kv
                .leases()
                .map(|l| (l.id, now_ms + clock.stretch(l.remaining_ms) + grace_ms))
                .collect(),
            expiring: BTreeMap::new(),
        }
    }

    /// The term it was made for.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Keeps the deadlines in step with a command the state machine applied.
    pub fn applied(&mut self, command: &Command, outcome: &Outcome, now_ms: u64) {
        match outcome {
            Outcome::LeaseGranted { id, ttl_ms } | Outcome::LeaseKept { id, ttl_ms } => {
                self.renewed(*id, *ttl_ms, now_ms);
            }
            Outcome::LeasesKept { kept, .. } => {
                for (id, ttl_ms) in kept {
                    self.renewed(*id, *ttl_ms, now_ms);
                }
            }
            Outcome::LeasesEnded { ended, .. } => {
                for id in ended {
                    self.deadlines.remove(id);
                    self.expiring.remove(id);
                }
            }
            _ => {}
        }
        if let Command::LeaseExpire { ids } = command {
            for id in ids {
                self.expiring.remove(id);
            }
        }
    }

    /// Lease `id` of `ttl_ms` was granted or renewed by an entry applied at
    /// `now_ms`.
    fn renewed(&mut self, id: LeaseId, ttl_ms: u64, now_ms: u64) {
        let deadline = now_ms + self.clock.stretch(ttl_ms) + self.clock.tick_ms;
        self.deadlines.insert(id, deadline);
    }

    /// Forgets leases a snapshot install removed.
    pub fn installed(&mut self, kv: &KvStore) {
        self.deadlines.retain(|id, _| kv.lease(*id).is_some());
    }

    /// One tick of the leader's clock: the commands to propose now. An expiry
    /// proposed but not applied (lost with a leadership change) is proposed
    /// again after `retry_after_ticks`. `renewing` names the leases with a
    /// keep-alive in the log that is not applied yet (`None` when the log
    /// cannot be read: then nothing is proposed); it is asked only when
    /// something is due.
    pub fn tick(
        &mut self,
        now_ms: u64,
        ticks: u64,
        retry_after_ticks: u64,
        checkpoint_due: bool,
        renewing: impl FnOnce() -> Option<BTreeSet<LeaseId>>,
    ) -> Vec<Command> {
        let mut proposals = Vec::new();
        let mut due: Vec<LeaseId> = self
            .deadlines
            .iter()
            .filter(|(id, deadline)| {
                **deadline <= now_ms
                    && self
                        .expiring
                        .get(id)
                        .is_none_or(|at| ticks >= at + retry_after_ticks)
            })
            .map(|(id, _)| *id)
            .collect();
        let checkpoint_due = checkpoint_due && !self.deadlines.is_empty();
        if due.is_empty() && !checkpoint_due {
            return proposals;
        }
        let Some(renewing) = renewing() else {
            return proposals;
        };
        due.retain(|id| !renewing.contains(id));
        if !due.is_empty() {
            for id in &due {
                self.expiring.insert(*id, ticks);
            }
            proposals.push(Command::LeaseExpire { ids: due });
        }
        if checkpoint_due {
            let remaining: Vec<(LeaseId, u64)> = self
                .deadlines
                .iter()
                .filter(|(id, _)| !self.expiring.contains_key(id) && !renewing.contains(id))
                .map(|(id, deadline)| (*id, deadline.saturating_sub(now_ms)))
                .collect();
            if !remaining.is_empty() {
                proposals.push(Command::LeaseCheckpoint { remaining });
            }
        }
        proposals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: ClockBounds = ClockBounds {
        tick_ms: 10,
        drift_per_mille: 0,
    };

    #[test]
    fn spans_are_stretched_by_the_drift_bound() {
        let (kv, id) = granted(1000);
        let fast = ClockBounds {
            tick_ms: 10,
            drift_per_mille: 20,
        };
        let mut lessor = Lessor::promote(&kv, 1, 0, 100, fast);
        assert_eq!(lessor.deadlines[&id], 1000 + 20 + 100);
        let kept = Outcome::LeaseKept { id, ttl_ms: 1000 };
        lessor.applied(&Command::LeaseKeepAlive { id }, &kept, 500);
        assert_eq!(lessor.deadlines[&id], 500 + 1020 + 10);
    }

    fn granted(ttl_ms: u64) -> (KvStore, LeaseId) {
        let mut kv = KvStore::default();
        match kv.apply(&Command::LeaseGrant { ttl_ms }).0 {
            Outcome::LeaseGranted { id, .. } => (kv, id),
            other => panic!("{other:?}"),
        }
    }

    fn none_renewing() -> Option<BTreeSet<LeaseId>> {
        Some(BTreeSet::new())
    }

    #[test]
    fn a_new_leader_adds_one_election_timeout_to_the_time_left() {
        let (mut kv, id) = granted(1_000);
        kv.apply(&Command::LeaseCheckpoint {
            remaining: vec![(id, 300)],
        });
        let mut lessor = Lessor::promote(&kv, 2, 5_000, 200, EXACT);
        assert!(lessor.tick(5_499, 1, 10, false, none_renewing).is_empty());
        assert_eq!(
            lessor.tick(5_500, 2, 10, false, none_renewing),
            [Command::LeaseExpire { ids: vec![id] }]
        );
        assert!(
            lessor.tick(5_510, 3, 10, false, none_renewing).is_empty(),
            "proposed once, then again only after the retry interval"
        );
        assert_eq!(lessor.tick(5_600, 12, 10, false, none_renewing).len(), 1);
    }

    #[test]
    fn deadlines_count_from_one_tick_after_the_apply() {
        let (kv, id) = granted(1_000);
        let mut lessor = Lessor::promote(&kv, 1, 0, 0, EXACT);
        let kept = Outcome::LeaseKept { id, ttl_ms: 1_000 };
        lessor.applied(&Command::LeaseKeepAlive { id }, &kept, 500);
        assert!(lessor.tick(1_509, 1, 10, false, none_renewing).is_empty());
        assert_eq!(lessor.tick(1_510, 2, 10, false, none_renewing).len(), 1);
    }

    #[test]
    fn a_keep_alive_not_yet_applied_keeps_its_lease_out_of_expiries_and_checkpoints() {
        let (kv, id) = granted(100);
        let mut lessor = Lessor::promote(&kv, 1, 0, 0, EXACT);
        let renewing = || Some(BTreeSet::from([id]));
        assert!(
            lessor.tick(1_000, 1, 10, true, renewing).is_empty(),
            "neither an expiry nor a checkpoint may follow the keep-alive in the log"
        );
        // Once applied, the keep-alive moves the deadline; a checkpoint then
        // records the time left after it.
        let kept = Outcome::LeaseKept { id, ttl_ms: 100 };
        lessor.applied(&Command::LeaseKeepAlive { id }, &kept, 1_000);
        assert_eq!(
            lessor.tick(1_050, 2, 10, true, none_renewing),
            [Command::LeaseCheckpoint {
                remaining: vec![(id, 60)]
            }]
        );
    }

    #[test]
    fn a_batch_of_keep_alives_moves_the_deadline_of_each_lease_it_kept() {
        let (mut kv, a) = granted(1_000);
        let b = match kv.apply(&Command::LeaseGrant { ttl_ms: 500 }).0 {
            Outcome::LeaseGranted { id, .. } => id,
            other => panic!("{other:?}"),
        };
        let mut lessor = Lessor::promote(&kv, 1, 0, 0, EXACT);
        let batch = Command::LeaseKeepAlives {
            ids: vec![a, 99, b],
        };
        let (outcome, _) = kv.apply(&batch);
        assert_eq!(
            outcome,
            Outcome::LeasesKept {
                kept: vec![(a, 1_000), (b, 500)],
                missing: vec![99]
            }
        );
        lessor.applied(&batch, &outcome, 400);
        assert_eq!(lessor.deadlines[&a], 400 + 1_000 + 10);
        assert_eq!(lessor.deadlines[&b], 400 + 500 + 10);
        assert!(!lessor.deadlines.contains_key(&99));
    }

    #[test]
    fn nothing_is_proposed_when_the_log_cannot_be_read_or_nothing_is_due() {
        let (kv, _) = granted(100);
        let mut lessor = Lessor::promote(&kv, 1, 0, 0, EXACT);
        assert!(lessor.tick(1_000, 1, 10, true, || None).is_empty());
        let mut asked = false;
        lessor.tick(10, 2, 10, false, || {
            asked = true;
            None
        });
        assert!(!asked, "the log is read only when something is due");
    }
}
