//! `flotilla-bench sim`: flotilla at scale, on the real code.
//!
//! A 3-member cluster of `flotilla daemon` processes (store-only members:
//! Raft, scheduler and API; no agent) on loopback, and `--hosts` agents in
//! this process, each the production agent over a modelled systemd
//! (`tests/support/fleet_sim.rs`, shared with the CI smoke test). Phases:
//!
//! 1. join: every host publishes its presence;
//! 2. bulk start: `--units` units started in batches (one registry call per
//!    batch, as `flotilla start` of many units does), while a prober times
//!    the API's list calls; until every unit runs;
//! 3. idle: nothing changes for `--idle-secs`: Raft entries/s (keep-alives),
//!    and who makes them: the leader's applied entries by kind and every
//!    store change by key kind, machine and unit ([`crate::store_tally`]);
//!    CPU of each member and of the simulator; then the API's list calls
//!    timed again for 15 s, idle (the loaded numbers' peer);
//! 4. failover: a tenth of the hosts die at once; per moved unit, the time
//!    from its old host's lease expiry (the store deleting its presence) to
//!    the unit running elsewhere, and from the kill to the last such start;
//! 5. checks: every unit runs on exactly one live host and `list-units`
//!    says so; no unit ever ran twice, no conflict was ever violated.
//!
//! Prints one JSON line per phase on stdout; exits non-zero if a check fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flotilla::consensus::client::{Client, member_status};
use flotilla::registry::keys;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet_sim::{self, Fleet, Model, Servers};
use crate::store_tally::{self, Tally};
use crate::store_watch::Recorder;

/// Options of `flotilla-bench sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Simulated hosts (agents in this process).
    #[arg(long, default_value_t = 100)]
    pub hosts: usize,
    /// Units to start.
    #[arg(long, default_value_t = 1000)]
    pub units: usize,
    /// Units per start call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Start units at this many per second (in chunks of rate/50, about 50
    /// start calls a second over 8 connections, each sent on time whether or
    /// not earlier calls returned, each unit's latency counted from its paced
    /// send time), to measure submit → running below capacity [default: as
    /// fast as the start calls return, one at a time, in chunks of --batch].
    #[arg(long)]
    pub submit_rate: Option<f64>,
    /// The agents' presence TTL, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl_secs: u64,
    /// Shortest modelled start, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub start_min_ms: u64,
    /// Longest modelled start, in milliseconds (uniform in between).
    #[arg(long, default_value_t = 100)]
    pub start_max_ms: u64,
    /// Chance that the modelled systemd refuses a start call.
    #[arg(long, default_value_t = 0.01)]
    pub start_failure: f64,
    /// Length of the idle window, in seconds.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Fraction of hosts killed in the failover phase.
    #[arg(long, default_value_t = 0.1)]
    pub kill_fraction: f64,
    /// How long each phase may take before the run fails, in seconds.
    #[arg(long, default_value_t = 600)]
    pub phase_timeout_secs: u64,
    /// Write a PNG of the latency distributions here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Where the members' data and the hosts' files go (removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
    /// Where the simulated hosts keep their unit files and state (a fresh
    /// directory in it, removed afterwards) [default: /dev/shm when it is a
    /// directory, else --work-dir]. 1,000 hosts writing their unit files to
    /// one ext4 disk cost this process more CPU in the kernel's inode
    /// allocation than in the agents, CPU the members then lack; real hosts
    /// each write their own few files to their own disk.
    #[arg(long)]
    pub hosts_dir: Option<PathBuf>,
    /// Keep the work directory (the members' logs) after a successful run too.
    #[arg(long)]
    pub keep: bool,
    /// The flotilla binary [default: ../target/release/flotilla next to this crate].
    #[arg(long)]
    pub flotilla_bin: Option<PathBuf>,
}

/// Store connections that send the paced start calls (`--submit-rate`): a
/// call still running does not hold back the next one.
const SUBMITTERS: usize = 8;

