//! The lab: N hosts running real systemd as PID 1 on one machine, in one command.
//!
//! Every end-to-end claim about flotilla is proven here, and a newcomer sees a
//! cluster work without renting VMs. Each host is a PID+mount+UTS+net+IPC
//! namespace whose root is an overlay over `/`; systemd boots in it with its own
//! machine-id, hostname, cgroup, ssh host keys and Raft data, and the hosts meet
//! on a bridge in a network namespace the lab made. The shape, from the outside:
//!
//! ```text
//! flotilla lab up ──spawns──► flotilla lab supervise (detached, one per lab)
//!                              ├─ sleep infinity      holds the switch netns: bridge + uplink
//!                              └─ unshare ... ► flotilla lab init-host ► exec systemd (per host)
//! root netns: flup<id> 10.X.Y.254 ══veth══ uplink ─┐
//!                                     bridge flbr<id> ├─ h1b1 ══veth══ eth0 10.X.Y.1 (host h1)
//!                                                   └─ h2b1 ══veth══ eth0 10.X.Y.2 (host h2)
//! ```
//!
//! * [`dir`]: where a lab keeps its files, and the names derived from its directory.
//! * [`state`]: the lab's persisted state, `DIR/lab.json`, and the JSON the CLI prints.
//! * [`shell`]: running the system tools the lab drives (`ip`, `mount`, `nsenter`, `kill`).
//! * [`doctor`]: every capability the lab needs, checked; Debian packages installed.
//! * [`cgroup`]: one cgroup per host, and killing everything in a lab's cgroups.
//! * [`net`]: the switch namespace, its bridge, the uplink and each host's link.
//! * [`disk`]: a host's disk, the overlay's upper dir, prepared before its first boot.
//! * [`init`]: what runs as PID 1 inside a new host until it execs systemd.
//! * [`host`]: booting a host from the supervisor's side, and entering a running one.
//! * [`supervisor`]: the long-running process that owns the hosts and reboots them.
//! * [`control`]: the one-line protocol between the CLI and the supervisor.
//! * [`up`] and [`down`]: creating a lab until its cluster is ready, and removing every trace.

pub mod cgroup;
pub mod control;
pub mod dir;
pub mod disk;
pub mod doctor;
pub mod down;
pub mod host;
pub mod init;
pub mod net;
pub mod shell;
pub mod state;
pub mod supervisor;
pub mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use dir::LabDir;
use state::LabState;

/// `flotilla lab ...`: boot and drive a lab of real-systemd hosts (root, Debian 12).
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Boot N hosts, wait for a Raft leader, print one JSON object describing the lab.
    Up(UpArgs),
    /// Tear the lab down: no process, mount, namespace, cgroup or interface is left.
    Down(DownArgs),
    /// Print the hosts as JSON: up or down, pid, per-boot id.
    Status(LabDirArg),
    /// Check every capability the lab needs; fails naming what is missing.
    Doctor(DoctorArgs),
    /// Run a command inside a host; its exit code is passed through.
    Exec(ExecArgs),
    /// Hard power-off: SIGKILL the host's PID 1.
    Kill(HostArgs),
    /// Boot a host that is down, with the same disk and machine-id.
    Start(HostArgs),
    /// `systemctl reboot` inside the host; the lab boots it again (new per-boot id).
    Reboot(HostArgs),
    /// Cut the host's network link (the host keeps running).
    Partition(HostArgs),
    /// Restore the host's network link.
    Heal(HostArgs),
    /// The lab's supervisor (started by `lab up`; not for direct use).
    #[command(hide = true)]
    Supervise(LabDirArg),
    /// PID 1 of a new host until it execs systemd (started by the supervisor).
    #[command(hide = true)]
    InitHost(InitHostArgs),
}

/// The lab's directory, shared by every verb.
#[derive(Debug, Clone, Args)]
pub struct LabDirArg {
    /// The lab's directory: its state, disks, keys and logs. Several labs may run at
    /// once in different directories.
    #[arg(
        long,
        env = "FLOTILLA_LAB_DIR",
        value_name = "DIR",
        default_value = "/var/lib/flotilla-lab"
    )]
    pub dir: PathBuf,
}

