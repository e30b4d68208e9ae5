//! The agent and scheduler end to end: units submitted through the CLI run on
//! real systemd (PID 1 of lab hosts), follow their `[X-Fleet]` rules, and move
//! when hosts die or are cut off. Every claim is checked through the CLI AND
//! through `systemctl` inside the hosts.
//!
//! Conflicts are proven by the units themselves: `hello@.service` takes a
//! per-host `flock -n` on /run/hello.lock and exits 99 (failing loudly) when
//! another instance already holds it, so two instances on one host can never
//! go unnoticed, even for a moment between samples.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

mod support;

use support::cluster::{Cluster, wait_for, wait_for_state};
use support::{HELLO, Scrape, parse_metrics, text};

const PLAIN: &str = "\
[Service]
ExecStart=/bin/sleep infinity
";

/// The last host whose Raft member does not lead (cutting it keeps a quorum).
fn last_follower(cluster: &Cluster) -> support::cluster::Host {
    let leader = cluster.leader();
    cluster
        .hosts
        .iter()
        .rev()
        .find(|h| h.name != leader)
        .unwrap()
        .clone()
}

/// A unit pinned to `machine` that fences itself after `secs` cut off.
fn fenced_unit(machine: &str, secs: u64) -> String {
    format!("{PLAIN}[X-Fleet]\nMachineID={machine}\nFenceAfter={secs}\n")
}

/// `ss`'s established TCP connections on `host` matching `filter`, one a line.
fn established(cluster: &Cluster, host: &str, filter: &str) -> String {
    let out = cluster.exec(host, &["ss", "-Htn", "state", "established", filter]);
    text(&out.stdout)
}

/// Every host's failed units matching `pattern`, which must be none.
fn assert_none_failed(cluster: &Cluster, pattern: &str) {
    for host in &cluster.hosts {
        let failed = cluster.systemd_failed(&host.name, pattern);
        assert!(
            failed.is_empty(),
            "{} has failed units: {failed:?}",
            host.name
        );
    }
}

/// How many hosts' systemd runs each unit matching `pattern`.
fn copies(cluster: &Cluster, pattern: &str) -> BTreeMap<String, usize> {
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for unit in systemd_view(cluster, pattern).into_values().flatten() {
        *copies.entry(unit).or_default() += 1;
    }
    copies
}

/// Active units matching `pattern`, by host, from systemd itself.
fn systemd_view(cluster: &Cluster, pattern: &str) -> BTreeMap<String, Vec<String>> {
    cluster
        .hosts
        .iter()
        .map(|h| (h.name.clone(), cluster.systemd_active(&h.name, pattern)))
        .collect()
}

