//! `flotilla-bench schedule`: how fast units start and move in a 3-host lab
//! of real systemd hosts, driven through the `flotilla` CLI as a user would.
//!
//! For each (units, TTL) pair, on a fresh lab:
//! * start: one `flotilla start` of N trivial instances, until list-units
//!   reports all N active (systemd's own state, reported by the agents);
//! * the same-run peer: the same N units started straight through systemd on
//!   one host (files in /run/systemd/system, one daemon-reload, one
//!   `systemctl start` of all), which is the floor any scheduler sits on;
//! * failover: `lab kill` of a host that is not the Raft leader, until every
//!   unit it ran is active elsewhere. Bounded below by the TTL (a dead host
//!   is only noticed when its lease expires), so the figure minus the TTL is
//!   what the scheduler itself adds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::lab::Lab;

/// Options of `flotilla-bench schedule`.
#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// Unit counts to start.
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    pub units: Vec<usize>,
    /// Presence TTLs to measure failover at, in seconds.
    #[arg(long, value_delimiter = ',', default_value = "5,30")]
    pub ttl_secs: Vec<u64>,
    /// The flotilla binary [default: ../target/release/flotilla next to this crate].
    #[arg(long)]
    pub flotilla_bin: Option<PathBuf>,
    /// The Raft election timeout of the lab's servers, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub election_timeout_ms: u64,
}

/// One result line on stdout.
#[derive(Serialize, Debug)]
struct ScheduleLine {
    bench: &'static str,
    units: usize,
    ttl_secs: u64,
    /// `flotilla start` of all units until all are reported active.
    start_secs: f64,
    /// The same units started directly through systemd on one host.
    systemd_direct_secs: f64,
    /// start_secs / systemd_direct_secs.
    start_ratio_vs_systemd: f64,
    /// Units that ran on the killed host.
    moved_units: usize,
    /// From `lab kill` until all of them were active elsewhere.
    failover_secs: f64,
    /// failover_secs minus the TTL: what detection leaves to the scheduler.
    failover_after_ttl_secs: f64,
}

const UNIT: &str = "[Unit]\nDescription=flotilla-bench trivial unit %i\n[Service]\nExecStart=/bin/sleep infinity\n";

/// Runs every (units, ttl) pair and prints one JSON line each.
pub fn run(args: &ScheduleArgs) -> Result<()> {
    let bin = args.flotilla_bin.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flotilla")
    });
    for &ttl in &args.ttl_secs {
        for &units in &args.units {
            let line = one(&bin, units, ttl, args.election_timeout_ms)
                .with_context(|| format!("{units} units at TTL {ttl} s"))?;
            println!("{}", serde_json::to_string(&line)?);
        }
    }
    Ok(())
}

fn wait(limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let started = Instant::now();
    while !done()? {
        if started.elapsed() > limit {
            bail!("not done within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(started.elapsed())
}

fn one(bin: &Path, units: usize, ttl: u64, election_ms: u64) -> Result<ScheduleLine> {
    let lab = Lab::up(
        bin,
        &[
            "--hosts",
            "3",
            "--ttl",
            &ttl.to_string(),
            "--election-timeout-ms",
            &election_ms.to_string(),
        ],
    )?;
    let file = lab.dir().join("bench@.service");
    std::fs::write(&file, UNIT)?;
    lab.cli(&["submit", file.to_str().context("utf-8 path")?])?;
    let names: Vec<String> = (1..=units).map(|i| format!("bench@{i}.service")).collect();

    let started = Instant::now();
    let mut args = vec!["start"];
    args.extend(names.iter().map(String::as_str));
    lab.cli(&args)?;
    wait(
        Duration::from_secs(300),
        || Ok(lab.active()?.len() == units),
    )?;
    let start_secs = started.elapsed().as_secs_f64();

    // The peer: the same units straight through systemd on h1.
    let script = format!(
        "for i in $(seq 1 {units}); do printf '{}' > /run/systemd/system/direct@$i.service; done; \
         systemctl daemon-reload",
        UNIT.replace('\n', "\\n").replace('%', "%%")
    );
    lab.exec("h1", &["sh", "-c", &script])?;
    let direct: Vec<String> = (1..=units).map(|i| format!("direct@{i}.service")).collect();
    let started = Instant::now();
    let mut cmd = vec!["systemctl", "start"];
    cmd.extend(direct.iter().map(String::as_str));
    lab.exec("h1", &cmd)?;
    let systemd_direct_secs = started.elapsed().as_secs_f64();

    // Failover: kill a host that is not the leader.
    let leader = lab.leader()?;
    let victim = lab
        .up
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .find(|h| *h != leader)
        .context("a follower")?;
    let moving: Vec<String> = lab
        .active()?
        .into_iter()
        .filter(|(_, host)| *host == victim)
        .map(|(unit, _)| unit)
        .collect();
    let killed = Instant::now();
    lab.lab(&["kill", &victim])?;
    wait(Duration::from_secs(ttl * 3 + 60), || {
        let active = lab.active()?;
        Ok(moving.iter().all(|u| {
            active
                .iter()
                .any(|(unit, host)| unit == u && *host != victim)
        }))
    })?;
    let failover_secs = killed.elapsed().as_secs_f64();
    Ok(ScheduleLine {
        bench: "schedule",
        units,
        ttl_secs: ttl,
        start_secs,
        systemd_direct_secs,
        start_ratio_vs_systemd: start_secs / systemd_direct_secs,
        moved_units: moving.len(),
        failover_secs,
        failover_after_ttl_secs: failover_secs - ttl as f64,
    })
}
