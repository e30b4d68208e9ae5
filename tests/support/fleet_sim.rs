//! A simulated fleet on the real code: a 3-member Raft cluster of `flotilla
//! daemon` processes on loopback (store-only members: their schedulers and
//! APIs run, no agent), and many agents in THIS process, each the production
//! agent ([`flotilla::agent::run::run_on`]: presence lease, claims, reconcile,
//! reports) over a [`FakeSystemd`] instead of D-Bus.
//!
//! Shared by the CI smoke test (`tests/sim_smoke.rs`) and the scale benchmark
//! (`flotilla-bench sim`, which includes this file by path), so both check the
//! same things the same way:
//! * every [`FakeSystemd`] writes each start and stop into one [`Journal`],
//!   which checks at the moment of every start that no unit runs on two hosts
//!   and no two units of a conflict group share a host — not even briefly;
//! * [`Journal::check_settled`] checks at the end that every unit runs.

#![allow(dead_code)] // the smoke test and the benchmark use different parts

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::agent::backend::{Backend, Call};
use flotilla::agent::run::AgentConfig;
use flotilla::agent::systemd::{Error as SystemdError, UnitState};
use flotilla::consensus::client::Client;
use flotilla::registry::records::DesiredState;
use flotilla::registry::{BodyCache, ops};
use flotilla::units::{Unit, UnitName};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many Raft members the simulated fleet's store has.
pub const MEMBERS: usize = 3;

/// Each member's `max_connections`: room for 5,000 simulated hosts' three
/// store connections each on one member (two, and the lease keep-alive's
/// spare once the agent's own was busy; keep `ulimit -n` above it).
pub const MAX_CONNECTIONS: usize = 20_000;

/// `n` free TCP ports on loopback (all bound at once, so they differ, then
/// released).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// 32 random bytes in hex: an API token.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Three `flotilla daemon` members on loopback; dropping it kills them.
pub struct Servers {
    children: Vec<Option<Child>>,
    /// Client (store) endpoints, `host:port`, in member order.
    pub endpoints: Vec<String>,
    /// Each member's HTTP API, `host:port` (empty strings when started without).
    pub apis: Vec<String>,
    /// The bearer token every request to those APIs carries (the API on TCP
    /// refuses to start without one), random per cluster.
    pub api_token: String,
    dir: PathBuf,
    /// What [`Servers::restart`] runs again.
    bin: PathBuf,
    peers: Vec<String>,
    extra: Vec<String>,
}

impl Servers {
    /// Starts members m0..m2 of `bin`, store-only (`--no-agent`), data and
    /// logs under `dir`, with `extra` daemon flags; with their HTTP APIs on
    /// loopback TCP when `api` is set. Returns once a write succeeds.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        api: bool,
        extra: &[&str],
    ) -> Result<Servers, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let ports = free_ports(3 * MEMBERS).map_err(|e| format!("free ports: {e}"))?;
        let at = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let endpoints: Vec<String> = (0..MEMBERS).map(|i| at(3 * i)).collect();
        let peers: Vec<String> = (0..MEMBERS).map(|i| at(3 * i + 1)).collect();
        let apis: Vec<String> = (0..MEMBERS)
            .map(|i| if api { at(3 * i + 2) } else { String::new() })
            .collect();
        let mut servers = Servers {
            children: Vec::new(),
            endpoints: endpoints.clone(),
            apis,
            api_token: random_token().map_err(|e| format!("reading /dev/urandom: {e}"))?,
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            peers,
            extra: extra.iter().map(|e| e.to_string()).collect(),
        };
        for i in 0..MEMBERS {
            let child = servers.spawn(i)?;
            servers.children.push(Some(child));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(client) = Client::connect(&endpoints).await
                && client.put("sim/ready", b"1".to_vec()).await.is_ok()
            {
                return Ok(servers);
            }
            for (i, child) in servers.children.iter_mut().enumerate() {
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    return Err(format!(
                        "member m{i} exited with {status}; see {}",
                        dir.display()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no cluster within 30 s; logs in {}", dir.display()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the process of member `i` (its data dir kept across restarts;
    /// its log appended to).
    fn spawn(&self, i: usize) -> Result<Child, String> {
        let initial = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))
            .map_err(|e| format!("opening m{i}.log: {e}"))?;
        Command::new(&self.bin)
            .args(["daemon", "--name", &format!("m{i}"), "--data-dir"])
            .arg(self.dir.join(format!("m{i}")))
            .args(["--client-listen", &self.endpoints[i]])
            .args(["--peer-listen", &self.peers[i]])
            .args(["--initial-cluster", &initial, "--log", "warn", "--no-agent"])
            .args(&self.extra)
            .env_remove("FLOTILLA_CONFIG")
            .env("FLOTILLA_API_SOCKET", "")
            .env("FLOTILLA_API_LISTEN", &self.apis[i])
            .env("FLOTILLA_API_TOKEN", &self.api_token)
            // Two store connections per simulated host, all of them possibly
            // on one member: the default (1,024) turns away hosts past ~500.
            .env("FLOTILLA_MAX_CONNECTIONS", MAX_CONNECTIONS.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e} (build it first)", self.bin.display()))
    }

    /// Kills member `i` at once (SIGKILL: no clean shutdown), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir, after [`Servers::kill`].
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.children[i] = Some(self.spawn(i)?);
        Ok(())
    }

    /// Each member's process id (0 once killed).
    pub fn pids(&self) -> Vec<u32> {
        self.children
            .iter()
            .map(|c| c.as_ref().map_or(0, Child::id))
            .collect()
    }

    /// The log of member `i`, for a failure message.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How the modelled systemd behaves.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    /// Shortest time from a start call until the unit is active.
    pub start_min: Duration,
    /// Longest such time (uniform between the two).
    pub start_max: Duration,
    /// Chance that a start call is refused (the agent retries on a later pass).
    pub start_failure: f64,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            start_min: Duration::from_millis(10),
            start_max: Duration::from_millis(100),
            start_failure: 0.01,
        }
    }
}

