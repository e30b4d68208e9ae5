//! The supervisor: the one long-running process of a lab.
//!
//! `lab up` starts it detached (`setsid flotilla lab supervise --dir DIR`, its
//! output in `DIR/logs/supervisor.log`). It joins the lab's cgroup, makes the
//! switch namespace and its bridge, boots every host, and then loops: it serves
//! the CLI's requests on `DIR/supervisor.sock` one at a time, and every few
//! milliseconds it reaps hosts whose PID 1 ended. A host that ended by asking
//! for a reboot (its PID 1 died of SIGHUP, see [`super::host`]) is booted again
//! with a new boot id; any other end leaves it down until `lab start`.
//!
//! It is the only writer of `lab.json` once it runs. It never exits by itself:
//! `lab down` asks it to `shutdown` (kill every host, reap every child, exit),
//! or kills it when it does not answer, before anything else is torn down, so
//! nothing reboots a host meanwhile.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cgroup::{self, Layout};
use super::control::Request;
use super::dir::LabDir;
use super::host::{self, Exit};
use super::net;
use super::shell;
use super::state::LabState;

/// How often hosts are checked for having exited.
const POLL: Duration = Duration::from_millis(20);

/// Runs the supervisor of the lab in `dir` until it is killed.
pub fn run(dir: &LabDir) -> Result<ExitCode> {
    let mut lab = LabState::load(dir)?;
    let layout = cgroup::detect()?;
    let own = format!("{}/supervisor", dir.cgroup());
    layout.create(&own)?;
    layout.join(&own)?;
    let switch = net::start_switch()?;
    lab.supervisor_pid = Some(std::process::id());
    lab.switch_pid = Some(switch.id());
    lab.save(dir)?;
    net::setup_switch(&lab, dir, switch.id())?;
    let mut supervisor = Supervisor {
        dir: dir.clone(),
        lab,
        layout,
        switch,
        hosts: BTreeMap::new(),
        started: Instant::now(),
    };
    supervisor.boot_all()?;

    let socket = dir.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    supervisor.log(&format!("serving on {}", socket.display()));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if supervisor.serve(stream) == Served::Shutdown {
                    supervisor.log("shut down");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(err) => {
                supervisor.log(&format!("accept failed: {err}"));
                std::thread::sleep(POLL);
            }
        }
        supervisor.poll();
    }
}

/// What serving one connection led to.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// Keep serving.
    Request,
    /// `lab down` asked the supervisor to stop everything and exit.
    Shutdown,
}

struct Supervisor {
    dir: LabDir,
    lab: LabState,
    layout: Layout,
    /// Holds the switch namespace; kept so it is reaped if it dies.
    switch: Child,
    /// The `unshare` process of every host that is up.
    hosts: BTreeMap<String, Child>,
    started: Instant,
}

impl Supervisor {
    fn log(&self, message: &str) {
        let t = self.started.elapsed().as_secs_f64();
        super::say(&format!("[{t:9.3}] {message}"));
    }

    fn save(&self) {
        if let Err(err) = self.lab.save(&self.dir) {
            self.log(&format!("{err:#}"));
        }
    }

    /// Boots every host: all namespaces start at once, then each gets its link.
    fn boot_all(&mut self) -> Result<()> {
        let names = self.lab.host_names();
        let mut booting = Vec::new();
        for name in &names {
            let boot_id = shell::random_hex()?;
            self.fresh_cgroup(name)?;
            booting.push((
                name.clone(),
                boot_id.clone(),
                host::start(&self.dir, name, &boot_id),
            ));
        }
        let mut first_error = None;
        for (name, boot_id, started) in booting {
            let result = started.and_then(|b| self.release(&name, &boot_id, b));
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        }
        self.save();
        match first_error {
            None => {
                self.log(&format!("booted {} hosts", names.len()));
                Ok(())
            }
            Some(err) => {
                for child in self.hosts.values_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(err)
            }
        }
    }