/// Latency summary in milliseconds.
#[derive(Serialize, Debug, Clone, Copy, Default)]
struct Summary {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn summary(samples: &mut [Duration]) -> Summary {
    samples.sort();
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        ms(samples[i])
    };
    Summary {
        n: samples.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: samples.last().map_or(0.0, |d| ms(*d)),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs the simulation with its files under a fresh directory in `--work-dir`.
pub async fn run(args: SimArgs) -> Result<()> {
    let args = &args;
    let hosts_dir = hosts_dir(args.hosts_dir.as_deref(), &args.work_dir);
    in_fresh_dir(
        &hosts_dir,
        "flotilla-sim-hosts-",
        "the simulated hosts' files",
        args.keep,
        |hosts| async move {
            in_fresh_dir(
                &args.work_dir,
                "flotilla-sim-",
                "member logs m0.log..m2.log",
                args.keep,
                |dir| async move { run_in(args, &dir, &hosts).await },
            )
            .await
        },
    )
    .await
}

/// Where the simulated hosts' directories go: `chosen`, else /dev/shm
/// (tmpfs) when there is one, else `work_dir`.
pub fn hosts_dir(chosen: Option<&Path>, work_dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    match chosen {
        Some(dir) => dir.to_path_buf(),
        None if shm.is_dir() => shm.to_path_buf(),
        None => work_dir.to_path_buf(),
    }
}

/// Runs `body` in a fresh directory named `prefix...` under `work_dir`,
/// removed after a success unless `keep`, and kept after a failure (said on
/// stderr, with `holds`: what in it is worth reading).
pub async fn in_fresh_dir<F, Fut>(
    work_dir: &Path,
    prefix: &str,
    holds: &str,
    keep: bool,
    body: F,
) -> Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let work = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(work_dir)
        .with_context(|| format!("creating a temp dir in {}", work_dir.display()))?;
    eprintln!("data under {}", work.path().display());
    let result = body(work.path().to_path_buf()).await;
    if result.is_err() || keep {
        let kept = work.keep();
        eprintln!("kept {} ({holds})", kept.display());
    }
    result
}

/// Everything a phase samples from outside: the members' Raft index, disk
/// bytes and CPU, and this process's CPU.
#[derive(Debug, Clone)]
struct Gauges {
    at: Instant,
    applied: u64,
    /// The store's revision (the highest a member reports).
    revision: u64,
    store_bytes: Vec<u64>,
    cpu_ticks: Vec<u64>,
    own_ticks: u64,
    leader: usize,
}

async fn gauges(servers: &Servers) -> Result<Gauges> {
    let mut applied = 0;
    let mut revision = 0;
    let mut store_bytes = Vec::new();
    let mut leader = 0;
    for (i, endpoint) in servers.endpoints.iter().enumerate() {
        let status = member_status(endpoint, Duration::from_secs(5))
            .await
            .with_context(|| format!("status of member m{i}"))?;
        applied = applied.max(status.applied);
        revision = revision.max(status.revision);
        store_bytes.push(status.store_bytes);
        if status.leader == status.id {
            leader = i;
        }
    }
    Ok(Gauges {
        at: Instant::now(),
        applied,
        revision,
        store_bytes,
        cpu_ticks: servers.pids().iter().map(|p| cpu_ticks(*p)).collect(),
        own_ticks: cpu_ticks(std::process::id()),
        leader,
    })
}

/// utime + stime of process `pid`, in clock ticks (0 if unreadable).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Resident and peak resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let round = |k: f64| (k / 1024.0 * 10.0).round() / 10.0;
    (round(kib("VmRSS:")), round(kib("VmHWM:")))
}

/// Share of one core each process used between two gauges, in percent.
fn cpu_percent(before: &Gauges, after: &Gauges) -> (Vec<f64>, f64) {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    // Linux reports in USER_HZ, 100 on every architecture flotilla runs on.
    let pct = |ticks: u64| (ticks as f64 / 100.0 / secs * 1000.0).round() / 10.0;
    let members = after
        .cpu_ticks
        .iter()
        .zip(&before.cpu_ticks)
        .map(|(a, b)| pct(a.saturating_sub(*b)))
        .collect();
    (
        members,
        pct(after.own_ticks.saturating_sub(before.own_ticks)),
    )
}

