//! `flotilla-bench idle-faults`: the false-positive test of issue 14.
//!
//! The simulator's fleet (`--hosts` production agents over a modelled
//! systemd, a real 3-member cluster) starts `--units` units, then stays idle
//! for `--idle-secs` while the Raft leader is killed (SIGKILL) and restarted
//! on its data twice, at a third and at two thirds of the window, and one
//! member (a follower when the window opens) is held to `--starve-pct` of one
//! core by a cgroup (v1 `cpu` controller's CFS quota) for the whole window.
//! Nothing is killed on the hosts' side, so every lease expiry (a presence
//! record deleted by the store) and every start or stop of a unit is a false
//! positive. Prints one JSON line; it is a measurement, not a test: it exits
//! non-zero only when the fleet cannot be set up or the final checks fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flotilla::consensus::client::{Client, member_status};
use flotilla::registry::keys;
use serde_json::json;

use crate::fleet_sim::{self, Fleet, Model, Servers};
use crate::store_watch::Recorder;

/// Options of `flotilla-bench idle-faults`.
#[derive(clap::Args, Debug)]
pub struct IdleFaultsArgs {
    /// Simulated hosts (agents in this process).
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    /// Units started before the idle window.
    #[arg(long, default_value_t = 3000)]
    pub units: usize,
    /// The agents' presence TTL, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl_secs: u64,
    /// Length of the idle window, in seconds.
    #[arg(long, default_value_t = 600)]
    pub idle_secs: u64,
    /// How long a killed leader stays down before it is started again, in
    /// seconds.
    #[arg(long, default_value_t = 10)]
    pub down_secs: u64,
    /// The CPU the starved member may use, in percent of one core.
    #[arg(long, default_value_t = 20)]
    pub starve_pct: u64,
    /// How long the start of the units may take, in seconds.
    #[arg(long, default_value_t = 600)]
    pub start_timeout_secs: u64,
    /// Where the members' data and the hosts' files go (removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
    /// The flotilla binary [default: ../target/release/flotilla next to this crate].
    #[arg(long)]
    pub flotilla_bin: Option<PathBuf>,
}

/// Runs the test with its files under a fresh directory in `--work-dir`.
pub async fn run(args: IdleFaultsArgs) -> Result<()> {
    let args = &args;
    let logs = "member logs servers/m0.log..m2.log";
    crate::sim::in_fresh_dir(
        &args.work_dir,
        "flotilla-idle-",
        logs,
        false,
        |dir| async move { run_in(args, &dir).await },
    )
    .await
}

/// A cgroup (v1 `cpu` controller) that holds one process to a share of a
/// core; removed on drop (its process moved back to the root group).
struct Starved {
    dir: PathBuf,
}

impl Starved {
    /// Creates the group with a quota of `pct` percent of one core.
    fn new(pct: u64) -> Result<Starved> {
        let root = Path::new("/sys/fs/cgroup/cpu");
        let dir = root.join(format!("flotilla-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "creating {} (needs root and the cgroup v1 cpu controller)",
                dir.display()
            )
        })?;
        let period = 100_000u64;
        std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(
            dir.join("cpu.cfs_quota_us"),
            (period * pct.max(1) / 100).to_string(),
        )?;
        Ok(Starved { dir })
    }

    /// Moves process `pid` (all its threads) into the group.
    fn hold(&self, pid: u32) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.dir.display()))
    }

    /// How long the group's processes were throttled, in seconds.
    fn throttled_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        stat.lines()
            .find_map(|l| l.strip_prefix("throttled_time "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0.0, |ns| (ns / 1e7).round() / 100.0)
    }
}