#[test]
fn conflicting_instances_spread_wait_and_take_over() {
    let cluster = Cluster::up(3, 3);
    cluster.submit(&[("hello@.service", HELLO)]);
    cluster.ok(&[
        "start",
        "--no-block",
        "hello@1",
        "hello@2",
        "hello@3",
        "hello@4",
        "hello@5",
    ]);
    let (active, took) = wait_for(Duration::from_secs(15), "3 active hello units", || {
        let active = cluster.active();
        (active.len() == 3).then_some(active)
    });
    eprintln!("3 of 5 conflicting instances active in {took:?}");
    let hosts: BTreeSet<&String> = active.values().flatten().collect();
    assert_eq!(hosts.len(), 3, "one per host: {active:?}");
    let rows = cluster.rows();
    let waiting: Vec<&str> = rows
        .iter()
        .filter(|r| r.machine.is_none())
        .map(|r| r.unit.as_str())
        .collect();
    assert_eq!(waiting.len(), 2, "two wait unplaced: {rows:?}");
    for (host, units) in systemd_view(&cluster, "hello@*") {
        assert_eq!(
            units.len(),
            1,
            "systemd on {host} runs exactly one hello: {units:?}"
        );
    }

    // Destroy one: a waiting instance takes its host.
    let (victim, on) = active
        .iter()
        .next()
        .map(|(u, h)| (u.clone(), h[0].clone()))
        .unwrap();
    cluster.ok(&["destroy", &victim]);
    let (after, took) = wait_for(
        Duration::from_secs(15),
        "a waiting instance to start",
        || {
            let now = cluster.active();
            (now.len() == 3 && !now.contains_key(&victim)).then_some(now)
        },
    );
    eprintln!("a waiting instance took over in {took:?}");
    let newcomer = after.keys().find(|u| !active.contains_key(*u)).unwrap();
    assert_eq!(
        after[newcomer],
        vec![on.clone()],
        "it runs where {victim} ran"
    );
    assert_eq!(
        cluster.systemd_active(&on, "hello@*"),
        vec![newcomer.clone()]
    );
    assert_none_failed(&cluster, "hello@*");

    // stop keeps the unit placed and loaded; start runs it again there; unload
    // removes it from the host (file and systemd's link) but keeps it submitted.
    let (host, unit) = (after[newcomer][0].clone(), newcomer.clone());
    cluster.ok(&["stop", &unit]);
    assert!(
        cluster.systemd_active(&host, &unit).is_empty(),
        "stopped on {host}"
    );
    let load = cluster.exec(&host, &["systemctl", "show", "-P", "LoadState", &unit]);
    assert_eq!(
        text(&load.stdout).trim(),
        "loaded",
        "still loaded after stop"
    );
    cluster.ok(&["start", &unit]);
    assert_eq!(
        cluster.systemd_active(&host, &unit),
        std::slice::from_ref(&unit),
        "back on {host}"
    );
    cluster.ok(&["unload", &unit]);
    assert!(cluster.systemd_active(&host, &unit).is_empty());
    let file = cluster.exec(
        &host,
        &["test", "-e", &format!("/run/flotilla/units/{unit}")],
    );
    assert!(!file.status.success(), "the unit file is gone from {host}");
    let files = cluster.ok(&["list-unit-files"]);
    assert!(
        files.lines().any(|l| l.starts_with(unit.as_str())
            && l.split('\t').filter(|c| !c.is_empty()).nth(2) == Some("inactive")),
        "{files}"
    );

    // A unit whose ExecStart fails is reported failed, not hidden.
    cluster.submit(&[("broken.service", "[Service]\nExecStart=/bin/false\n")]);
    cluster.ok(&["start", "--no-block", "broken"]);
    wait_for(
        Duration::from_secs(15),
        "broken.service reported failed",
        || {
            cluster
                .rows()
                .into_iter()
                .any(|r| r.unit == "broken.service" && r.active.as_deref() == Some("failed"))
                .then_some(())
        },
    );
    let out = cluster.ok(&["list-units"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("broken.service"))
        .unwrap();
    assert!(
        line.contains("failed"),
        "list-units shows it failed: {line}"
    );
}

/// One scrape of `GET /metrics` on `host`'s unix socket.
fn scrape(cluster: &Cluster, host: &str) -> Scrape {
    let out = cluster.exec(
        host,
        &[
            "curl",
            "-sS",
            "--fail",
            "--unix-socket",
            "/run/flotilla/api.sock",
            "http://x/metrics",
        ],
    );
    assert!(
        out.status.success(),
        "scraping {host}: {}",
        text(&out.stderr)
    );
    parse_metrics(&text(&out.stdout))
}

/// The sum of `series` over several hosts' scrapes (absent counts 0).
fn total(scrapes: &[Scrape], series: &str) -> f64 {
    scrapes.iter().filter_map(|s| s.get(series)).sum()
}

fn scrape_all(cluster: &Cluster, hosts: &[String]) -> Vec<Scrape> {
    hosts.iter().map(|h| scrape(cluster, h)).collect()
}

/// The metrics issue 15 names, as `/metrics` spells them (a prefix is
/// enough: histograms have several series, some are labelled).
const METRIC_NAMES: [&str; 21] = [
    "flotilla_raft_term ",
    "flotilla_raft_commit_index",
    "flotilla_raft_applied_index",
    "flotilla_raft_leader_changes_total",
    "flotilla_raft_proposal_duration_seconds_bucket",
    "flotilla_disk_fsync_duration_seconds_count",
    "flotilla_store_size_bytes",
    "flotilla_store_quota_used_bytes",
    "flotilla_store_quota_bytes",
    "flotilla_store_nospace_alarm",
    "flotilla_store_keys",
    "flotilla_leases",
    "flotilla_units{desired_state=\"launched\"}",
    "flotilla_unit_states{active_state=",
    "flotilla_units_claimed",
    "flotilla_placements_total",
    "flotilla_claim_conflicts_total",
    "flotilla_lease_expiries_total",
    "flotilla_systemd_call_duration_seconds_count{method=\"StartUnit\"}",
    "flotilla_api_request_duration_seconds_count{method=\"GET\",route=",
    "flotilla_machines",
];

#[test]
fn killed_hosts_units_move_within_the_ttl() {
    let cluster = Cluster::up(3, 3);
    let all: Vec<String> = cluster.hosts.iter().map(|h| h.name.clone()).collect();
    let before = scrape_all(&cluster, &all);
    cluster.submit(&[("plain@.service", PLAIN)]);
    let names: Vec<String> = (1..=9).map(|i| format!("plain@{i}.service")).collect();
    let mut args = vec!["start", "--no-block"];
    args.extend(names.iter().map(String::as_str));
    cluster.ok(&args);
    wait_for(Duration::from_secs(15), "9 active units", || {
        (cluster.active().len() == 9).then_some(())
    });

    // Metrics: every name is there, and starting 9 units moved the counters.
    let rise = |after: &[Scrape], before: &[Scrape], series: &str| {
        total(after, series) - total(before, series)
    };
    // The quota's use grew with 9 units' records, claims and states (the
    // default quota stays, far away: no alarm). The store's gauges are
    // published once a second, so they may trail the units by that much.
    let quota = "flotilla_store_quota_used_bytes";
    let (started, _) = wait_for_state(Duration::from_secs(5), "the quota's use to grow", || {
        let started = scrape_all(&cluster, &all);
        let grew = rise(&started, &before, quota);
        if grew >= 9.0 * 100.0 {
            Ok(started)
        } else {
            Err(format!("{grew} bytes more than before the units"))
        }
    });
    for name in METRIC_NAMES {
        for (host, scrape) in all.iter().zip(&started) {
            assert!(
                scrape
                    .keys()
                    .any(|series| format!("{series} ").starts_with(name)),
                "{host}'s /metrics has no {name}: {scrape:?}"
            );
        }
    }
    assert!(rise(&started, &before, "flotilla_placements_total") >= 9.0);
    let starts = "flotilla_systemd_call_duration_seconds_count{method=\"StartUnit\"}";
    assert!(rise(&started, &before, starts) >= 9.0);
    assert!(
        rise(
            &started,
            &before,
            "flotilla_raft_proposal_duration_seconds_count"
        ) >= 9.0
    );
    assert!(rise(&started, &before, "flotilla_raft_applied_index") >= 9.0 * 3.0);
    for scrape in &started {
        assert_eq!(
            scrape["flotilla_store_quota_bytes"],
            2.0 * 1024.0 * 1024.0 * 1024.0
        );
        assert_eq!(scrape["flotilla_store_nospace_alarm"], 0.0);
        assert_eq!(scrape["flotilla_units{desired_state=\"launched\"}"], 9.0);
        assert_eq!(scrape["flotilla_unit_states{active_state=\"active\"}"], 9.0);
        assert_eq!(scrape["flotilla_machines"], 3.0);
        assert_eq!(scrape["flotilla_store_reachable"], 1.0);
    }
    eprintln!(
        "metrics after 9 starts: placements +{}, StartUnit calls +{}, leases {}",
        rise(&started, &before, "flotilla_placements_total"),
        rise(&started, &before, starts),
        started[0]["flotilla_leases"]
    );

    // A follower host first, then the Raft leader's host.
    let leader = cluster.leader();
    let follower = cluster
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .find(|h| *h != leader)
        .unwrap();
    for (victim, bound) in [
        (follower, cluster.ttl + Duration::from_secs(2)),
        // The leader's host takes the lessor with it: a new leader must be
        // elected (up to 2 × 300 ms here), and it grants every lease its
        // last checkpointed remaining time plus one election timeout, so a
        // lease can outlive the kill by up to about a second more than the
        // TTL; then the usual path runs (as for the follower, about 1 s).
        (leader.clone(), cluster.ttl + Duration::from_secs(3)),
    ] {
        let moving: Vec<String> = cluster
            .active()
            .into_iter()
            .filter(|(_, hosts)| hosts.contains(&victim))
            .map(|(unit, _)| unit)
            .collect();
        assert!(!moving.is_empty(), "{victim} runs some units");
        let killed = Instant::now();
        cluster.lab(&["kill", &victim]);
        eprintln!("lab kill {victim} returned after {:?}", killed.elapsed());
        wait_for(bound * 3, "units to move off the killed host", || {
            let active = cluster.active();
            moving
                .iter()
                .all(|u| active.get(u).is_some_and(|h| !h.contains(&victim)))
                .then_some(())
        });
        // From the kill, not from the first poll.
        let took = killed.elapsed();
        if victim != leader {
            // Metrics: the survivors applied the expiry and re-placed the units.
            let survivors: Vec<String> = all.iter().filter(|h| **h != victim).cloned().collect();
            let was: Vec<Scrape> = all
                .iter()
                .zip(&started)
                .filter(|(h, _)| **h != victim)
                .map(|(_, s)| s.clone())
                .collect();
            let now = scrape_all(&cluster, &survivors);
            for (host, (now, was)) in survivors.iter().zip(now.iter().zip(&was)) {
                let expired =
                    now["flotilla_lease_expiries_total"] - was["flotilla_lease_expiries_total"];
                assert!(expired >= 1.0, "{host} applied no lease expiry");
                assert_eq!(now["flotilla_machines"], 2.0, "{host}");
            }
            let placed = rise(&now, &was, "flotilla_placements_total");
            assert!(
                placed >= moving.len() as f64,
                "{placed} placements for {} moved units",
                moving.len()
            );
        }
        eprintln!(
            "{} units moved off killed {victim} in {took:?} (bound {bound:?})",
            moving.len()
        );
        assert!(took <= bound, "moved in {took:?}, over the bound {bound:?}");
        for unit in &moving {
            let running: Vec<String> = systemd_view(&cluster, unit)
                .into_iter()
                .filter(|(_, units)| !units.is_empty())
                .map(|(host, _)| host)
                .collect();
            assert_eq!(running.len(), 1, "{unit} runs once: {running:?}");
        }
        if cluster.hosts.len() - 1 < 2 {
            break;
        }
        // Keep a quorum for the second kill: bring the first victim back.
        cluster.lab(&["start", &victim]);
        wait_for(Duration::from_secs(20), "the host to rejoin", || {
            (cluster.machines().len() == 3).then_some(())
        });
    }
}

#[test]
fn a_partitioned_host_is_replaced_and_stops_its_copies_before_rejoining() {
    let cluster = Cluster::up(3, 2);
    let cut = last_follower(&cluster);
    let fenced = fenced_unit(&cut.machine_id, 3);
    cluster.submit(&[("plain@.service", PLAIN), ("fenced.service", &fenced)]);
    let names: Vec<String> = (1..=6).map(|i| format!("plain@{i}.service")).collect();
    let mut args = vec!["start", "--no-block", "fenced"];
    args.extend(names.iter().map(String::as_str));
    cluster.ok(&args);
    wait_for(Duration::from_secs(15), "7 active units", || {
        (cluster.active().len() == 7).then_some(())
    });
    let on_cut: Vec<String> = cluster.systemd_active(&cut.name, "plain@*");
    assert!(!on_cut.is_empty(), "{} runs some plain units", cut.name);

    cluster.lab(&["partition", &cut.name]);
    let cut_at = Instant::now();
    // The cluster starts them elsewhere once the lease (2 s) expires...
    let (_, took) = wait_for(Duration::from_secs(15), "units to start elsewhere", || {
        let active = cluster.active();
        on_cut
            .iter()
            .all(|u| active.get(u).is_some_and(|h| !h.contains(&cut.name)))
            .then_some(())
    });
    eprintln!(
        "{} units restarted elsewhere {took:?} after the cut",
        on_cut.len()
    );
    // ...while the cut-off host keeps running its copies (at-least-once),
    // except the unit that asked to be fenced after 3 s.
    while cut_at.elapsed() < cluster.ttl * 2 + Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        cluster.systemd_active(&cut.name, "plain@*"),
        on_cut,
        "units keep running on the cut-off host"
    );
    assert!(
        cluster
            .systemd_active(&cut.name, "fenced.service")
            .is_empty(),
        "FenceAfter=3 stopped fenced.service on the cut-off host"
    );

    // Heal: the host stops its stale copies BEFORE it is present again.
    cluster.lab(&["heal", &cut.name]);
    let (_, took) = wait_for(Duration::from_secs(20), "the healed host to rejoin", || {
        cluster.machines().contains(&cut.machine_id).then_some(())
    });
    let stale = cluster.systemd_active(&cut.name, "plain@*");
    let before: BTreeSet<&String> = on_cut.iter().collect();
    assert!(
        stale.iter().all(|u| !before.contains(u)),
        "when {} is present again its stale copies are stopped: {stale:?}",
        cut.name
    );
    eprintln!("healed host rejoined {took:?} after the heal");
    // Exactly one copy of everything, cluster-wide, from systemd's own view.
    let mut copies: BTreeMap<String, usize> = BTreeMap::new();
    for units in systemd_view(&cluster, "plain@*").values() {
        for unit in units {
            *copies.entry(unit.clone()).or_default() += 1;
        }
    }
    assert_eq!(copies.len(), 6, "{copies:?}");
    assert!(
        copies.values().all(|n| *n == 1),
        "one copy each: {copies:?}"
    );
    // The pinned, fenced unit comes back on its host.
    wait_for(
        Duration::from_secs(15),
        "fenced.service back on its host",
        || (cluster.systemd_active(&cut.name, "fenced.service").len() == 1).then_some(()),
    );
}