async fn run_in(args: &SimArgs, dir: &Path, hosts_dir: &Path) -> Result<()> {
    let bin = args
        .flotilla_bin
        .clone()
        .unwrap_or_else(crate::flotilla_target::default_binary);
    if let Some(rate) = args.submit_rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--submit-rate must be a positive number of units per second, not {rate}");
    }
    let limit = Duration::from_secs(args.phase_timeout_secs);
    let ttl = Duration::from_secs(args.ttl_secs);
    let servers = Servers::start(&bin, &dir.join("servers"), true, &[])
        .await
        .map_err(|e| anyhow!(e))?;
    let client = Client::connect(&servers.endpoints).await?;
    let model = Model {
        start_min: Duration::from_millis(args.start_min_ms),
        start_max: Duration::from_millis(args.start_max_ms),
        start_failure: args.start_failure,
    };
    let header = json!({"hosts": args.hosts, "units": args.units, "ttl_secs": args.ttl_secs,
        "batch": args.batch, "submit_rate": args.submit_rate, "start_ms": [args.start_min_ms, args.start_max_ms],
        "start_failure": args.start_failure});

    // 1. join.
    let started = Instant::now();
    let mut fleet = Fleet::start(args.hosts, &servers.endpoints, ttl, model, hosts_dir);
    loop {
        let count = client.range(keys::MACHINES, true, false).await?.0.len();
        if count >= args.hosts {
            break;
        }
        if started.elapsed() > limit {
            bail!(
                "only {count} of {} hosts joined within {limit:?}",
                args.hosts
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{}",
        json!({"phase": "join", "run": header, "secs": started.elapsed().as_secs_f64()})
    );

    // 2. bulk start, with the API probed meanwhile.
    let names = fleet_sim::unit_names(args.units, args.hosts);
    let before = gauges(&servers).await?;
    let served_before = served(&servers).await;
    let bulk_kinds_before = entry_kinds(&servers, before.leader).await;
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = spawn_probe(
        servers.apis.clone(),
        servers.api_token.clone(),
        probing.clone(),
    );
    let bulk_start = Instant::now();
    let sent = match args.submit_rate {
        Some(rate) => {
            let mut submitters = Vec::new();
            for _ in 0..SUBMITTERS {
                submitters.push(Arc::new(Client::connect(&servers.endpoints).await?));
            }
            fleet_sim::submit_paced(&submitters, &names, args.batch, rate).await
        }
        None => fleet_sim::submit_all(&client, &names, args.batch).await,
    }
    .map_err(|e| anyhow!(e))?;
    let submitted = bulk_start.elapsed();
    let mut said = Instant::now();
    while fleet.journal.running_units() < args.units {
        let running = fleet.journal.running_units();
        if bulk_start.elapsed() > limit {
            println!(
                "{}",
                json!({"phase": "bulk_start", "run": header, "timed_out_secs": limit.as_secs(),
                    "running": running})
            );
            bail!(
                "only {running} of {} units ran within {limit:?}",
                args.units
            );
        }
        if said.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "{:.0} s: {running} of {} units run",
                bulk_start.elapsed().as_secs_f64(),
                args.units
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_running = bulk_start.elapsed();
    probing.store(false, std::sync::atomic::Ordering::SeqCst);
    let api = probe.await??;
    let served_loaded = served(&servers).await;
    let after = gauges(&servers).await?;
    // Counted by the member that led at the start: a leader change makes
    // these a follower's (the same entries, applied there too).
    let bulk_entries = store_tally::entry_kinds_delta(
        &bulk_kinds_before,
        &entry_kinds(&servers, before.leader).await,
    );
    let first_start = first_starts(&fleet, None);
    let mut start_latency: Vec<Duration> = names
        .iter()
        .filter_map(|n| Some(first_start.get(n.as_str())?.duration_since(sent[n])))
        .collect();
    let start_summary = summary(&mut start_latency);
    let (cpu, sim_cpu) = cpu_percent(&before, &after);
    let entries = after.applied.saturating_sub(before.applied);
    let leader_bytes =
        after.store_bytes[after.leader].saturating_sub(before.store_bytes[after.leader]);
    let mut api_summaries = BTreeMap::new();
    for (path, samples) in &api {
        let mut samples = samples.clone();
        api_summaries.insert(path.clone(), summary(&mut samples));
    }
    println!(
        "{}",
        json!({"phase": "bulk_start", "run": header,
            "submit_secs": submitted.as_secs_f64(),
            "all_running_secs": all_running.as_secs_f64(),
            "placements_per_sec": (args.units as f64 / all_running.as_secs_f64()).round(),
            "submit_to_running": start_summary,
            "api": api_summaries,
            "api_in_process": in_process(&served_before, &served_loaded),
            "raft_entries_per_placement": entries as f64 / args.units as f64,
            "leader_store_bytes_per_placement": leader_bytes as f64 / args.units as f64,
            "raft_entries_by_kind": bulk_entries,
            "member_cpu_pct": cpu, "leader": after.leader, "sim_cpu_pct": sim_cpu})
    );

    // 3. idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Outside the window, and from a follower: a scrape reads the registry
    // (the cluster's figures), which the idle leader's CPU must not include.
    let follower = (gauges(&servers).await?.leader + 1) % servers.endpoints.len();
    let kinds_before = entry_kinds(&servers, follower).await;
    let tally = Tally::start(&servers.endpoints).await?;
    let before = gauges(&servers).await?;
    let sim_events = fleet.journal.events().len();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let after = gauges(&servers).await?;
    let kinds_after = entry_kinds(&servers, follower).await;
    let writes = tally
        .finish(before.revision, after.revision, TOP_WRITERS)
        .await;
    let entries = store_tally::entry_kinds_delta(&kinds_before, &kinds_after);
    let (cpu, sim_cpu) = cpu_percent(&before, &after);
    let secs = after.at.duration_since(before.at).as_secs_f64();
    eprintln!("idle: Raft entries by kind {entries:?}; store changes {writes}");
    println!(
        "{}",
        json!({"phase": "idle", "run": header, "secs": secs,
            "raft_entries_per_sec": ((after.applied - before.applied) as f64 / secs).round(),
            "raft_entries_by_kind": entries,
            "store_changes": writes,
            "member_cpu_pct": cpu, "leader": after.leader,
            "sim_cpu_pct": sim_cpu,
            "sim_cpu_pct_per_agent": (sim_cpu / args.hosts as f64 * 1000.0).round() / 1000.0,
            "starts_or_stops_while_idle": fleet.journal.events().len() - sim_events})
    );

    // 3b. the same API calls, idle: what the bulk start's load adds.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = spawn_probe(
        servers.apis.clone(),
        servers.api_token.clone(),
        probing.clone(),
    );
    tokio::time::sleep(IDLE_PROBE).await;
    probing.store(false, std::sync::atomic::Ordering::SeqCst);
    let idle_api = probe.await??;
    let served_idle = served(&servers).await;
    let mut idle_summaries = BTreeMap::new();
    for (path, samples) in &idle_api {
        let mut samples = samples.clone();
        idle_summaries.insert(path.clone(), summary(&mut samples));
    }
    println!(
        "{}",
        json!({"phase": "idle_api", "run": header, "secs": IDLE_PROBE.as_secs(),
            "api": idle_summaries,
            "api_in_process": in_process(&served_loaded, &served_idle)})
    );

    // 4. failover.
    // Every k-th host, k = 1 / fraction: 10% of 1,000 hosts is 100 of them.
    let every = (1.0 / args.kill_fraction.max(1e-9)).round().max(1.0) as usize;
    let killed: Vec<usize> = (0..args.hosts).step_by(every).collect();
    let killed_ids: BTreeMap<String, usize> = killed
        .iter()
        .map(|i| (fleet.hosts[*i].id.clone(), *i))
        .collect();
    let placement = fleet.journal.placement();
    let affected: BTreeMap<String, usize> = placement
        .iter()
        .filter_map(|(unit, hosts)| {
            let host = hosts.iter().find(|h| killed.contains(h))?;
            Some((unit.clone(), *host))
        })
        .collect();
    let watcher = Recorder::start(servers.endpoints.clone(), None, keys::MACHINES).await?;
    let placements = Recorder::start(servers.endpoints.clone(), None, keys::PER_MACHINE).await?;
    let kill_at = Instant::now();
    let kill_wall = chrono_free_utc(std::time::SystemTime::now());
    for i in &killed {
        fleet.kill(*i).await;
    }
    let deadline = Instant::now() + limit;
    loop {
        // Never a copy of the whole placement here: see Journal::not_running.
        let missing = fleet.journal.not_running(affected.keys(), &fleet.dead);
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} moved units still not running after {limit:?}",
                affected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The first expiry of each killed host; other deletions are not ours.
    let mut expiries: HashMap<usize, Instant> = HashMap::new();
    let watch_resyncs = watcher.resyncs();
    for (id, at) in watcher.expiries() {
        if let Some(host) = killed_ids.get(&id) {
            expiries.entry(*host).or_insert(at);
        }
    }
    drop(watcher);
    let moved_at = first_starts(&fleet, Some(kill_at));
    let mut after_expiry = Vec::new();
    let mut done = Duration::ZERO;
    for (unit, host) in &affected {
        let Some(at) = moved_at.get(unit.as_str()) else {
            continue;
        };
        done = done.max(at.duration_since(kill_at));
        if let Some(expired) = expiries.get(host) {
            after_expiry.push(at.saturating_duration_since(*expired));
        }
    }
    let mut expiry_after_kill: Vec<Duration> = expiries
        .values()
        .map(|e| e.duration_since(kill_at))
        .collect();
    let failover_summary = summary(&mut after_expiry.clone());
    let moved = Failover {
        affected: &affected,
        killed_ids: &killed_ids,
        expiries: &expiries,
        moved_at: &moved_at,
        kill_at,
    };
    let timeline = failover_timeline(
        &placements,
        &fleet,
        &moved,
        args.keep.then(|| dir.join("failover-units.csv")).as_deref(),
    );
    drop(placements);
    println!(
        "{}",
        json!({"phase": "failover", "run": header, "killed_hosts": killed.len(),
            "moved_units": affected.len(),
            "expiries_seen": expiries.len(), "watch_resyncs": watch_resyncs,
            "kill_to_expiry": summary(&mut expiry_after_kill),
            "expiry_to_running": failover_summary,
            "kill_to_all_running_secs": done.as_secs_f64(),
            "killed_at_utc": kill_wall, "timeline": timeline})
    );

    // 5. checks.
    let every = Duration::from_millis(250);
    let settled = fleet_sim::settled(&client, &names, &fleet, limit, every).await;
    let ok = settled.is_ok();
    let last = settled.err().unwrap_or_default();
    let memory: Vec<_> = servers.pids().iter().map(|p| rss_mib(*p)).collect();
    let own = rss_mib(std::process::id());
    println!(
        "{}",
        json!({"phase": "end", "run": header, "checks_passed": ok,
            "violations": fleet.journal.violations().len(),
            "member_rss_mib": memory.iter().map(|m| m.0).collect::<Vec<_>>(),
            "member_peak_rss_mib": memory.iter().map(|m| m.1).collect::<Vec<_>>(),
            "sim_rss_mib": own.0, "sim_peak_rss_mib": own.1})
    );
    if let Some(path) = &args.plot {
        let api_samples: Vec<(String, Vec<Duration>)> = api.into_iter().collect();
        crate::plot::latencies(
            path,
            &format!("{} hosts, {} units", args.hosts, args.units),
            &[
                ("submit → running".to_string(), start_latency),
                ("lease expiry → running elsewhere".to_string(), after_expiry),
            ],
            &api_samples,
        )?;
        eprintln!("plot written to {}", path.display());
    }
    fleet.stop_all().await;
    if !ok {
        bail!("checks failed: {last}");
    }
    Ok(())
}

/// What the failover phase knows of the units it moved, for
/// [`failover_timeline`].
struct Failover<'a> {
    /// Each moved unit and the killed host it ran on.
    affected: &'a BTreeMap<String, usize>,
    /// The killed hosts' machine ids and host indexes.
    killed_ids: &'a BTreeMap<String, usize>,
    /// Each killed host's lease expiry, as the watch received it.
    expiries: &'a HashMap<usize, Instant>,
    /// Each moved unit's first start elsewhere.
    moved_at: &'a HashMap<String, Instant>,
    /// When the hosts were killed.
    kill_at: Instant,
}

