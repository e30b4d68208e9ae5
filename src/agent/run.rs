//! The agent's loop: presence, claims, systemd, state reports.
//!
//! 1. Join: find this machine's presence record. The same instance (a daemon
//!    restart within the TTL) re-takes its lease and adopts everything it
//!    runs. Otherwise every unit still running here from an earlier life is
//!    stopped and unloaded FIRST, and only then is presence published: a host
//!    coming back from a partition never runs a unit the cluster moved away.
//!    Another instance with this machine id is a duplicate and stays out.
//! 2. Keep the lease alive every TTL/3 (its own task, never delayed by
//!    systemd). Losing the cluster stops nothing; a lease found expired on
//!    reconnect sends the agent back to step 1.
//! 3. On every change under its own prefix (and every few seconds as a
//!    backstop): claim the proposals it may run, in one transaction that
//!    bumps the machine's generation key; release claims whose proposal went;
//!    bring systemd to what is claimed ([`super::reconcile`]). systemd is
//!    reloaded at most once per pass, and only when the pass unloads a unit or
//!    loads one systemd already holds (a changed body): systemd (252 checked)
//!    loads a newly linked file on demand, and a reload with hundreds of units
//!    loaded costs most of a second of systemd's time.
//! 4. Report LOAD/ACTIVE/SUB of its units, driven by systemd's signals.
//!
//! A unit with `FenceAfter=N` is stopped when the store has been out of reach
//! for N seconds; all others keep running through any outage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::claims::{self, Ruled};
use super::files::{LocalUnit, UnitFiles};
use super::identity;
use super::reconcile::{self, Action, Activity, Actual, Desired};
use super::systemd::{Systemd, UnitState};
use crate::consensus::client::{Client, ClientError};
use crate::consensus::kv::{Compare, KeyValue, LeaseId, Op, Revision};
use crate::registry::keys::{self, MachineKey};
use crate::registry::records::{self, Claim, MachineRecord, Proposal, ReportedState, Target};
use crate::units::{Requirements, Unit, UnitHash, UnitName};

/// How often the agent reconciles when nothing wakes it.
const RESYNC: Duration = Duration::from_secs(5);
/// How often the loop checks whether renewals stopped (FenceAfter's resolution).
const CUT_OFF_TICK: Duration = Duration::from_millis(250);
/// How often every unit's state is read from systemd again, signals or not.
const FULL_RESYNC: Duration = Duration::from_secs(30);

/// What the agent needs to know, from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Client addresses of the Raft members.
    pub endpoints: Vec<String>,
    /// The daemon's data directory (holds the instance id).
    pub data_dir: PathBuf,
    /// Where unit files are written.
    pub units_dir: PathBuf,
    /// The machine id file, normally `/etc/machine-id`.
    pub machine_id_path: PathBuf,
    /// The presence lease's TTL.
    pub ttl: Duration,
    /// The address to publish; detected from the route to the store if unset.
    pub public_ip: Option<String>,
    /// This machine's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Stop and unload every unit and leave the cluster on shutdown.
    pub leave_on_stop: bool,
    /// New metadata while running (the daemon's SIGHUP reload).
    pub metadata_updates: Option<watch::Receiver<BTreeMap<String, String>>>,
}

/// Why the agent could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The host's identity is unusable.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// Why joining failed, which decides how soon to try again.
#[derive(Debug)]
enum JoinError {
    /// Another install holds this machine id: retry slowly, loudly.
    Duplicate(String),
    /// The store did not answer or the write raced: retry soon.
    Store(String),
}

impl From<ClientError> for JoinError {
    fn from(e: ClientError) -> Self {
        JoinError::Store(e.to_string())
    }
}

/// Shared between the loop and the keep-alive task.
struct Health {
    /// When the lease was last renewed.
    last_ok: Mutex<Instant>,
    /// Set when the store says the lease no longer exists.
    lost: Mutex<bool>,
}

