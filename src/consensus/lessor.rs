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
//! ordered in the log before an expiry always wins over it.

use std::collections::BTreeMap;

use super::kv::{Command, KvStore, LeaseId, Outcome};

/// The leader's lease deadlines; exists only while this member leads.
#[derive(Debug, Clone)]
pub struct Lessor {
    /// When each lease runs out, in the node's milliseconds.
    deadlines: BTreeMap<LeaseId, u64>,
    /// Leases whose expiry was proposed, with the tick it was proposed at.
    expiring: BTreeMap<LeaseId, u64>,
}

impl Lessor {
    /// The lessor of a member that just became leader: every lease gets its
    /// checkpointed remaining time plus `grace_ms` (one election timeout),
    /// never a fresh TTL and never an instant expiry.
    pub fn promote(kv: &KvStore, now_ms: u64, grace_ms: u64) -> Lessor {
        Lessor {
            deadlines: kv
                .leases()
                .map(|l| (l.id, now_ms + l.remaining_ms + grace_ms))
                .collect(),
            expiring: BTreeMap::new(),
        }
    }

    /// Keeps the deadlines in step with a command the state machine applied.
    pub fn applied(&mut self, command: &Command, outcome: &Outcome, now_ms: u64) {
        match outcome {
            Outcome::LeaseGranted { id, ttl_ms } | Outcome::LeaseKept { id, ttl_ms } => {
                self.deadlines.insert(*id, now_ms + ttl_ms);
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

    /// Forgets leases a snapshot install removed.
    pub fn installed(&mut self, kv: &KvStore) {
        self.deadlines.retain(|id, _| kv.lease(*id).is_some());
    }

    /// One tick of the leader's clock: the commands to propose now. An expiry
    /// proposed but not applied (lost with a leadership change) is proposed
    /// again after `retry_after_ticks`.
    pub fn tick(
        &mut self,
        now_ms: u64,
        ticks: u64,
        retry_after_ticks: u64,
        checkpoint_due: bool,
    ) -> Vec<Command> {
        let mut proposals = Vec::new();
        let due: Vec<LeaseId> = self
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
                .filter(|(id, _)| !self.expiring.contains_key(id))
                .map(|(id, deadline)| (*id, deadline.saturating_sub(now_ms)))
                .collect();
            if !remaining.is_empty() {
                proposals.push(Command::LeaseCheckpoint { remaining });
            }
        }
        proposals
    }
}
