//! The agent's loop: what wakes it, and what it does each time.
//!
//! 1. Join ([`super::presence`]) when it never did or its lease expired.
//! 2. Fence ([`super::presence`]): while renewals fail, stop units with
//!    `FenceAfter=` once their time is up; a cut-off agent does nothing else
//!    (a pass or a report would only wait for its timeout).
//! 3. On every change under its own prefix, every systemd signal, new
//!    metadata, and as a backstop: one pass ([`super::pass`]: claim, bring
//!    systemd to the claims, release), then a report of systemd's states
//!    ([`super::report`]).
//!
//! The watch of its own prefix is how the agent learns of a proposal or of
//! one withdrawn: it resumes after the last revision it delivered when its
//! member goes, and wakes the agent on every (re)subscription, so nothing
//! is missed while it was down. The backstop pass is for what no watch or
//! signal reports: a pass or a report that failed, a systemd call that
//! failed, a proposal waiting on a condition (a foreign unit, a peer, a
//! body), a refused unit. After a pass whose systemd calls failed it comes
//! after [`RETRY`], doubled for each pass in a row that fails, up to
//! [`RESYNC`]; while anything else is left ("unsettled"), every [`RESYNC`]; once a pass leaves the host settled, only with the full
//! resync of systemd's states, every 22.5–30 s ([`FULL_RESYNC`] less a share
//! fixed by the machine id, so a fleet's agents do not pass in step:
//! [`Backstop::for_machine`]). Every pass reads the
//! prefix linearizably, and each of those reads is a ReadIndex round on the
//! leader: at 1,000 idle hosts the 5 s backstop alone was ~200 of them a
//! second (BENCHMARKS.md, issue 14).
//!
//! The store is reached only through the registry ([`MachineStore`]), systemd
//! only through [`Host`], over a [`Backend`] (D-Bus in production).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{Notify, watch};

use super::backend::Backend;
use super::execute::Host;
use super::identity;
use super::presence::Presence;
use super::report::Reports;
use super::systemd::Systemd;
use crate::consensus::client::Client;
use crate::registry::BodyCache;
use crate::registry::machine::{self, MachineStore};
use crate::registry::records::{MachineRecord, Target, renew_interval};
use crate::units::UnitName;

/// How soon the agent reconciles again, when nothing wakes it, after a pass
/// that left something unsettled (see the module doc).
const RESYNC: Duration = Duration::from_secs(5);
/// How often the loop checks whether renewals stopped (FenceAfter's resolution).
const CUT_OFF_TICK: Duration = Duration::from_millis(250);
/// How often, at most, every unit's state is read from systemd again,
/// signals or not, in a pass of its own: also the backstop of a settled
/// host. Each machine uses its own period, up to a quarter shorter
/// ([`Backstop::for_machine`]).
const FULL_RESYNC: Duration = Duration::from_secs(30);
/// How soon a pass follows one whose systemd calls failed (a start refused):
/// doubled for each further pass that fails, up to [`RESYNC`]. A refused
/// start waited the whole [`RESYNC`] before, which at 1,000 hosts was the
/// failover's 99th percentile (BENCHMARKS.md, issue 14).
const RETRY: Duration = Duration::from_millis(250);
/// How long a wake-up waits for the rest of its burst (proposals landing,
/// systemd signals), so one pass and one report serve them all.
const COALESCE: Duration = Duration::from_millis(20);

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
    /// Unit bodies by hash, shared with the daemon's other roles.
    pub bodies: Arc<BodyCache>,
    /// The HTTPS API's `api_listen`, when the daemon serves one (TLS on):
    /// published with the presence ([`identity::api_address`]).
    pub api_listen: Option<String>,
}

/// Why the agent could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The host's identity is unusable.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// Why each proposal is not claimed yet ([`Agent::pass`] notes it), kept to
/// log only changes.
#[derive(Debug, Default)]
pub(super) struct Waiting(BTreeMap<UnitName, String>);