/// One start or stop as a fake systemd saw it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Host index.
    pub host: usize,
    /// The unit.
    pub unit: String,
    /// When.
    pub at: Instant,
    /// Started (true) or stopped.
    pub started: bool,
}

/// Every start and stop on every simulated host, and what runs where now,
/// checked for double runs and conflicts at the moment each start finishes.
#[derive(Debug, Default)]
pub struct Journal {
    inner: Mutex<JournalInner>,
}

#[derive(Debug, Default)]
struct JournalInner {
    events: Vec<Event>,
    /// unit → hosts it runs on now.
    running: HashMap<String, BTreeSet<usize>>,
    /// host → units it runs now.
    on_host: HashMap<usize, BTreeSet<String>>,
    violations: Vec<String>,
    /// Every start call a fake systemd answered: which host, unit, when,
    /// and whether it was refused (modelled failure).
    start_calls: Vec<StartCall>,
}

/// One start call as a fake systemd answered it: where the agent's start
/// path begins, so a bench can tell the call from the unit turning active.
#[derive(Debug, Clone)]
pub struct StartCall {
    /// Host index.
    pub host: usize,
    /// The unit.
    pub unit: String,
    /// When the call arrived.
    pub at: Instant,
    /// Refused (the modelled failure rate): the agent must call again.
    pub refused: bool,
}

/// The conflict group of a unit: units of the template `excl@.service`
/// (which the simulator submits with `Conflicts=excl@*.service`) may not
/// share a host.
pub fn conflict_group(unit: &str) -> Option<&'static str> {
    unit.starts_with("excl@").then_some("excl@")
}

impl Journal {
    fn started(&self, host: usize, unit: &str) {
        let mut j = self.inner.lock().expect("journal lock");
        let now = Instant::now();
        let elsewhere: Vec<usize> = j
            .running
            .get(unit)
            .map(|hosts| hosts.iter().copied().filter(|h| *h != host).collect())
            .unwrap_or_default();
        if !elsewhere.is_empty() {
            j.violations.push(format!(
                "{unit} started on host {host} while running on {elsewhere:?}"
            ));
        }
        if let Some(group) = conflict_group(unit) {
            let beside: Vec<String> = j
                .on_host
                .get(&host)
                .into_iter()
                .flatten()
                .filter(|u| *u != unit && conflict_group(u) == Some(group))
                .cloned()
                .collect();
            if !beside.is_empty() {
                j.violations
                    .push(format!("{unit} started on host {host} beside {beside:?}"));
            }
        }
        j.running.entry(unit.to_string()).or_default().insert(host);
        j.on_host.entry(host).or_default().insert(unit.to_string());
        j.events.push(Event {
            host,
            unit: unit.to_string(),
            at: now,
            started: true,
        });
    }

