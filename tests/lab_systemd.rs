//! `agent::systemd` against a real systemd: a 1-host lab's PID 1, driven from
//! this (outer) process through the host's system bus, reached at
//! `/proc/PID/root/run/dbus/system_bus_socket`.
//!
//! Not through systemd's private socket, for two reasons found here (systemd
//! 252, zbus 6.2.1): systemd authenticates a private-socket peer by
//! SO_PEERCRED, and a peer outside its PID namespace has pid 0 there, so it is
//! dropped in the handshake; and even from inside (through a proxy), systemd
//! stamps its replies with the sender `org.freedesktop.systemd1`, which zbus
//! rejects as not a unique name. The test's last step pins the second one, so
//! it notices when zbus starts accepting them.
//!
//! Like every `lab_*` test this needs root on Debian 12 (or a machine like it)
//! and fails, never skips, when `lab doctor` fails. nextest runs the `lab_*`
//! binaries one at a time (test group `lab` in .config/nextest.toml).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla::agent::systemd::{Error, Systemd, UnitState};
use serde_json::Value;

mod support;

use support::{lab_in, text};

/// Where this test keeps unit files inside a host, as systemd there sees them.
/// Not the agent's /run/flotilla/units: the host's own flotilla agent owns
/// that directory and unloads whatever it did not put there.
const UNITS_DIR: &str = "/run/lab-systemd-test/units";

const HELLO: &str = "\
[Unit]
Description=flotilla lab_systemd: a service that runs until stopped

[Service]
ExecStart=/bin/sleep infinity
";

/// Fails 0.2 s after it starts, long after its start job is done: no job
/// reports the failure, only the unit's properties do.
const BROKEN: &str = "\
[Unit]
Description=flotilla lab_systemd: a service whose ExecStart fails

[Service]
ExecStart=/bin/sh -c 'sleep 0.2; exec /bin/false'
";

const ENABLED: &str = "\
[Unit]
Description=flotilla lab_systemd: a service enabled for multi-user.target

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
";

/// A 1-host lab in a temporary directory, torn down when dropped (also on panic).
struct Lab {
    dir: tempfile::TempDir,
    /// The outer pid of h1's PID 1 (systemd).
    pid: u64,
}

impl Lab {
    fn up() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-lab-systemd")
            .tempdir()
            .unwrap();
        let doctor = lab_in(dir.path(), &["doctor", "--install"]);
        assert!(
            doctor.status.success(),
            "lab doctor failed; this machine cannot run lab tests:\n{}{}",
            text(&doctor.stdout),
            text(&doctor.stderr)
        );
        let out = lab_in(
            dir.path(),
            &["up", "--hosts", "1", "--election-timeout-ms", "300"],
        );
        // Own the directory before asserting, so a half-booted lab is torn down.
        let mut lab = Lab { dir, pid: 0 };
        assert!(out.status.success(), "lab up failed: {}", text(&out.stderr));
        let up: Value = serde_json::from_str(&text(&out.stdout)).expect("lab up prints JSON");
        lab.pid = up["hosts"][0]["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no pid for h1 in {up}"));
        lab
    }

    /// A path inside h1, reached from outside through its PID 1's root.
    fn inside(&self, path: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid)).join(path.trim_start_matches('/'))
    }

    /// Whether `path` inside h1 exists, as a file or as a link. The links
    /// systemd makes are absolute, so following them from outside h1 would
    /// look in this machine's directories, not h1's.
    fn has(&self, path: &str) -> bool {
        self.inside(path).symlink_metadata().is_ok()
    }

    /// Writes a unit file into h1's unit directory; returns its path inside h1.
    fn write_unit(&self, name: &str, body: &str) -> String {
        std::fs::create_dir_all(self.inside(UNITS_DIR)).unwrap();
        let path = format!("{UNITS_DIR}/{name}");
        std::fs::write(self.inside(&path), body).unwrap();
        path
    }

    /// `systemctl is-active NAME` inside h1, as systemctl prints it.
    fn is_active(&self, name: &str) -> String {
        self.systemctl("is-active", name)
    }

    /// `systemctl VERB NAME` inside h1, as systemctl prints it.
    fn systemctl(&self, verb: &str, name: &str) -> String {
        let out = lab_in(
            self.dir.path(),
            &["exec", "h1", "--", "systemctl", verb, name],
        );
        text(&out.stdout).trim().to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs and the host's journal of a failed test.
            let _ = lab_in(self.dir.path(), &["down", "--keep-disks"]);
            self.dir.disable_cleanup(true);
            eprintln!(
                "lab kept for inspection: {} (logs/, hosts/*/upper/var/log/journal)",
                self.dir.path().display()
            );
        } else {
            let _ = lab_in(self.dir.path(), &["down"]);
        }
    }
}