impl Waiting {
    /// Logs why `unit` is not claimed, if that changed.
    pub(super) fn note(&mut self, unit: &UnitName, why: String) {
        if self.0.get(unit) != Some(&why) {
            tracing::info!("agent: not claiming {unit} yet: {why}");
            self.0.insert(unit.clone(), why);
        }
    }

    /// `unit` was claimed: it waits no more.
    pub(super) fn claimed(&mut self, unit: &UnitName) {
        self.0.remove(unit);
    }

    /// Nothing waits to be claimed.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// Everything the loop drives: the store, this host, its presence, what it
/// reported, and why proposals wait.
pub(super) struct Agent {
    pub(super) store: MachineStore,
    pub(super) host: Host,
    pub(super) presence: Presence,
    pub(super) reports: Reports,
    pub(super) waiting: Waiting,
    /// The target the agent last brought each claimed unit to.
    pub(super) applied: BTreeMap<UnitName, Target>,
}

/// Runs the agent until `stop` turns true, driving this host's systemd over
/// D-Bus.
pub async fn run(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    let me = identify(&config)?;
    let Some(systemd) =
        until_stopped(&mut stop, "systemd's D-Bus API", Systemd::connect_system).await
    else {
        return Ok(());
    };
    drive(config, me, Arc::new(systemd), stop).await;
    Ok(())
}

/// Runs the same agent as [`run`] over another service manager: the seam the
/// scale simulator (`flotilla-bench sim`) and its smoke test use to run many
/// agents in one process, each against a modelled systemd.
pub async fn run_on(
    config: AgentConfig,
    systemd: Arc<dyn Backend>,
    stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let me = identify(&config)?;
    drive(config, me, systemd, stop).await;
    Ok(())
}

/// The agent of the module doc, as `me`, over `systemd`, until `stop` turns
/// true.
async fn drive(
    mut config: AgentConfig,
    me: MachineRecord,
    systemd: Arc<dyn Backend>,
    mut stop: watch::Receiver<bool>,
) {
    let changes = match systemd.watch_changes().await {
        Ok(changes) => Some(changes),
        Err(e) => {
            tracing::warn!("no systemd signals ({e}); states are read every {RESYNC:?}");
            None
        }
    };
    let backstop = Backstop::for_machine(&me.id, changes.is_some());
    let timeout = renew_interval(config.ttl).max(Duration::from_secs(1));
    let endpoints = config.endpoints.clone();
    let Some(client) = until_stopped(&mut stop, "the cluster", || async {
        Client::connect(&endpoints)
            .await
            .map(|c| c.with_timeout(timeout))
    })
    .await
    else {
        return;
    };
    let proposals = Arc::new(Notify::new());
    let watcher = tokio::spawn(machine::wake_on_own_changes(
        config.endpoints.clone(),
        me.id.clone(),
        proposals.clone(),
    ));
    let mut wakeups = Wakeups::new(proposals, config.metadata_updates.take(), changes, backstop);
    let mut agent = Agent {
        store: MachineStore::new(
            client,
            &me.id,
            &me.instance,
            config.ttl,
            config.bodies.clone(),
        ),
        host: Host::new(systemd, &config.units_dir),
        presence: Presence::new(me, config.ttl),
        reports: Reports::default(),
        waiting: Waiting::default(),
        applied: BTreeMap::new(),
    };
    agent.run_until_stopped(&mut wakeups, &mut stop).await;
    watcher.abort();
    agent.presence.stop_keeping();
    if config.leave_on_stop {
        agent
            .presence
            .leave(&mut agent.store, &mut agent.host)
            .await;
    }
}

/// This machine's presence record, from its identity and the configuration.
fn identify(config: &AgentConfig) -> Result<MachineRecord, AgentError> {
    let id = identity::machine_id(&config.machine_id_path)?;
    let instance = identity::instance_id(&config.data_dir)?;
    let ip = config
        .public_ip
        .clone()
        .or_else(|| identity::detect_ip(&config.endpoints).map(|ip| ip.to_string()))
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let api = config
        .api_listen
        .as_deref()
        .and_then(|listen| identity::api_address(listen, &ip));
    let me = MachineRecord {
        id,
        instance,
        hostname: identity::hostname(),
        ip,
        metadata: config.metadata.clone(),
        api,
    };
    tracing::info!(
        "agent: machine {} ({}), instance {}",
        me.id,
        me.ip,
        me.instance
    );
    Ok(me)
}

impl Agent {
    /// The loop of the module doc, until `stop` turns true.
    async fn run_until_stopped(&mut self, wakeups: &mut Wakeups, stop: &mut watch::Receiver<bool>) {
        let mut last_full = Instant::now();
        let (mut work, mut was_out_of_touch) = (true, false);
        loop {
            if self.presence.must_join(&self.store) {
                if !self
                    .presence
                    .join(&mut self.store, &mut self.host, stop)
                    .await
                {
                    return;
                }
                self.joined().await;
            }
            let out_of_touch = self.presence.fence(&mut self.host).await;
            // Back in touch after a cut: reconcile at once.
            work |= was_out_of_touch && !out_of_touch;
            was_out_of_touch = out_of_touch;
            if last_full.elapsed() >= wakeups.backstop.settled {
                last_full = Instant::now();
                self.host.forget_states();
                work = true;
            }
            if work && !out_of_touch {
                let (settled, failed) = match self.pass().await {
                    Ok(passed) => {
                        if passed.again {
                            wakeups.again();
                        }
                        (passed.settled, passed.failed)
                    }
                    Err(e) => {
                        tracing::debug!("agent pass: {e}");
                        (false, false)
                    }
                };
                let reported = self
                    .reports
                    .report(&self.store, &mut self.host, &self.applied)
                    .await;
                let _ = wakeups.passed(settled && reported, failed);
            }
            work = match wakeups.next(stop).await {
                Wakeup::Stop => return,
                Wakeup::Work => true,
                Wakeup::Metadata(fresh) => {
                    self.presence.update_metadata(&self.store, fresh).await;
                    true
                }
                Wakeup::Changed(units) => {
                    for unit in units {
                        self.host.changed(&unit);
                    }
                    true
                }
                // Only the fence clock: no pass unless something else woke us.
                Wakeup::FenceTick => false,
            };
        }
    }
}

impl Agent {
    /// After a join: reports go again (a fresh lease holds none), and what
    /// an earlier run of this daemon applied is read back from its reports
    /// (a daemon restart adopting its lease), so a unit it had launched and
    /// that is wanted loaded now is still stopped.
    async fn joined(&mut self) {
        self.reports = Reports::default();
        match self.store.reported_targets().await {
            Ok(targets) => {
                for (unit, target) in targets {
                    self.applied.entry(unit).or_insert(target);
                }
            }
            Err(e) => tracing::debug!("agent: cannot read its reports back: {e}"),
        }
    }
}

/// What woke the loop.
enum Wakeup {
    /// The daemon stops.
    Stop,
    /// Proposals or claims changed, or the backstop passed: run a pass.
    Work,
    /// New metadata to publish.
    Metadata(BTreeMap<String, String>),
    /// systemd says these units changed.
    Changed(Vec<String>),
    /// Time to check the fences, nothing else.
    FenceTick,
}

/// When the backstop pass comes (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Backstop {
    /// systemd's signals reach the agent: without them a unit's state is
    /// learnt only by reading it, so passes stay every [`RESYNC`].
    signals: bool,
    /// This machine's full resync period, and the backstop of a settled
    /// host: [`FULL_RESYNC`] less up to a quarter of it.
    settled: Duration,
}

