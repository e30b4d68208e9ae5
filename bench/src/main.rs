//! `flotilla-bench`: measures write throughput and latency of flotilla's Raft
//! KV store and of etcd, in the same run, on the same disk, through native
//! clients driven by the same closed-loop load driver.
//!
//! Output: one JSON line per (target, clients) result on stdout, and a human
//! table on stderr at the end. See README.md.
//!
//! `flotilla-bench schedule` measures the scheduler instead: unit start and
//! failover times in a lab of real systemd hosts (see `schedule.rs`).
//!
//! `flotilla-bench sim` measures flotilla at scale: thousands of production
//! agents over a modelled systemd against a real 3-member cluster (see
//! `sim.rs`); `flotilla-bench idle-faults` counts false lease expiries and
//! unit moves of an idle simulated fleet while the leader is killed twice
//! and one member is CPU-starved (see `idle_faults.rs`).
//!
//! `flotilla-bench lab-failover` measures the presence TTL as users see it:
//! kill → units active elsewhere in a lab of real systemd hosts at default
//! settings, for a follower member's host and the leader's (see
//! `lab_failover.rs`). It and `schedule` drive their labs through `lab.rs`;
//! `store_watch.rs` is the one store watch the benches time events with.

mod driver;
mod etcd;
#[path = "../../tests/support/fleet_sim.rs"]
mod fleet_sim;
mod flotilla_target;
mod idle_faults;
mod lab;
mod lab_failover;
mod plot;
mod schedule;
mod sim;
mod store_memory;
mod store_tally;
mod store_watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::driver::{KvTarget, LoadReport, LoadSpec};
use crate::etcd::{EtcdCluster, EtcdTarget};
use crate::fleet_sim::Servers;
use crate::flotilla_target::FlotillaTarget;

/// Command line of the benchmark binary.
#[derive(Parser, Debug)]
#[command(name = "flotilla-bench", version, about)]
struct Cli {
    /// What to benchmark.
    #[command(subcommand)]
    command: Command,
}

/// The benchmarks this binary knows.
#[derive(Subcommand, Debug)]
enum Command {
    /// Put throughput and latency of 3-member clusters on loopback.
    Kv(KvArgs),
    /// Start and failover times of units in a 3-host lab (root, Debian 12).
    Schedule(schedule::ScheduleArgs),
    /// Many simulated hosts (the real agent over a modelled systemd) against
    /// a real 3-member cluster: placement, API, idle and failover at scale.
    Sim(sim::SimArgs),
    /// The false-positive test: a simulated fleet idle while the Raft leader
    /// is killed twice and one member is CPU-starved; counts lease expiries
    /// and unit moves.
    IdleFaults(idle_faults::IdleFaultsArgs),
    /// Kill → units active elsewhere in a lab of real systemd hosts at
    /// default settings, for a follower member's host and the leader's
    /// (root, Debian 12).
    LabFailover(lab_failover::LabFailoverArgs),
    /// Where a member's state machine keeps its bytes: decodes a backup
    /// (`flotilla snapshot save`) and measures each part's heap.
    StoreMemory(store_memory::StoreMemoryArgs),
}

/// Options of `flotilla-bench kv`.
#[derive(clap::Args, Debug)]
struct KvArgs {
    /// Stores to benchmark, in order; each gets a fresh 3-member cluster
    /// (`etcd-leader`: etcd with every client connected to its leader only).
    #[arg(long, value_delimiter = ',', default_value = "etcd")]
    target: Vec<Target>,
    /// Concurrent clients (one connection each) to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Length of each measured window, in seconds.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Unmeasured warm-up before each window, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Size of every written value, in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Directory under which each cluster's data dirs are created (and removed
    /// afterwards). Every target writes here, so all use the same disk; it
    /// must not be a tmpfs, or fsync costs nothing.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// The etcd server binary (Debian package `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// The flotilla binary [default: ../target/release/flotilla next to this crate].
    #[arg(long)]
    flotilla_bin: Option<PathBuf>,
}

/// A store the benchmark can start and load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// flotilla's embedded Raft KV store.
    Flotilla,
    /// etcd from Debian's `etcd-server`, via its gRPC API, each client
    /// spreading its requests over every member (followers forward puts).
    Etcd,
    /// The same etcd with every client pinned to the leader: etcd's best
    /// case, so a ratio against it is against etcd at its best.
    EtcdLeader,
}

/// A started cluster and the target that writes to it. Fields drop in order:
/// the target's connections close before the cluster is killed.
struct Started {
    /// What the driver loads.
    target: Box<dyn KvTarget>,
    /// Keeps the cluster's processes alive; dropping it stops them.
    _cluster: Box<dyn Send>,
}