    fn stopped(&self, host: usize, unit: &str) {
        let mut j = self.inner.lock().expect("journal lock");
        if let Some(hosts) = j.running.get_mut(unit) {
            hosts.remove(&host);
        }
        if let Some(units) = j.on_host.get_mut(&host) {
            units.remove(unit);
        }
        j.events.push(Event {
            host,
            unit: unit.to_string(),
            at: Instant::now(),
            started: false,
        });
    }

    fn start_called(&self, host: usize, unit: &str, refused: bool) {
        let mut j = self.inner.lock().expect("journal lock");
        j.start_calls.push(StartCall {
            host,
            unit: unit.to_string(),
            at: Instant::now(),
            refused,
        });
    }

    /// Every start call answered so far, in order.
    pub fn start_calls(&self) -> Vec<StartCall> {
        self.inner.lock().expect("journal lock").start_calls.clone()
    }

    /// Every start and stop so far.
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().expect("journal lock").events.clone()
    }

    /// How many distinct units run now.
    pub fn running_units(&self) -> usize {
        let j = self.inner.lock().expect("journal lock");
        j.running.values().filter(|h| !h.is_empty()).count()
    }

    /// How many of `units` run on no host outside `dead` now. Counted under
    /// the journal's lock without copying it: a poll that copied
    /// [`Journal::placement`] (100,000 units) every 20 ms held the lock
    /// most of the time, and every fake systemd's start and stop waits for
    /// it, blocking the tokio worker that runs the agent (and every other
    /// agent queued on that worker) meanwhile.
    pub fn not_running<'a>(
        &self,
        units: impl IntoIterator<Item = &'a String>,
        dead: &BTreeSet<usize>,
    ) -> usize {
        let j = self.inner.lock().expect("journal lock");
        units
            .into_iter()
            .filter(|u| {
                !j.running
                    .get(u.as_str())
                    .is_some_and(|h| h.iter().any(|h| !dead.contains(h)))
            })
            .count()
    }

    /// Where each unit runs now.
    pub fn placement(&self) -> BTreeMap<String, BTreeSet<usize>> {
        let j = self.inner.lock().expect("journal lock");
        j.running
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(u, h)| (u.clone(), h.clone()))
            .collect()
    }

    /// The double runs and conflicts seen at any moment so far.
    pub fn violations(&self) -> Vec<String> {
        self.inner.lock().expect("journal lock").violations.clone()
    }

    /// Every unit of `units` runs on exactly one live host, and nothing was
    /// ever violated; otherwise what is wrong.
    pub fn check_settled(&self, units: &[UnitName], dead: &BTreeSet<usize>) -> Result<(), String> {
        let mut problems = self.violations();
        let placement = self.placement();
        for unit in units {
            match placement.get(unit.as_str()) {
                None => problems.push(format!("{unit} runs nowhere")),
                Some(hosts) if hosts.len() > 1 => {
                    problems.push(format!("{unit} runs on hosts {hosts:?}"))
                }
                Some(hosts) if hosts.iter().any(|h| dead.contains(h)) => {
                    problems.push(format!("{unit} runs on a dead host {hosts:?}"))
                }
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let shown: Vec<&String> = problems.iter().take(20).collect();
            Err(format!("{} problems, first: {shown:#?}", problems.len()))
        }
    }
}

/// A modelled systemd for one simulated host: units are linked, started
/// (after a modelled delay, or refused at a modelled rate) and stopped in
/// memory; every start and stop goes into the fleet's [`Journal`], and every
/// change is signalled as systemd's D-Bus signals would be.
pub struct FakeSystemd {
    host: usize,
    model: Model,
    journal: Arc<Journal>,
    alive: AtomicBool,
    random: AtomicU64,
    units: Mutex<HashMap<String, FakeUnit>>,
    signals: Mutex<Option<UnboundedSender<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    Inactive,
    Activating,
    Active,
}