impl Backstop {
    /// The backstop of machine `id`. A fleet's agents pass together after
    /// anything that wakes them all (a bulk start, a leader change): with
    /// one period for all, 1,000 settled agents then read their prefixes
    /// (a ReadIndex round on the leader each) in the same instant every
    /// 30 s. Each machine's period is fixed by its id, alike on every start,
    /// spread over the last quarter below [`FULL_RESYNC`], so their passes
    /// spread over 7.5 s at once and drift further apart after.
    fn for_machine(id: &str, signals: bool) -> Backstop {
        const STEPS: u64 = 1024;
        let step = crate::consensus::node::stable_hash(id) % STEPS;
        let spread = (FULL_RESYNC / 4).mul_f64(step as f64 / STEPS as f64);
        Backstop {
            signals,
            settled: FULL_RESYNC - spread,
        }
    }

    /// How long after a pass the next one comes if nothing wakes the agent;
    /// `settled`: that pass left nothing for a later one to notice.
    fn after(self, settled: bool) -> Duration {
        if settled && self.signals {
            self.settled
        } else {
            RESYNC
        }
    }
}

/// How soon a pass follows the `failures`-th pass in a row whose systemd
/// calls failed (`failures` ≥ 1): [`RETRY`], doubled each time, at most
/// [`RESYNC`].
fn retry_after(failures: u32) -> Duration {
    RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESYNC)
}