/// One result as printed on stdout: a single JSON line.
#[derive(Serialize, Debug)]
struct ResultLine {
    /// `"etcd"`, `"etcd-leader"` or `"flotilla"`.
    target: &'static str,
    /// Concurrent clients.
    clients: usize,
    /// Bytes per value.
    value_size: usize,
    /// Measured window, in seconds.
    duration_secs: u64,
    /// Puts acknowledged in the window.
    writes: u64,
    /// Acknowledged puts per second.
    writes_per_sec: f64,
    /// Median put latency, in milliseconds.
    p50_ms: f64,
    /// 99th-percentile put latency, in milliseconds.
    p99_ms: f64,
    /// Largest put latency, in milliseconds.
    max_ms: f64,
    /// Failed or timed-out puts in the window.
    errors: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // The simulated agents run the production agent code, which logs through
    // `tracing`: `RUST_LOG=flotilla=info` shows why a host lost its lease.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Kv(args) => kv(args).await,
        Command::Schedule(args) => tokio::task::block_in_place(|| schedule::run(&args)),
        Command::Sim(args) => sim::run(args).await,
        Command::IdleFaults(args) => idle_faults::run(args).await,
        Command::LabFailover(args) => lab_failover::run(args).await,
        Command::StoreMemory(args) => store_memory::run(args),
    }
}

/// `flotilla-bench kv`: every target at every client count, one cluster per
/// target, all data under one temporary directory that is removed at the end
/// (and kept, with the clusters' logs, if the run fails).
async fn kv(args: KvArgs) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("flotilla-bench-")
        .tempdir_in(&args.work_dir)
        .with_context(|| format!("creating a temp dir in {}", args.work_dir.display()))?;
    eprintln!("data under {}", work.path().display());
    match kv_in(&args, work.path()).await {
        Ok(lines) => {
            print_table(&lines);
            Ok(())
        }
        Err(err) => {
            let kept = work.keep();
            eprintln!("kept {} for inspection", kept.display());
            Err(err)
        }
    }
}

/// The body of [`kv`], with all data under `dir`.
async fn kv_in(args: &KvArgs, dir: &Path) -> Result<Vec<ResultLine>> {
    let mut lines = Vec::new();
    for &target in &args.target {
        let name = target_name(target);
        eprintln!("{name}: starting a 3-member cluster");
        let started = start(target, args, &dir.join(name)).await?;
        for &clients in &args.clients {
            let spec = LoadSpec {
                clients,
                warmup: Duration::from_secs(args.warmup_secs),
                duration: Duration::from_secs(args.duration_secs),
                value_size: args.value_size,
                op_timeout: Duration::from_secs(10),
                key_prefix: format!("bench/{clients}c"),
            };
            eprintln!("{name}: {clients} clients for {}s", args.duration_secs);
            let report = driver::run(started.target.as_ref(), &spec).await?;
            let line = result_line(name, args, &report);
            println!("{}", serde_json::to_string(&line)?);
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Starts a fresh cluster of `target` with its data under `dir`.
async fn start(target: Target, args: &KvArgs, dir: &Path) -> Result<Started> {
    match target {
        Target::Etcd | Target::EtcdLeader => {
            let cluster = EtcdCluster::start(&args.etcd_bin, dir).await?;
            let target = if target == Target::EtcdLeader {
                EtcdTarget::pinned_to_leader(cluster.endpoints()).await?
            } else {
                EtcdTarget::new(cluster.endpoints())
            };
            eprintln!("etcd: clients connect to {:?}", target.endpoints());
            Ok(Started {
                target: Box::new(target),
                _cluster: Box::new(cluster),
            })
        }
        Target::Flotilla => {
            let bin = args
                .flotilla_bin
                .clone()
                .unwrap_or_else(flotilla_target::default_binary);
            let cluster = Servers::start(&bin, dir, false, &[])
                .await
                .map_err(anyhow::Error::msg)?;
            let target = FlotillaTarget::new(cluster.endpoints.clone());
            Ok(Started {
                target: Box::new(target),
                _cluster: Box::new(cluster),
            })
        }
    }
}

/// The name a target goes by in output and directory names.
fn target_name(target: Target) -> &'static str {
    match target {
        Target::Flotilla => "flotilla",
        Target::Etcd => "etcd",
        Target::EtcdLeader => "etcd-leader",
    }
}

/// Converts a driver report into the printed shape.
fn result_line(target: &'static str, args: &KvArgs, report: &LoadReport) -> ResultLine {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    ResultLine {
        target,
        clients: report.clients,
        value_size: args.value_size,
        duration_secs: args.duration_secs,
        writes: report.writes,
        writes_per_sec: (report.writes_per_sec * 10.0).round() / 10.0,
        p50_ms: ms(report.p50),
        p99_ms: ms(report.p99),
        max_ms: ms(report.max),
        errors: report.errors,
    }
}

/// Prints all results as an aligned table on stderr.
fn print_table(lines: &[ResultLine]) {
    eprintln!(
        "\n{:<11} {:>7} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "target", "clients", "writes/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for l in lines {
        eprintln!(
            "{:<11} {:>7} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>7}",
            l.target, l.clients, l.writes_per_sec, l.p50_ms, l.p99_ms, l.max_ms, l.errors
        );
    }
}
