//! One machine's side of the registry: what an agent writes and reads.
//!
//! A machine publishes its presence on a lease, reads what the scheduler
//! proposed to it, claims proposals (on the lease, serialised by its
//! generation key), releases claims whose proposal went, and reports
//! systemd's states of its units (on the lease). Every one of those is one
//! transaction built here, so the agent ([`crate::agent`]) decides what to do
//! and never how the store spells it. Everything it reacts to lives under its
//! own prefix ([`super::keys::machine_prefix`]), which [`wake_on_own_changes`]
//! watches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::bodies::{Body, BodyCache};
use super::keys::{self, MachineKey};
use super::ops::RegistryError;
use super::records::{self, Claim, MachineRecord, Proposal, ReportedState};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, LeaseId, Op, Revision};
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
pub enum Renewal {
    /// The lease lives on for another TTL.
    Renewed,
    /// The lease is gone (it expired, or was revoked): its records with it.
    Expired,
}

/// Keeps one lease alive; cheap to hand to a task of its own.
#[derive(Clone)]
pub struct LeaseKeeper {
    client: Arc<Client>,
    lease: LeaseId,
}

impl LeaseKeeper {
    /// Renews the lease once.
    pub async fn renew(&self) -> Result<Renewal, ClientError> {
        renew(&self.client, self.lease).await
    }
}

async fn renew(client: &Client, lease: LeaseId) -> Result<Renewal, ClientError> {
    match client.keep_alive(lease).await {
        Ok(()) => Ok(Renewal::Renewed),
        Err(ClientError::LeaseNotFound(_)) => Ok(Renewal::Expired),
        Err(e) => Err(e),
    }
}

/// The store as one machine uses it: its id, its instance, its current
/// presence lease, and the unit bodies it has read.
pub struct MachineStore {
    client: Arc<Client>,
    id: String,
    instance: String,
    lease: Option<LeaseId>,
    bodies: BodyCache,
}

impl MachineStore {
    /// Machine `id`, install `instance`, over `client`; no lease yet.
    pub fn new(client: Client, id: &str, instance: &str) -> MachineStore {
        MachineStore {
            client: Arc::new(client),
            id: id.to_string(),
            instance: instance.to_string(),
            lease: None,
            bodies: BodyCache::new(),
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
    pub async fn adopt(&mut self, lease: LeaseId) -> Result<Renewal, ClientError> {
        let renewal = renew(&self.client, lease).await?;
        if renewal == Renewal::Renewed {
            self.lease = Some(lease);
        }
        Ok(renewal)
    }

    /// Grants a fresh presence lease of `ttl` and holds it from now on.
    pub async fn take_lease(&mut self, ttl: Duration) -> Result<LeaseId, ClientError> {
        let lease = self.client.grant(ttl).await?;
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
        let Some(lease) = self.lease else {
            return Ok(false);
        };
        let key = keys::machine(&self.id);
        let compare = Compare::revision_is(&key, read.map_or(0, |p| p.revision));
        let op = Op::put_on_lease(key, records::encode(me), lease);
        let (ok, _, _) = self.client.txn(vec![compare], vec![op], Vec::new()).await?;
        Ok(ok)
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
/// on every (re)subscription, for what it may have missed), for ever.
pub async fn wake_on_own_changes(endpoints: Vec<String>, id: String, wake: Arc<Notify>) {
    let prefix = keys::machine_prefix(&id);
    loop {
        if let Ok(client) = Client::connect(&endpoints).await
            && let Ok((_, revision)) = client.range(&prefix, true, true).await
        {
            let mut watch = client.watch(&prefix, revision + 1);
            wake.notify_one();
            while watch.next().await.is_ok() {
                wake.notify_one();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