    /// Boots one host that is down.
    fn boot(&mut self, name: &str) -> Result<String> {
        let boot_id = shell::random_hex()?;
        self.fresh_cgroup(name)?;
        let booting = host::start(&self.dir, name, &boot_id)?;
        self.release(name, &boot_id, booting)?;
        self.save();
        Ok(boot_id)
    }

    /// Removes what a host's previous boot left in its cgroup and makes it anew.
    fn fresh_cgroup(&self, name: &str) -> Result<()> {
        let rel = format!("{}/{name}", self.dir.cgroup());
        if let Err(err) = self.layout.remove(&rel, Duration::from_secs(2)) {
            self.log(&format!("{name}: {err:#}"));
        }
        self.layout.create(&rel)
    }

    /// Gives a booting host its link, lets it exec systemd and records it as up.
    fn release(&mut self, name: &str, boot_id: &str, booting: host::Booting) -> Result<()> {
        let host = self.lab.host(name).context("no such host")?.clone();
        let port = format!("{name}b{}", host.boots + 1);
        if let Err(err) = net::attach_host(&self.dir, self.switch.id(), booting.pid, &host, &port) {
            let _ = booting.fail(name, "could not get its network link");
            return Err(err);
        }
        let pid = booting.pid;
        let child = booting.release(name)?;
        self.hosts.insert(name.to_string(), child);
        let host = self.lab.host_mut(name).expect("checked above");
        host.pid = Some(pid);
        host.boot_id = Some(boot_id.to_string());
        host.boots += 1;
        host.port = Some(port);
        host.last_exit = None;
        self.log(&format!("{name}: booting (pid {pid}, boot id {boot_id})"));
        Ok(())
    }