/// Everything that wakes the loop, in one place.
struct Wakeups {
    /// Changes under this machine's prefix (and a raced claim).
    proposals: Arc<Notify>,
    metadata: Option<watch::Receiver<BTreeMap<String, String>>>,
    changes: Option<UnboundedReceiver<String>>,
    fence_clock: tokio::time::Interval,
    backstop: Backstop,
    /// The backstop pass: a deadline that survives the loop's other wake-ups
    /// (a fresh sleep in the select would be restarted by every fence tick).
    resync: Pin<Box<tokio::time::Sleep>>,
    /// Passes in a row whose systemd calls failed ([`retry_after`]).
    failures: u32,
}

impl Wakeups {
    fn new(
        proposals: Arc<Notify>,
        metadata: Option<watch::Receiver<BTreeMap<String, String>>>,
        changes: Option<UnboundedReceiver<String>>,
        backstop: Backstop,
    ) -> Wakeups {
        let mut fence_clock = tokio::time::interval(CUT_OFF_TICK);
        fence_clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let resync = Box::pin(tokio::time::sleep(RESYNC));
        Wakeups {
            proposals,
            metadata,
            changes,
            fence_clock,
            backstop,
            resync,
            failures: 0,
        }
    }

    /// A pass (and its report) just ran: the backstop counts from here, and
    /// waits longer if it left the host `settled`; after a pass whose
    /// systemd calls `failed`, the next comes soon ([`retry_after`]).
    /// Returns how long after now the next pass comes, unless woken sooner.
    fn passed(&mut self, settled: bool, failed: bool) -> Duration {
        let after = if failed {
            self.failures = self.failures.saturating_add(1);
            retry_after(self.failures)
        } else {
            self.failures = 0;
            self.backstop.after(settled)
        };
        self.resync
            .as_mut()
            .reset(tokio::time::Instant::now() + after);
        after
    }

    /// Another pass should follow at once.
    fn again(&self) {
        self.proposals.notify_one();
    }

    /// Waits for the next reason to wake.
    async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> Wakeup {
        tokio::select! {
            _ = stop.changed() => Wakeup::Stop,
            _ = self.proposals.notified() => {
                // Let a burst of proposals land: one pass, one reload for all.
                tokio::time::sleep(COALESCE).await;
                Wakeup::Work
            }
            Ok(()) = next_metadata(&mut self.metadata) => {
                let fresh = self.metadata.as_ref().map(|m| m.borrow().clone()).unwrap_or_default();
                Wakeup::Metadata(fresh)
            }
            Some(unit) = next_change(&mut self.changes) => {
                let mut units = vec![unit];
                while let Some(Ok(unit)) = self.changes.as_mut().map(|c| c.try_recv()) {
                    units.push(unit);
                }
                // Coalesce a burst of signals into one report.
                tokio::time::sleep(COALESCE).await;
                Wakeup::Changed(units)
            }
            _ = self.fence_clock.tick() => Wakeup::FenceTick,
            () = self.resync.as_mut() => {
                // Due again in RESYNC unless a pass sets it first (none runs
                // while the agent is cut off: the sleep must not fire at once
                // for ever then).
                self.resync.as_mut().reset(tokio::time::Instant::now() + RESYNC);
                Wakeup::Work
            }
        }
    }
}