impl Drop for Starved {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The member that leads now, asking the members that run.
async fn leader(servers: &Servers) -> Option<usize> {
    for (i, endpoint) in servers.endpoints.iter().enumerate() {
        if servers.pids()[i] == 0 {
            continue;
        }
        if let Ok(status) = member_status(endpoint, Duration::from_secs(2)).await
            && status.leader == status.id
            && status.id != 0
        {
            return Some(i);
        }
    }
    None
}

async fn run_in(args: &IdleFaultsArgs, dir: &Path) -> Result<()> {
    let bin = args
        .flotilla_bin
        .clone()
        .unwrap_or_else(crate::flotilla_target::default_binary);
    let mut servers = Servers::start(&bin, &dir.join("servers"), true, &[])
        .await
        .map_err(|e| anyhow!(e))?;
    let client = Client::connect(&servers.endpoints).await?;
    let ttl = Duration::from_secs(args.ttl_secs);
    let mut fleet = Fleet::start(
        args.hosts,
        &servers.endpoints,
        ttl,
        Model::default(),
        &dir.join("hosts"),
    );
    let limit = Duration::from_secs(args.start_timeout_secs);
    let started = Instant::now();
    while client.range(keys::MACHINES, true, false).await?.0.len() < args.hosts {
        if started.elapsed() > limit {
            bail!("not every host joined within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names = fleet_sim::unit_names(args.units, args.hosts);
    fleet_sim::submit_all(&client, &names, 1000)
        .await
        .map_err(|e| anyhow!(e))?;
    if !fleet_sim::wait_running(&fleet.journal, args.units, limit).await {
        bail!(
            "only {} of {} units ran within {limit:?}",
            fleet.journal.running_units(),
            args.units
        );
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} units run after {setup_secs:.1} s; idle from now",
        args.units
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The idle window.
    let watcher = Recorder::start(servers.endpoints.clone(), None, keys::MACHINES).await?;
    let events_before = fleet.journal.events().len();
    let first_leader = leader(&servers).await.context("no member leads")?;
    let starved_member = (first_leader + 1) % fleet_sim::MEMBERS;
    let starved = Starved::new(args.starve_pct)?;
    starved.hold(servers.pids()[starved_member])?;
    let window = Instant::now();
    let mut kills = Vec::new();
    for k in 1..=2u32 {
        let at = window + Duration::from_secs(args.idle_secs) * k / 3;
        tokio::time::sleep_until(at.into()).await;
        let Some(victim) = leader(&servers).await else {
            kills.push(
                json!({"at_secs": window.elapsed().as_secs_f64(), "killed": null,
                "note": "no member led"}),
            );
            continue;
        };
        let killed_at = Instant::now();
        servers.kill(victim);
        let mut elected = None;
        while killed_at.elapsed() < Duration::from_secs(args.down_secs) {
            if elected.is_none()
                && let Some(new) = leader(&servers).await
            {
                elected = Some((new, killed_at.elapsed().as_secs_f64()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        servers.restart(victim).map_err(|e| anyhow!(e))?;
        if victim == starved_member {
            starved.hold(servers.pids()[victim])?;
        }
        eprintln!("killed leader m{victim}; new leader {elected:?}; restarted");
        kills.push(
            json!({"at_secs": killed_at.duration_since(window).as_secs_f64(),
            "killed": format!("m{victim}"),
            "new_leader": elected.map(|(m, _)| format!("m{m}")),
            "new_leader_after_secs": elected.map(|(_, s)| s)}),
        );
    }
    tokio::time::sleep_until((window + Duration::from_secs(args.idle_secs)).into()).await;
    let throttled = starved.throttled_secs();
    drop(starved);
    let window_secs = window.elapsed().as_secs_f64();
    // Late deletions of the window still arrive within a TTL.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expired = watcher.expiries();
    let watch_resyncs = watcher.resyncs();
    let expiries_listed = watcher.expiries_found_by_listing();
    drop(watcher);
    let events = fleet.journal.events();
    let during = &events[events_before.min(events.len())..];
    let starts = during.iter().filter(|e| e.started).count();
    let stops = during.len() - starts;
    let mut expired_hosts: BTreeMap<String, usize> = BTreeMap::new();
    for (id, _) in &expired {
        *expired_hosts.entry(id.clone()).or_default() += 1;
    }
    let first_expiry = expired
        .iter()
        .map(|(_, at)| at.saturating_duration_since(window).as_secs_f64())
        .fold(f64::INFINITY, f64::min);

    // Checks: every unit runs once, on a live host, and the store says so.
    let (limit, every) = (Duration::from_secs(120), Duration::from_millis(500));
    let settled = fleet_sim::settled(&client, &names, &fleet, limit, every).await;
    let ok = settled.is_ok();
    let last = settled.err().unwrap_or_default();
    println!(
        "{}",
        json!({"phase": "idle_faults", "hosts": args.hosts, "units": args.units,
            "ttl_secs": args.ttl_secs, "idle_secs": window_secs, "setup_secs": setup_secs,
            "starved_member": format!("m{starved_member}"), "starve_pct": args.starve_pct,
            "starved_throttled_secs": throttled,
            "leader_kills": kills, "down_secs": args.down_secs,
            "lease_expiries": expired.len(), "hosts_expired": expired_hosts.len(),
            "watch_resyncs": watch_resyncs, "expiries_found_by_listing": expiries_listed,
            "first_expiry_secs": if expired.is_empty() { None } else { Some(first_expiry) },
            "unit_starts": starts, "unit_stops": stops,
            "violations": fleet.journal.violations().len(), "checks_passed": ok})
    );
    fleet.stop_all().await;
    if !ok {
        bail!("checks failed after the idle window: {last}");
    }
    Ok(())
}
