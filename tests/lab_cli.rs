//! The CLI as a fleetctl user drives it, on a lab of real systemd hosts with
//! real sshd, from the outer machine through the hosts' HTTP API (issue 12's
//! proof, CLI side): ssh/status/journal to a unit's host, host keys checked,
//! `--tunnel`, a failing unit, fleet's client scenarios, `--replace`,
//! restart, and 200 units started in one call.
//!
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a time.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::cluster::{Cluster, wait_for};
use support::{read_ticks, text};

fn unit_dir(cluster: &Cluster) -> std::path::PathBuf {
    let dir = cluster.dir().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes unit files; returns their paths.
fn files(cluster: &Cluster, units: &[(&str, &str)]) -> Vec<String> {
    let dir = unit_dir(cluster);
    units
        .iter()
        .map(|(name, body)| {
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            path.display().to_string()
        })
        .collect()
}

fn fails(out: &Output, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

const HELLO: &str =
    "[Service]\nExecStart=/bin/sh -c \"echo hello-from-unit; exec sleep infinity\"\n";
const TICKER: &str = "[Service]\nExecStart=/bin/sh -c \"i=0; while true; do i=$$((i+1)); \
                      echo tick $$i; sleep 0.2; done\"\n";

#[test]
fn ssh_status_journal_and_the_tunnel_reach_a_units_host() {
    let cluster = Cluster::up(3, 3);
    let paths = files(
        &cluster,
        &[("hello.service", HELLO), ("ticker.service", TICKER)],
    );
    let started = cluster.ok(&["start", &paths[0], &paths[1]]);
    let line = started
        .lines()
        .find(|l| l.starts_with("Unit hello.service launched on "))
        .unwrap_or_else(|| panic!("{started}"));
    let legend = line.rsplit(' ').next().unwrap();
    let (id8, ip) = legend.split_once(".../").expect("id8.../ip");
    assert_eq!(id8.len(), 8, "{line}");
    let host = cluster
        .hosts
        .iter()
        .find(|h| h.machine_id.starts_with(id8))
        .unwrap()
        .name
        .clone();

    // ssh to the unit's host, to a machine by IP and by id prefix.
    assert_eq!(
        cluster.ok(&["ssh", "hello.service", "echo", "foo"]),
        "foo\n"
    );
    let ssh_host = |target: &str| cluster.ok(&["ssh", target, "hostname"]).trim().to_string();
    assert_eq!(ssh_host(ip), host);
    let h3 = cluster.id_of("h3").to_string();
    assert_eq!(ssh_host(&h3[..8]), "h3");

    // status and journal run there; from inside that host, they run locally.
    let status = cluster.ok(&["status", "hello.service"]);
    assert!(status.contains("Active: active"), "{status}");
    let journal = cluster.ok(&["journal", "hello.service"]);
    assert!(journal.contains("hello-from-unit"), "{journal}");
    let local = cluster.exec(&host, &["flotilla", "status", "hello.service"]);
    assert!(
        text(&local.stdout).contains("Active: active"),
        "{}{}",
        text(&local.stdout),
        text(&local.stderr)
    );

    // journal -f follows: new ticks arrive while it runs.
    let mut follow = cluster
        .command()
        .args(["journal", "-f", "--lines", "1", "ticker.service"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ticks = read_ticks(follow.stdout.take().unwrap(), 4, Duration::from_secs(20));
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert!(ticks.len() >= 4, "journal -f printed {ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "{ticks:?}");

    // A host whose key changed is refused under strict checking (the
    // default), and reached when checking is turned off.
    let known = std::fs::read_to_string(&cluster.known_hosts).unwrap();
    // Lines are `IP,NAME KEYTYPE KEY`; h1's entries get h2's keys.
    let names_of = |line: &str| line.split(' ').next().unwrap().to_string();
    let entry = |host: &str| {
        known
            .lines()
            .map(names_of)
            .find(|names| names.ends_with(&format!(",{host}")))
            .unwrap()
    };
    let (h1_names, h2_names) = (entry("h1"), entry("h2"));
    let h1_ip = h1_names.split(',').next().unwrap().to_string();
    let h2_ip = h2_names.split(',').next().unwrap().to_string();
    let forged: String = known
        .lines()
        .filter(|l| names_of(l) != h1_names)
        .map(|l| format!("{l}\n"))
        .chain(
            known
                .lines()
                .filter(|l| names_of(l) == h2_names)
                .map(|l| format!("{}\n", l.replacen(&h2_names, &h1_names, 1))),
        )
        .collect();
    let forged_file = cluster.dir().join("forged_known_hosts");
    std::fs::write(&forged_file, forged).unwrap();
    let forged_path = forged_file.to_str().unwrap();
    let refused = cluster.flotilla(&["--known-hosts-file", forged_path, "ssh", &h1_ip, "true"]);
    assert_eq!(
        refused.status.code(),
        Some(255),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        text(&refused.stderr).contains("Host key verification failed"),
        "{}",
        text(&refused.stderr)
    );
    let loose = cluster.flotilla(&[
        "ssh",
        "--known-hosts-file",
        forged_path,
        "--strict-host-key-checking=false",
        &h1_ip,
        "echo",
        "in",
    ]);
    assert_eq!(text(&loose.stdout), "in\n", "{}", text(&loose.stderr));

    // --tunnel: the API of a host's unix socket, through ssh to that host;
    // and ssh to a unit's host through it.
    let tunneled = cluster.ok(&[
        "--tunnel",
        &h2_ip,
        "--endpoint",
        "unix:///run/flotilla/api.sock",
        "list-units",
    ]);
    assert!(tunneled.contains("hello.service\t"), "{tunneled}");
    // Every endpoint is tried through the tunnel: a dead first one is skipped.
    let tunneled = cluster.ok(&[
        "--tunnel",
        &h2_ip,
        "--endpoint",
        "http://127.0.0.1:1,unix:///run/flotilla/api.sock",
        "list-units",
    ]);
    assert!(tunneled.contains("hello.service\t"), "{tunneled}");
    // An https endpoint through the tunnel: TLS end to end, checked as always.
    let tunneled = cluster.ok(&[
        "--tunnel",
        &h2_ip,
        "--endpoint",
        "https://127.0.0.1:4003",
        "list-units",
    ]);
    assert!(tunneled.contains("hello.service\t"), "{tunneled}");
    let through = cluster.ok(&["--tunnel", &h2_ip, "ssh", "hello.service", "hostname"]);
    assert_eq!(through.trim(), host);

    // A unit whose ExecStart fails: start says so, promptly, and fails.
    let broken = files(
        &cluster,
        &[("broken.service", "[Service]\nExecStart=/bin/false\n")],
    );
    let started = Instant::now();
    let out = cluster.flotilla(&["start", &broken[0]]);
    let took = started.elapsed();
    let err = fails(&out, "start of a failing unit");
    assert!(
        err.contains("broken.service (systemd reports it failed on"),
        "{err}"
    );
    assert!(err.contains("flotilla status broken.service"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    eprintln!("start of a failing unit failed after {took:?}");

    // What needs the API's flotilla extras: a machine by host name, and
    // status and journal through the API, without ssh: of the unit's host,
    // and of another host, which asks the unit's host over mutual TLS.
    assert_eq!(ssh_host("h2"), "h2");
    let its_api = format!("https://{ip}:4003");
    let status = cluster.ok(&[
        "status",
        "--via-api",
        "--endpoint",
        &its_api,
        "hello.service",
    ]);
    assert!(status.contains("Active: active"), "{status}");
    let journal = cluster.ok(&[
        "journal",
        "--via-api",
        "--endpoint",
        &its_api,
        "hello.service",
    ]);
    assert!(journal.contains("hello-from-unit"), "{journal}");
    let elsewhere = cluster
        .hosts
        .iter()
        .find(|h| h.name != host)
        .map(|h| h.name.clone())
        .unwrap();
    let other_ip = entry(&elsewhere).split(',').next().unwrap().to_string();
    let other_api = format!("https://{other_ip}:4003");
    let status = cluster.ok(&[
        "status",
        "--via-api",
        "--endpoint",
        &other_api,
        "hello.service",
    ]);
    assert!(status.contains("Active: active"), "{status}");
}

/// `list-units` rows as (unit, active), from the table.
fn unit_rows(cluster: &Cluster) -> Vec<(String, String)> {
    cluster
        .ok(&["list-units", "--no-legend", "--fields", "unit,active"])
        .lines()
        .map(|l| {
            let (unit, active) = l.split_once('\t').unwrap();
            (
                unit.to_string(),
                active.trim_start_matches('\t').to_string(),
            )
        })
        .collect()
}

fn unit_files(cluster: &Cluster) -> Vec<String> {
    cluster
        .ok(&["list-unit-files", "--no-legend", "--fields", "unit"])
        .lines()
        .map(str::to_string)
        .collect()
}

const APP: &str = "[Service]\nExecStart=/bin/sleep infinity\n";

#[test]
fn fleets_client_scenarios_replace_restart_and_200_units() {
    let cluster = Cluster::up(3, 3);
    let dir = unit_dir(&cluster);
    files(&cluster, &[("app@.service", APP)]);
    let instances = |n: usize| -> Vec<String> {
        (1..=n)
            .map(|i| dir.join(format!("app@{i}.service")).display().to_string())
            .collect()
    };
    let names = |n: usize| -> Vec<String> { (1..=n).map(|i| format!("app@{i}.service")).collect() };
    let run = |verb: &[&str], units: &[String]| {
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(units.iter().map(String::as_str));
        cluster.ok(&args)
    };

    // submit the template and 9 instances, listed sorted; destroy the instances.
    let mut submitted = vec![dir.join("app@.service").display().to_string()];
    submitted.extend(instances(9));
    run(&["submit"], &submitted);
    let mut expected = vec!["app@.service".to_string()];
    let mut sorted = names(9);
    sorted.sort();
    expected.extend(sorted);
    assert_eq!(unit_files(&cluster), expected);
    run(&["destroy"], &names(9));
    assert_eq!(unit_files(&cluster), ["app@.service"]);

    // load 6 (the cluster's template makes them), none running; unload them.
    let out = run(&["load"], &names(6));
    assert_eq!(out.matches(" loaded on ").count(), 6, "{out}");
    let rows = unit_rows(&cluster);
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(
        rows.iter().all(|(_, active)| active != "active"),
        "{rows:?}"
    );
    run(&["unload"], &names(6));
    assert!(unit_rows(&cluster).is_empty());

    // start 3; restart them, one by one, all active again; stop them.
    let out = run(&["start"], &names(3));
    assert_eq!(out.matches(" launched on ").count(), 3, "{out}");
    let on_host = |unit: &str| {
        let row = cluster.rows().into_iter().find(|r| r.unit == unit).unwrap();
        cluster.host_of(row.machine.as_deref().unwrap()).to_string()
    };
    let before: Vec<(String, String)> = names(3)
        .iter()
        .map(|u| (on_host(u), cluster.entered(&on_host(u), u)))
        .collect();
    run(&["restart"], &names(3));
    for (unit, (host, entered)) in names(3).iter().zip(&before) {
        assert_eq!(
            cluster.systemd_active(host, unit),
            std::slice::from_ref(unit),
            "{unit} active on {host}"
        );
        assert_ne!(
            &cluster.entered(host, unit),
            entered,
            "{unit} was restarted"
        );
    }
    let out = run(&["restart", "--no-block"], &names(1));
    assert_eq!(
        out,
        "Triggered unit app@1.service stop\nTriggered unit app@1.service start\n"
    );
    wait_for(Duration::from_secs(15), "app@1 active again", || {
        let host = on_host("app@1.service");
        (cluster.systemd_active(&host, "app@1.service").len() == 1).then_some(())
    });
    run(&["stop"], &names(3));
    let rows = unit_rows(&cluster);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|(_, active)| active != "active"),
        "{rows:?}"
    );
    let mut everything = names(6);
    everything.push("app@.service".into());
    run(&["destroy"], &everything);
    wait_for(Duration::from_secs(15), "empty lists", || {
        (unit_rows(&cluster).is_empty() && unit_files(&cluster).is_empty()).then_some(())
    });

    // 200 units started in one call, with the progress shown as it went.
    files(&cluster, &[("many@.service", APP)]);
    let many: Vec<String> = (1..=200)
        .map(|i| dir.join(format!("many@{i}.service")).display().to_string())
        .collect();
    let mut args = vec!["start"];
    args.extend(many.iter().map(String::as_str));
    let started = Instant::now();
    let out = cluster.flotilla(&args);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("200 units started in {took:?}; progress on stderr:\n{stderr}");
    assert_eq!(stdout.matches(" launched on ").count(), 200, "{stdout}");
    assert!(stderr.contains("200/200 units launched"), "{stderr}");
    let active = cluster.active();
    assert_eq!(
        active.keys().filter(|u| u.starts_with("many@")).count(),
        200,
        "{active:?}"
    );
    let mut args = vec!["destroy".to_string()];
    args.extend((1..=200).map(|i| format!("many@{i}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.ok(&args);
    assert_eq!(out.lines().count(), 200);

    // (Needs the API to replace a body as fleet did.) --replace on submit,
    // load and start changes what cat prints and what
    // systemd runs.
    let version = |v: &str| {
        let body =
            format!("[Service]\nExecStart=/bin/sh -c \"echo body-{v}; exec sleep infinity\"\n");
        files(&cluster, &[("r.service", &body)]).remove(0)
    };
    let file = version("v1");
    cluster.ok(&["submit", &file]);
    let file = version("v2");
    cluster.ok(&["submit", "--replace", &file]);
    let cat = cluster.ok(&["cat", "r"]);
    assert!(cat.contains("body-v2"), "cat r after the v2 replace: {cat}");
    cluster.ok(&["load", &file]);
    let file = version("v3");
    cluster.ok(&["load", "--replace", &file]);
    let cat = cluster.ok(&["cat", "r"]);
    assert!(cat.contains("body-v3"), "cat r after the v3 replace: {cat}");
    let host = on_host("r.service");
    let systemd = cluster.exec(&host, &["systemctl", "cat", "r.service"]);
    assert!(
        text(&systemd.stdout).contains("body-v3"),
        "{}",
        text(&systemd.stdout)
    );
    cluster.ok(&["start", &file]);
    let file = version("v4");
    cluster.ok(&["start", "--replace", &file]);
    assert!(cluster.ok(&["cat", "r"]).contains("body-v4"));
    let host = on_host("r.service");
    let journal = cluster.ok(&["journal", "r.service"]);
    assert!(journal.contains("body-v4"), "{journal}");
    assert_eq!(cluster.systemd_active(&host, "r.service"), ["r.service"]);
}