/// `flotilla lab up`
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of hosts (h1..hN).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=250))]
    pub hosts: u16,
    /// Number of Raft servers, the first K hosts [default: min(N, 3)].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=250))]
    pub servers: Option<u16>,
    /// Agent presence TTL in seconds (every host's ttl_secs).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub ttl: u64,
    /// Raft election timeout of the servers, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub election_timeout_ms: u64,
    /// How long to wait for the cluster to become ready before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 90)]
    pub timeout: u64,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// `flotilla lab down`
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Keep the hosts' disks (overlay upper dirs, journals) for inspection.
    #[arg(long)]
    pub keep_disks: bool,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// `flotilla lab doctor`
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// First install the missing Debian packages, as `lab up` does.
    #[arg(long)]
    pub install: bool,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// A verb on one host.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The host's name (h1, h2, ...).
    pub host: String,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// `flotilla lab exec HOST -- CMD...`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The host's name (h1, h2, ...).
    pub host: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// `flotilla lab init-host` (hidden).
#[derive(Debug, Args)]
pub struct InitHostArgs {
    /// The host's name.
    #[arg(long)]
    pub host: String,
    /// The id of this boot, written to /run/flotilla/boot_id inside the host.
    #[arg(long)]
    pub boot_id: String,
    #[command(flatten)]
    pub lab: LabDirArg,
}

/// Runs one `flotilla lab` verb.
pub fn run(command: LabCommand) -> Result<ExitCode> {
    match command {
        LabCommand::Up(args) => up::run(&args),
        LabCommand::Down(args) => {
            down::run(&LabDir::for_teardown(&args.lab.dir)?, args.keep_disks)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status(args) => {
            let dir = LabDir::existing(&args.dir)?;
            let status = state::Status::read(&dir)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Doctor(args) => {
            if args.install {
                doctor::ensure_packages()?;
            }
            doctor::run(&args.lab.dir)
        }
        LabCommand::Exec(args) => {
            let dir = LabDir::existing(&args.lab.dir)?;
            let lab = LabState::load(&dir)?;
            let pid = running_pid(&dir, &lab, &args.host)?;
            host::exec(pid, &args.command)
        }
        LabCommand::Kill(args) => host_verb(&args, control::Request::Kill),
        LabCommand::Start(args) => host_verb(&args, control::Request::Start),
        LabCommand::Reboot(args) => host_verb(&args, control::Request::Reboot),
        LabCommand::Partition(args) => host_verb(&args, control::Request::Partition),
        LabCommand::Heal(args) => host_verb(&args, control::Request::Heal),
        LabCommand::Supervise(args) => supervisor::run(&LabDir::existing(&args.dir)?),
        LabCommand::InitHost(args) => {
            init::run(&LabDir::existing(&args.lab.dir)?, &args.host, &args.boot_id)
        }
    }
}

/// Asks the supervisor to act on one host, then, for verbs that boot it, waits
/// until its systemd has finished starting up.
fn host_verb(args: &HostArgs, make: fn(String) -> control::Request) -> Result<ExitCode> {
    let dir = LabDir::existing(&args.lab.dir)?;
    let lab = LabState::load(&dir)?;
    if lab.host(&args.host).is_none() {
        bail!(
            "no host {:?} in the lab at {} (hosts: {})",
            args.host,
            dir.path().display(),
            lab.host_names().join(" ")
        );
    }
    let request = make(args.host.clone());
    let boots = matches!(
        request,
        control::Request::Start(_) | control::Request::Reboot(_)
    );
    let reply = control::send(&dir, &request)?;
    if boots {
        let lab = LabState::load(&dir)?;
        let pid = running_pid(&dir, &lab, &args.host)?;
        host::wait_booted(&args.host, pid, std::time::Duration::from_secs(60))
            .with_context(|| format!("{} was booted but did not finish starting", args.host))?;
    }
    say(&format!("{}: {reply}", args.host));
    Ok(ExitCode::SUCCESS)
}

/// The outer pid of a running host's PID 1, or an error saying how to start it.
fn running_pid(dir: &LabDir, lab: &LabState, name: &str) -> Result<u32> {
    let host = lab.host(name).with_context(|| {
        format!(
            "no host {name:?} in the lab at {} (hosts: {})",
            dir.path().display(),
            lab.host_names().join(" ")
        )
    })?;
    match host.pid.filter(|pid| host::is_running(*pid)) {
        Some(pid) => Ok(pid),
        None => bail!(
            "{name} is down; boot it with: flotilla lab start {name} --dir {}",
            dir.path().display()
        ),
    }
}

/// The lab's progress notes and warnings, on stderr so that stdout stays
/// machine-readable (`lab up` prints exactly one JSON object there). Errors are
/// not printed here: they are returned to `main`.
pub fn say(message: &str) {
    eprintln!("lab: {message}");
}