#[derive(Debug, Clone)]
struct FakeUnit {
    linked: bool,
    /// The unit file it was linked from, as systemd's FragmentPath.
    file: Option<String>,
    activity: Activity,
    /// Bumped by every start or stop, so a start that finishes after a
    /// later stop does nothing.
    generation: u64,
}

impl FakeSystemd {
    /// Host number `host` of a fleet journalled in `journal`.
    pub fn new(host: usize, model: Model, journal: Arc<Journal>) -> Arc<FakeSystemd> {
        Arc::new(FakeSystemd {
            host,
            model,
            journal,
            alive: AtomicBool::new(true),
            random: AtomicU64::new(0x9e37_79b9_7f4a_7c15 ^ (host as u64).wrapping_mul(0x2545_f491)),
            units: Mutex::new(HashMap::new()),
            signals: Mutex::new(None),
        })
    }

    /// The host dies: everything it ran stops at once, and every later call fails.
    pub fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let mut units = self.units.lock().expect("units lock");
        for (name, unit) in units.iter_mut() {
            if unit.activity == Activity::Active {
                self.journal.stopped(self.host, name);
            }
            unit.activity = Activity::Inactive;
            unit.generation += 1;
        }
    }

    /// A number in [0, 1), from a per-host splitmix64 sequence.
    fn uniform(&self) -> f64 {
        let mut z = self
            .random
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn signal(&self, unit: &str) {
        if let Some(sender) = self.signals.lock().expect("signals lock").as_ref() {
            let _ = sender.send(unit.to_string());
        }
    }

    fn refuse<T>(&self, action: &'static str, unit: &str, reason: &str) -> Result<T, SystemdError> {
        Err(SystemdError::Refused {
            action,
            unit: unit.to_string(),
            reason: reason.to_string(),
        })
    }

    fn check_alive(&self, action: &'static str, unit: &str) -> Result<(), SystemdError> {
        if self.alive.load(Ordering::SeqCst) {
            Ok(())
        } else {
            self.refuse(action, unit, "the host is down")
        }
    }

    fn state_of(&self, name: &str) -> UnitState {
        let units = self.units.lock().expect("units lock");
        let (load, active, sub) = match units.get(name) {
            None => ("not-found", "inactive", "dead"),
            Some(u) => {
                let load = if u.linked { "loaded" } else { "not-found" };
                match u.activity {
                    Activity::Inactive => (load, "inactive", "dead"),
                    Activity::Activating => (load, "activating", "start"),
                    Activity::Active => (load, "active", "running"),
                }
            }
        };
        UnitState {
            load: load.to_string(),
            active: active.to_string(),
            sub: sub.to_string(),
        }
    }

    fn do_start(self: &Arc<Self>, name: &str) -> Result<(), SystemdError> {
        self.check_alive("start", name)?;
        let refused = self.uniform() < self.model.start_failure;
        self.journal.start_called(self.host, name, refused);
        if refused {
            return self.refuse("start", name, "simulated failure");
        }
        let generation = {
            let mut units = self.units.lock().expect("units lock");
            let Some(unit) = units.get_mut(name).filter(|u| u.linked) else {
                return self.refuse("start", name, "unit not found");
            };
            if unit.activity != Activity::Inactive {
                return Ok(());
            }
            unit.activity = Activity::Activating;
            unit.generation += 1;
            unit.generation
        };
        let (min, max) = (self.model.start_min, self.model.start_max);
        let delay = min + (max.saturating_sub(min)).mul_f64(self.uniform());
        let me = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let done = {
                let mut units = me.units.lock().expect("units lock");
                match units.get_mut(&name) {
                    Some(u) if u.generation == generation && me.alive.load(Ordering::SeqCst) => {
                        u.activity = Activity::Active;
                        // Journalled under the units lock: a stop cannot slip in between.
                        me.journal.started(me.host, &name);
                        true
                    }
                    _ => false,
                }
            };
            if done {
                me.signal(&name);
            }
        });
        Ok(())
    }

    fn do_stop(&self, name: &str) -> Result<(), SystemdError> {
        self.check_alive("stop", name)?;
        let changed = {
            let mut units = self.units.lock().expect("units lock");
            match units.get_mut(name) {
                Some(u) if u.activity != Activity::Inactive => {
                    if u.activity == Activity::Active {
                        self.journal.stopped(self.host, name);
                    }
                    u.activity = Activity::Inactive;
                    u.generation += 1;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.signal(name);
        }
        Ok(())
    }
}

/// Whether `name` matches glob `pattern` (`*` and `?`; enough for the
/// simulator's `Conflicts=` patterns).
fn glob_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The fake as the agent's backend. Every call answers at once, as a fast
/// systemd would; only starts take their modelled time.
pub struct FakeBackend(pub Arc<FakeSystemd>);

impl Backend for FakeBackend {
    fn states<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, Vec<(String, UnitState)>> {
        Box::pin(async move {
            self.0.check_alive("list", "units")?;
            Ok(names
                .iter()
                .map(|n| (n.to_string(), self.0.state_of(n)))
                .collect())
        })
    }

    fn active_units_matching<'a>(&'a self, patterns: &'a [String]) -> Call<'a, Vec<String>> {
        Box::pin(async move {
            self.0.check_alive("list", "units")?;
            let units = self.0.units.lock().expect("units lock");
            Ok(units
                .iter()
                .filter(|(_, u)| u.activity != Activity::Inactive)
                .filter(|(n, _)| patterns.iter().any(|p| glob_matches(p, n)))
                .map(|(n, _)| n.clone())
                .collect())
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move { self.0.do_start(name) })
    }

    fn stop<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move { self.0.do_stop(name) })
    }

    fn reload(&self) -> Call<'_, ()> {
        Box::pin(async move { self.0.check_alive("reload", "its unit files") })
    }

    fn link_runtime_all<'a>(&'a self, files: &'a [PathBuf]) -> Call<'a, ()> {
        Box::pin(async move {
            self.0.check_alive("link", "unit files")?;
            let mut units = self.0.units.lock().expect("units lock");
            for file in files {
                if let Some(name) = file.file_name().and_then(|n| n.to_str()) {
                    let unit = units.entry(name.to_string()).or_insert(FakeUnit {
                        linked: true,
                        file: None,
                        activity: Activity::Inactive,
                        generation: 0,
                    });
                    unit.linked = true;
                    unit.file = Some(file.display().to_string());
                }
            }
            Ok(())
        })
    }

    fn fragment_path<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>> {
        Box::pin(async move {
            self.0.check_alive("read the unit file of", name)?;
            let units = self.0.units.lock().expect("units lock");
            Ok(units
                .get(name)
                .map(|unit| unit.file.clone().unwrap_or_default()))
        })
    }

    fn enable_runtime<'a>(&'a self, _file: &'a Path) -> Call<'a, ()> {
        Box::pin(async move { self.0.check_alive("enable", "a unit file") })
    }

    fn disable_runtime_all<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, ()> {
        Box::pin(async move {
            self.0.check_alive("disable", "unit files")?;
            let mut units = self.0.units.lock().expect("units lock");
            for name in names {
                if let Some(u) = units.get_mut(*name) {
                    u.linked = false;
                }
            }
            Ok(())
        })
    }

    fn reset_failed<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move { self.0.check_alive("reset", name) })
    }

    fn watch_changes(&self) -> Call<'_, UnboundedReceiver<String>> {
        Box::pin(async move {
            let (sender, receiver) = unbounded_channel();
            *self.0.signals.lock().expect("signals lock") = Some(sender);
            Ok(receiver)
        })
    }
}