    /// Reaps hosts whose PID 1 ended; boots again those that asked for a reboot.
    fn poll(&mut self) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in names {
            if let Some(exit) = self.reap(&name)
                && exit == Exit::Reboot
                && let Err(err) = self.boot(&name)
            {
                self.log(&format!("{name}: cannot boot again: {err:#}"));
            }
        }
        if let Ok(Some(status)) = self.switch.try_wait() {
            self.log(&format!(
                "the switch namespace's holder ended ({status}); the lab has no network"
            ));
        }
    }

    /// If the host's PID 1 ended, records how and returns it.
    fn reap(&mut self, name: &str) -> Option<Exit> {
        let child = self.hosts.get_mut(name)?;
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(err) => {
                self.log(&format!("{name}: cannot wait: {err}"));
                return None;
            }
        };
        self.hosts.remove(name);
        let exit = Exit::of(status);
        let host = self.lab.host_mut(name).expect("hosts come from the state");
        host.pid = None;
        host.port = None;
        host.last_exit = Some(exit.to_string());
        self.log(&format!("{name}: {exit}"));
        self.save();
        Some(exit)
    }

    /// Waits until the host's PID 1 ends, reaping it.
    fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(exit) = self.reap(name) {
                return Some(exit);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn serve(&mut self, stream: UnixStream) -> Served {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            return Served::Request;
        }
        let request = Request::parse(&line);
        let served = match request {
            Ok(Request::Shutdown) => Served::Shutdown,
            _ => Served::Request,
        };
        let reply = request.and_then(|request| {
            self.log(&format!("request: {}", request.to_line()));
            self.handle(request)
        });
        let reply = match reply {
            Ok(message) => format!("ok {message}\n"),
            Err(err) => {
                self.log(&format!("refused: {err:#}"));
                format!("error {}\n", format!("{err:#}").replace('\n', " "))
            }
        };
        let _ = (&stream).write_all(reply.as_bytes());
        served
    }

    /// Kills every host and the switch and reaps them all, so that when the
    /// supervisor exits no zombie is left holding a host's PID namespace.
    fn shutdown(&mut self) -> Result<String> {
        let pids: Vec<u32> = self
            .hosts
            .keys()
            .filter_map(|name| self.lab.host(name)?.pid)
            .collect();
        // SIGKILL PID 1, not unshare: unshare then reaps PID 1 and exits itself.
        shell::signal(&pids, "KILL");
        let hosts = std::mem::take(&mut self.hosts);
        for (name, mut child) in hosts {
            let _ = child.wait();
            let host = self.lab.host_mut(&name).expect("hosts come from the state");
            host.pid = None;
            host.port = None;
            host.last_exit = Some("stopped by lab down".to_string());
        }
        let _ = self.switch.kill();
        let _ = self.switch.wait();
        self.lab.switch_pid = None;
        self.save();
        let _ = std::fs::remove_file(self.dir.socket());
        Ok(format!("stopped {} hosts", pids.len()))
    }

    fn handle(&mut self, request: Request) -> Result<String> {
        let name = match &request {
            Request::Ping => return Ok("pong".to_string()),
            Request::Shutdown => return self.shutdown(),
            Request::Kill(h)
            | Request::Start(h)
            | Request::Reboot(h)
            | Request::Partition(h)
            | Request::Heal(h) => h.clone(),
        };
        // A host may have ended since the last poll (and may need booting again).
        self.poll();
        let Some(host) = self.lab.host(&name).cloned() else {
            bail!(
                "no host {name:?} (hosts: {})",
                self.lab.host_names().join(" ")
            );
        };
        let pid = self.hosts.contains_key(&name).then_some(host.pid).flatten();
        let dir = self.dir.path().display().to_string();
        match request {
            Request::Ping | Request::Shutdown => unreachable!("answered above"),
            Request::Kill(_) => {
                let pid = pid.with_context(|| format!("{name} is already down"))?;
                shell::signal(&[pid], "KILL");
                if self.wait_exit(&name, Duration::from_secs(10)).is_none() {
                    bail!("{name}'s PID 1 (pid {pid}) survived SIGKILL for 10 s");
                }
                // unshare cannot re-raise SIGKILL on itself and exits with status 1
                // instead, so the record says what really happened.
                let host = self.lab.host_mut(&name).expect("checked above");
                host.last_exit = Some(Exit::Killed.to_string());
                self.save();
                Ok(Exit::Killed.to_string())
            }
            Request::Start(_) => {
                if let Some(pid) = pid {
                    bail!(
                        "{name} is already up (pid {pid}); `flotilla lab kill {name} --dir {dir}` first"
                    );
                }
                let boot_id = self.boot(&name)?;
                Ok(format!("booted (boot id {boot_id})"))
            }
            Request::Reboot(_) => {
                let pid = pid.with_context(|| {
                    format!("{name} is down; boot it with `flotilla lab start {name} --dir {dir}`")
                })?;
                // What `systemctl reboot` asks of PID 1, without going through logind
                // (whose connection breaks as the host goes down, failing the call).
                let asked = shell::run(host::enter(pid, "systemctl").args([
                    "start",
                    "--no-block",
                    "--job-mode=replace-irreversibly",
                    "reboot.target",
                ]));
                let wait = if asked.is_ok() { 60 } else { 5 };
                match self.wait_exit(&name, Duration::from_secs(wait)) {
                    Some(Exit::Reboot) => {
                        let boot_id = self.boot(&name)?;
                        Ok(format!("rebooted (boot id {boot_id})"))
                    }
                    Some(exit) => bail!("{name} did not reboot: it {exit}"),
                    None => {
                        asked.with_context(|| format!("cannot ask {name}'s systemd to reboot"))?;
                        bail!(
                            "{name} did not shut down within {wait} s; `flotilla lab kill {name}` forces it"
                        )
                    }
                }
            }
            Request::Partition(_) | Request::Heal(_) => {
                let cut = matches!(request, Request::Partition(_));
                if let (Some(port), Some(_)) = (&host.port, pid) {
                    net::set_port(self.switch.id(), port, !cut)?;
                }
                self.lab.host_mut(&name).expect("checked above").partitioned = cut;
                self.save();
                Ok(if cut { "partitioned" } else { "healed" }.to_string())
            }
        }
    }
}
