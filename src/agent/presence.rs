//! This machine's presence in the cluster: join, keep-alive, fence, leave.
//!
//! * Join: find this machine's presence record. The same instance (a daemon
//!   restart within the TTL) re-takes its lease and adopts everything it
//!   runs. Otherwise (the lease expired while the host was cut off, or the
//!   daemon was down longer than the TTL) the units still here from before
//!   that now run elsewhere, or are no longer wanted, are stopped and
//!   unloaded FIRST: a host coming back from a partition never runs a unit
//!   the cluster moved away. Then presence is published and what nobody
//!   else took meanwhile is claimed back, in one transaction, so it keeps
//!   running without a restart (fleet's single-host connectivity loss stops
//!   nothing). Another instance with this machine id is a duplicate and
//!   stays out.
//! * Keep-alive: the lease is renewed every [`renew_interval`] by a task of
//!   its own, never delayed by systemd nor queued behind the agent's
//!   claims and reports on a slow leader ([`LeaseKeeper`]). Losing the cluster stops nothing; a
//!   lease found expired on reconnect sends the agent back to join.
//! * Fence: a unit with `FenceAfter=N` is stopped when renewals have failed
//!   for N seconds; all others keep running through any outage.
//! * Leave (`--leave-on-stop`): unload everything, revoke the lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::execute::Host;
use crate::registry::RegistryError;
use crate::registry::machine::{LeaseKeeper, Leftover, MachineStore, Renewed, StoredPresence};
use crate::registry::records::{MachineRecord, renew_interval};
use crate::units::UnitName;

/// How soon to retry renewing or joining after a failure: when the store
/// comes back (a new leader after a quorum outage), the lease's remaining
/// time is all the agent has to renew it before its units would be moved.
fn retry_soon(ttl: Duration) -> Duration {
    renew_interval(ttl).min(Duration::from_millis(250))
}

/// Why joining failed, which decides how soon to try again.
#[derive(Debug)]
enum JoinError {
    /// Another install holds this machine id: retry slowly, loudly.
    Duplicate(String),
    /// The store did not answer or the write raced: retry soon.
    Store(String),
}

impl<E: Into<RegistryError>> From<E> for JoinError {
    fn from(e: E) -> Self {
        JoinError::Store(e.into().to_string())
    }
}

/// Shared between the loop and the keep-alive task.
struct Health {
    /// When the lease was last renewed.
    last_ok: Mutex<Instant>,
    /// Set when the store says the lease no longer exists.
    lost: Mutex<bool>,
}

impl Health {
    fn renewed(&self) {
        *self.last_ok.lock().expect("health lock") = Instant::now();
    }
}

/// This machine's presence: its record, its lease's health, its fences.
pub struct Presence {
    me: MachineRecord,
    ttl: Duration,
    health: Arc<Health>,
    /// Units stopped by FenceAfter while cut off.
    fenced: BTreeSet<UnitName>,
    keeper: Option<JoinHandle<()>>,
}

impl Presence {
    /// Presence as `me`, on leases of `ttl`; not joined yet.
    pub fn new(me: MachineRecord, ttl: Duration) -> Presence {
        Presence {
            me,
            ttl,
            health: Arc::new(Health {
                last_ok: Mutex::new(Instant::now()),
                lost: Mutex::new(false),
            }),
            fenced: BTreeSet::new(),
            keeper: None,
        }
    }

    /// Whether the agent must join (again): it never did, or the keep-alive
    /// task found the lease expired.
    pub fn must_join(&self, store: &MachineStore) -> bool {
        let lost = std::mem::take(&mut *self.health.lost.lock().expect("health lock"));
        store.lease().is_none() || lost
    }

    /// Whether FenceAfter stopped `unit` (it stays loaded, not started).
    pub fn is_fenced(&self, unit: &UnitName) -> bool {
        self.fenced.contains(unit)
    }