/// `at` as UTC `HH:MM:SS.mmm`, to line the failover phase up with the
/// members' logs.
fn chrono_free_utc(at: std::time::SystemTime) -> String {
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// Where a moved unit's time from its old host's lease expiry to running
/// elsewhere goes, stage by stage, each a summary over the moved units:
/// expiry seen → its new proposal seen (the scheduler: wake-up, planning,
/// writing), proposal → the new host's claim seen (the agent's watch, its
/// pass and claim transaction), claim → the first start call at the fake
/// systemd, that call → active (the modelled start, and a refused call's
/// retry). Store events are as this process's watch of the machines'
/// prefixes received them; units a stage cannot be timed for are left out
/// of it. Also: the moved units whose start was refused at least once, and
/// their expiry → running; and how many proposals of the moved units live
/// hosts were given and had withdrawn (more than one per unit: the
/// scheduler moved a proposal nobody claimed within its bound). With
/// `rows_to`, writes each unit's times (ms after the kill) there as CSV.
fn failover_timeline(
    placements: &Recorder,
    fleet: &Fleet,
    failover: &Failover<'_>,
    rows_to: Option<&Path>,
) -> serde_json::Value {
    let Failover {
        affected,
        killed_ids,
        expiries,
        moved_at,
        kill_at,
    } = *failover;
    // unit → first proposal / claim on a live host, as received here.
    let mut proposed: HashMap<&str, Instant> = HashMap::new();
    let mut claimed: HashMap<&str, Instant> = HashMap::new();
    // Proposals of moved units written to live hosts, per unit, and those
    // withdrawn from live hosts (the scheduler moving an unclaimed one on).
    let mut proposals: HashMap<&str, usize> = HashMap::new();
    let mut withdrawn = 0usize;
    let seen = placements.seen();
    for s in &seen {
        if s.listed {
            continue;
        }
        if s.event.kind != flotilla::consensus::kv::EventKind::Put {
            if let Some(rest) = s.event.kv.key.strip_prefix(keys::PER_MACHINE)
                && let [machine, "p", unit] = rest.splitn(3, '/').collect::<Vec<_>>()[..]
                && !killed_ids.contains_key(machine)
                && affected.contains_key(unit)
            {
                withdrawn += 1;
            }
            continue;
        }
        let Some(rest) = s.event.kv.key.strip_prefix(keys::PER_MACHINE) else {
            continue;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(machine), Some(kind), Some(unit)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if killed_ids.contains_key(machine) || !affected.contains_key(unit) {
            continue;
        }
        if kind == "p" {
            *proposals.entry(unit).or_default() += 1;
        }
        let firsts = match kind {
            "p" => &mut proposed,
            "c" => &mut claimed,
            _ => continue,
        };
        firsts.entry(unit).or_insert(s.at);
    }
    let mut called: HashMap<String, Instant> = HashMap::new();
    let mut refused: HashMap<String, usize> = HashMap::new();
    for call in fleet.journal.start_calls() {
        if call.at < kill_at
            || fleet.dead.contains(&call.host)
            || !affected.contains_key(&call.unit)
        {
            continue;
        }
        if call.refused {
            *refused.entry(call.unit.clone()).or_default() += 1;
        }
        called.entry(call.unit).or_insert(call.at);
    }
    let between = |from: Option<&Instant>, to: Option<&Instant>| match (from, to) {
        (Some(a), Some(b)) => Some(b.saturating_duration_since(*a)),
        _ => None,
    };
    let mut stages: [Vec<Duration>; 5] = Default::default();
    let mut refused_running = Vec::new();
    let mut rows = String::from(
        "unit,old_host,expiry_ms,proposal_ms,claim_ms,start_call_ms,active_ms,refused\n",
    );
    let since_kill = |at: Option<&Instant>| {
        at.map_or(String::new(), |at| {
            format!("{:.1}", ms(at.saturating_duration_since(kill_at)))
        })
    };
    for (unit, host) in affected {
        let expired = expiries.get(host);
        rows.push_str(&format!(
            "{unit},{host},{},{},{},{},{},{}\n",
            since_kill(expired),
            since_kill(proposed.get(unit.as_str())),
            since_kill(claimed.get(unit.as_str())),
            since_kill(called.get(unit)),
            since_kill(moved_at.get(unit)),
            refused.get(unit).copied().unwrap_or(0)
        ));
        let times = [
            between(expired, proposed.get(unit.as_str())),
            between(proposed.get(unit.as_str()), claimed.get(unit.as_str())),
            between(claimed.get(unit.as_str()), called.get(unit)),
            between(called.get(unit), moved_at.get(unit)),
            between(Some(&kill_at), expired),
        ];
        for (stage, time) in stages.iter_mut().zip(times) {
            stage.extend(time);
        }
        if refused.contains_key(unit)
            && let Some(time) = between(expired, moved_at.get(unit))
        {
            refused_running.push(time);
        }
    }
    if let Some(path) = rows_to {
        if let Err(e) = std::fs::write(path, rows) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    let [to_proposal, to_claim, to_call, to_active, kill_to_expiry] = &mut stages;
    json!({
        "kill_to_expiry": summary(kill_to_expiry),
        "expiry_to_proposal": summary(to_proposal),
        "proposal_to_claim": summary(to_claim),
        "claim_to_start_call": summary(to_call),
        "start_call_to_active": summary(to_active),
        "proposals_written": proposals.values().sum::<usize>(),
        "units_proposed_more_than_once": proposals.values().filter(|n| **n > 1).count(),
        "most_proposals_of_a_unit": proposals.values().max().copied().unwrap_or(0),
        "proposals_withdrawn": withdrawn,
        "units_refused_once_or_more": refused.len(),
        "refused_calls": refused.values().sum::<usize>(),
        "refused_units_expiry_to_running": summary(&mut refused_running),
    })
}

/// How many machines and units with the most store changes the idle phase
/// names.
const TOP_WRITERS: usize = 5;

/// Member `i`'s applied Raft entries by kind, from its `/metrics` (empty if
/// it does not answer, or is a release without the counter).
async fn entry_kinds(servers: &Servers, i: usize) -> BTreeMap<String, u64> {
    match get_body(&servers.apis[i], &servers.api_token, "/metrics").await {
        Ok(text) => store_tally::entry_kinds(&text),
        Err(_) => BTreeMap::new(),
    }
}

/// Each unit's first start (after `since`, if given) in the journal.
fn first_starts(fleet: &Fleet, since: Option<Instant>) -> HashMap<String, Instant> {
    let mut first = HashMap::new();
    for event in fleet.journal.events() {
        if event.started && since.is_none_or(|s| event.at >= s) && !fleet.dead.contains(&event.host)
        {
            first.entry(event.unit).or_insert(event.at);
        }
    }
    first
}

/// The API paths timed while loaded: what `list-units` and `list-machines`
/// call (their first page).
const PROBED: [&str; 3] = ["/fleet/v1/units", "/fleet/v1/state", "/fleet/v1/machines"];

/// Runs [`probe_api`] on a thread of its own with its own runtime, so its
/// timings are the API's as a client sees them, not the wait for a turn on
/// the runtime that also drives the 1,000 simulated agents (its timers and
/// reads used to queue behind theirs).
fn spawn_probe(
    apis: Vec<String>,
    token: String,
    running: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::sync::oneshot::Receiver<Result<BTreeMap<String, Vec<Duration>>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let probed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow!("the API prober's runtime: {e}"))
            .map(|runtime| runtime.block_on(probe_api(apis, token, running)));
        let _ = tx.send(probed);
    });
    rx
}