/// One simulated host: its fake systemd and its running agent.
pub struct SimHost {
    /// Its machine id.
    pub id: String,
    /// Its modelled systemd.
    pub systemd: Arc<FakeSystemd>,
    stop: watch::Sender<bool>,
    agent: Option<JoinHandle<()>>,
}

/// Many simulated hosts, their files under one directory.
pub struct Fleet {
    /// The hosts, by index.
    pub hosts: Vec<SimHost>,
    /// Every start and stop on every host.
    pub journal: Arc<Journal>,
    /// Hosts killed so far.
    pub dead: BTreeSet<usize>,
}

impl Fleet {
    /// Starts `n` agents against `endpoints`, with presence leases of `ttl`,
    /// each over a [`FakeSystemd`] of `model`; files (machine id, instance
    /// id, unit files) under `dir`.
    pub fn start(n: usize, endpoints: &[String], ttl: Duration, model: Model, dir: &Path) -> Fleet {
        let journal = Arc::new(Journal::default());
        let mut hosts = Vec::with_capacity(n);
        for i in 0..n {
            let home = dir.join(format!("h{i}"));
            std::fs::create_dir_all(&home).expect("creating a simulated host's directory");
            let id = format!("{:032x}", 0x5157_0000_0000u64 + i as u64);
            std::fs::write(home.join("machine-id"), format!("{id}\n"))
                .expect("writing a machine id");
            let config = AgentConfig {
                endpoints: endpoints.to_vec(),
                data_dir: home.clone(),
                units_dir: home.join("units"),
                machine_id_path: home.join("machine-id"),
                ttl,
                public_ip: Some(format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)),
                metadata: BTreeMap::new(),
                leave_on_stop: false,
                metadata_updates: None,
                bodies: Arc::new(BodyCache::new()),
                api_listen: None,
            };
            let systemd = FakeSystemd::new(i, model, journal.clone());
            let backend: Arc<dyn Backend> = Arc::new(FakeBackend(systemd.clone()));
            let (stop, stopped) = watch::channel(false);
            let agent = tokio::spawn(async move {
                if let Err(e) = flotilla::agent::run::run_on(config, backend, stopped).await {
                    eprintln!("simulated agent {i}: {e}");
                }
            });
            hosts.push(SimHost {
                id,
                systemd,
                stop,
                agent: Some(agent),
            });
        }
        Fleet {
            hosts,
            journal,
            dead: BTreeSet::new(),
        }
    }

    /// Kills host `i` as a crash would: its agent stops without leaving (its
    /// lease runs out), and everything it ran stops at once.
    pub async fn kill(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        let _ = host.stop.send(true);
        if let Some(agent) = host.agent.take() {
            let _ = agent.await;
        }
        host.systemd.die();
        self.dead.insert(i);
    }

    /// Stops every agent (the fleet's end; leases run out).
    pub async fn stop_all(&mut self) {
        for host in &self.hosts {
            let _ = host.stop.send(true);
        }
        for host in &mut self.hosts {
            if let Some(agent) = host.agent.take() {
                let _ = agent.await;
            }
        }
    }
}