/// Runs the agent until `stop` turns true.
pub async fn run(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    let machine_id = identity::machine_id(&config.machine_id_path)?;
    let instance = identity::instance_id(&config.data_dir)?;
    let ip = config
        .public_ip
        .clone()
        .or_else(|| identity::detect_ip(&config.endpoints).map(|ip| ip.to_string()))
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let me = MachineRecord {
        id: machine_id,
        instance,
        hostname: identity::hostname(),
        ip,
        metadata: config.metadata.clone(),
    };
    tracing::info!(
        "agent: machine {} ({}), instance {}",
        me.id,
        me.ip,
        me.instance
    );

    let Some(systemd) =
        until_stopped(&mut stop, "systemd's D-Bus API", Systemd::connect_system).await
    else {
        return Ok(());
    };
    let mut changes = match systemd.watch_changes().await {
        Ok(changes) => Some(changes),
        Err(e) => {
            tracing::warn!("no systemd signals ({e}); states are read every {RESYNC:?}");
            None
        }
    };
    let timeout = (config.ttl / 3).max(Duration::from_secs(1));
    let endpoints = config.endpoints.clone();
    let Some(client) = until_stopped(&mut stop, "the cluster", || async {
        Client::connect(&endpoints)
            .await
            .map(|c| c.with_timeout(timeout))
    })
    .await
    else {
        return Ok(());
    };
    let mut agent = Agent {
        client: Arc::new(client),
        systemd,
        files: UnitFiles::new(&config.units_dir),
        config,
        me,
        lease: 0,
        bodies: HashMap::new(),
        states: BTreeMap::new(),
        reported: BTreeMap::new(),
        dirty: BTreeSet::new(),
        fenced: BTreeSet::new(),
        waiting: BTreeMap::new(),
        health: Arc::new(Health {
            last_ok: Mutex::new(Instant::now()),
            lost: Mutex::new(false),
        }),
    };

    let wake = Arc::new(Notify::new());
    let watcher = tokio::spawn(wake_on_own_changes(
        agent.config.endpoints.clone(),
        keys::machine_prefix(&agent.me.id),
        wake.clone(),
    ));
    let mut keeper = None;
    let mut last_full = Instant::now();
    let mut metadata = agent.config.metadata_updates.take();
    let mut fence_clock = tokio::time::interval(CUT_OFF_TICK);
    fence_clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The backstop pass: a deadline that survives the loop's other wake-ups
    // (a fresh sleep in the select would be restarted by every fence tick).
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut work, mut was_out_of_touch) = (true, false);
    loop {
        if agent.lease == 0 || agent.take_lost() {
            if let Some(task) = keeper.take() {
                tokio::task::JoinHandle::abort(&task);
            }
            if !agent.join(&mut stop).await {
                break;
            }
            keeper = Some(tokio::spawn(keep_alive(
                agent.client.clone(),
                agent.lease,
                agent.config.ttl,
                agent.health.clone(),
            )));
        }
        let out_of_touch = agent.fence().await;
        // Back in touch after a cut: reconcile at once.
        work |= was_out_of_touch && !out_of_touch;
        was_out_of_touch = out_of_touch;
        if last_full.elapsed() >= FULL_RESYNC {
            last_full = Instant::now();
            agent.states.clear();
        }
        // Cut off, a pass or a report would only wait for its timeout; the
        // loop then just keeps time for FenceAfter until renewals succeed.
        if work && !out_of_touch {
            resync.reset();
            match agent.pass().await {
                Ok(again) if again => wake.notify_one(),
                Ok(_) => {}
                Err(e) => tracing::debug!("agent pass: {e}"),
            }
            agent.report().await;
        }
        work = true;
        tokio::select! {
            _ = stop.changed() => break,
            _ = wake.notified() => {
                // Let a burst of proposals land: one pass, one reload for all.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(()) = next_metadata(&mut metadata) => {
                let fresh = metadata.as_ref().map(|m| m.borrow().clone()).unwrap_or_default();
                agent.update_metadata(fresh).await;
            }
            Some(unit) = next_change(&mut changes) => {
                agent.mark_dirty(unit);
                while let Some(Ok(unit)) = changes.as_mut().map(|c| c.try_recv()) {
                    agent.mark_dirty(unit);
                }
                // Coalesce a burst of signals into one report.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Only the fence clock: no pass unless something else woke us.
            _ = fence_clock.tick() => work = false,
            _ = resync.tick() => {}
        }
    }
    watcher.abort();
    if let Some(task) = keeper {
        task.abort();
    }
    if agent.config.leave_on_stop {
        agent.leave().await;
    }
    Ok(())
}

