//! Which machines are alive and which ones the store still remembers without
//! a live presence, for `flotilla cluster health`.
//!
//! A machine's presence record lives on its lease and vanishes when the lease
//! expires (host down, cut off longer than its TTL, or retired). Its claim
//! generation key and its drain mark do not: they outlive the lease, so they
//! name the machines that were here and no longer are.
//!
//! A live machine whose last renewal is overdue (two renewals missed) is
//! named too: it is about to lose its units.
//!
//! Reads are serializable (this member's state, no leader needed): a health
//! report must still say something when the cluster has lost its quorum.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::RegistryError;
use super::keys::{self, MachineKey};
use super::records::{self, Renewal};
use crate::consensus::client::Client;

/// A machine the store knows whose presence lease has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpiredMachine {
    /// Its machine id.
    pub machine: String,
    /// Whether it is drained (an operator took it out on purpose).
    pub drained: bool,
    /// Units still proposed to it (the scheduler moves them after its bound).
    pub proposals: usize,
}

/// A live machine that has missed renewals: its lease runs out soon unless
/// it is heard of again (host overloaded, cut off, or its agent stuck).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverdueMachine {
    /// Its machine id.
    pub machine: String,
    /// Seconds since its last renewal.
    pub renewed_secs_ago: u64,
    /// Its presence lease's TTL in seconds.
    pub ttl_secs: u64,
}

/// The machines, as their presence leases say: alive or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Liveness {
    /// Machines with a live presence.
    pub live: Vec<String>,
    /// Live machines whose last renewal is overdue ([`Renewal::is_overdue`]).
    pub overdue: Vec<OverdueMachine>,
    /// Machines without one that the store still remembers.
    pub expired: Vec<ExpiredMachine>,
}

/// Reads which machines are live (and which of those are overdue, by this
/// host's clock) and which have expired.
pub async fn liveness(client: &Client) -> Result<Liveness, RegistryError> {
    let (machines, _) = client.range(keys::MACHINES, true, true).await?;
    let (renewals, _) = client.range(keys::RENEWALS, true, true).await?;
    let (drains, _) = client.range(keys::DRAIN, true, true).await?;
    let (per_machine, _) = client.range(keys::PER_MACHINE, true, true).await?;
    let live: BTreeSet<String> = machines
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::MACHINES))
        .map(str::to_string)
        .collect();
    let drained: BTreeSet<&str> = drains
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::DRAIN))
        .collect();
    let mut known: BTreeMap<String, usize> = drained.iter().map(|id| (id.to_string(), 0)).collect();
    for kv in &per_machine {
        match keys::parse_machine_key(&kv.key) {
            Some(MachineKey::Proposal(id, _)) => *known.entry(id).or_default() += 1,
            Some(MachineKey::Claim(id, _) | MachineKey::Generation(id)) => {
                known.entry(id).or_default();
            }
            None => {}
        }
    }
    let expired = known
        .into_iter()
        .filter(|(id, _)| !live.contains(id))
        .map(|(id, proposals)| ExpiredMachine {
            drained: drained.contains(id.as_str()),
            machine: id,
            proposals,
        })
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let overdue = renewals
        .iter()
        .filter_map(|kv| {
            let id = kv.key.strip_prefix(keys::RENEWALS)?;
            let renewal: Renewal = records::decode(&kv.key, &kv.value).ok()?;
            (live.contains(id) && renewal.is_overdue(now_ms)).then(|| OverdueMachine {
                machine: id.to_string(),
                renewed_secs_ago: now_ms.saturating_sub(renewal.at_ms) / 1000,
                ttl_secs: renewal.ttl_ms / 1000,
            })
        })
        .collect();
    Ok(Liveness {
        live: live.into_iter().collect(),
        overdue,
        expired,
    })
}
