//! This host's reboot coordinator, inside `flotilla daemon`.
//!
//! Once a second (every two while there is nothing to do) it gathers the
//! facts — is a reboot wanted (`/run/reboot-required`, or a mark left by
//! `flotilla lock need-reboot`), the window, its slot in its group's reboot
//! lock, its drain mark and units, its health — asks [`super::step::next`]
//! what to do, and does that one thing. All state that must survive the
//! reboot is in the store: the slot records the boot it was taken in and the
//! reboot mark the boot the reboot was asked in, so after the reboot the new
//! boot's coordinator knows the reboot happened and finishes it. Timers
//! (drain started, reboot asked, postponed until) are in memory: a daemon
//! restart only starts them over.
//!
//! The drain is `flotilla drain`'s: the drain mark, not tied to any lease
//! (a host that goes down drained stays unschedulable until it says
//! otherwise). The scheduler keeps each unit of a draining host where it is
//! until a replacement is active on another host, and only then withdraws it
//! here (make-before-break); units pinned here or global stay and stop with
//! the host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::reboot;
use super::settings::RebootSettings;
use super::step::{self, Facts, Hold, Need, Stays, Step, Strategy};
use crate::agent::systemd::Systemd;
use crate::consensus::client::Client;
use crate::duration::show_duration;
use crate::registry::BodyCache;
use crate::registry::lock::{self as store, HostView, LockOpError, RebootMark};
use crate::registry::ops;
use crate::registry::semaphore::LockError;
use crate::units::UnitName;

/// The Debian/Ubuntu convention: package updates that need a reboot leave
/// this file (on a tmpfs, so the reboot itself removes it).
pub const REBOOT_REQUIRED: &str = "/run/reboot-required";

/// How often the coordinator looks while a reboot is in progress.
const BUSY: Duration = Duration::from_secs(1);
/// How often it looks while nothing is wanted.
const IDLE: Duration = Duration::from_secs(2);