#[test]
fn a_restarted_daemon_adopts_its_units_and_a_duplicate_stays_out() {
    // systemd restarts the daemon after RestartSec=1s; a 5 s TTL leaves that
    // restart well inside the lease whenever the kill lands.
    let cluster = Cluster::up(3, 5);
    cluster.submit(&[("plain@.service", PLAIN)]);
    cluster.ok(&[
        "start",
        "--no-block",
        "plain@1",
        "plain@2",
        "plain@3",
        "plain@4",
        "plain@5",
        "plain@6",
    ]);
    wait_for(Duration::from_secs(15), "6 active units", || {
        (cluster.active().len() == 6).then_some(())
    });
    let before = cluster.active();
    let entered: BTreeMap<String, String> = before
        .iter()
        .map(|(unit, hosts)| (unit.clone(), cluster.entered(&hosts[0], unit)))
        .collect();
    let host = "h2";
    let pid = |c: &Cluster| {
        text(
            &c.exec(host, &["systemctl", "show", "-P", "MainPID", "flotilla"])
                .stdout,
        )
        .trim()
        .to_string()
    };
    let old_pid = pid(&cluster);
    let out = cluster.exec(host, &["systemctl", "kill", "-s", "KILL", "flotilla"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // systemd restarts it (Restart=on-failure) well within the TTL.
    wait_for(Duration::from_secs(10), "a new daemon process", || {
        let now = pid(&cluster);
        (now != old_pid && now != "0" && !now.is_empty()).then_some(())
    });
    std::thread::sleep(cluster.ttl * 2);
    assert_eq!(cluster.active(), before, "no unit moved");
    for (unit, hosts) in &before {
        assert_eq!(
            cluster.entered(&hosts[0], unit),
            entered[unit],
            "{unit} was not restarted"
        );
    }

    // h3 takes h1's machine id: a different install with the same id must stay out.
    let h1_id = cluster.id_of("h1").to_string();
    let h3_id = cluster.id_of("h3").to_string();
    let out = cluster.exec(
        "h3",
        &[
            "sh",
            "-c",
            &format!("echo {h1_id} > /etc/machine-id && systemctl restart flotilla"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for(
        Duration::from_secs(15),
        "h3's old presence to expire",
        || (!cluster.machines().contains(&h3_id)).then_some(()),
    );
    let (_, _) = wait_for(
        Duration::from_secs(15),
        "the duplicate's error in h3's journal",
        || {
            // --merge: journalctl alone reads the journal of the NEW machine id.
            let log = cluster.exec(
                "h3",
                &["journalctl", "--merge", "-u", "flotilla", "--no-pager"],
            );
            text(&log.stdout)
                .contains("another flotilla daemon")
                .then_some(())
        },
    );
    let machines = cluster.machines();
    assert_eq!(
        machines.len(),
        2,
        "the duplicate is not registered: {machines:?}"
    );
    assert!(machines.contains(&h1_id));
    // h3's units moved away (its presence expired), h1 kept its own.
    wait_for(Duration::from_secs(15), "h3's units elsewhere", || {
        let active = cluster.active();
        (active.len() == 6 && active.values().flatten().all(|h| h != "h3")).then_some(())
    });
    assert!(
        cluster.systemd_active("h3", "plain@*").is_empty(),
        "h3 stopped its copies"
    );
}

/// Gives a host metadata at runtime: rewrite its config, `systemctl reload flotilla`.
fn set_metadata(cluster: &Cluster, host: &str, pairs: &str) {
    let script = format!(
        "sed -i '/^\\[metadata\\]/,$d' /etc/flotilla/flotilla.toml && \
         printf '[metadata]\\n{pairs}\\n' >> /etc/flotilla/flotilla.toml && \
         systemctl reload flotilla"
    );
    let out = cluster.exec(host, &["sh", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Hosts where `unit` is reported active, sorted.
fn hosts_of(cluster: &Cluster, unit: &str) -> Vec<String> {
    let mut hosts = cluster.active().remove(unit).unwrap_or_default();
    hosts.sort();
    hosts
}

#[test]
fn affinity_pinning_metadata_and_global_units() {
    let cluster = Cluster::up(3, 2);
    set_metadata(&cluster, "h1", "disk = \"ssd\"\nregion = \"eu\"");
    set_metadata(&cluster, "h2", "disk = \"hdd\"\nregion = \"eu\"");
    set_metadata(&cluster, "h3", "disk = \"ssd\"\nregion = \"us\"");
    let pin = format!(
        "{PLAIN}[X-Fleet]\nMachineID={}\n",
        &cluster.id_of("h2")[..8]
    );
    cluster.submit(&[
        ("app.service", PLAIN),
        (
            "app-sidekick.service",
            &format!("{PLAIN}[X-Fleet]\nMachineOf=app.service\n"),
        ),
        ("pinned.service", &pin),
        // AND across keys, OR within one: ssd in eu → only h1.
        (
            "ssd-eu.service",
            &format!("{PLAIN}[X-Fleet]\nMachineMetadata=disk=ssd\nMachineMetadata=region=eu\n"),
        ),
        // OR within a key: hdd or nvme → h2 only.
        (
            "either.service",
            &format!("{PLAIN}[X-Fleet]\nGlobal=true\nMachineMetadata=\"disk=hdd\" \"disk=nvme\"\n"),
        ),
        // Negation, global: everywhere but hdd → h1, h3.
        (
            "not-hdd.service",
            &format!("{PLAIN}[X-Fleet]\nGlobal=true\nMachineMetadata=disk!=hdd\n"),
        ),
        (
            "everywhere.service",
            &format!("{PLAIN}[X-Fleet]\nGlobal=true\n"),
        ),
    ]);
    wait_for(Duration::from_secs(10), "metadata published", || {
        let out = cluster.ok(&["list-machines"]);
        (out.matches("disk=").count() == 3).then_some(())
    });
    cluster.ok(&[
        "start",
        "--no-block",
        "app",
        "app-sidekick",
        "pinned",
        "ssd-eu",
        "either",
        "not-hdd",
        "everywhere",
    ]);
    wait_for(Duration::from_secs(15), "every unit active", || {
        let active = cluster.active();
        (active.len() == 7 && active["everywhere.service"].len() == 3).then_some(())
    });
    let app = hosts_of(&cluster, "app.service");
    assert_eq!(
        hosts_of(&cluster, "app-sidekick.service"),
        app,
        "MachineOf co-locates"
    );
    assert_eq!(hosts_of(&cluster, "pinned.service"), ["h2"]);
    assert_eq!(hosts_of(&cluster, "ssd-eu.service"), ["h1"]);
    assert_eq!(hosts_of(&cluster, "either.service"), ["h2"]);
    assert_eq!(hosts_of(&cluster, "not-hdd.service"), ["h1", "h3"]);
    assert_eq!(hosts_of(&cluster, "everywhere.service"), ["h1", "h2", "h3"]);
    for host in ["h1", "h2", "h3"] {
        let mine = cluster.systemd_active(host, "*.service");
        assert!(
            mine.contains(&"everywhere.service".to_string()),
            "systemd on {host} runs the global unit: {mine:?}"
        );
    }

    // Metadata changes at runtime: h2 becomes ssd, so not-hdd comes, either goes.
    set_metadata(&cluster, "h2", "disk = \"ssd\"\nregion = \"eu\"");
    wait_for(
        Duration::from_secs(15),
        "global units to follow metadata",
        || {
            (hosts_of(&cluster, "not-hdd.service") == ["h1", "h2", "h3"]
                && hosts_of(&cluster, "either.service").is_empty())
            .then_some(())
        },
    );
    assert!(cluster.systemd_active("h2", "either.service").is_empty());

    // A host that joins later gets the global units: h3 leaves (its daemon
    // stops, its lease expires) and comes back.
    let out = cluster.exec("h3", &["systemctl", "stop", "flotilla"]);
    assert!(out.status.success());
    let h3 = cluster.id_of("h3").to_string();
    wait_for(Duration::from_secs(15), "h3 to leave", || {
        (!cluster.machines().contains(&h3)).then_some(())
    });
    let out = cluster.exec("h3", &["systemctl", "start", "flotilla"]);
    assert!(out.status.success());
    wait_for(
        Duration::from_secs(15),
        "the global unit on the returning host",
        || (hosts_of(&cluster, "everywhere.service") == ["h1", "h2", "h3"]).then_some(()),
    );

    // MachineOf pairs move together when their host dies (the leader's host
    // is spared so the test is about the pair, not about elections).
    let leader = cluster.leader();
    if app[0] == leader {
        return;
    }
    cluster.lab(&["kill", &app[0]]);
    let (moved, took) = wait_for(Duration::from_secs(15), "the pair to move", || {
        let app_now = hosts_of(&cluster, "app.service");
        (app_now.len() == 1
            && app_now != app
            && hosts_of(&cluster, "app-sidekick.service") == app_now)
            .then_some(app_now)
    });
    eprintln!("the MachineOf pair moved from {app:?} to {moved:?} in {took:?}");
}

#[test]
fn replace_evicts_replaces_displaces_and_drain_moves() {
    let cluster = Cluster::up(3, 2);
    cluster.submit(&[
        ("a.service", PLAIN),
        ("b.service", PLAIN),
        ("v1.service", PLAIN),
    ]);
    cluster.ok(&["start", "--no-block", "a", "v1"]);
    wait_for(Duration::from_secs(15), "a and v1 active", || {
        (cluster.active().len() == 2).then_some(())
    });
    let a_host = hosts_of(&cluster, "a.service");
    // b follows a by MachineOf, so it lands beside a.
    cluster.replace(
        "b.service",
        &format!("{PLAIN}[X-Fleet]\nMachineOf=a.service\n"),
    );
    cluster.ok(&["start", "--no-block", "b"]);
    wait_for(Duration::from_secs(15), "b beside a", || {
        (hosts_of(&cluster, "b.service") == a_host).then_some(())
    });
    let a_entered = cluster.entered(&a_host[0], "a.service");

    // --replace a with a Conflicts glob matching b: b is evicted (its MachineOf
    // keeps it from going anywhere else), a is reloaded with its new body.
    cluster.replace(
        "a.service",
        &format!("[Unit]\nDescription=a, second body\n{PLAIN}[X-Fleet]\nConflicts=b.service\n"),
    );
    wait_for(Duration::from_secs(15), "b evicted", || {
        (cluster.systemd_active(&a_host[0], "b.service").is_empty()
            && hosts_of(&cluster, "a.service") == a_host
            && cluster.entered(&a_host[0], "a.service") != a_entered)
            .then_some(())
    });
    assert!(hosts_of(&cluster, "b.service").is_empty(), "b runs nowhere");
    // systemd runs the new body (it was reloaded), not the one it had cached.
    let out = cluster.exec(
        &a_host[0],
        &["systemctl", "show", "-P", "Description", "a.service"],
    );
    assert_eq!(text(&out.stdout).trim(), "a, second body");
    let out = cluster.ok(&["cat", "a.service"]);
    assert!(out.contains("Conflicts=b.service"), "{out}");

    // Replaces: v2 goes where v1 runs and v1 moves elsewhere.
    let v1_before = hosts_of(&cluster, "v1.service");
    cluster.submit(&[(
        "v2.service",
        &format!("{PLAIN}[X-Fleet]\nReplaces=v1.service\n"),
    )]);
    cluster.ok(&["start", "--no-block", "v2"]);
    wait_for(Duration::from_secs(15), "v2 to displace v1", || {
        let v1 = hosts_of(&cluster, "v1.service");
        (hosts_of(&cluster, "v2.service") == v1_before && v1.len() == 1 && v1 != v1_before)
            .then_some(())
    });

    // Drain: every unit leaves h3 and nothing new goes there; undo lets it work again.
    let h3 = cluster.id_of("h3").to_string();
    cluster.submit(&[("plain@.service", PLAIN)]);
    cluster.ok(&[
        "start",
        "--no-block",
        "plain@1",
        "plain@2",
        "plain@3",
        "plain@4",
        "plain@5",
        "plain@6",
    ]);
    wait_for(Duration::from_secs(15), "plain units active", || {
        (cluster
            .active()
            .keys()
            .filter(|u| u.starts_with("plain@"))
            .count()
            == 6)
            .then_some(())
    });
    cluster.ok(&["drain", &h3[..8]]);
    wait_for(Duration::from_secs(15), "h3 drained", || {
        let active = cluster.active();
        (active.keys().filter(|u| u.starts_with("plain@")).count() == 6
            && active.values().flatten().all(|h| h != "h3")
            && cluster
                .systemd_active("h3", "*.service")
                .iter()
                .all(|u| !u.starts_with("plain@")))
        .then_some(())
    });
    let out = cluster.ok(&["list-machines", "--fields", "machine,drained"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&h3[..8]) && l.ends_with("true")),
        "{out}"
    );
    cluster.ok(&["drain", "--undo", &h3[..8]]);
    cluster.ok(&["start", "--no-block", "plain@7", "plain@8", "plain@9"]);
    wait_for(Duration::from_secs(15), "h3 takes new units", || {
        cluster
            .active()
            .values()
            .flatten()
            .any(|h| h == "h3")
            .then_some(())
    });
}

#[test]
fn a_host_running_a_conflicting_unit_outside_flotilla_is_skipped() {
    let cluster = Cluster::up(3, 3);
    // h3 runs hello@0 outside flotilla, holding h3's hello lock.
    let out = cluster.exec(
        "h3",
        &[
            "systemd-run",
            "--unit=hello@0.service",
            "/usr/bin/flock",
            "-n",
            "/run/hello.lock",
            "/bin/sleep",
            "infinity",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    cluster.submit(&[("hello@.service", HELLO)]);
    cluster.ok(&["start", "--no-block", "hello@1", "hello@2", "hello@3"]);
    wait_for(Duration::from_secs(15), "2 active hello units", || {
        (cluster.active().len() == 2).then_some(())
    });
    // Longer than the claim bound (5 s): the third is re-proposed, never lands on h3.
    std::thread::sleep(Duration::from_secs(6));
    let active = cluster.active();
    assert_eq!(active.len(), 2, "{active:?}");
    assert!(active.values().flatten().all(|h| h != "h3"), "{active:?}");
    assert_eq!(cluster.systemd_active("h3", "hello@*"), ["hello@0.service"]);
    assert_none_failed(&cluster, "hello@*");
    // Once the foreign unit stops, h3 takes the waiting instance.
    let out = cluster.exec("h3", &["systemctl", "stop", "hello@0.service"]);
    assert!(out.status.success());
    let (_, took) = wait_for(Duration::from_secs(20), "the third instance on h3", || {
        (cluster.active().len() == 3).then_some(())
    });
    eprintln!("h3 took the waiting instance {took:?} after the foreign unit stopped");
    assert_eq!(cluster.systemd_active("h3", "hello@*").len(), 1);
    assert_none_failed(&cluster, "hello@*");
}

#[test]
fn a_unit_named_like_one_of_the_hosts_own_is_refused_not_loaded_over_it() {
    let cluster = Cluster::up(1, 3);
    let h1 = &cluster.hosts[0].name;
    let show = |unit: &str, property: &str| {
        let out = cluster.exec(h1, &["systemctl", "show", "-P", property, unit]);
        text(&out.stdout).trim().to_string()
    };
    let sshd_path = show("ssh.service", "FragmentPath");
    assert!(sshd_path.starts_with("/lib/systemd/system/"), "{sshd_path}");
    let sshd_started = cluster.entered(h1, "ssh.service");
    // A transient unit (systemd-run) is the host's own just the same.
    let out = cluster.exec(
        h1,
        &[
            "systemd-run",
            "--unit=busy.service",
            "/bin/sleep",
            "infinity",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    cluster.submit(&[
        ("ssh.service", PLAIN),
        ("busy.service", PLAIN),
        ("mine.service", PLAIN),
    ]);
    cluster.ok(&[
        "start",
        "--no-block",
        "ssh.service",
        "busy.service",
        "mine.service",
    ]);

    let units = |cluster: &Cluster| -> serde_json::Value {
        let out = cluster.ok(&["list-units", "--json"]);
        serde_json::from_str(&out).unwrap()
    };
    let (rows, _) = wait_for(Duration::from_secs(20), "two refusals reported", || {
        let rows = units(&cluster);
        let failed = rows
            .as_array()?
            .iter()
            .filter(|r| r["active"] == "failed" && r["reason"].is_string())
            .count();
        (failed == 2).then_some(rows)
    });
    let reason = |unit: &str| -> String {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["unit"] == unit)
            .and_then(|r| r["reason"].as_str())
            .unwrap_or_else(|| panic!("no reason for {unit}: {rows}"))
            .to_string()
    };
    assert!(reason("ssh.service").contains(&sshd_path), "{rows}");
    assert!(
        reason("busy.service").contains("/run/systemd/transient/busy.service"),
        "{rows}"
    );
    assert_eq!(
        cluster.active().keys().collect::<Vec<_>>(),
        ["mine.service"]
    );

    // systemd still runs the host's own, from its own file, never restarted.
    assert_eq!(show("ssh.service", "FragmentPath"), sshd_path);
    assert_eq!(show("ssh.service", "ActiveState"), "active");
    assert_eq!(cluster.entered(h1, "ssh.service"), sshd_started);
    assert_eq!(show("busy.service", "ActiveState"), "active");
    let out = cluster.exec(h1, &["ls", "/run/flotilla/units", "/run/systemd/system"]);
    let listed = text(&out.stdout);
    assert!(listed.contains("mine.service"), "{listed}");
    assert!(!listed.contains("ssh.service"), "{listed}");
    assert!(!listed.contains("busy.service"), "{listed}");

    let explained = cluster.ok(&["explain", "ssh.service"]);
    assert!(explained.contains("not loaded"), "{explained}");
    assert!(explained.contains(&sshd_path), "{explained}");

    // Destroying flotilla's ssh.service leaves the host's alone.
    cluster.ok(&["destroy", "ssh.service", "busy.service"]);
    wait_for(Duration::from_secs(15), "the refusals gone", || {
        (units(&cluster).as_array()?.len() == 1).then_some(())
    });
    assert_eq!(show("ssh.service", "ActiveState"), "active");
    assert_eq!(cluster.entered(h1, "ssh.service"), sshd_started);
    assert_eq!(show("busy.service", "ActiveState"), "active");
}

#[test]
fn losing_quorum_stops_nothing_and_recovery_restarts_nothing() {
    let cluster = Cluster::up(3, 3);
    cluster.submit(&[("plain@.service", PLAIN)]);
    cluster.ok(&[
        "start",
        "--no-block",
        "plain@1",
        "plain@2",
        "plain@3",
        "plain@4",
        "plain@5",
        "plain@6",
    ]);
    wait_for(Duration::from_secs(15), "6 active units", || {
        (cluster.active().len() == 6).then_some(())
    });
    let survivor = "h3";
    let mine = cluster.systemd_active(survivor, "plain@*");
    assert!(!mine.is_empty(), "{survivor} runs some units");
    let entered: Vec<String> = mine.iter().map(|u| cluster.entered(survivor, u)).collect();

    // Two of three Raft members die: no quorum, no leader, no store.
    cluster.lab(&["kill", "h1"]);
    cluster.lab(&["kill", "h2"]);
    std::thread::sleep(cluster.ttl * 3);
    assert_eq!(
        cluster.systemd_active(survivor, "plain@*"),
        mine,
        "nothing stops while the store is gone"
    );

    // The quorum comes back: the survivor keeps its lease (it renews within
    // the remaining time the new leader grants) and restarts nothing. The
    // powered-off hosts' units were not running anyway: they come back on
    // their hosts or, if a host's lease ran out before its daemon was up
    // again, anywhere (the survivor included).
    cluster.lab(&["start", "h1"]);
    cluster.lab(&["start", "h2"]);
    wait_for(Duration::from_secs(30), "all 6 units active again", || {
        (cluster.active().len() == 6).then_some(())
    });
    std::thread::sleep(cluster.ttl);
    let now = cluster.systemd_active(survivor, "plain@*");
    for unit in &mine {
        assert!(
            now.contains(unit),
            "{unit} still runs on {survivor}: {now:?}"
        );
    }
    let after: Vec<String> = mine.iter().map(|u| cluster.entered(survivor, u)).collect();
    assert_eq!(after, entered, "no unit on {survivor} was restarted");
    let active = cluster.active();
    for unit in &mine {
        assert_eq!(active[unit], [survivor], "{unit} stayed on {survivor}");
    }
    let copies = copies(&cluster, "plain@*");
    assert_eq!(copies.len(), 6, "every unit runs: {copies:?}");
    assert!(
        copies.values().all(|n| *n == 1),
        "each runs once: {copies:?}"
    );
    eprintln!("{survivor} ran {mine:?} and runs {now:?} after the recovery; active: {active:?}");
}

#[test]
fn a_fenced_unit_stops_when_cut_off_and_runs_again_when_back_within_the_ttl() {
    // TTL 6 s, FenceAfter=2 (raised to TTL/3 + 1 s = 3 s): a 5 s cut stops the
    // unit but keeps the lease, so it comes back where it was.
    let cluster = Cluster::up(3, 6);
    let cut = last_follower(&cluster);
    let fenced = fenced_unit(&cut.machine_id, 2);
    cluster.submit(&[("fenced.service", &fenced), ("plain.service", PLAIN)]);
    cluster.ok(&["start", "fenced"]);
    let before = cluster.entered(&cut.name, "fenced.service");
    cluster.lab(&["partition", &cut.name]);
    let (_, took) = wait_for(
        Duration::from_secs(10),
        "the fence to stop the unit",
        || {
            cluster
                .systemd_active(&cut.name, "fenced.service")
                .is_empty()
                .then_some(())
        },
    );
    eprintln!("fenced.service stopped {took:?} after the cut");
    // Not before FenceAfter (the last renewal came at most TTL/3 = 2 s before
    // the cut), at most 3 s after that renewal plus the agent's 250 ms fence
    // clock and this test's polling.
    assert!(
        took >= Duration::from_secs(1),
        "not before FenceAfter: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(4500),
        "fenced too late: {took:?}"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(took));
    cluster.lab(&["heal", &cut.name]);
    wait_for(
        Duration::from_secs(10),
        "fenced.service running again",
        || (cluster.systemd_active(&cut.name, "fenced.service").len() == 1).then_some(()),
    );
    assert_ne!(
        cluster.entered(&cut.name, "fenced.service"),
        before,
        "it was restarted"
    );
    assert!(
        cluster.machines().contains(&cut.machine_id),
        "the lease survived the 5 s cut"
    );
}

#[test]
fn an_agent_only_host_claims_promptly_after_the_server_it_watched_goes_silent() {
    // h4 has no Raft seat: its agent watches its own prefix through a server,
    // h1 first. A server cut off (or powered off) sends no reset, so that
    // watch must find out by itself that it went silent, and move on.
    let cluster = Cluster::up(4, 5);
    let h4 = cluster.id_of("h4").to_string();
    cluster.submit(&[(
        "pinned@.service",
        &format!("{PLAIN}[X-Fleet]\nMachineID={h4}\n"),
    )]);
    cluster.ok(&["start", "pinned@0"]);
    let h4_conns = established(&cluster, "h4", "( dport = :4001 )");
    let h1 = cluster
        .store_endpoint
        .split(',')
        .next()
        .unwrap()
        .to_string();
    assert!(
        h4_conns.contains(&h1),
        "h4's agent talks to h1 first: {h4_conns}"
    );
    // h4's own address, as its side of those connections shows it.
    let h4_ip = h4_conns
        .split_whitespace()
        .nth(2)
        .and_then(|local| local.rsplit_once(':'))
        .map(|(ip, _)| format!("{ip}:"))
        .expect("a connection line");
    // Cut off, h1 goes silent: no reset, no end of stream, nothing.
    cluster.lab(&["partition", "h1"]);
    let cut = Instant::now();
    // Longer than a watch may stay silent before it is given up.
    std::thread::sleep(Duration::from_secs(4));
    wait_for(Duration::from_secs(10), "the cluster to answer", || {
        cluster.try_rows()
    });
    for i in 1..=3 {
        let unit = format!("pinned@{i}.service");
        cluster.ok(&["start", "--no-block", &unit]);
        let (_, took) = wait_for(Duration::from_secs(10), "the unit on h4", || {
            (cluster.systemd_active("h4", &unit).len() == 1).then_some(())
        });
        eprintln!("{unit} active on h4 {took:?} after start");
        // Woken by its watch, not by a periodic pass.
        assert!(
            took < Duration::from_millis(1500),
            "{unit} took {took:?} to start on h4"
        );
    }
    let rows = cluster.rows();
    for row in rows.iter().filter(|r| r.unit.starts_with("pinned@")) {
        assert_eq!(row.machine.as_deref(), Some(h4.as_str()), "{row:?}");
    }
    // And h1 lets go of h4's connections (watch heartbeats unacknowledged,
    // keepalive probes unanswered) instead of keeping them forever.
    wait_for(
        Duration::from_secs(20),
        "h1 to drop h4's connections",
        || (!established(&cluster, "h1", "( sport = :4001 )").contains(&h4_ip)).then_some(()),
    );
    eprintln!(
        "h1 dropped h4's connections {:?} after the cut",
        cut.elapsed()
    );
}

#[test]
fn a_frozen_member_neither_hangs_the_cli_nor_stops_the_cluster() {
    let cluster = Cluster::up(3, 4);
    cluster.submit(&[("plain@.service", PLAIN)]);
    // Every client tries h1 first. Frozen, its daemon still has its port
    // open (the kernel accepts connections for it) but answers nothing.
    let out = cluster.exec(
        "h1",
        &["systemctl", "kill", "--signal=SIGSTOP", "flotilla.service"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A bounded CLI call, so a hang fails here instead of stalling the suite.
    let cli = |args: &[&str]| {
        let started = Instant::now();
        let command = cluster.command();
        let out = std::process::Command::new("timeout")
            .arg("30")
            .arg(command.get_program())
            .args(args)
            .envs(command.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let (out, took) = cli(&["list-units"]);
    assert!(
        out.status.success(),
        "list-units with h1 frozen: {}",
        text(&out.stderr)
    );
    eprintln!("list-units answered in {took:?} with h1 frozen");
    assert!(took < Duration::from_secs(5), "list-units took {took:?}");
    let (out, took) = cli(&["start", "--no-block", "plain@1", "plain@2"]);
    assert!(out.status.success(), "start: {}", text(&out.stderr));
    eprintln!("start answered in {took:?} with h1 frozen");
    assert!(took < Duration::from_secs(5), "start took {took:?}");
    // h1's agent is frozen too: its lease runs out and nothing lands there.
    let (active, took) = wait_for(Duration::from_secs(20), "2 active units", || {
        let active = cluster.active();
        (active.len() == 2).then_some(active)
    });
    eprintln!("both units active {took:?} after start: {active:?}");
    assert!(active.values().flatten().all(|h| h != "h1"), "{active:?}");
    let out = cluster.exec(
        "h1",
        &["systemctl", "kill", "--signal=SIGCONT", "flotilla.service"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// One `key = value` line of `host`'s daemon configuration, as written.
fn config_line(cluster: &Cluster, host: &str, key: &str) -> String {
    cluster
        .sh(host, "cat /etc/flotilla/flotilla.toml")
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap_or_else(|| panic!("{host}'s config has no {key}"))
        .to_string()
}

#[test]
fn a_survivor_forced_into_a_new_cluster_keeps_every_unit_running_and_takes_new_members() {
    // h1-h3 hold the Raft seats; h4 and h5 run only the agent.
    let cluster = Cluster::up_with(5, 3, 3);
    cluster.submit(&[("plain@.service", PLAIN)]);
    let names: Vec<String> = (1..=10).map(|i| format!("plain@{i}.service")).collect();
    let mut args = vec!["start", "--no-block"];
    args.extend(names.iter().map(String::as_str));
    cluster.ok(&args);
    wait_for(Duration::from_secs(20), "10 active units", || {
        (cluster.active().len() == 10).then_some(())
    });
    let survivors = ["h3", "h4", "h5"];
    let running: BTreeMap<&str, Vec<(String, String)>> = survivors
        .iter()
        .map(|h| {
            let units = cluster.systemd_active(h, "plain@*");
            (
                *h,
                units
                    .iter()
                    .map(|u| (u.clone(), cluster.entered(h, u)))
                    .collect(),
            )
        })
        .collect();

    // Two of the three members die for good: no quorum, ever again.
    cluster.lab(&["kill", "h1"]);
    cluster.lab(&["kill", "h2"]);
    std::thread::sleep(cluster.ttl);

    // h3's daemon restarts once with --force-new-cluster (a drop-in, as an
    // operator would do it), then the drop-in goes for later restarts.
    let forced = Instant::now();
    cluster.sh(
        "h3",
        "mkdir -p /run/systemd/system/flotilla.service.d && \
         printf '[Service]\\nExecStart=\\nExecStart=/usr/bin/flotilla daemon \
         --config /etc/flotilla/flotilla.toml --force-new-cluster\\n' \
         > /run/systemd/system/flotilla.service.d/recover.conf && \
         systemctl daemon-reload && systemctl restart flotilla && \
         rm /run/systemd/system/flotilla.service.d/recover.conf && systemctl daemon-reload",
    );
    // h3 alone, and leading once its first election is over.
    let (members, _) = wait_for(Duration::from_secs(10), "h3 to lead alone", || {
        let members = cluster.ok(&["member", "list"]);
        members.contains("yes").then_some(members)
    });
    assert_eq!(members.lines().count(), 2, "h3 alone: {members}");
    assert!(members.contains("h3"), "{members}");
    // The dead hosts' units come back on the survivors; each runs once.
    wait_for(
        Duration::from_secs(30),
        "10 active units after the recovery",
        || {
            let active = cluster.active();
            (active.len() == 10
                && active.values().all(|h| {
                    h.len() == 1 && !h.contains(&"h1".to_string()) && !h.contains(&"h2".to_string())
                }))
            .then_some(())
        },
    );
    eprintln!(
        "10 units active again {:?} after the forced restart",
        forced.elapsed()
    );

    // Two new members: h4 and h5 become Raft members (added, then restarted
    // as members joining an existing cluster).
    let h3_peer = config_line(&cluster, "h3", "peer_listen");
    let h3_peer = h3_peer.split('"').nth(1).unwrap().to_string();
    let mut initial = format!("h3={h3_peer}");
    // The members' client addresses: they listen on 0.0.0.0 and publish none.
    let mut stores = vec![h3_peer.replace(":4002", ":4001")];
    for host in ["h4", "h5"] {
        let ip = cluster.sh(host, "hostname -I");
        let ip = ip.split_whitespace().next().unwrap().to_string();
        let peer = format!("{ip}:4002");
        // One membership change at a time: the last newcomer's promotion may
        // still be on its way.
        wait_for(Duration::from_secs(20), "member add to be taken", || {
            let out = cluster.flotilla(&["member", "add", host, &peer]);
            out.status.success().then_some(())
        });
        initial.push_str(&format!(",{host}={peer}"));
        // A member needs a member certificate: the agent one names its machine.
        let issued = tempfile::tempdir().unwrap();
        let ca = cluster.dir().join("tls");
        cluster.ok(&[
            "tls",
            "issue",
            host,
            "--role",
            "member",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            issued.path().to_str().unwrap(),
        ]);
        let read = |ext: &str| std::fs::read_to_string(issued.path().join(format!("{host}.{ext}")));
        let (cert, key) = (read("pem").unwrap(), read("key").unwrap());
        let out = cluster.exec(
            host,
            &[
                "sh",
                "-c",
                "umask 077 && printf '%s' \"$0\" > /etc/flotilla/tls/member.pem && \
                 printf '%s' \"$1\" > /etc/flotilla/tls/member.key",
                &cert,
                &key,
            ],
        );
        assert!(out.status.success(), "{host}: {}", text(&out.stderr));
        let mut config: Vec<String> = cluster
            .sh(host, "cat /etc/flotilla/flotilla.toml")
            .lines()
            .filter(|l| {
                !l.starts_with("endpoints =")
                    && !l.starts_with("tls_cert =")
                    && !l.starts_with("tls_key =")
            })
            .map(str::to_string)
            .collect();
        config.push("tls_cert = \"/etc/flotilla/tls/member.pem\"".into());
        config.push("tls_key = \"/etc/flotilla/tls/member.key\"".into());
        config.push("client_listen = \"0.0.0.0:4001\"".into());
        config.push(format!("peer_listen = \"{peer}\""));
        config.push(format!("initial_cluster = \"{initial}\""));
        config.push("initial_cluster_state = \"existing\"".into());
        config.push(config_line(&cluster, "h3", "election_timeout_ms"));
        let out = cluster.exec(
            host,
            &[
                "sh",
                "-c",
                "printf '%s\\n' \"$0\" > /etc/flotilla/flotilla.toml && systemctl restart flotilla",
                &config.join("\n"),
            ],
        );
        assert!(out.status.success(), "{host}: {}", text(&out.stderr));
        stores.push(format!("{ip}:4001"));
    }
    let members = cluster.ok(&["member", "list"]);
    assert_eq!(members.lines().count(), 4, "h3, h4, h5: {members}");
    // Healthy: all three answer and follow the leader.
    let stores = stores.join(",");
    let (report, _) = wait_for(
        Duration::from_secs(30),
        "a healthy 3-member cluster",
        || {
            let out =
                cluster.flotilla(&["--store-endpoint", &stores, "cluster", "health", "--json"]);
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (out.status.success() && report["quorum"]["following"] == 3).then_some(report)
        },
    );
    eprintln!("after adding h4 and h5: {}", report["members"]);
    cluster.ok(&["kv", "put", "/after-recovery", "ok"]);

    // Throughout, nothing that ran on a survivor stopped or restarted.
    for (host, units) in &running {
        let now = cluster.systemd_active(host, "plain@*");
        for (unit, entered) in units {
            assert!(now.contains(unit), "{unit} still runs on {host}: {now:?}");
            assert_eq!(
                &cluster.entered(host, unit),
                entered,
                "{unit} on {host} was not restarted"
            );
        }
    }
    let copies = copies(&cluster, "plain@*");
    assert_eq!(copies.len(), 10, "every unit runs: {copies:?}");
    assert!(
        copies.values().all(|n| *n == 1),
        "each runs once: {copies:?}"
    );
}

/// Each unit file's name, desired state and hash, as `list-unit-files` shows them.
fn unit_files(cluster: &Cluster) -> BTreeMap<String, (String, String)> {
    let out = cluster.ok(&["list-unit-files", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    rows.iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (field("unit"), (field("desired"), field("hash")))
        })
        .collect()
}

#[test]
fn a_backup_restored_into_fresh_stores_gives_back_every_unit_and_agents_converge() {
    let cluster = Cluster::up(3, 5);
    cluster.submit(&[("plain@.service", PLAIN)]);
    cluster.ok(&["start", "plain@1", "plain@2", "plain@3", "plain@4"]);
    cluster.ok(&["load", "plain@5"]);
    cluster.ok(&["submit", "plain@6"]);
    let files = unit_files(&cluster);
    assert_eq!(files.len(), 7, "the template and 6 instances: {files:?}");
    // Where every host sees it (the hosts' /tmp is their own).
    let kept = tempfile::Builder::new()
        .prefix("flotilla-backup-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let file = kept.path().join("store.snap");
    let file = file.to_str().unwrap();
    let saved = cluster.ok(&["snapshot", "save", file]);
    eprintln!("{}", saved.trim());

    // Every member loses its store; the units keep running meanwhile.
    let hosts = ["h1", "h2", "h3"];
    for host in hosts {
        cluster.sh(
            host,
            "systemctl stop flotilla && rm -r /var/lib/flotilla/raft",
        );
    }
    for host in hosts {
        let initial = config_line(&cluster, host, "initial_cluster");
        let initial = initial.split('"').nth(1).unwrap().to_string();
        cluster.sh(
            host,
            &format!(
                "flotilla snapshot restore {file} --data-dir /var/lib/flotilla \
                 --initial-cluster {initial}"
            ),
        );
    }
    let restored = Instant::now();
    for host in hosts {
        cluster.sh(host, "systemctl start flotilla");
    }
    assert_eq!(
        unit_files(&cluster),
        files,
        "every unit, desired state and body"
    );
    // The agents converge: the 4 launched units active, each on one host;
    // plain@5 loaded (placed, not running); plain@6 nowhere.
    wait_for(Duration::from_secs(30), "the launched units active", || {
        let active = cluster.active();
        (active.len() == 4 && active.values().all(|h| h.len() == 1)).then_some(())
    });
    eprintln!(
        "4 units active {:?} after the restored members started",
        restored.elapsed()
    );
    let copies = copies(&cluster, "plain@*");
    let expected: BTreeMap<String, usize> =
        (1..=4).map(|i| (format!("plain@{i}.service"), 1)).collect();
    assert_eq!(copies, expected, "systemd runs each launched unit once");
    let rows = cluster.rows();
    let loaded: Vec<&support::cluster::Row> = rows
        .iter()
        .filter(|r| r.unit == "plain@5.service")
        .collect();
    assert_eq!(loaded.len(), 1, "{rows:?}");
    assert!(loaded[0].machine.is_some(), "plain@5 is placed: {rows:?}");
    assert!(
        !rows.iter().any(|r| r.unit == "plain@6.service"),
        "plain@6 stays inactive: {rows:?}"
    );
    // The states above could be the backup's own; these are the agents'
    // work on the restored cluster: past two TTLs every machine is still
    // present (it renews its lease), and changes reach systemd.
    std::thread::sleep(cluster.ttl * 2);
    assert_eq!(cluster.machines().len(), 3, "every agent renews");
    cluster.ok(&["stop", "plain@1"]);
    cluster.ok(&["start", "plain@6"]);
    let running: BTreeSet<String> = systemd_view(&cluster, "plain@*")
        .into_values()
        .flatten()
        .collect();
    let expected: BTreeSet<String> = [2, 3, 4, 6]
        .iter()
        .map(|i| format!("plain@{i}.service"))
        .collect();
    assert_eq!(running, expected, "systemd follows the restored cluster");
}
