//! One machine's side of the registry: what an agent writes and reads.
//!
//! A machine publishes its presence on a lease, reads what the scheduler
//! proposed to it, claims proposals (on the lease, serialised by its
//! generation key), releases claims whose proposal went, and reports
//! systemd's states of its units (on the lease). A renewal is a keep-alive
//! of the lease and nothing else: the members tell how long ago each lease
//! was renewed ([`super::liveness::last_renewals`]). (Agents of the first
//! release also stamped each renewal in a key of its own, a second log
//! entry per renewal; this one removes such a stamp when it takes its lease
//! over.)
//! Joining again after its lease expired, it re-claims in one transaction
//! what nobody else took meanwhile ([`MachineStore::reclaimable`],
//! [`MachineStore::rejoin`]). Every one of those is one
//! transaction built here, so the agent ([`crate::agent`]) decides what to do
//! and never how the store spells it. Everything it reacts to lives under its
//! own prefix ([`super::keys::machine_prefix`]), which [`wake_on_own_changes`]
//! watches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::bodies::{Body, BodyCache};
use super::error::RegistryError;
use super::keys::{self, MachineKey};
use super::records::{
    self, Claim, DesiredState, MachineRecord, Proposal, ReportedState, Target, UnitRecord,
};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, KeyValue, LeaseId, Op, Revision};
use crate::units::{Requirements, UnitHash, UnitName};

/// A machine's presence record as read, with what guards a write over it.
#[derive(Debug, Clone)]
pub struct StoredPresence {
    /// The record.
    pub record: MachineRecord,
    /// The lease it is on.
    pub lease: Option<LeaseId>,
    /// Its key's mod revision, so a publish over it fails if it changed.
    revision: Revision,
}

/// This machine's proposals and claims, as one read saw them.
#[derive(Debug, Default)]
pub struct OwnView {
    /// What the scheduler proposes here, with each proposal's revision.
    pub proposals: BTreeMap<UnitName, (Proposal, Revision)>,
    /// The claims on this machine's current lease, with their revisions.
    pub claims: BTreeMap<UnitName, Revision>,
    /// The generation key's mod revision (0: never claimed anything).
    generation: Revision,
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// The lease lives on for another TTL.
    Renewed,
    /// The lease is gone (it expired, or was revoked): its records with it.
    Expired,
}

/// Keeps one lease alive from a task of its own. A keep-alive never queues
/// behind the machine's claims, reports and reads, which on a loaded leader
/// can each take up to the client's timeout (a third of the TTL) and would
/// otherwise let a live host's lease run out: it goes over the machine's
/// connection when that is free (so a connection to a member gone silent is
/// found out between the machine's requests), else over a spare connection
/// of its own, opened the first time it is needed.
#[derive(Clone)]
pub struct LeaseKeeper {
    client: Arc<Client>,
    spare: Arc<Client>,
    lease: LeaseId,
}

impl LeaseKeeper {
    /// Renews the lease once: one keep-alive, which the member batches with
    /// others into one log entry.
    pub async fn renew(&self) -> Result<Renewed, ClientError> {
        let kept = match self.client.keep_alive_if_idle(self.lease).await {
            Some(kept) => kept,
            None => self.spare.keep_alive(self.lease).await,
        };
        renewed(kept)
    }
}

async fn renew(client: &Client, lease: LeaseId) -> Result<Renewed, ClientError> {
    renewed(client.keep_alive(lease).await)
}

/// What a keep-alive's answer says of its lease.
fn renewed(kept: Result<(), ClientError>) -> Result<Renewed, ClientError> {
    match kept {
        Ok(()) => Ok(Renewed::Renewed),
        Err(ClientError::LeaseNotFound(_)) => Ok(Renewed::Expired),
        Err(e) => Err(e),
    }
}

/// A unit file still on this machine from before its lease expired.
#[derive(Debug, Clone, Copy)]
pub struct Leftover<'a> {
    /// The unit.
    pub name: &'a UnitName,
    /// The body its file holds.
    pub hash: UnitHash,
    /// Its `[X-Fleet]` rules.
    pub requirements: &'a Requirements,
}