/// The trivial unit every simulated host runs (`%i`: its instance).
pub const SIM_TEMPLATE: &str =
    "[Unit]\nDescription=simulated unit %i\n[Service]\nExecStart=/bin/sleep infinity\n";

/// Units that may not share a host.
pub const EXCL_TEMPLATE: &str = "[Unit]\nDescription=exclusive unit %i\n[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nConflicts=excl@*.service\n";

/// The units of a run: `units` in all, of which `min(units / 20, hosts / 2)`
/// are `excl@N.service` (conflicting with each other), the rest `sim@N.service`.
pub fn unit_names(units: usize, hosts: usize) -> Vec<UnitName> {
    let excl = (units / 20).min(hosts / 2);
    (0..units)
        .map(|i| {
            let name = if i < excl {
                format!("excl@{i}.service")
            } else {
                format!("sim@{i}.service")
            };
            UnitName::parse(&name).expect("a simulated unit name parses")
        })
        .collect()
}

/// Submits the two templates and starts `names` in batches of `batch`
/// (one registry call each, as `flotilla start` of many units does); returns
/// when each unit's batch was sent.
pub async fn submit_all(
    client: &Client,
    names: &[UnitName],
    batch: usize,
) -> Result<HashMap<UnitName, Instant>, String> {
    submit_templates(client).await?;
    let mut sent = HashMap::new();
    for chunk in names.chunks(batch.max(1)) {
        let at = Instant::now();
        ops::set_desired(client, chunk, DesiredState::Launched)
            .await
            .map_err(|e| format!("starting {} units: {e}", chunk.len()))?;
        for name in chunk {
            sent.insert(name.clone(), at);
        }
    }
    Ok(sent)
}

/// Submits the templates every simulated unit is an instance of.
async fn submit_templates(client: &Client) -> Result<(), String> {
    for (name, text) in [
        ("sim@.service", SIM_TEMPLATE),
        ("excl@.service", EXCL_TEMPLATE),
    ] {
        let name = UnitName::parse(name).map_err(|e| e.to_string())?;
        let unit = Unit::from_text(&name, text).map_err(|e| e.to_string())?;
        ops::submit(client, &unit, false)
            .await
            .map_err(|e| format!("submitting {name}: {e}"))?;
    }
    Ok(())
}

