//! `lab up`: from nothing to a ready cluster, then one JSON object on stdout.
//!
//! Steps: install missing packages; run the doctor's checks; clean up whatever a
//! previous lab in the same directory left; choose a subnet; write the shared
//! files and every host's disk (in parallel); start the supervisor detached and
//! wait until it has booted every host; then wait until every host's systemd has
//! finished starting and every Raft server agrees on one leader. If anything
//! fails, the lab is torn down again (logs and disks kept) and the error says
//! where to look.

use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::UpArgs;
use super::control::{self, Request};
use super::dir::LabDir;
use super::disk;
use super::doctor;
use super::down;
use super::host;
use super::net;
use super::shell;
use super::state::{CLIENT_PORT, LabState, UpHost, UpOutput};

/// Runs `lab up`.
pub fn run(args: &UpArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let hosts = usize::from(args.hosts);
    let servers = args.servers.map_or(hosts.min(3), usize::from);
    if servers > hosts {
        bail!("--servers {servers} is more than --hosts {hosts}");
    }
    doctor::ensure_packages()?;
    let dir = LabDir::create(&args.lab.dir)?;
    doctor::require(dir.path())?;
    if let Ok(old) = LabState::load(&dir)
        && old.supervisor_pid.is_some_and(|pid| dir.is_supervisor(pid))
    {
        bail!(
            "a lab of {} hosts is already running in {}; tear it down first: flotilla lab down --dir {}",
            old.hosts.len(),
            dir.path().display(),
            dir.path().display()
        );
    }
    // A lab that died without `lab down` may have left processes or cgroups.
    down::teardown(&dir)?;

    let subnet = net::choose_subnet(&dir)?;
    let mut lab = LabState::new(
        &dir,
        subnet,
        hosts,
        servers,
        args.ttl,
        args.election_timeout_ms,
    );
    for host in &mut lab.hosts {
        host.machine_id = shell::random_hex()?;
    }
    lab.api_token = shell::random_hex()?;
    // A new lab starts with new disks and logs (a smaller one would otherwise
    // inherit the old hN beyond its own).
    for old in [dir.hosts(), dir.logs()] {
        if old.exists() {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove {}", old.display()))?;
        }
    }
    let exe = std::env::current_exe().context("cannot find the flotilla binary")?;
    disk::prepare_lab(&dir, &exe)?;
    let admin = lab_ca(&dir)?;
    std::thread::scope(|scope| {
        let jobs: Vec<_> = lab
            .hosts
            .iter()
            .map(|host| scope.spawn(|| disk::prepare_host(&dir, &lab, host)))
            .collect();
        jobs.into_iter()
            .try_for_each(|job| job.join().expect("preparing a disk panicked"))
    })?;
    let known_hosts: String = lab
        .hosts
        .iter()
        .map(|host| disk::known_hosts_lines(&dir, host))
        .collect::<Result<_>>()?;
    std::fs::write(dir.known_hosts(), known_hosts)
        .with_context(|| format!("cannot write {}", dir.known_hosts().display()))?;
    lab.save(&dir)?;
    let prepared = started.elapsed();

    let result = boot_and_wait(&dir, deadline);
    let lab = match result {
        Ok(lab) => lab,
        Err(err) => {
            let cleanup = down::teardown(&dir).err();
            down::remove_files(&dir, true);
            let mut err = err.context(format!(
                "lab up failed and tore the lab down; logs are in {}, the hosts' disks \
                 (and journals) in {} until the next `lab up` or `lab down` there",
                dir.logs().display(),
                dir.hosts().display()
            ));
            if let Some(cleanup) = cleanup {
                err = err.context(format!("and tearing it down failed too: {cleanup:#}"));
            }
            return Err(err);
        }
    };

    let output = UpOutput {
        endpoint: lab.api_endpoint(),
        api_token: lab.api_token.clone(),
        store_endpoint: lab.endpoint(),
        known_hosts: dir.known_hosts(),
        hosts: lab
            .hosts
            .iter()
            .map(|h| UpHost {
                name: h.name.clone(),
                machine_id: h.machine_id.clone(),
                ip: h.ip,
                pid: h.pid.unwrap_or_default(),
            })
            .collect(),
        ssh_key: dir.ssh_key(),
        tls_ca: admin.ca.clone(),
        tls_cert: admin.cert.clone(),
        tls_key: admin.key.clone(),
        dir: dir.path().to_path_buf(),
    };
    println!("{}", serde_json::to_string(&output)?);
    let exe = std::env::current_exe().context("cannot find the flotilla binary")?;
    let first = &lab.hosts[0];
    super::say(&format!(
        "{hosts} hosts ready in {:.1} s (disks {:.1} s), Raft servers: {}. To use it from \
         this shell (the flotilla binary is {}):\n\n{}\n\nthen try:\n  \
         flotilla list-machines\n  \
         flotilla ssh {} hostname\n  \
         flotilla lab exec {} -- systemctl status flotilla\n  \
         flotilla lab down",
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        lab.hosts
            .iter()
            .filter(|h| h.server)
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        exe.display(),
        env_lines(&lab, &dir, &exe),
        first.name,
        first.name,
    ));
    Ok(ExitCode::SUCCESS)
}