/// GETs each of [`PROBED`] in turn, round-robin over the members, until
/// `running` turns false; returns each path's latencies.
async fn probe_api(
    apis: Vec<String>,
    token: String,
    running: Arc<std::sync::atomic::AtomicBool>,
) -> BTreeMap<String, Vec<Duration>> {
    let mut samples: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut i = 0usize;
    while running.load(std::sync::atomic::Ordering::SeqCst) {
        for path in PROBED {
            let api = &apis[i % apis.len()];
            i += 1;
            let start = Instant::now();
            if get(api, &token, path).await.is_ok() {
                samples
                    .entry(path.to_string())
                    .or_default()
                    .push(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples
}

/// How long the API is probed once the cluster is idle.
const IDLE_PROBE: Duration = Duration::from_secs(15);

/// Cumulative bucket counts of `flotilla_api_request_duration_seconds` for
/// the GETs of [`PROBED`], summed over the members, and of each of
/// [`STAGES`] per member (`stage@mN`): `key -> [(le, count)]`.
type Served = BTreeMap<String, Vec<(f64, u64)>>;

/// Each member's own timing of the probed routes, from its `/metrics`
/// (handler and JSON, not the wait for a connection to be accepted), and of
/// the stages of a read; empty for a member that does not answer.
async fn served(servers: &fleet_sim::Servers) -> Served {
    let mut total = Served::new();
    for (member, api) in servers.apis.iter().enumerate() {
        let Ok(text) = get_body(api, &servers.api_token, "/metrics").await else {
            continue;
        };
        for line in text.lines() {
            let Some((name, rest)) = line.split_once("_bucket{") else {
                continue;
            };
            let Some((labels, count)) = rest.split_once("} ") else {
                continue;
            };
            // A probed route (all members together), or one stage of a
            // read (per member: the leader's differ from the followers').
            let key = if name == "flotilla_api_request_duration_seconds" {
                PROBED
                    .iter()
                    .find(|p| labels.contains(&format!("method=\"GET\",route=\"{p}\"")))
                    .map(|p| p.to_string())
            } else {
                STAGES
                    .iter()
                    .find(|(metric, _)| *metric == name)
                    .map(|(_, stage)| format!("{stage}@m{member}"))
            };
            let le = labels
                .split("le=\"")
                .nth(1)
                .and_then(|l| l.strip_suffix('"'))
                .map(|l| {
                    if l == "+Inf" {
                        f64::INFINITY
                    } else {
                        l.parse().unwrap_or(f64::NAN)
                    }
                });
            let (Some(key), Some(le), Ok(count)) = (key, le, count.trim().parse::<u64>()) else {
                continue;
            };
            let buckets = total.entry(key).or_default();
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, n)) => *n += count,
                None => buckets.push((le, count)),
            }
        }
    }
    total
}

/// The stages of an API read each member times in its `/metrics`, by
/// histogram, with the short name [`in_process`] reports them under: the
/// barrier (a linearizable read of the store's revision) as the API saw it,
/// that read's parts on the Raft thread that served it (queued, ReadIndex
/// confirmed by a quorum, waiting for the apply), the wait for the API's copy
/// to reach the revision, and one Raft pass's fsync for scale.
const STAGES: [(&str, &str); 6] = [
    ("flotilla_api_barrier_duration_seconds", "api_barrier"),
    (
        "flotilla_raft_read_queue_duration_seconds",
        "raft_read_queue",
    ),
    (
        "flotilla_raft_read_confirm_duration_seconds",
        "raft_read_confirm",
    ),
    (
        "flotilla_raft_read_apply_duration_seconds",
        "raft_read_apply",
    ),
    ("flotilla_api_catch_up_duration_seconds", "api_catch_up"),
    ("flotilla_disk_fsync_duration_seconds", "fsync"),
];

/// The requests served between two [`served`] readings, per route: how many
/// and the bucket bounds (seconds) holding their median and 99th percentile.
fn in_process(before: &Served, after: &Served) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (route, buckets) in after {
        let earlier = |le: f64| {
            before
                .get(route)
                .and_then(|b| b.iter().find(|(l, _)| *l == le))
                .map_or(0, |(_, n)| *n)
        };
        let mut delta: Vec<(f64, u64)> = buckets
            .iter()
            .map(|(le, n)| (*le, n.saturating_sub(earlier(*le))))
            .collect();
        delta.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = delta.last().map_or(0, |(_, n)| *n);
        let bound = |q: f64| {
            let want = (q * n as f64).ceil() as u64;
            delta
                .iter()
                .find(|(_, c)| *c >= want.max(1))
                .map(|(le, _)| {
                    if le.is_finite() {
                        json!(le * 1e3)
                    } else {
                        json!("inf")
                    }
                })
        };
        out.insert(
            route.clone(),
            json!({"n": n, "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99)}),
        );
    }
    serde_json::Value::Object(out)
}

/// One HTTP/1.1 GET with the API's bearer `token`; Ok when the answer is 200.
async fn get(api: &str, token: &str, path: &str) -> Result<()> {
    get_body(api, token, path).await.map(|_| ())
}

/// One HTTP/1.1 GET with the API's bearer `token`: the whole response
/// (head and body) when the answer is 200.
async fn get_body(api: &str, token: &str, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(api).await?;
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(String::from_utf8_lossy(&response).into_owned())
    } else {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        )
    }
}