async fn next_metadata(
    updates: &mut Option<watch::Receiver<BTreeMap<String, String>>>,
) -> Result<(), watch::error::RecvError> {
    match updates {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn next_change(
    changes: &mut Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) -> Option<String> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Retries `connect` every second, logging, until it works or `stop` is set.
async fn until_stopped<T, E: std::fmt::Display, F, Fut>(
    stop: &mut watch::Receiver<bool>,
    what: &str,
    mut connect: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut logged = false;
    loop {
        match connect().await {
            Ok(value) => return Some(value),
            Err(e) if !logged => {
                tracing::warn!("agent: cannot reach {what} yet ({e}); retrying");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.changed() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Renews the lease every TTL/3; records success, and loss of the lease.
async fn keep_alive(client: Arc<Client>, lease: LeaseId, ttl: Duration, health: Arc<Health>) {
    let mut pause = ttl / 3;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(pause).await;
        // After a failure, retry soon: when the store comes back (a new
        // leader after a quorum outage), the lease's remaining time is all
        // the agent has to renew it before its units would be moved.
        pause = (ttl / 3).min(Duration::from_millis(250));
        match client.keep_alive(lease).await {
            Ok(()) => {
                *health.last_ok.lock().expect("health lock") = Instant::now();
                pause = ttl / 3;
                if failures > 0 {
                    tracing::info!("agent: presence renewed again after {failures} failed tries");
                    failures = 0;
                }
            }
            Err(ClientError::LeaseNotFound(_)) => {
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

/// Wakes the agent on every change under its own prefix.
async fn wake_on_own_changes(endpoints: Vec<String>, prefix: String, wake: Arc<Notify>) {
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

/// This machine's records under its prefix, as one read saw them.
#[derive(Debug, Default)]
struct OwnView {
    proposals: BTreeMap<UnitName, (Proposal, Revision)>,
    /// Claims on this agent's lease.
    claims: BTreeMap<UnitName, Revision>,
    generation: Option<KeyValue>,
}

struct Agent {
    config: AgentConfig,
    client: Arc<Client>,
    systemd: Systemd,
    files: UnitFiles,
    me: MachineRecord,
    lease: LeaseId,
    /// Unit file texts by hash (bodies never change under a hash).
    bodies: HashMap<UnitHash, String>,
    /// systemd's states of local units, as last read.
    states: BTreeMap<UnitName, UnitState>,
    /// What was last written to the store per unit.
    reported: BTreeMap<UnitName, ReportedState>,
    /// Units whose state must be read again.
    dirty: BTreeSet<UnitName>,
    /// Units stopped by FenceAfter while cut off.
    fenced: BTreeSet<UnitName>,
    /// Why each proposal is not claimed, to log changes only.
    waiting: BTreeMap<UnitName, String>,
    health: Arc<Health>,
}

impl Agent {
    fn take_lost(&self) -> bool {
        std::mem::take(&mut *self.health.lost.lock().expect("health lock"))
    }

    fn mark_dirty(&mut self, unit: String) {
        if let Ok(name) = UnitName::parse(&unit) {
            self.states.remove(&name);
            self.dirty.insert(name);
        }
    }

    /// Joins the cluster (step 1 of the module doc); false if told to stop.
    ///
    /// While the store is unreachable it retries soon (a daemon restarting
    /// with its host must re-take its lease within the lease's remaining
    /// time, or its units move), backing off to the slow pace a duplicate
    /// machine id retries at.
    async fn join(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let slowest = self.config.ttl.min(Duration::from_secs(5));
        let mut pause = (self.config.ttl / 3).min(Duration::from_millis(250));
        let mut last_error = String::new();
        loop {
            let wait = match self.try_join().await {
                Ok(()) => {
                    *self.health.last_ok.lock().expect("health lock") = Instant::now();
                    self.fenced.clear();
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

    async fn try_join(&mut self) -> Result<(), JoinError> {
        let key = keys::machine(&self.me.id);
        let found = self.client.get(&key).await?;
        if let Some(kv) = &found {
            let record: MachineRecord =
                records::decode(&kv.key, &kv.value).map_err(|e| JoinError::Store(e.to_string()))?;
            if record.instance != self.me.instance {
                // Whatever runs here from an earlier life is not claimed by
                // this install, and the cluster runs it elsewhere.
                self.unload_everything("staying out as a duplicate").await;
                return Err(JoinError::Duplicate(format!(
                    "another flotilla daemon (instance {}, host {}, {}) is registered with this \
                     machine id {}; this host stays out of the cluster. Was the machine cloned? \
                     Give it its own id (rm /etc/machine-id && systemd-machine-id-setup) and \
                     restart flotilla",
                    record.instance, record.hostname, record.ip, self.me.id
                )));
            }
            if let Some(lease) = kv.lease {
                match self.client.keep_alive(lease).await {
                    Ok(()) => {
                        self.lease = lease;
                        if record != self.me {
                            self.publish(&key, Some(kv))
                                .await
                                .map_err(JoinError::Store)?;
                        }
                        tracing::info!("agent: rejoined with the same lease; adopting its units");
                        return Ok(());
                    }
                    Err(ClientError::LeaseNotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // A fresh presence: nothing claimed survives from before, so nothing
        // from before may keep running here.
        self.unload_everything("joining the cluster").await;
        let lease = self.client.grant(self.config.ttl).await?;
        self.lease = lease;
        match self.publish(&key, found.as_ref()).await {
            Ok(()) => {
                tracing::info!("agent: joined the cluster (lease {lease:x})");
                Ok(())
            }
            Err(e) => {
                let _ = self.client.revoke(lease).await;
                self.lease = 0;
                Err(JoinError::Store(e))
            }
        }
    }

    /// Publishes new metadata (scheduling follows: units whose
    /// `MachineMetadata` no longer matches move away, newly matching ones come).
    async fn update_metadata(&mut self, metadata: BTreeMap<String, String>) {
        if metadata == self.me.metadata {
            return;
        }
        tracing::info!("agent: metadata is now {metadata:?}");
        self.me.metadata = metadata;
        if self.lease == 0 {
            return;
        }
        let key = keys::machine(&self.me.id);
        for _ in 0..3 {
            let read = match self.client.get(&key).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!("agent: cannot publish new metadata now: {e}");
                    return;
                }
            };
            if self.publish(&key, read.as_ref()).await.is_ok() {
                return;
            }
        }
    }

    /// Writes the presence record on the current lease, if `key` is as read.
    async fn publish(&mut self, key: &str, read: Option<&KeyValue>) -> Result<(), String> {
        let op = Op::put_on_lease(key.to_string(), records::encode(&self.me), self.lease);
        let (ok, _, _) = self
            .client
            .txn(vec![Compare::unchanged(key, read)], vec![op], Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        if ok {
            Ok(())
        } else {
            Err("the presence record changed while joining; retrying".to_string())
        }
    }

    /// Stops and unloads every unit file this agent ever wrote here.
    async fn unload_everything(&mut self, why: &str) {
        let local = self.files.list().unwrap_or_default();
        if local.is_empty() {
            return;
        }
        tracing::info!("agent: {why}: stopping {} units from before", local.len());
        let mut actions: Vec<Action> = local.keys().cloned().map(Action::Stop).collect();
        actions.extend(local.keys().cloned().map(Action::Unload));
        actions.push(Action::Reload);
        self.execute(&actions).await;
    }

    /// Reads this machine's proposals, claims and generation.
    async fn own_view(&self) -> Result<OwnView, ClientError> {
        let (kvs, _) = self
            .client
            .range(&keys::machine_prefix(&self.me.id), true, false)
            .await?;
        let mut view = OwnView::default();
        for kv in kvs {
            match keys::parse_machine_key(&kv.key) {
                Some(MachineKey::Proposal(_, unit)) => {
                    if let Ok(p) = records::decode::<Proposal>(&kv.key, &kv.value) {
                        view.proposals.insert(unit, (p, kv.mod_revision));
                    }
                }
                Some(MachineKey::Claim(_, unit)) if kv.lease == Some(self.lease) => {
                    view.claims.insert(unit, kv.mod_revision);
                }
                Some(MachineKey::Generation(_)) => view.generation = Some(kv),
                _ => {}
            }
        }
        Ok(view)
    }

    /// The text of the body with `hash`.
    async fn body(&mut self, hash: &UnitHash) -> Option<String> {
        if let Some(text) = self.bodies.get(hash) {
            return Some(text.clone());
        }
        let kv = self.client.get(&keys::body(hash)).await.ok()??;
        let text = String::from_utf8_lossy(&kv.value).into_owned();
        self.bodies.insert(*hash, text.clone());
        Some(text)
    }

    /// One reconcile pass; returns whether another should follow at once.
    async fn pass(&mut self) -> Result<bool, ClientError> {
        let mut view = self.own_view().await?;
        let local = self.files.list().unwrap_or_default();
        let again = self.claim(&mut view, &local).await?;

        let mut desired = BTreeMap::new();
        for (unit, (proposal, _)) in &view.proposals {
            if view.claims.contains_key(unit) {
                // A fenced unit stays loaded but is not started until the
                // cluster is in reach again.
                let target = match proposal.target {
                    _ if self.fenced.contains(unit) => Target::Loaded,
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
        self.read_states(local.keys()).await;
        let actual: BTreeMap<UnitName, Actual> = local
            .iter()
            .map(|(unit, found)| {
                let have = Actual {
                    hash: found.as_ref().map(|f| f.hash),
                    activity: Activity::of(self.states.get(unit)),
                };
                (unit.clone(), have)
            })
            .collect();
        let absent: Vec<&UnitName> = desired.keys().filter(|u| !local.contains_key(*u)).collect();
        self.read_states(absent.iter().copied()).await;
        let held = absent
            .into_iter()
            .filter(|u| self.states.get(*u).is_some_and(UnitState::is_held))
            .cloned()
            .collect();
        let actions = reconcile::reconcile(&desired, &actual, &held);
        if !actions.is_empty() {
            tracing::debug!("agent: {} actions", actions.len());
            self.execute(&actions).await;
        }
        self.release(&view).await?;
        Ok(again)
    }

    /// Claims what it may (one transaction); true if the claim raced.
    async fn claim(
        &mut self,
        view: &mut OwnView,
        local: &BTreeMap<UnitName, Option<LocalUnit>>,
    ) -> Result<bool, ClientError> {
        let unclaimed: Vec<(UnitName, Proposal, Revision)> = view
            .proposals
            .iter()
            .filter(|(u, _)| !view.claims.contains_key(*u))
            .map(|(u, (p, r))| (u.clone(), *p, *r))
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
                && let Some(parsed) = self.parse(unit, &proposal.hash).await
            {
                rules.insert(unit.clone(), parsed.requirements().clone());
            }
        }
        let mut candidate_rules = BTreeMap::new();
        for (unit, proposal, _) in &unclaimed {
            match self.parse(unit, &proposal.hash).await {
                Some(parsed) => {
                    candidate_rules.insert(unit.clone(), parsed.requirements().clone());
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
        let (chosen, waiting) = claims::choose(&present, &claimed, &candidates);

        let mut chosen_now = Vec::new();
        let managed: BTreeSet<String> = local.keys().map(|u| u.to_string()).collect();
        for unit in chosen {
            let rules = &candidate_rules[unit];
            let patterns: Vec<String> = rules
                .conflicts
                .iter()
                .chain(&rules.replaces)
                .map(|g| g.as_str().to_string())
                .collect();
            match self.systemd.active_units_matching(&patterns).await {
                Ok(active) => {
                    let foreign: Vec<String> = active
                        .into_iter()
                        .filter(|n| !managed.contains(n))
                        .collect();
                    if foreign.is_empty() {
                        chosen_now.push(unit.clone());
                    } else {
                        self.note_waiting(
                            unit,
                            format!(
                                "systemd here runs {} which it conflicts with",
                                foreign.join(", ")
                            ),
                        );
                    }
                }
                Err(e) => self.note_waiting(unit, format!("cannot ask systemd: {e}")),
            }
        }
        for (unit, why) in waiting {
            let why = match why {
                claims::Wait::Peer(peer) => format!("waiting for MachineOf peer {peer} here"),
                claims::Wait::Excludes(other) => format!("may not run beside {other}"),
            };
            self.note_waiting(unit, why);
        }
        if chosen_now.is_empty() {
            return Ok(false);
        }
        let generation = keys::generation(&self.me.id);
        let mut compare = vec![Compare::unchanged(&generation, view.generation.as_ref())];
        let mut ops = vec![Op::put(generation, Vec::new())];
        let claim = records::encode(&Claim {
            instance: self.me.instance.clone(),
        });
        for unit in &chosen_now {
            let (_, revision) = view.proposals[unit];
            compare.push(Compare::revision_is(
                &keys::proposal(&self.me.id, unit),
                revision,
            ));
            compare.push(Compare::unchanged(&keys::claim(&self.me.id, unit), None));
            for peer in &candidate_rules[unit].machine_of {
                compare.push(Compare::exists(&keys::claim(&self.me.id, peer)));
            }
            ops.push(Op::put_on_lease(
                keys::claim(&self.me.id, unit),
                claim.clone(),
                self.lease,
            ));
        }
        let (ok, _, revision) = self.client.txn(compare, ops, Vec::new()).await?;
        if !ok {
            return Ok(true);
        }
        for unit in chosen_now {
            self.waiting.remove(&unit);
            view.claims.insert(unit, revision);
        }
        Ok(false)
    }

    fn note_waiting(&mut self, unit: &UnitName, why: String) {
        if self.waiting.get(unit) != Some(&why) {
            tracing::info!("agent: not claiming {unit} yet: {why}");
            self.waiting.insert(unit.clone(), why);
        }
    }

    async fn parse(&mut self, unit: &UnitName, hash: &UnitHash) -> Option<Unit> {
        let text = self.body(hash).await?;
        Unit::from_text(unit, &text).ok()
    }

    /// Drops claims whose proposal is gone, once the unit is unloaded here.
    async fn release(&mut self, view: &OwnView) -> Result<(), ClientError> {
        let local = self.files.list().unwrap_or_default();
        let mut compare = Vec::new();
        let mut ops = Vec::new();
        for (unit, revision) in &view.claims {
            if view.proposals.contains_key(unit) || local.contains_key(unit) {
                continue;
            }
            compare.push(Compare::revision_is(
                &keys::claim(&self.me.id, unit),
                *revision,
            ));
            ops.push(Op::delete(keys::claim(&self.me.id, unit)));
            ops.push(Op::delete(keys::state(unit, &self.me.id)));
            self.reported.remove(unit);
        }
        if !ops.is_empty() {
            self.client.txn(compare, ops, Vec::new()).await?;
        }
        Ok(())
    }

    /// Reads from systemd, in one call, the states of `units` not cached.
    async fn read_states<'u>(&mut self, units: impl Iterator<Item = &'u UnitName>) {
        let missing: Vec<&str> = units
            .filter(|u| !self.states.contains_key(*u))
            .map(UnitName::as_str)
            .collect();
        match self.systemd.states(&missing).await {
            Ok(states) => {
                for (name, state) in states {
                    if let Ok(name) = UnitName::parse(&name) {
                        self.states.insert(name, state);
                    }
                }
            }
            Err(e) => tracing::debug!("agent: {e}"),
        }
    }

    /// Asks systemd for each action in order; failures are logged and the
    /// next pass tries again. Runs of loads and of unloads go to systemd as
    /// one link or disable call each.
    async fn execute(&mut self, actions: &[Action]) {
        let mut i = 0;
        while i < actions.len() {
            let run = actions[i..]
                .iter()
                .take_while(|a| std::mem::discriminant(*a) == std::mem::discriminant(&actions[i]))
                .count();
            let batch = &actions[i..i + run];
            i += run;
            let result = match &batch[0] {
                Action::Load(..) => self.load_all(batch).await,
                Action::Unload(_) => self.unload_all(batch).await,
                Action::Reload => self.systemd.reload().await,
                Action::Stop(_) | Action::Start(_) => {
                    self.jobs(batch).await;
                    Ok(())
                }
            };
            for action in batch {
                if let Action::Stop(unit)
                | Action::Unload(unit)
                | Action::Start(unit)
                | Action::Load(unit, _) = action
                {
                    self.states.remove(unit);
                    self.dirty.insert(unit.clone());
                }
            }
            if let Err(e) = result {
                tracing::warn!("agent: {e}");
            }
        }
    }

    /// Queues the start or stop jobs of a run of units, all calls in flight at
    /// once so systemd never waits on a round trip between them.
    async fn jobs(&self, batch: &[Action]) {
        let mut calls = tokio::task::JoinSet::new();
        for action in batch {
            let systemd = self.systemd.clone();
            let action = action.clone();
            calls.spawn(async move {
                match &action {
                    Action::Stop(unit) => systemd.stop(unit.as_str()).await.map(drop),
                    Action::Start(unit) => systemd.start(unit.as_str()).await.map(drop),
                    _ => Ok(()),
                }
            });
        }
        while let Some(done) = calls.join_next().await {
            match done {
                Ok(Err(e)) => tracing::warn!("agent: {e}"),
                Err(e) => tracing::warn!("agent: a systemd call failed to run: {e}"),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Unloads a run of units: one disable call, then reset-failed and the files.
    async fn unload_all(&mut self, batch: &[Action]) -> super::systemd::Result<()> {
        let units: Vec<&UnitName> = batch
            .iter()
            .filter_map(|a| match a {
                Action::Unload(unit) => Some(unit),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = units.iter().map(|u| u.as_str()).collect();
        self.systemd.disable_runtime_all(&names).await?;
        for unit in units {
            self.systemd.reset_failed(unit.as_str()).await?;
            if let Err(e) = self.files.remove(unit) {
                tracing::warn!("agent: cannot remove the file of {unit}: {e}");
            }
        }
        Ok(())
    }

    /// Loads a run of units: writes every file, links them in one call, then
    /// enables those with an `[Install]` section.
    async fn load_all(&mut self, batch: &[Action]) -> super::systemd::Result<()> {
        let mut paths = Vec::new();
        let mut installs = Vec::new();
        for action in batch {
            let Action::Load(unit, hash) = action else {
                continue;
            };
            let Some(text) = self.body(hash).await else {
                tracing::warn!("agent: the body of {unit} is not in the store; not loading it");
                continue;
            };
            match self.files.write(unit, &text) {
                Ok(path) => {
                    let has_install = Unit::from_text(unit, &text)
                        .is_ok_and(|u| u.file().section("Install").next().is_some());
                    if has_install {
                        installs.push(path.clone());
                    }
                    paths.push(path);
                }
                Err(e) => tracing::warn!("agent: cannot write the file of {unit}: {e}"),
            }
        }
        self.systemd.link_runtime_all(&paths).await?;
        for path in installs {
            self.systemd.enable_runtime(&path).await?;
        }
        Ok(())
    }

    /// Writes the states of changed units into the store, on the lease.
    async fn report(&mut self) {
        if self.lease == 0 {
            return;
        }
        let local = self.files.list().unwrap_or_default();
        let mut ops = Vec::new();
        let units: Vec<UnitName> = local.keys().cloned().collect();
        self.read_states(units.iter()).await;
        for unit in units {
            let Some(Some(found)) = local.get(&unit) else {
                continue;
            };
            let Some(state) = self.states.get(&unit) else {
                continue;
            };
            let record = ReportedState {
                hash: found.hash,
                state: state.clone(),
            };
            if self.reported.get(&unit) != Some(&record) {
                ops.push(Op::put_on_lease(
                    keys::state(&unit, &self.me.id),
                    records::encode(&record),
                    self.lease,
                ));
                self.reported.insert(unit.clone(), record);
            }
        }
        let gone: Vec<UnitName> = self
            .reported
            .keys()
            .filter(|u| !local.contains_key(*u))
            .cloned()
            .collect();
        for unit in gone {
            ops.push(Op::delete(keys::state(&unit, &self.me.id)));
            self.reported.remove(&unit);
        }
        self.dirty.clear();
        if !ops.is_empty()
            && let Err(e) = self.client.txn(Vec::new(), ops, Vec::new()).await
        {
            tracing::debug!("agent: cannot report states: {e}");
            self.reported.clear();
        }
    }

    /// Stops units with `FenceAfter=` once the store has been unreachable that
    /// long (counted from the last renewal, never below the normal gap).
    /// Returns whether renewals have been failing for longer than normal.
    async fn fence(&mut self) -> bool {
        let cut_off = self.health.last_ok.lock().expect("health lock").elapsed();
        // Renewals come every TTL/3: silence up to then (plus a second for
        // the call itself) is normal, and clears any fence.
        let normal = self.config.ttl / 3 + Duration::from_secs(1);
        if cut_off < normal {
            if !self.fenced.is_empty() {
                tracing::info!("agent: in touch with the cluster again; fenced units may run");
                self.fenced.clear();
            }
            return false;
        }
        let local = self.files.list().unwrap_or_default();
        for (unit, found) in &local {
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
                if let Err(e) = self.systemd.stop(unit.as_str()).await {
                    tracing::warn!("agent: {e}");
                }
                self.states.remove(unit);
            }
        }
        true
    }

    /// `--leave-on-stop`: unload everything, drop claims and presence.
    async fn leave(&mut self) {
        self.unload_everything("leaving the cluster").await;
        if self.lease != 0 && self.client.revoke(self.lease).await.is_ok() {
            tracing::info!("agent: left the cluster");
        }
    }
}