/// Makes the lab's cluster CA (a new one for every lab) and an admin
/// certificate for the outer machine's store verbs, which this process
/// presents too (it waits for the cluster through the store).
fn lab_ca(dir: &LabDir) -> Result<crate::tls::ca::Issued> {
    use crate::tls::{Role, Trust, ca};
    let tls = dir.tls();
    if tls.exists() {
        std::fs::remove_dir_all(&tls)
            .with_context(|| format!("cannot remove {}", tls.display()))?;
    }
    ca::init(&tls).context("cannot make the lab's CA")?;
    let admin = ca::issue("admin", Role::Admin, &tls, &tls, ca::DEFAULT_DAYS)
        .context("cannot issue the lab's admin certificate")?;
    let trust = Trust::load(&admin.ca, &admin.cert, &admin.key)
        .context("cannot load the lab's admin certificate")?;
    crate::tls::stream::set_default_client(trust.client);
    Ok(admin)
}

/// The `export` lines that point flotilla at the lab: the API and its
/// token, the store and the admin certificate for it, the lab's directory,
/// and ssh as root with the lab's key and known_hosts.
fn env_lines(lab: &LabState, dir: &LabDir, exe: &std::path::Path) -> String {
    let bin = exe
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    [
        format!("export PATH=\"{bin}:$PATH\""),
        format!("export FLOTILLA_ENDPOINT={}", lab.api_endpoint()),
        format!("export FLOTILLA_API_TOKEN={}", lab.api_token),
        format!("export FLOTILLA_STORE_ENDPOINT={}", lab.endpoint()),
        format!(
            "export FLOTILLA_TLS_CA={}",
            dir.tls().join(crate::tls::ca::CA_CERT).display()
        ),
        format!(
            "export FLOTILLA_TLS_CERT={}",
            dir.tls().join("admin.pem").display()
        ),
        format!(
            "export FLOTILLA_TLS_KEY={}",
            dir.tls().join("admin.key").display()
        ),
        format!("export FLOTILLA_LAB_DIR={}", dir.path().display()),
        "export FLOTILLA_SSH_USERNAME=root".to_string(),
        format!("export FLOTILLA_SSH_IDENTITY={}", dir.ssh_key().display()),
        format!(
            "export FLOTILLA_KNOWN_HOSTS_FILE={}",
            dir.known_hosts().display()
        ),
    ]
    .join("\n")
}

/// Starts the supervisor and waits until the cluster is ready; returns the state
/// with every host's pid.
fn boot_and_wait(dir: &LabDir, deadline: Instant) -> Result<LabState> {
    let mut supervisor = spawn_supervisor(dir)?;
    wait_supervisor(dir, &mut supervisor, deadline)?;
    let lab = LabState::load(dir)?;
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::scope(|scope| {
        let boots: Vec<_> = lab
            .hosts
            .iter()
            .map(|h| {
                let pid = h.pid.with_context(|| format!("{} did not boot", h.name));
                scope.spawn(move || {
                    host::wait_booted(&h.name, pid?, left).with_context(|| {
                        format!(
                            "{} did not finish booting; see {} and `journalctl -D {}`",
                            h.name,
                            dir.console_log(&h.name).display(),
                            dir.journal(&h.name).display()
                        )
                    })
                })
            })
            .collect();
        let leader = wait_leader(lab_servers(&lab), deadline).with_context(|| {
            format!(
                "see the daemon's log: journalctl -u flotilla -D {}",
                dir.journal(&lab.hosts[0].name).display()
            )
        });
        for boot in boots {
            boot.join().expect("waiting for a boot panicked")?;
        }
        leader?;
        wait_agents(lab_servers(&lab), lab.hosts.len(), deadline).with_context(|| {
            format!(
                "see the agents' logs: journalctl -u flotilla -D {}",
                dir.journal(&lab.hosts[0].name).display()
            )
        })
    })?;
    Ok(lab)
}