async fn next_metadata(
    updates: &mut Option<watch::Receiver<BTreeMap<String, String>>>,
) -> Result<(), watch::error::RecvError> {
    match updates {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn next_change(changes: &mut Option<UnboundedReceiver<String>>) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_host_with_signals_waits_for_its_full_resync() {
        let backstop = Backstop::for_machine("abc", true);
        assert_eq!(backstop.after(true), backstop.settled);
        assert!(backstop.settled <= FULL_RESYNC);
        assert!(backstop.settled >= FULL_RESYNC * 3 / 4);
        assert_eq!(backstop.after(false), RESYNC);
    }

    /// A pass whose systemd calls failed is followed after 250 ms, then
    /// 500 ms, 1 s, ... for each further one that fails, never later than
    /// the unsettled backstop.
    #[test]
    fn failed_calls_are_retried_soon_then_less_often() {
        assert_eq!(retry_after(1), RETRY);
        assert_eq!(retry_after(2), RETRY * 2);
        assert_eq!(retry_after(3), RETRY * 4);
        assert!(retry_after(1) < RESYNC);
        assert_eq!(retry_after(6), RESYNC);
        assert_eq!(retry_after(u32::MAX), RESYNC);
        for failures in 1..40 {
            assert!(retry_after(failures) <= retry_after(failures + 1));
        }
    }

    #[tokio::test]
    async fn a_failed_pass_brings_the_next_one_forward_and_a_clean_one_resets_it() {
        let mut wakeups = Wakeups::new(
            Arc::new(Notify::new()),
            None,
            None,
            Backstop::for_machine("abc", true),
        );
        assert_eq!(wakeups.passed(false, true), RETRY);
        assert_eq!(wakeups.passed(false, true), RETRY * 2);
        assert_eq!(wakeups.passed(true, false), wakeups.backstop.settled);
        assert_eq!(wakeups.passed(false, true), RETRY);
        assert_eq!(wakeups.passed(false, false), RESYNC);
    }

    #[test]
    fn without_signals_the_backstop_stays_short() {
        let backstop = Backstop::for_machine("abc", false);
        assert_eq!(backstop.after(true), RESYNC);
        assert_eq!(backstop.after(false), RESYNC);
    }

    /// 1,000 machines with ids as alike as the simulator's (they differ in
    /// their last hex digits) settle on periods spread over the whole
    /// quarter below the full resync: no second of it holds more than a
    /// fifth of them, and each machine keeps its period.
    #[test]
    fn settled_backstops_are_spread_over_the_machines() {
        let ids: Vec<String> = (0..1000u64)
            .map(|i| format!("{:032x}", 0x5157_0000_0000u64 + i))
            .collect();
        let mut per_second = BTreeMap::new();
        for id in &ids {
            let settled = Backstop::for_machine(id, true).settled;
            assert_eq!(settled, Backstop::for_machine(id, true).settled);
            assert!(settled <= FULL_RESYNC && settled > FULL_RESYNC * 3 / 4);
            *per_second.entry(settled.as_secs()).or_insert(0) += 1;
        }
        // 22.5 s to 30 s: seconds 22 (half of it) to 29, and 30 for a step of 0.
        assert!(per_second.len() >= 8, "{per_second:?}");
        assert!(per_second.values().all(|n| *n <= 200), "{per_second:?}");
    }
}