/// What [`MachineStore::reclaimable`] found: the leftovers nobody else took,
/// and what the re-claim must find unchanged.
#[derive(Debug, Default)]
pub struct Reclaim {
    /// Units still proposed here with the same body, with the proposal's revision.
    proposed: BTreeMap<UnitName, Revision>,
    /// Units proposed nowhere, unchanged and still wanted: proposed here
    /// again, with the unit record as read and the proposal to write.
    orphaned: BTreeMap<UnitName, (KeyValue, Proposal, bool)>,
    generation: Revision,
}

impl Reclaim {
    /// The units the re-claim takes.
    pub fn units(&self) -> BTreeSet<&UnitName> {
        self.proposed.keys().chain(self.orphaned.keys()).collect()
    }
}

/// The store as one machine uses it: its id, its instance, its current
/// presence lease, and the unit bodies it has read.
pub struct MachineStore {
    client: Arc<Client>,
    id: String,
    instance: String,
    /// The presence lease's TTL.
    ttl: Duration,
    lease: Option<LeaseId>,
    bodies: Arc<BodyCache>,
}

impl MachineStore {
    /// Machine `id`, install `instance`, over `client`, with presence leases
    /// of `ttl`, reading unit bodies through `bodies`; no lease yet.
    pub fn new(
        client: Client,
        id: &str,
        instance: &str,
        ttl: Duration,
        bodies: Arc<BodyCache>,
    ) -> MachineStore {
        MachineStore {
            client: Arc::new(client),
            id: id.to_string(),
            instance: instance.to_string(),
            ttl,
            lease: None,
            bodies,
        }
    }

    /// The presence lease this machine holds, if it joined.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }

    /// A keeper of the current lease, for the keep-alive task.
    pub fn keeper(&self) -> Option<LeaseKeeper> {
        self.lease.map(|lease| LeaseKeeper {
            client: self.client.clone(),
            spare: Arc::new(self.client.sibling()),
            lease,
        })
    }

    /// This machine's presence record as stored now, if any.
    pub async fn presence(&self) -> Result<Option<StoredPresence>, RegistryError> {
        let Some(kv) = self.client.get(&keys::machine(&self.id)).await? else {
            return Ok(None);
        };
        Ok(Some(StoredPresence {
            record: records::decode(&kv.key, &kv.value)?,
            lease: kv.lease,
            revision: kv.mod_revision,
        }))
    }

    /// Takes over `lease` (a daemon restarting within its TTL): renews it,
    /// and holds it from now on if it still exists.
    pub async fn adopt(&mut self, lease: LeaseId) -> Result<Renewed, ClientError> {
        let renewal = renew(&self.client, lease).await?;
        if renewal == Renewed::Renewed {
            // A renewal stamp an agent of the first release left on the
            // lease: nobody renews it now, and standing it would say this
            // machine is overdue.
            self.client.delete(&keys::renewal(&self.id), false).await?;
            self.lease = Some(lease);
        }
        Ok(renewal)
    }

    /// Grants a fresh presence lease and holds it from now on.
    pub async fn take_lease(&mut self) -> Result<LeaseId, ClientError> {
        let lease = self.client.grant(self.ttl).await?;
        self.lease = Some(lease);
        Ok(lease)
    }

    /// Revokes the lease held (its presence, claims and states vanish with it).
    pub async fn revoke(&mut self) -> Result<(), ClientError> {
        match self.lease.take() {
            Some(lease) => self.client.revoke(lease).await,
            None => Ok(()),
        }
    }

    /// Writes `me` as this machine's presence on the lease held, if the record
    /// is still as `read` found it (`None`: still absent). False when it
    /// changed meanwhile, or no lease is held: nothing was written.
    pub async fn publish(
        &self,
        me: &MachineRecord,
        read: Option<&StoredPresence>,
    ) -> Result<bool, ClientError> {
        let Some((compare, ops)) = self.presence_writes(me, read) else {
            return Ok(false);
        };
        let (ok, _, _) = self.client.txn(compare, ops, Vec::new()).await?;
        Ok(ok)
    }