/// Waits until every host's agent has published its presence.
fn wait_agents(servers: Vec<String>, hosts: usize, deadline: Instant) -> Result<()> {
    use crate::consensus::client::Client;
    use crate::registry::keys::MACHINES;
    let runtime = client_runtime()?;
    runtime.block_on(async {
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            let found = tokio::time::timeout(Duration::from_secs(2), async {
                let client = Client::connect(&servers)
                    .await?
                    .with_timeout(Duration::from_secs(1));
                client.range(MACHINES, true, false).await
            })
            .await;
            match found {
                Ok(Ok((machines, _))) if machines.len() >= hosts => return Ok(()),
                Ok(Ok((machines, _))) => {
                    last = format!("{} of {hosts} agents joined", machines.len());
                }
                Ok(Err(err)) => last = err.to_string(),
                Err(_) => last = "no answer within 2 s".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("not every host's agent joined the cluster in time (last: {last})")
    })
}

fn lab_servers(lab: &LabState) -> Vec<String> {
    lab.hosts
        .iter()
        .filter(|h| h.server)
        .map(|h| format!("{}:{CLIENT_PORT}", h.ip))
        .collect()
}

/// `setsid flotilla lab supervise --dir DIR`, from the lab's copy of the binary,
/// with its output in the supervisor's log and no tie to our terminal or pipes
/// (a caller reading our stdout must see it close when we exit).
fn spawn_supervisor(dir: &LabDir) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.supervisor_log())
        .with_context(|| format!("cannot open {}", dir.supervisor_log().display()))?;
    Command::new("setsid")
        .arg(dir.binary())
        .args(["lab", "supervise", "--dir"])
        .arg(dir.path())
        .env_remove("FLOTILLA_LAB_DIR")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the lab's supervisor (setsid flotilla lab supervise)")
}

/// Waits until the supervisor answers (it listens once every host is booting).
fn wait_supervisor(dir: &LabDir, supervisor: &mut Child, deadline: Instant) -> Result<()> {
    loop {
        if let Some(status) = supervisor.try_wait()? {
            bail!(
                "the supervisor stopped ({status}): {}",
                log_tail(&dir.supervisor_log())
            );
        }
        if dir.socket().exists() && control::send(dir, &Request::Ping).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the supervisor did not finish booting the hosts in time: {}",
                log_tail(&dir.supervisor_log())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A runtime for the lab's few client calls.
fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Waits until every server answers and all name the same leader.
fn wait_leader(servers: Vec<String>, deadline: Instant) -> Result<()> {
    use crate::consensus::client::Client;
    let runtime = client_runtime()?;
    runtime.block_on(async {
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            let mut leaders = Vec::new();
            for endpoint in &servers {
                let status = tokio::time::timeout(Duration::from_millis(500), async {
                    let client = Client::connect(std::slice::from_ref(endpoint))
                        .await?
                        .with_timeout(Duration::from_millis(400));
                    client.status().await
                })
                .await;
                match status {
                    Ok(Ok(status)) if status.leader != 0 => leaders.push(status.leader),
                    Ok(Ok(_)) => last = format!("{endpoint} knows no leader yet"),
                    Ok(Err(err)) => last = format!("{endpoint}: {err}"),
                    Err(_) => last = format!("{endpoint}: no answer within 500 ms"),
                }
            }
            if leaders.len() == servers.len() && leaders.windows(2).all(|w| w[0] == w[1]) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("the Raft servers did not agree on a leader in time (last: {last})")
    })
}

/// The last lines of a log, for error messages.
fn log_tail(path: &std::path::Path) -> String {
    let mut text = String::new();
    let _ = std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().rev().take(6).collect();
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (from {})", lines.join(" | "), path.display())
}
