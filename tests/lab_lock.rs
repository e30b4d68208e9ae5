//! Reboot coordination end to end, on real systemd (PID 1 of lab hosts that
//! really reboot: the lab boots a host again when its PID 1 asks to reboot,
//! with a new per-boot id).
//!
//! * The semaphore's history is read from a watch started before anything
//!   happens, so "never more than max holders" is checked at EVERY revision
//!   of the key, not by sampling.
//! * A service's availability is read from systemd's own timestamps: each
//!   host's `PropertiesChanged` signals (`busctl monitor`, restarted after
//!   each boot) carry ActiveEnter/ActiveExit in CLOCK_MONOTONIC, which every
//!   lab host shares (no time namespace), so the intervals of all hosts lie on
//!   one time line. ActiveExit (leaving `active`) is used as the end, the
//!   stricter of ActiveExit and InactiveEnter.
//!
//! * The rolling reboot asks two hosts with `lock need-reboot` and the third
//!   only with `/run/reboot-required`, the Debian/Ubuntu convention.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::cluster::{Cluster, wait_for};
use support::{FLOTILLA, HELLO, lab_in, text};

/// Sets `FLOTILLA_<KEY>=value` for `host`'s daemon (a drop-in) and restarts
/// it; waits until the host is in the cluster again.
fn configure(cluster: &Cluster, host: &str, vars: &[(&str, &str)]) {
    let mut conf = String::from("[Service]\n");
    for (key, value) in vars {
        conf.push_str(&format!("Environment=\"FLOTILLA_{key}={value}\"\n"));
    }
    let script = "mkdir -p /etc/systemd/system/flotilla.service.d && \
                  printf %s \"$1\" > /etc/systemd/system/flotilla.service.d/lock.conf && \
                  systemctl daemon-reload && systemctl restart flotilla";
    let out = cluster.exec(host, &["sh", "-c", script, "sh", &conf]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = cluster.id_of(host).to_string();
    wait_for(Duration::from_secs(30), "the host back in", || {
        cluster.machines().contains(&id).then_some(())
    });
}

/// The per-boot id of every host, from `lab status`.
fn boot_ids(cluster: &Cluster) -> BTreeMap<String, (bool, String)> {
    let out = lab_in(cluster.dir(), &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                (
                    h["up"].as_bool().unwrap(),
                    h["boot_id"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

/// The boot id of `host` if it is up, from `lab status` of the lab in `dir`.
fn running_boot(dir: &std::path::Path, host: &str) -> Option<String> {
    let out = lab_in(dir, &["status"]);
    let status: Value = serde_json::from_slice(&out.stdout).ok()?;
    let found = status["hosts"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == host)?;
    (found["up"] == true).then(|| found["boot_id"].as_str().map(str::to_string))?
}

/// `flotilla lock status --json`, parsed.
fn lock_status(cluster: &Cluster) -> Value {
    serde_json::from_str(&cluster.ok(&["lock", "status", "--json"])).unwrap()
}

/// [`lock_status`], `None` while the member asked is going down.
fn try_lock_status(cluster: &Cluster) -> Option<Value> {
    let out = cluster.flotilla(&["lock", "status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn holders(status: &Value) -> Vec<String> {
    status["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

/// The host's flotilla journal, as text.
fn journal(cluster: &Cluster, host: &str) -> String {
    let out = cluster.exec(host, &["journalctl", "-u", "flotilla", "--no-pager"]);
    text(&out.stdout)
}

/// Every event of `flotilla kv watch PREFIX`, from the next revision on, kept
/// by a reader thread until [`History::stop`], which checks that the watch
/// ran all along (a watch that ended early would hide revisions).
struct History {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<String>>,
}

impl History {
    fn start(cluster: &Cluster, prefix: &str) -> History {
        let mut child = cluster
            .command()
            .args([
                "--store-endpoint",
                &cluster.store_endpoint,
                "kv",
                "watch",
                prefix,
            ])
            .env_remove("FLOTILLA_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let errors = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut errors = sink.lock().unwrap();
                errors.push_str(&line);
                errors.push('\n');
            }
        });
        // The watch starts at the revision after its first read.
        std::thread::sleep(Duration::from_millis(500));
        History {
            child,
            lines,
            errors,
        }
    }

    /// Every semaphore value written, in revision order: (revision, max, holders).
    fn values(&self) -> Vec<(u64, u64, Vec<String>)> {
        let lines = self.lines.lock().unwrap();
        let mut values = Vec::new();
        for line in lines.iter() {
            let mut parts = line.splitn(3, ' ');
            let (Some(revision), Some(kind), Some(rest)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if kind != "Put" {
                continue;
            }
            let Some((_, value)) = rest.split_once('=') else {
                continue;
            };
            let value: Value = serde_json::from_str(value).expect("a semaphore value");
            let ids = value["holders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["id"].as_str().unwrap().to_string())
                .collect();
            values.push((
                revision.parse().unwrap(),
                value["max"].as_u64().unwrap(),
                ids,
            ));
        }
        values
    }

    /// Ends the watch, first asserting it was still running: the history
    /// is whole only if the watch never stopped.
    fn stop(&mut self) {
        let ended = self.child.try_wait().expect("the watch's status");
        self.end();
        if let Some(status) = ended {
            panic!(
                "the lock watch ended early ({status}), so its history misses revisions: {}",
                self.errors.lock().unwrap()
            );
        }
    }

    fn end(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.end();
    }
}

/// Checks every revision of the semaphore: never more holders than max
/// (and never more than `limit`, the max the test set). Returns the values.
fn assert_never_over(history: &History, limit: u64) -> Vec<(u64, u64, Vec<String>)> {
    let values = history.values();
    let mut last = 0;
    for (revision, max, ids) in &values {
        assert!(*revision > last, "revisions in order: {values:?}");
        last = *revision;
        assert!(
            ids.len() as u64 <= (*max).min(limit),
            "revision {revision}: {} holders, max {max}: {ids:?}",
            ids.len()
        );
    }
    values
}

/// One unit's active interval on one host, in CLOCK_MONOTONIC µs (end
/// `None`: still active).
#[derive(Debug, Clone)]
struct Interval {
    unit: String,
    host: String,
    start: u64,
    end: Option<u64>,
}

/// (host, unit, "enter" or "exit", CLOCK_MONOTONIC µs).
type Stamp = (String, String, &'static str, u64);

/// systemd's ActiveEnter/ActiveExit of units matching a prefix on every
/// host, from its PropertiesChanged signals, read by `busctl monitor` in each
/// host; the monitor is started again once in each new boot.
struct Monitor {
    stop: Arc<AtomicBool>,
    /// Every timestamp seen.
    events: Arc<Mutex<Vec<Stamp>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(cluster: &Cluster, unit_prefix: &str) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let path_prefix = format!(
            "/org/freedesktop/systemd1/unit/{}",
            unit_prefix.replace('@', "_40")
        );
        for host in &cluster.hosts {
            let (stop, events, dir) = (stop.clone(), events.clone(), cluster.dir().to_path_buf());
            let (host, path_prefix) = (host.name.clone(), path_prefix.clone());
            threads.push(std::thread::spawn(move || {
                // Attach once per boot: entering a host that is shutting down
                // again and again would race its final kill-and-unmount stage.
                let mut attached: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let boot = running_boot(&dir, &host);
                    if boot.is_none() || boot == attached {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                    attached = boot;
                    let child = Command::new(FLOTILLA)
                        .args(["lab", "exec", &host, "--", "busctl", "monitor", "--json=short"])
                        .arg("--match=type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'")
                        .env("FLOTILLA_LAB_DIR", &dir)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn();
                    let Ok(mut child) = child else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    let out = child.stdout.take().unwrap();
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(message) = serde_json::from_str::<Value>(&line) else {
                            continue;
                        };
                        let path = message["path"].as_str().unwrap_or_default();
                        if !path.starts_with(&path_prefix) {
                            continue;
                        }
                        let unit = path
                            .trim_start_matches("/org/freedesktop/systemd1/unit/")
                            .replace("_40", "@")
                            .replace("_2e", ".");
                        let changed = &message["payload"]["data"][1];
                        for (field, kind) in [
                            ("ActiveEnterTimestampMonotonic", "enter"),
                            ("ActiveExitTimestampMonotonic", "exit"),
                        ] {
                            if let Some(at) = changed[field]["data"].as_u64()
                                && at > 0
                            {
                                events.lock().unwrap().push((host.clone(), unit.clone(), kind, at));
                            }
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        // Let every monitor attach before anything starts.
        std::thread::sleep(Duration::from_secs(2));
        Monitor {
            stop,
            events,
            threads,
        }
    }

    /// The active intervals seen, plus units still active now (read from
    /// systemd directly, in case a monitor attached after their start).
    fn intervals(&self, cluster: &Cluster, pattern: &str) -> Vec<Interval> {
        let mut events = self.events.lock().unwrap().clone();
        for host in &cluster.hosts {
            for unit in cluster.systemd_active(&host.name, pattern) {
                let at: u64 = cluster.entered(&host.name, &unit).parse().unwrap();
                events.push((host.name.clone(), unit, "enter", at));
            }
        }
        events.sort_by_key(|e| e.3);
        events.dedup();
        let mut open: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut intervals = Vec::new();
        for (host, unit, kind, at) in events {
            let key = (host.clone(), unit.clone());
            match kind {
                "enter" => {
                    open.entry(key).or_insert(at);
                }
                _ => {
                    if let Some(start) = open.remove(&key)
                        && at >= start
                    {
                        intervals.push(Interval {
                            unit,
                            host,
                            start,
                            end: Some(at),
                        });
                    }
                }
            }
        }
        for ((host, unit), start) in open {
            intervals.push(Interval {
                unit,
                host,
                start,
                end: None,
            });
        }
        intervals
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Monitors block on their pipe; they end with the lab.
        self.threads.clear();
    }
}

/// The gaps (µs) in the union of `intervals` from the earliest start on.
fn gaps(intervals: &[Interval]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<&Interval> = intervals.iter().collect();
    sorted.sort_by_key(|i| i.start);
    let mut gaps = Vec::new();
    let Some(first) = sorted.first() else {
        return gaps;
    };
    let mut covered = first.end;
    for i in &sorted[1..] {
        match covered {
            None => break,
            Some(until) if i.start > until => {
                gaps.push((until, i.start));
                covered = i.end;
            }
            Some(until) => covered = i.end.map(|e| e.max(until)),
        }
    }
    if let Some(until) = covered {
        gaps.push((until, u64::MAX));
    }
    gaps
}

#[test]
fn three_hosts_reboot_one_at_a_time_and_the_service_never_goes_down() {
    let cluster = Cluster::up(3, 3);
    // h2 has no logind: its coordinator must reboot through systemd itself.
    let out = cluster.exec(
        "h2",
        &["systemctl", "mask", "--now", "systemd-logind.service"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut history = History::start(&cluster, "/flotilla/lock/");
    let monitor = Monitor::start(&cluster, "hello@");
    cluster.submit(&[("hello@.service", HELLO)]);
    cluster.ok(&["start", "--no-block", "hello@1", "hello@2"]);
    wait_for(
        Duration::from_secs(20),
        "both hello instances active",
        || (cluster.active().len() == 2).then_some(()),
    );
    let before = boot_ids(&cluster);

    // Sample hosts down (PID 1 gone, or out of the cluster) while they reboot.
    let sampling = Arc::new(AtomicBool::new(true));
    let worst = Arc::new(Mutex::new((0usize, String::new())));
    let sampler = {
        let (sampling, worst) = (sampling.clone(), worst.clone());
        let (dir, endpoint, token) = (
            cluster.dir().to_path_buf(),
            cluster.endpoint.clone(),
            cluster.api_token.clone(),
        );
        let ids: Vec<String> = cluster.hosts.iter().map(|h| h.machine_id.clone()).collect();
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let out = lab_in(&dir, &["status"]);
                let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let mut down: BTreeSet<String> = status["hosts"]
                    .as_array()
                    .map(|hosts| {
                        hosts
                            .iter()
                            .filter(|h| h["up"] == false)
                            .map(|h| h["machine_id"].as_str().unwrap().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let listed = Command::new(FLOTILLA)
                    .args(["--endpoint", &endpoint, "--api-token", &token])
                    .args(["list-machines", "--json", "--full"])
                    .output()
                    .unwrap();
                if let Ok(rows) = serde_json::from_slice::<Value>(&listed.stdout) {
                    let present: BTreeSet<&str> = rows
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["machine"].as_str().unwrap())
                        .collect();
                    down.extend(
                        ids.iter()
                            .filter(|id| !present.contains(id.as_str()))
                            .cloned(),
                    );
                }
                let mut worst = worst.lock().unwrap();
                if down.len() > worst.0 {
                    *worst = (down.len(), format!("{down:?}"));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    // h1 and h2 are marked with `lock need-reboot`; h3 only gets the
    // Debian/Ubuntu `/run/reboot-required` file, which its coordinator reads
    // (the reboot's fresh /run removes it).
    let started = Instant::now();
    for host in &cluster.hosts[..2] {
        cluster.ok(&["lock", "need-reboot", &host.machine_id]);
    }
    let out = cluster.exec("h3", &["touch", "/run/reboot-required"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, took) = wait_for(
        Duration::from_secs(150),
        "all three hosts rebooted, the lock free and no request left",
        || {
            let now = boot_ids(&cluster);
            let rebooted = now
                .iter()
                .all(|(name, (up, boot))| *up && *boot != before[name].1);
            let status = try_lock_status(&cluster)?;
            (rebooted
                && holders(&status).is_empty()
                && status["need_reboot"].as_array().unwrap().is_empty()
                && cluster.machines().len() == 3)
                .then_some(())
        },
    );
    eprintln!(
        "3 rolling reboots, max 1: {took:?} ({:?} since the requests)",
        started.elapsed()
    );
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let out = cluster.exec("h3", &["test", "-e", "/run/reboot-required"]);
    assert!(
        !out.status.success(),
        "h3's new boot has no reboot-required"
    );
    wait_for(
        Duration::from_secs(20),
        "both hello instances active again",
        || (cluster.active().len() == 2).then_some(()),
    );

    // Every revision of the semaphore: at most one holder; each host held it.
    history.stop();
    let values = assert_never_over(&history, 1);
    let held: BTreeSet<&String> = values.iter().flat_map(|(_, _, ids)| ids).collect();
    assert_eq!(held.len(), 3, "each host took the lock once: {values:?}");
    let (down, which) = worst.lock().unwrap().clone();
    assert!(down <= 1, "two hosts were down at once: {which}");

    // The service: from the first start on, some hello instance was active at
    // every moment (by systemd's timestamps), across all three reboots.
    let intervals = monitor.intervals(&cluster, "hello@*");
    monitor.stop();
    eprintln!(
        "{} semaphore revisions, {} active intervals of hello@*: {:?}",
        values.len(),
        intervals.len(),
        intervals
            .iter()
            .map(|i| format!("{}@{} {}..{:?}", i.unit, i.host, i.start, i.end))
            .collect::<Vec<_>>()
    );
    // Each host asked for its reboot over D-Bus; h2, without logind, asked
    // systemd's Manager itself. The line is logged before the call: one
    // logged after it may be lost with the shutdown.
    for host in &cluster.hosts {
        let log = journal(&cluster, &host.name);
        let asked = if host.name == "h2" {
            "rebooting now (asking systemd)"
        } else {
            "rebooting now (asking "
        };
        assert!(log.contains(asked), "{}: {log}", host.name);
        assert!(
            log.contains("released the reboot lock"),
            "{}: {log}",
            host.name
        );
    }
    let moved: BTreeSet<&str> = intervals.iter().map(|i| i.host.as_str()).collect();
    assert!(
        moved.len() == 3,
        "instances ran on every host: {intervals:?}"
    );
    let gaps = gaps(&intervals);
    assert!(
        gaps.is_empty(),
        "the service had no active instance in {gaps:?} (µs, CLOCK_MONOTONIC): {intervals:#?}"
    );
    // Make-before-break: every instance that stopped somewhere was already
    // active on another host when it did.
    for stopped in intervals.iter().filter(|i| i.end.is_some()) {
        let end = stopped.end.unwrap();
        assert!(
            intervals.iter().any(|other| other.unit == stopped.unit
                && other.host != stopped.host
                && other.start < end
                && other.end.is_none_or(|e| e > end)),
            "{} stopped on {} with no copy active elsewhere: {intervals:#?}",
            stopped.unit,
            stopped.host
        );
    }
}

#[test]
fn concurrent_acquires_and_a_killed_holder_with_and_without_stale_after() {
    let cluster = Cluster::up(3, 2);
    let mut history = History::start(&cluster, "/flotilla/lock/");

    // Races: 24 acquires at once from different ids, max 2.
    let out = cluster.ok(&["lock", "set-max", "2"]);
    assert_eq!(out, "Old: 1\nNew: 2\n");
    let racers: Vec<Child> = (0..24)
        .map(|i| {
            cluster
                .command()
                .args([
                    "--store-endpoint",
                    &cluster.store_endpoint,
                    "lock",
                    "acquire",
                ])
                .arg(format!("racer-{i}"))
                .env_remove("FLOTILLA_ENDPOINT")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout))
        .collect();
    assert_eq!(won.len(), 2, "exactly max acquire: {won:?}");
    for lost in outcomes.iter().filter(|o| !o.status.success()) {
        let err = text(&lost.stderr);
        assert!(err.contains("reboot lock is full"), "{err}");
    }
    let status = lock_status(&cluster);
    let winners = holders(&status);
    assert_eq!(winners.len(), 2);
    assert_eq!(status["available"], 0);
    // Acquiring a lock already held succeeds; releasing one not held fails.
    let winner = winners[0].clone();
    assert!(
        cluster
            .ok(&["lock", "lock", &winner])
            .contains("already holds")
    );
    let out = cluster.flotilla(&["lock", "unlock", "racer-nobody"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not hold"),
        "{}",
        text(&out.stderr)
    );
    for id in holders(&status) {
        cluster.ok(&["lock", "release", &id]);
    }
    cluster.ok(&["lock", "set-max", "1"]);
    // Bad input changes nothing and says why.
    for bad in [
        &["lock", "acquire", "a/b"][..],
        &["lock", "status", "--group", "no/such"],
        &["lock", "set-max", "-1"],
    ] {
        let out = cluster.flotilla(bad);
        assert!(!out.status.success(), "{bad:?}");
    }

    // A holder killed hard, stale_after off (the default): it stays held.
    let h3 = cluster.id_of("h3").to_string();
    cluster.ok(&["lock", "acquire", &h3]);
    cluster.lab(&["kill", "h3"]);
    wait_for(Duration::from_secs(20), "h3 out of the cluster", || {
        (!cluster.machines().contains(&h3)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(12));
    let status = cluster.ok(&["lock", "status"]);
    assert!(
        status.contains(&h3),
        "lock status names the holder: {status}"
    );
    assert!(status.contains("Available: 0"), "{status}");

    // stale_after on h1 (10 s; reboot_timeout lowered to match): freed after it.
    // The daemon's absence clock cannot start before its restart is asked for.
    let restarted = Instant::now();
    configure(
        &cluster,
        "h1",
        &[("STALE_AFTER", "10s"), ("REBOOT_TIMEOUT", "10s")],
    );
    wait_for(Duration::from_secs(40), "the stale holder freed", || {
        holders(&lock_status(&cluster)).is_empty().then_some(())
    });
    eprintln!(
        "stale holder freed {:?} after h1's restart with stale_after=10s was asked",
        restarted.elapsed()
    );
    assert!(
        restarted.elapsed() >= Duration::from_secs(10),
        "not before stale_after"
    );
    assert!(journal(&cluster, "h1").contains(&format!("released {h3}")));

    // A stale_after shorter than the reboot timeout is refused.
    let out = cluster.exec(
        "h2",
        &[
            "env",
            "FLOTILLA_STALE_AFTER=1m",
            "FLOTILLA_REBOOT_TIMEOUT=5m",
            "flotilla",
            "daemon",
            "--config",
            "/etc/flotilla/flotilla.toml",
            "--check-config",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("shorter than reboot_timeout"),
        "{}",
        text(&out.stderr)
    );

    history.stop();
    let values = assert_never_over(&history, 2);
    assert!(
        values
            .iter()
            .any(|(_, _, ids)| winners.iter().all(|w| ids.contains(w))),
        "the watch saw both winners {winners:?} hold at once: {values:?}"
    );
}

#[test]
fn a_host_outside_its_window_waits_and_a_drain_with_nowhere_to_go_postpones() {
    let cluster = Cluster::up(3, 3);
    let mut history = History::start(&cluster, "/flotilla/lock/");
    // h1's window opens twelve hours from now (UTC).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let opens = (now + 12 * 3600) % 86_400;
    let start = format!("{:02}:{:02}", opens / 3600, opens / 60 % 60);
    configure(&cluster, "h1", &[("REBOOT_WINDOW_START", &start)]);
    configure(&cluster, "h2", &[("DRAIN_TIMEOUT", "5s")]);
    let before = boot_ids(&cluster);

    cluster.ok(&["lock", "need-reboot", cluster.id_of("h1")]);
    let (log, _) = wait_for(Duration::from_secs(20), "h1 to say it waits", || {
        let log = journal(&cluster, "h1");
        log.contains("waiting for the reboot window").then_some(log)
    });
    assert!(log.contains(&start), "{log}");
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        holders(&lock_status(&cluster)).is_empty(),
        "h1 took no lock"
    );
    assert_eq!(boot_ids(&cluster)["h1"], before["h1"], "h1 did not reboot");
    // Withdraw the request so h1 stays out of the rest.
    cluster.ok(&[
        "kv",
        "del",
        &format!("/flotilla/reboot/{}", cluster.id_of("h1")),
    ]);

    // Three conflicting instances fill the three hosts: h2's has nowhere to go.
    cluster.submit(&[("hello@.service", HELLO)]);
    cluster.ok(&["start", "--no-block", "hello@1", "hello@2", "hello@3"]);
    let (active, _) = wait_for(Duration::from_secs(20), "three hello instances", || {
        let active = cluster.active();
        (active.len() == 3).then_some(active)
    });
    let on_h2 = active
        .iter()
        .find(|(_, hosts)| hosts.contains(&"h2".to_string()))
        .map(|(unit, _)| unit.clone())
        .unwrap();
    let entered = cluster.entered("h2", &on_h2);
    cluster.ok(&["lock", "need-reboot", cluster.id_of("h2")]);
    let (log, took) = wait_for(Duration::from_secs(30), "h2 to postpone", || {
        let log = journal(&cluster, "h2");
        log.contains("reboot postponed").then_some(log)
    });
    eprintln!("h2 postponed after {took:?}");
    let line = log
        .lines()
        .find(|l| l.contains("reboot postponed"))
        .unwrap();
    assert!(
        line.contains(&format!("{on_h2} has nowhere to go")),
        "{line}"
    );
    assert!(line.contains("conflicts with hello@"), "{line}");
    // Withdraw the request (it would be tried again after drain_timeout).
    // Nothing was broken meanwhile: h2 still runs its instance (never
    // restarted), gave the lock back, is schedulable, and did not reboot.
    cluster.ok(&[
        "kv",
        "del",
        &format!("/flotilla/reboot/{}", cluster.id_of("h2")),
    ]);
    wait_for(
        Duration::from_secs(10),
        "the lock given back, h2 undrained",
        || {
            (holders(&lock_status(&cluster)).is_empty()
                && !cluster
                    .ok(&["list-machines", "--fields", "drained"])
                    .contains("true"))
            .then_some(())
        },
    );
    assert_eq!(cluster.entered("h2", &on_h2), entered);
    assert_eq!(boot_ids(&cluster)["h2"], before["h2"]);
    history.stop();
    let values = assert_never_over(&history, 1);
    assert!(
        values
            .iter()
            .any(|(_, _, ids)| ids == &[cluster.id_of("h2").to_string()]),
        "h2 held the lock while draining: {values:?}"
    );
}