    /// The guarded writes of `me` as this machine's presence (see
    /// [`MachineStore::publish`]), removing any renewal stamp an agent of
    /// the first release left; `None` without a lease.
    fn presence_writes(
        &self,
        me: &MachineRecord,
        read: Option<&StoredPresence>,
    ) -> Option<(Vec<Compare>, Vec<Op>)> {
        let lease = self.lease?;
        let key = keys::machine(&self.id);
        let compare = Compare::revision_is(&key, read.map_or(0, |p| p.revision));
        let ops = vec![
            Op::put_on_lease(key, records::encode(me), lease),
            Op::delete(keys::renewal(&self.id)),
        ];
        Some((vec![compare], ops))
    }

    /// Which of `leftovers` (unit files here from before this machine's
    /// lease expired) nobody else took meanwhile, so [`MachineStore::rejoin`]
    /// may claim them back: those still proposed here with the same body,
    /// and those proposed nowhere (and claimed nowhere else) whose unit is
    /// unchanged and still wanted. A unit whose `MachineOf` peers are not
    /// among them is left out. Everything else runs elsewhere now, or is no
    /// longer wanted: the caller stops it before rejoining.
    pub async fn reclaimable(&self, leftovers: &[Leftover<'_>]) -> Result<Reclaim, RegistryError> {
        let view = self.own_view().await?;
        let mut reclaim = Reclaim {
            generation: view.generation,
            ..Reclaim::default()
        };
        let mut claimed_elsewhere: Option<BTreeSet<UnitName>> = None;
        for leftover in leftovers {
            if let Some((proposal, revision)) = view.proposals.get(leftover.name) {
                if proposal.hash == leftover.hash {
                    reclaim.proposed.insert(leftover.name.clone(), *revision);
                }
                continue;
            }
            let Some(kv) = self.client.get(&keys::unit(leftover.name)).await? else {
                continue;
            };
            let record: UnitRecord = records::decode(&kv.key, &kv.value)?;
            let Some(target) = Target::of(record.desired) else {
                continue;
            };
            let global = leftover.requirements.global;
            if record.hash != leftover.hash || record.desired == DesiredState::Inactive {
                continue;
            }
            if !global {
                if self
                    .client
                    .get(&keys::placed(leftover.name))
                    .await?
                    .is_some()
                {
                    continue;
                }
                if claimed_elsewhere.is_none() {
                    claimed_elsewhere = Some(self.claims_elsewhere().await?);
                }
                if claimed_elsewhere
                    .as_ref()
                    .is_some_and(|c| c.contains(leftover.name))
                {
                    continue;
                }
            }
            let proposal = Proposal {
                hash: record.hash,
                target,
            };
            reclaim
                .orphaned
                .insert(leftover.name.clone(), (kv, proposal, global));
        }
        // A unit whose MachineOf peer stays out stays out too, until none does.
        loop {
            let taken: BTreeSet<UnitName> = reclaim.units().into_iter().cloned().collect();
            let out: Vec<&UnitName> = leftovers
                .iter()
                .filter(|l| taken.contains(l.name))
                .filter(|l| l.requirements.machine_of.iter().any(|p| !taken.contains(p)))
                .map(|l| l.name)
                .collect();
            if out.is_empty() {
                return Ok(reclaim);
            }
            for unit in out {
                reclaim.proposed.remove(unit);
                reclaim.orphaned.remove(unit);
            }
        }
    }

    /// Units claimed by any other machine.
    async fn claims_elsewhere(&self) -> Result<BTreeSet<UnitName>, ClientError> {
        let (kvs, _) = self.client.range(keys::PER_MACHINE, true, false).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| match keys::parse_machine_key(&kv.key) {
                Some(MachineKey::Claim(id, unit)) if id != self.id => Some(unit),
                _ => None,
            })
            .collect())
    }

    /// Publishes `me` (as [`MachineStore::publish`]) and claims what
    /// `reclaim` found, in ONE transaction on the lease held: an orphaned
    /// unit is proposed here again (with its placement pointer) in the same
    /// write, and every read it was decided from must be unchanged. False
    /// when anything changed meanwhile: nothing was written.
    pub async fn rejoin(
        &self,
        me: &MachineRecord,
        read: Option<&StoredPresence>,
        reclaim: &Reclaim,
    ) -> Result<bool, ClientError> {
        let Some((mut compare, mut ops)) = self.presence_writes(me, read) else {
            return Ok(false);
        };
        let Some(lease) = self.lease else {
            return Ok(false);
        };
        if !reclaim.units().is_empty() {
            let generation = keys::generation(&self.id);
            compare.push(Compare::revision_is(&generation, reclaim.generation));
            ops.push(Op::put(generation, Vec::new()));
        }
        let claim = records::encode(&Claim {
            instance: self.instance.clone(),
        });
        for (unit, revision) in &reclaim.proposed {
            compare.push(Compare::revision_is(
                &keys::proposal(&self.id, unit),
                *revision,
            ));
        }
        for (unit, (kv, proposal, global)) in &reclaim.orphaned {
            let here = keys::proposal(&self.id, unit);
            compare.push(Compare::unchanged(&kv.key, Some(kv)));
            compare.push(Compare::unchanged(&here, None));
            ops.push(Op::put(here, records::encode(proposal)));
            if !global {
                compare.push(Compare::unchanged(&keys::placed(unit), None));
                ops.push(Op::put(keys::placed(unit), self.id.as_bytes().to_vec()));
            }
        }
        for unit in reclaim.units() {
            let key = keys::claim(&self.id, unit);
            compare.push(Compare::unchanged(&key, None));
            ops.push(Op::put_on_lease(key, claim.clone(), lease));
        }
        let (ok, _, _) = self.client.txn(compare, ops, Vec::new()).await?;
        Ok(ok)
    }

    /// The target this machine's reports say it applied to each unit (read
    /// back after a daemon restart that adopted its lease).
    pub async fn reported_targets(&self) -> Result<BTreeMap<UnitName, Target>, ClientError> {
        let (kvs, _) = self.client.range(keys::STATES, true, false).await?;
        Ok(kvs
            .iter()
            .filter(|kv| kv.lease.is_some() && kv.lease == self.lease)
            .filter_map(|kv| {
                let (unit, id) = keys::parse_state_key(&kv.key)?;
                let state: ReportedState = records::decode(&kv.key, &kv.value).ok()?;
                (id == self.id).then_some((unit, state.target?))
            })
            .collect())
    }

    /// Reads this machine's proposals, its claims on the lease held, and its
    /// generation.
    pub async fn own_view(&self) -> Result<OwnView, ClientError> {
        let prefix = keys::machine_prefix(&self.id);
        let (kvs, _) = self.client.range(&prefix, true, false).await?;
        let mut view = OwnView::default();
        for kv in kvs {
            match keys::parse_machine_key(&kv.key) {
                Some(MachineKey::Proposal(_, unit)) => {
                    if let Ok(p) = records::decode::<Proposal>(&kv.key, &kv.value) {
                        view.proposals.insert(unit, (p, kv.mod_revision));
                    }
                }
                Some(MachineKey::Claim(_, unit))
                    if kv.lease.is_some() && kv.lease == self.lease =>
                {
                    view.claims.insert(unit, kv.mod_revision);
                }
                Some(MachineKey::Generation(_)) => view.generation = kv.mod_revision,
                _ => {}
            }
        }
        Ok(view)
    }

    /// Claims `units` (each proposed in `view`, with its rules) in one
    /// transaction on the lease held. It bumps the generation key, so it fails
    /// if any other claim here happened since `view` was read; it also fails
    /// if a proposal changed, a claim appeared, or a `MachineOf` peer is not
    /// claimed here. Returns whether it claimed (then `view` has the claims).
    pub async fn claim(
        &self,
        view: &mut OwnView,
        units: &[(&UnitName, &Requirements)],
    ) -> Result<bool, ClientError> {
        let Some(lease) = self.lease else {
            return Ok(false);
        };
        let generation = keys::generation(&self.id);
        let mut compare = vec![Compare::revision_is(&generation, view.generation)];
        let mut ops = vec![Op::put(generation, Vec::new())];
        let claim = records::encode(&Claim {
            instance: self.instance.clone(),
        });
        for (unit, rules) in units {
            let Some((_, revision)) = view.proposals.get(*unit) else {
                return Ok(false);
            };
            let key = keys::claim(&self.id, unit);
            compare.push(Compare::revision_is(
                &keys::proposal(&self.id, unit),
                *revision,
            ));
            compare.push(Compare::unchanged(&key, None));
            for peer in &rules.machine_of {
                compare.push(Compare::exists(&keys::claim(&self.id, peer)));
            }
            ops.push(Op::put_on_lease(key, claim.clone(), lease));
        }
        let (ok, _, revision) = self.client.txn(compare, ops, Vec::new()).await?;
        if ok {
            view.generation = revision;
            for (unit, _) in units {
                view.claims.insert((*unit).clone(), revision);
            }
        }
        Ok(ok)
    }

    /// Drops the claims on `units` (as `view` read them) and their reported
    /// states, in one transaction.
    pub async fn release(&self, view: &OwnView, units: &[&UnitName]) -> Result<(), ClientError> {
        let mut compare = Vec::new();
        let mut ops = Vec::new();
        for unit in units {
            let Some(revision) = view.claims.get(*unit) else {
                continue;
            };
            compare.push(Compare::revision_is(
                &keys::claim(&self.id, unit),
                *revision,
            ));
            ops.push(Op::delete(keys::claim(&self.id, unit)));
            ops.push(Op::delete(keys::state(unit, &self.id)));
        }
        if !ops.is_empty() {
            self.client.txn(compare, ops, Vec::new()).await?;
        }
        Ok(())
    }

    /// Writes systemd's states of units here, on the lease held (`None`: the
    /// unit is gone from here, its report goes too), in one transaction.
    pub async fn report(
        &self,
        states: &[(UnitName, Option<ReportedState>)],
    ) -> Result<(), ClientError> {
        let Some(lease) = self.lease else {
            return Ok(());
        };
        let ops: Vec<Op> = states
            .iter()
            .map(|(unit, state)| {
                let key = keys::state(unit, &self.id);
                match state {
                    Some(state) => Op::put_on_lease(key, records::encode(state), lease),
                    None => Op::delete(key),
                }
            })
            .collect();
        if !ops.is_empty() {
            self.client.txn(Vec::new(), ops, Vec::new()).await?;
        }
        Ok(())
    }

    /// The body stored under `hash` (read once; see [`BodyCache`]).
    pub async fn body(&self, hash: &UnitHash) -> Result<Option<Arc<Body>>, ClientError> {
        self.bodies.get(&self.client, hash).await
    }
}