    /// Joins the cluster and starts keeping the lease alive; false if told
    /// to stop first.
    ///
    /// While the store is unreachable it retries soon (a daemon restarting
    /// with its host must re-take its lease within the lease's remaining
    /// time, or its units move), backing off to the slow pace a duplicate
    /// machine id retries at.
    pub async fn join(
        &mut self,
        store: &mut MachineStore,
        host: &mut Host,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        if let Some(task) = self.keeper.take() {
            task.abort();
        }
        let slowest = self.ttl.min(Duration::from_secs(5));
        let mut pause = retry_soon(self.ttl);
        let mut last_error = String::new();
        loop {
            let wait = match self.try_join(store, host).await {
                Ok(()) => {
                    self.health.renewed();
                    self.fenced.clear();
                    if let Some(keeper) = store.keeper() {
                        let task = keep_alive(keeper, self.ttl, self.health.clone());
                        self.keeper = Some(tokio::spawn(task));
                    }
                    return true;
                }
                Err(JoinError::Duplicate(message)) => {
                    tracing::error!("agent: {message}");
                    slowest
                }
                Err(JoinError::Store(message)) => {
                    if message != last_error {
                        tracing::warn!("agent: cannot join the cluster yet: {message}; retrying");
                        last_error = message;
                    }
                    let wait = pause;
                    pause = (pause * 2).min(slowest);
                    wait
                }
            };
            tokio::select! {
                _ = stop.changed() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn try_join(
        &mut self,
        store: &mut MachineStore,
        host: &mut Host,
    ) -> Result<(), JoinError> {
        let found = store.presence().await?;
        if let Some(found) = &found {
            let record = &found.record;
            if record.instance != self.me.instance {
                // Whatever runs here from an earlier life is not claimed by
                // this install, and the cluster runs it elsewhere.
                host.unload_everything(store, "staying out as a duplicate")
                    .await;
                return Err(JoinError::Duplicate(format!(
                    "another flotilla daemon (instance {}, host {}, {}) is registered with this \
                     machine id {}; this host stays out of the cluster. Was the machine cloned? \
                     Give it its own id (rm /etc/machine-id && systemd-machine-id-setup) and \
                     restart flotilla",
                    record.instance, record.hostname, record.ip, self.me.id
                )));
            }
            if let Some(lease) = found.lease
                && store.adopt(lease).await? == Renewed::Renewed
            {
                if *record != self.me {
                    self.publish(store, Some(found)).await?;
                }
                tracing::info!("agent: rejoined with the same lease; adopting its units");
                return Ok(());
            }
        }
        // A fresh presence: what nobody else took meanwhile is claimed back;
        // everything else stops here first.
        let local = host.local().await;
        let leftovers: Vec<Leftover<'_>> = local
            .iter()
            .filter_map(|(name, found)| {
                let found = found.as_ref()?;
                Some(Leftover {
                    name,
                    hash: found.hash,
                    requirements: found.unit.requirements(),
                })
            })
            .collect();
        let reclaim = store.reclaimable(&leftovers).await?;
        let keep = reclaim.units();
        let kept: Vec<UnitName> = keep.iter().map(|u| (*u).clone()).collect();
        drop(leftovers);
        host.unload_all_but(store, &kept, "joining the cluster")
            .await;
        let lease = store.take_lease().await?;
        match store.rejoin(&self.me, found.as_ref(), &reclaim).await {
            Ok(true) => {
                tracing::info!(
                    "agent: joined the cluster (lease {lease:x}); claimed back {} units \
                     nobody else took",
                    kept.len()
                );
                Ok(())
            }
            Ok(false) => {
                let _ = store.revoke().await;
                Err(JoinError::Store(
                    "the cluster changed while joining; retrying".to_string(),
                ))
            }
            Err(e) => {
                let _ = store.revoke().await;
                Err(e.into())
            }
        }
    }

    /// Writes the presence record on the current lease, if it is as read.
    async fn publish(
        &self,
        store: &MachineStore,
        read: Option<&StoredPresence>,
    ) -> Result<(), JoinError> {
        if store.publish(&self.me, read).await? {
            Ok(())
        } else {
            Err(JoinError::Store(
                "the presence record changed while joining; retrying".to_string(),
            ))
        }
    }

    /// Publishes new metadata (scheduling follows: units whose
    /// `MachineMetadata` no longer matches move away, newly matching ones come).
    pub async fn update_metadata(
        &mut self,
        store: &MachineStore,
        metadata: BTreeMap<String, String>,
    ) {
        if metadata == self.me.metadata {
            return;
        }
        tracing::info!("agent: metadata is now {metadata:?}");
        self.me.metadata = metadata;
        if store.lease().is_none() {
            return;
        }
        for _ in 0..3 {
            let read = match store.presence().await {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!("agent: cannot publish new metadata now: {e}");
                    return;
                }
            };
            if self.publish(store, read.as_ref()).await.is_ok() {
                return;
            }
        }
    }

    /// Stops units with `FenceAfter=` once the store has been unreachable that
    /// long (counted from the last renewal, never below the normal gap).
    /// Returns whether renewals have been failing for longer than normal.
    pub async fn fence(&mut self, host: &mut Host) -> bool {
        let cut_off = self.health.last_ok.lock().expect("health lock").elapsed();
        // Silence up to one renewal interval (plus a second for the call
        // itself) is normal, and clears any fence.
        let normal = renew_interval(self.ttl) + Duration::from_secs(1);
        if cut_off < normal {
            if !self.fenced.is_empty() {
                tracing::info!("agent: in touch with the cluster again; fenced units may run");
                self.fenced.clear();
            }
            return false;
        }
        for (unit, found) in &host.local().await {
            let Some(secs) = found
                .as_ref()
                .and_then(|f| f.unit.requirements().fence_after_secs)
            else {
                continue;
            };
            if cut_off >= Duration::from_secs(secs).max(normal) && self.fenced.insert(unit.clone())
            {
                tracing::warn!(
                    "agent: cut off from the cluster for {cut_off:?}; stopping {unit} (FenceAfter={secs})"
                );
                host.stop(unit).await;
            }
        }
        true
    }

    /// Stops keeping the lease alive (the daemon stops; the lease then runs
    /// out unless a restarted daemon adopts it).
    pub fn stop_keeping(&mut self) {
        if let Some(task) = self.keeper.take() {
            task.abort();
        }
    }

    /// `--leave-on-stop`: unload everything, drop claims and presence.
    pub async fn leave(&mut self, store: &mut MachineStore, host: &mut Host) {
        self.stop_keeping();
        host.unload_everything(store, "leaving the cluster").await;
        if store.lease().is_some() && store.revoke().await.is_ok() {
            tracing::info!("agent: left the cluster");
        }
    }
}

/// Renews the lease every [`renew_interval`]; records success, and loss of
/// the lease.
async fn keep_alive(keeper: LeaseKeeper, ttl: Duration, health: Arc<Health>) {
    let mut pause = renew_interval(ttl);
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(pause).await;
        pause = retry_soon(ttl);
        match keeper.renew().await {
            Ok(Renewed::Renewed) => {
                health.renewed();
                pause = renew_interval(ttl);
                if failures > 0 {
                    tracing::info!("agent: presence renewed again after {failures} failed tries");
                    failures = 0;
                }
            }
            Ok(Renewed::Expired) => {
                tracing::warn!("agent: the presence lease expired while cut off; rejoining");
                *health.lost.lock().expect("health lock") = true;
                return;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!("agent: cannot renew presence: {e}; units keep running");
                }
            }
        }
    }
}