/// What the coordinator needs, from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Client addresses of the Raft members.
    pub endpoints: Vec<String>,
    /// The `reboot_*` settings.
    pub settings: RebootSettings,
    /// The machine id file, normally `/etc/machine-id`.
    pub machine_id_path: PathBuf,
    /// The file whose presence says a reboot is needed ([`REBOOT_REQUIRED`]).
    pub reboot_required: PathBuf,
    /// Unit bodies by hash, for the rules of the units on this host; shared
    /// with the daemon's other roles.
    pub bodies: Arc<BodyCache>,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The machine id is unusable.
    #[error(transparent)]
    Identity(#[from] crate::agent::identity::IdentityError),
    /// The boot id is unusable.
    #[error(transparent)]
    Reboot(#[from] reboot::RebootError),
}

/// In-memory timers of one coordinator.
#[derive(Debug, Default)]
struct Timers {
    drain_started: Option<Instant>,
    asked_reboot: Option<Instant>,
    postponed_until: Option<Instant>,
}

/// Runs the coordinator until `stop` turns true.
pub async fn run(
    config: CoordinatorConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let me = crate::agent::identity::machine_id(&config.machine_id_path)?;
    let boot_id = reboot::boot_id(&config.settings.boot_id_file)?;
    tracing::info!(
        "reboot coordinator: machine {me}, boot {boot_id}, strategy {:?}, group {}{}",
        config.settings.strategy,
        config.settings.group,
        config
            .settings
            .window
            .map(|w| format!(", window {w}"))
            .unwrap_or_default()
    );
    let mut coordinator = Coordinator {
        config,
        me,
        boot_id,
        client: None,
        systemd: None,
        timers: Timers::default(),
        said: String::new(),
    };
    loop {
        let pause = match coordinator.tick().await {
            Ok(true) => BUSY,
            Ok(false) => IDLE,
            Err(e) => {
                coordinator.say(format!("cannot reach the cluster: {e}"), false);
                coordinator.client = None;
                BUSY
            }
        };
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

struct Coordinator {
    config: CoordinatorConfig,
    me: String,
    boot_id: String,
    client: Option<Arc<Client>>,
    systemd: Option<Systemd>,
    timers: Timers,
    /// The last thing logged, to log changes only.
    said: String,
}

impl Coordinator {
    /// Logs `what` if it differs from the last message (warnings loudly).
    fn say(&mut self, what: String, warn: bool) {
        if what != self.said {
            if warn {
                tracing::warn!("reboot coordinator: {what}");
            } else {
                tracing::info!("reboot coordinator: {what}");
            }
            self.said = what;
        }
    }

    /// The connection to the cluster, made again after a failure.
    async fn client(&mut self) -> Result<Arc<Client>, LockOpError> {
        if self.client.is_none() {
            self.client = Some(Arc::new(Client::connect(&self.config.endpoints).await?));
        }
        Ok(self.client.clone().expect("connected above"))
    }

    /// One look and at most one step; returns whether a reboot is in progress.
    async fn tick(&mut self) -> Result<bool, LockOpError> {
        let settings = self.config.settings.clone();
        let client = self.client().await?;
        let mark = store::reboot_mark(&client, &self.me).await?;
        let file = self.config.reboot_required.exists();
        let need = match (&mark, file) {
            (Some((mark, _)), _) => Some(Need {
                force: mark.force,
                asked_in: mark.from_boot.clone(),
            }),
            (None, true) => Some(Need {
                force: false,
                asked_in: None,
            }),
            (None, false) => None,
        };
        let hold = if settings.strategy == Strategy::Lock {
            let read = store::read(&client, &settings.group).await?;
            match read.semaphore.holder(&self.me).map(|h| h.boot_id.clone()) {
                None => Hold::None,
                Some(None) => Hold::ByHand,
                Some(Some(b)) if b == self.boot_id => Hold::ThisBoot,
                Some(Some(_)) => Hold::EarlierBoot,
            }
        } else {
            Hold::None
        };
        if need.is_none() && matches!(hold, Hold::None | Hold::ByHand) {
            self.timers = Timers::default();
            return Ok(false);
        }
        let view = store::host_view(&client, &self.config.bodies, &self.me).await?;
        let (moving, staying) = step::drain_progress(&view);
        let now = Instant::now();
        if view.drained && self.timers.drain_started.is_none() {
            self.timers.drain_started = Some(now);
        }
        let after_boot = hold == Hold::EarlierBoot
            || need
                .as_ref()
                .and_then(|n| n.asked_in.as_deref())
                .is_some_and(|b| b != self.boot_id);
        let health = if after_boot {
            self.health(&view).await
        } else {
            Err("not checked before the reboot".to_string())
        };
        let facts = Facts {
            strategy: settings.strategy,
            boot_id: self.boot_id.clone(),
            need: need.clone(),
            window: settings.window.map(|w| w.state(unix_now())),
            hold: hold.clone(),
            drained: view.drained,
            draining_for: self.timers.drain_started.map(|t| now - t),
            drain_timeout: settings.drain_timeout,
            moving,
            health,
            postponed_for: self
                .timers
                .postponed_until
                .filter(|t| *t > now)
                .map(|t| t - now),
            asked_reboot: self.timers.asked_reboot.map(|t| now - t),
            reboot_timeout: settings.reboot_timeout,
        };
        let next = step::next(&facts);
        tracing::debug!("reboot coordinator: {next:?}");
        self.act(next, &view, &staying, mark.as_ref(), hold).await?;
        Ok(true)
    }

    /// Carries out one step.
    async fn act(
        &mut self,
        next: Step,
        view: &HostView,
        staying: &[(UnitName, Stays)],
        mark: Option<&(RebootMark, u64)>,
        hold: Hold,
    ) -> Result<(), LockOpError> {
        let settings = self.config.settings.clone();
        let (me, group) = (self.me.clone(), settings.group.clone());
        match next {
            Step::Idle => {}
            Step::WaitWindow(opens_in) => self.say(
                format!(
                    "a reboot is wanted; waiting for the reboot window ({}), which opens in {}",
                    settings.window.map(|w| w.to_string()).unwrap_or_default(),
                    show_duration(opens_in)
                ),
                false,
            ),
            Step::Postponed(left) => self.say(
                format!(
                    "a reboot is wanted; postponed, trying again in {}",
                    show_duration(left)
                ),
                false,
            ),
            Step::Acquire => {
                let boot_id = self.boot_id.clone();
                let client = self.client().await?;
                match store::acquire(&client, &group, &me, unix_now(), Some(&boot_id)).await {
                    Ok(_) => self.say(format!("took the reboot lock of group {group}"), false),
                    Err(LockOpError::Lock(e @ LockError::Full { .. })) => {
                        self.say(format!("a reboot is wanted; waiting: {e}"), false)
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::Drain => {
                ops::set_drained(&*self.client().await?, &me, true).await?;
                self.timers.drain_started = Some(Instant::now());
                self.say(
                    format!(
                        "draining before the reboot: {} unit(s) start elsewhere before they \
                         stop here (up to drain_timeout {})",
                        view.units.len() - staying.len(),
                        show_duration(settings.drain_timeout)
                    ),
                    false,
                );
            }
            Step::WaitDrain(moving) => self.say(
                format!("draining: waiting for {} to move", names(&moving)),
                false,
            ),
            Step::Postpone(stuck) => {
                let why = self.explain(view, &stuck).await?;
                let client = self.client().await?;
                ops::set_drained(&client, &me, false).await?;
                if hold == Hold::ThisBoot {
                    store::release(&client, &group, &me).await?;
                }
                self.timers.drain_started = None;
                self.timers.postponed_until = Some(Instant::now() + settings.drain_timeout);
                self.say(
                    format!(
                        "reboot postponed: the drain did not finish within drain_timeout {}: {why}; \
                         this host takes units again and tries again in {} (`flotilla lock \
                         need-reboot --force` reboots anyway)",
                        show_duration(settings.drain_timeout),
                        show_duration(settings.drain_timeout)
                    ),
                    true,
                );
            }
            Step::Reboot => self.reboot(staying, mark).await?,
            Step::WaitReboot => self.say("waiting for the reboot to begin".to_string(), false),
            Step::Undrain => {
                ops::set_drained(&*self.client().await?, &me, false).await?;
                self.timers.drain_started = None;
                self.say("this host takes units again".to_string(), false);
            }
            Step::WaitHealthy(why) => self.say(format!("back from the reboot; {why}"), false),
            Step::Release => {
                store::release(&*self.client().await?, &group, &me).await?;
                self.say(
                    format!("healthy after the reboot; released the reboot lock of group {group}"),
                    false,
                );
            }
            Step::Forget => {
                if let Some((_, revision)) = mark {
                    store::clear_reboot_mark(&*self.client().await?, &me, *revision).await?;
                }
                self.timers = Timers::default();
                self.say("the reboot is done".to_string(), false);
            }
        }
        Ok(())
    }

    /// Records the boot the reboot is asked in, then asks for it.
    async fn reboot(
        &mut self,
        staying: &[(UnitName, Stays)],
        mark: Option<&(RebootMark, u64)>,
    ) -> Result<(), LockOpError> {
        let record = RebootMark {
            since: mark.map_or_else(unix_now, |(m, _)| m.since),
            force: mark.is_some_and(|(m, _)| m.force),
            from_boot: Some(self.boot_id.clone()),
        };
        let me = self.me.clone();
        store::mark_reboot(&*self.client().await?, &me, &record).await?;
        if !staying.is_empty() {
            let shown: Vec<String> = staying
                .iter()
                .map(|(unit, why)| match why {
                    Stays::Pinned => format!("{unit} (MachineID pins it here)"),
                    Stays::Global => format!("{unit} (global)"),
                })
                .collect();
            tracing::warn!(
                "reboot coordinator: these units cannot move and stop with this host: {}",
                shown.join(", ")
            );
        }
        let Some(systemd) = self.systemd().await else {
            return Ok(());
        };
        match reboot::reboot(&systemd).await {
            Ok(via) => {
                self.timers.asked_reboot = Some(Instant::now());
                self.say(format!("rebooting now (asked {via})"), false);
            }
            Err(e) => self.say(e.to_string(), true),
        }
        Ok(())
    }

    /// A connection to systemd, made on first use.
    async fn systemd(&mut self) -> Option<Systemd> {
        if self.systemd.is_none() {
            match Systemd::connect_system().await {
                Ok(s) => self.systemd = Some(s),
                Err(e) => self.say(format!("cannot reach systemd: {e}"), true),
            }
        }
        self.systemd.clone()
    }

    /// Whether this host is healthy after its boot ([`step::health`]), by
    /// systemd's own states here.
    async fn health(&mut self, view: &HostView) -> Result<(), String> {
        let names: Vec<&str> = view
            .units
            .iter()
            .filter(|u| u.proposal.is_some())
            .map(|u| u.name.as_str())
            .collect();
        let mut local = BTreeMap::new();
        if !names.is_empty() {
            let Some(systemd) = self.systemd().await else {
                return Err("systemd is not reachable".to_string());
            };
            match systemd.states(&names).await {
                Ok(states) => {
                    for (name, state) in states {
                        if let Ok(name) = UnitName::parse(&name) {
                            local.insert(name, state);
                        }
                    }
                }
                Err(e) => return Err(format!("cannot ask systemd: {e}")),
            }
        }
        step::health(view, &local)
    }

    /// One sentence per unit that did not leave, saying why.
    async fn explain(
        &mut self,
        view: &HostView,
        stuck: &[UnitName],
    ) -> Result<String, LockOpError> {
        let placement = store::placement_view(&*self.client().await?, &self.config.bodies).await?;
        let reasons: Vec<String> = stuck
            .iter()
            .map(|unit| {
                let rules = view
                    .units
                    .iter()
                    .find(|u| &u.name == unit)
                    .and_then(|u| u.requirements.as_ref());
                step::explain(unit, rules, &placement, &self.me)
            })
            .collect();
        Ok(reasons.join("; "))
    }
}

fn names(units: &[UnitName]) -> String {
    units
        .iter()
        .map(UnitName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