/// Wakes `wake` on every change under machine `id`'s own prefix (and once
/// on every (re)subscription, for what it may have missed), for ever. The
/// watch requires a leader: a member cut off from the majority learns of no
/// new proposal, so the watch moves to a member that does. It starts on the
/// member [`watch_start`] picks for `id`, so a cluster's agents spread their
/// watches over the members instead of all holding the first endpoint.
pub async fn wake_on_own_changes(endpoints: Vec<String>, id: String, wake: Arc<Notify>) {
    let prefix = keys::machine_prefix(&id);
    loop {
        if let Ok(client) = Client::connect(&endpoints).await
            && let Ok((_, revision)) = client.range(&prefix, true, true).await
        {
            let mut watch = client
                .watch(&prefix, revision + 1)
                .require_leader()
                .starting_at(watch_start(&id));
            wake.notify_one();
            while watch.next().await.is_ok() {
                wake.notify_one();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where machine `id`'s watch starts among the endpoints (taken modulo
/// their number): a stable hash of the id, the same after every restart.
fn watch_start(id: &str) -> usize {
    crate::consensus::node::stable_hash(id) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_spread_their_watches_over_the_members() {
        // Machine ids as /etc/machine-id holds them: 32 hex digits.
        let ids = (1..=1000u64).map(|i| {
            let mix = |x: u64| x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
            format!("{:016x}{:016x}", mix(i), mix(i ^ 0xffff))
        });
        for members in [3usize, 5] {
            let mut held = vec![0usize; members];
            for id in ids.clone() {
                held[watch_start(&id) % members] += 1;
            }
            let fair = 1000 / members;
            for (member, n) in held.iter().enumerate() {
                assert!(
                    n * 4 > fair * 3 && n * 4 < fair * 5,
                    "member {member} of {members} holds {n} of 1000 watches: {held:?}"
                );
            }
        }
        assert_eq!(watch_start("abc"), watch_start("abc"), "stable");
    }
}