/// [`submit_all`], paced at `rate` units per second: the units go out in
/// chunks of `rate / 50` (at least one, at most `batch`), so about 50 start
/// calls a second, each sent at its paced time whether or not the earlier
/// calls returned (spread over `clients`, one call at a time on each), and
/// each unit's start counted from that paced time: a cluster that falls
/// behind the pace shows its queueing in the latencies instead of slowing
/// the pace down.
pub async fn submit_paced(
    clients: &[Arc<Client>],
    names: &[UnitName],
    batch: usize,
    rate: f64,
) -> Result<HashMap<UnitName, Instant>, String> {
    submit_templates(&clients[0]).await?;
    let chunk_len = ((rate / 50.0).floor() as usize).clamp(1, batch.max(1));
    let began = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for (i, chunk) in names.chunks(chunk_len).enumerate() {
        let due = began + Duration::from_secs_f64((i * chunk_len) as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let client = clients[i % clients.len()].clone();
        let chunk = chunk.to_vec();
        calls.spawn(async move {
            ops::set_desired(&client, &chunk, DesiredState::Launched)
                .await
                .map_err(|e| format!("starting {} units: {e}", chunk.len()))?;
            Ok::<_, String>((chunk, due))
        });
    }
    let mut sent = HashMap::new();
    while let Some(call) = calls.join_next().await {
        let (chunk, due) = call.map_err(|e| e.to_string())??;
        for name in chunk {
            sent.insert(name, due);
        }
    }
    Ok(sent)
}

/// Waits until `want` units run (by the journal), up to `limit`; false on
/// time-out.
pub async fn wait_running(journal: &Journal, want: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if journal.running_units() >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    journal.running_units() >= want
}

/// Waits up to `limit`, checking every `every`, until the fleet settled:
/// [`Journal::check_settled`] and [`check_store`] both pass. `Err` with
/// the last problems seen when the time ran out, or at once when the
/// journal saw a violation (a unit twice, conflicting units together).
pub async fn settled(
    client: &Client,
    names: &[UnitName],
    fleet: &Fleet,
    limit: Duration,
    every: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let journal = fleet.journal.check_settled(names, &fleet.dead);
        let store = check_store(client, names, fleet).await;
        if let (Ok(()), Ok(())) = (&journal, &store) {
            return Ok(());
        }
        let violations = fleet.journal.violations();
        if !violations.is_empty() {
            return Err(format!("violated: {violations:#?}"));
        }
        if Instant::now() > deadline {
            return Err(format!("journal: {journal:?}; store: {store:?}"));
        }
        tokio::time::sleep(every).await;
    }
}

/// What the store says: each unit's rows of `list-units` must be one, on a
/// live simulated host, reported active there.
pub async fn check_store(client: &Client, names: &[UnitName], fleet: &Fleet) -> Result<(), String> {
    let rows = ops::unit_rows(client).await.map_err(|e| e.to_string())?;
    let live: BTreeMap<&str, usize> = fleet
        .hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| !fleet.dead.contains(i))
        .map(|(i, h)| (h.id.as_str(), i))
        .collect();
    let placement = fleet.journal.placement();
    let mut by_unit: BTreeMap<&UnitName, Vec<_>> = BTreeMap::new();
    for row in &rows {
        by_unit.entry(&row.name).or_default().push(row);
    }
    let mut problems = Vec::new();
    for name in names {
        let rows = by_unit.get(name).cloned().unwrap_or_default();
        let [row] = rows.as_slice() else {
            problems.push(format!("{name}: {} rows in list-units", rows.len()));
            continue;
        };
        let host = row.machine.as_deref().and_then(|m| live.get(m));
        let active = row.state.as_ref().map(|s| s.state.active.as_str());
        let runs_there = host.is_some_and(|h| {
            placement
                .get(name.as_str())
                .is_some_and(|hosts| hosts.contains(h))
        });
        if !runs_there || active != Some("active") {
            problems.push(format!(
                "{name}: list-units says machine {:?} active {active:?}; it runs on {:?}",
                row.machine,
                placement.get(name.as_str())
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let shown: Vec<&String> = problems.iter().take(20).collect();
        Err(format!("{} problems, first: {shown:#?}", problems.len()))
    }
}