fn step(name: &str, started: Instant) {
    eprintln!("[{:6.2}s] {name}", started.elapsed().as_secs_f64());
}

/// Polls `name` until its ActiveState is `active`; panics after 10 s.
async fn wait_active(systemd: &Systemd, name: &str, active: &str) -> UnitState {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = systemd.state(name).await.unwrap();
        if state.active == active {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {active}; last {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `name`'s state each time `changes` reports it, until its ActiveState
/// is `active`; panics if no report leads there within 10 s. Returns every
/// state read, the last one `active`.
async fn wait_reported(
    systemd: &Systemd,
    changes: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    name: &str,
    active: &str,
) -> Vec<UnitState> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut reported = Vec::new();
    let mut states = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, changes.recv()).await;
        let unit = next
            .unwrap_or_else(|_| panic!("no report took {name} to {active}; got {reported:?}"))
            .expect("the watcher ended while the connection was open");
        if unit == name {
            let state = systemd.state(name).await.unwrap();
            let done = state.active == active;
            states.push(state);
            if done {
                return states;
            }
        }
        reported.push(unit);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_systemd_drives_units_over_the_system_bus() {
    let started = Instant::now();
    let lab = Lab::up();
    step("lab up", started);

    let bus = lab.inside("/run/dbus/system_bus_socket");
    let systemd = Systemd::connect_system_at(&bus).await.unwrap();
    step("connected", started);

    // link + reload: systemd now knows the unit, from a file outside its search path.
    let hello = lab.write_unit("hello.service", HELLO);
    let changes = systemd.link_runtime(Path::new(&hello)).await.unwrap();
    assert!(
        changes.iter().any(|(kind, file, to)| kind == "symlink"
            && file == "/run/systemd/system/hello.service"
            && to == &hello),
        "{changes:?}"
    );
    systemd.reload().await.unwrap();
    let state = systemd.state("hello.service").await.unwrap();
    assert_eq!(state.load, "loaded", "{state:?}");
    assert_eq!(state.active, "inactive", "{state:?}");
    step("linked and reloaded", started);

    // A unit that was never active has no start time.
    assert_eq!(
        systemd
            .active_enter_timestamp("hello.service")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        systemd
            .active_enter_timestamp("never-was.service")
            .await
            .unwrap(),
        0
    );

    // start: active/running, and systemctl inside the host agrees.
    systemd.start("hello.service").await.unwrap();
    let state = wait_active(&systemd, "hello.service", "active").await;
    assert_eq!(state.sub, "running", "{state:?}");
    assert_eq!(lab.is_active("hello.service"), "active");
    let hello_started = systemd
        .active_enter_timestamp("hello.service")
        .await
        .unwrap();
    assert!(hello_started > 0);
    step("started", started);

    // Globs find the running unit, and neither a loaded stopped one nor others.
    let idle = lab.write_unit("hello-idle.service", HELLO);
    systemd.link_runtime(Path::new(&idle)).await.unwrap();
    systemd.reload().await.unwrap();
    assert_eq!(
        systemd.state("hello-idle.service").await.unwrap().load,
        "loaded"
    );
    let globs = |patterns: &[&str]| patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    assert_eq!(
        systemd
            .active_units_matching(&globs(&["hello*.service", "*.nothing"]))
            .await
            .unwrap(),
        ["hello.service"]
    );
    assert!(
        systemd
            .active_units_matching(&globs(&["hello-idle.service", "nothing-*"]))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(systemd.active_units_matching(&[]).await.unwrap().is_empty());
    systemd.disable_runtime("hello-idle.service").await.unwrap();
    step("active units by glob", started);

    // enable: the unit's link and its [Install] section's link, until reboot.
    const WANTED: &str = "/run/systemd/system/multi-user.target.wants/enabled.service";
    let enabled = lab.write_unit("enabled.service", ENABLED);
    let changes = systemd.enable_runtime(Path::new(&enabled)).await.unwrap();
    assert!(
        changes
            .iter()
            .any(|(kind, file, _)| kind == "symlink" && file == WANTED),
        "{changes:?}"
    );
    assert!(lab.has(WANTED));
    systemd.reload().await.unwrap();
    assert_eq!(
        lab.systemctl("is-enabled", "enabled.service"),
        "enabled-runtime"
    );
    // A unit without [Install] has nothing to enable, and says so.
    let error = systemd.enable_runtime(Path::new(&hello)).await.unwrap_err();
    assert!(matches!(error, Error::NoInstallSection { .. }), "{error:?}");
    systemd.disable_runtime("enabled.service").await.unwrap();
    assert!(!lab.has(WANTED));
    systemd.reload().await.unwrap();
    // Two reloads later, hello was never restarted.
    assert_eq!(
        systemd
            .active_enter_timestamp("hello.service")
            .await
            .unwrap(),
        hello_started
    );
    step("enabled and disabled", started);

    // stop: inactive/dead.
    assert!(systemd.stop("hello.service").await.unwrap().is_some());
    let state = wait_active(&systemd, "hello.service", "inactive").await;
    assert_eq!(state.sub, "dead", "{state:?}");
    assert_eq!(lab.is_active("hello.service"), "inactive");
    step("stopped", started);

    // disable: the runtime link goes, and after a reload the unit has no file.
    let changes = systemd.disable_runtime("hello.service").await.unwrap();
    assert!(
        changes
            .iter()
            .any(|(kind, file, _)| kind == "unlink" && file == "/run/systemd/system/hello.service"),
        "{changes:?}"
    );
    assert!(!lab.has("/run/systemd/system/hello.service"));
    systemd.reload().await.unwrap();
    let state = systemd.state("hello.service").await.unwrap();
    assert_eq!(state.load, "not-found", "{state:?}");

    // Stopping or resetting a unit that is not loaded is success: systemd answers
    // NoSuchUnit, and an agent that took that for an error would never converge.
    assert_eq!(systemd.stop("hello.service").await.unwrap(), None);
    assert_eq!(systemd.stop("never-was.service").await.unwrap(), None);
    systemd.reset_failed("never-was.service").await.unwrap();
    step("disabled; stop of unloaded units succeeds", started);

    // A unit whose ExecStart fails ends up failed, and the watcher reports it:
    // the start job is done once the shell is forked, 0.2 s before it fails, so
    // only a PropertiesChanged tells of the failure. reset-failed clears it.
    let broken = lab.write_unit("broken.service", BROKEN);
    systemd.link_runtime(Path::new(&broken)).await.unwrap();
    systemd.reload().await.unwrap();
    let mut changes = systemd.watch_changes().await.unwrap();
    systemd.start("broken.service").await.unwrap();
    let states = wait_reported(&systemd, &mut changes, "broken.service", "failed").await;
    // Reported while it ran (the job), and again once it failed (properties).
    assert!(states.len() >= 2, "{states:?}");
    assert_ne!(states[0].active, "failed", "{states:?}");
    let state = states.last().unwrap();
    assert_eq!(state.sub, "failed", "{state:?}");
    assert_eq!(lab.is_active("broken.service"), "failed");
    systemd.reset_failed("broken.service").await.unwrap();
    let state = systemd.state("broken.service").await.unwrap();
    assert_eq!(state.active, "inactive", "{state:?}");
    systemd.disable_runtime("broken.service").await.unwrap();
    step("failing unit", started);

    drop(systemd);
    drop(lab);
    step("lab down", started);

    // The host's bus went with it, and so did the watcher, closing its channel.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while changes.recv().await.is_some() {}
    });
    ended.await.expect("the watcher outlived its connection");
}
