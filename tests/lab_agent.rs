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

use support::cluster::{Cluster, wait_for};
use support::text;

const HELLO: &str = "\
[Unit]
Description=hello %i: holds this host's hello lock or fails
[Service]
ExecStart=/usr/bin/flock -n -E 99 /run/hello.lock /bin/sleep infinity
[X-Fleet]
Conflicts=hello@*.service
";

const PLAIN: &str = "\
[Service]
ExecStart=/bin/sleep infinity
";

/// Every host's failed units matching `pattern`, which must be none.
fn assert_none_failed(cluster: &Cluster, pattern: &str) {
    for host in &cluster.hosts {
        let failed = cluster.systemd_failed(&host.name, pattern);
        assert!(failed.is_empty(), "{} has failed units: {failed:?}", host.name);
    }
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
        "start", "hello@1", "hello@2", "hello@3", "hello@4", "hello@5",
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
        assert_eq!(units.len(), 1, "systemd on {host} runs exactly one hello: {units:?}");
    }

    // Destroy one: a waiting instance takes its host.
    let (victim, on) = active.iter().next().map(|(u, h)| (u.clone(), h[0].clone())).unwrap();
    cluster.ok(&["destroy", &victim]);
    let (after, took) = wait_for(Duration::from_secs(15), "a waiting instance to start", || {
        let now = cluster.active();
        (now.len() == 3 && !now.contains_key(&victim)).then_some(now)
    });
    eprintln!("a waiting instance took over in {took:?}");
    let newcomer = after.keys().find(|u| !active.contains_key(*u)).unwrap();
    assert_eq!(after[newcomer], vec![on.clone()], "it runs where {victim} ran");
    assert_eq!(cluster.systemd_active(&on, "hello@*"), vec![newcomer.clone()]);
    assert_none_failed(&cluster, "hello@*");

    // A unit whose ExecStart fails is reported failed, not hidden.
    cluster.submit(&[("broken.service", "[Service]\nExecStart=/bin/false\n")]);
    cluster.ok(&["start", "broken"]);
    wait_for(Duration::from_secs(15), "broken.service reported failed", || {
        cluster
            .rows()
            .into_iter()
            .any(|r| r.unit == "broken.service" && r.active.as_deref() == Some("failed"))
            .then_some(())
    });
    let out = cluster.ok(&["list-units"]);
    let line = out.lines().find(|l| l.starts_with("broken.service")).unwrap();
    assert!(line.contains("failed"), "list-units shows it failed: {line}");
}

#[test]
fn killed_hosts_units_move_within_the_ttl() {
    let cluster = Cluster::up(3, 3);
    cluster.submit(&[("plain@.service", PLAIN)]);
    let names: Vec<String> = (1..=9).map(|i| format!("plain@{i}.service")).collect();
    let mut args = vec!["start"];
    args.extend(names.iter().map(String::as_str));
    cluster.ok(&args);
    wait_for(Duration::from_secs(15), "9 active units", || {
        (cluster.active().len() == 9).then_some(())
    });

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
        // A new leader gives every lease its remaining time plus one
        // election timeout (300 ms here), then the usual path runs.
        (leader, cluster.ttl + Duration::from_millis(2300)),
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
        let (_, took) = wait_for(bound * 3, "units to move off the killed host", || {
            let active = cluster.active();
            moving
                .iter()
                .all(|u| active.get(u).is_some_and(|h| !h.contains(&victim)))
                .then_some(())
        });
        let took = took.max(killed.elapsed().min(took));
        eprintln!(
            "{} units moved off killed {victim} in {took:?} (bound {bound:?})",
            moving.len()
        );
        assert!(took <= bound, "moved in {took:?}, over the bound {bound:?}");
        for unit in &moving {
            let running: Vec<&String> = systemd_view(&cluster, unit)
                .into_iter()
                .filter(|(_, units)| !units.is_empty())
                .map(|(host, _)| host)
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| {
                    cluster
                        .hosts
                        .iter()
                        .find(|x| x.name == h)
                        .map(|x| &x.name)
                        .unwrap()
                })
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
