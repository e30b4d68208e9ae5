//! The HTTP API end to end, on 3-host labs with real systemd: fleetctl's
//! call sequences (start and wait, restart, a failing ExecStart, --replace,
//! destroy, lists with filters) against the units systemd really runs; a
//! loaded unit systemd starts itself; templates whose `[X-Fleet]` uses `%i`
//! with metadata set through PATCH; status and journal through the API (of
//! the unit's host, and of another host, which asks it over mutual TLS);
//! explain on a draining host; and a host cut off past its lease that
//! claims back, without a restart, what nobody else took.
//!
//! Every request is made with curl INSIDE a lab host (the hosts see the outer
//! machine's files, curl included), on that host's root-only unix socket
//! (and its HTTPS port, with the lab's CA).
//! Root on Debian 12 is needed; nextest runs the lab binaries one test at a
//! time.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

use support::cluster::{Cluster, wait_for};
use support::{Answer, text};

const SOCKET: &str = "/run/flotilla/api.sock";

/// Runs a shell snippet on `host` whose last word is curl's options; adds
/// `-w` so the status comes back on the last line.
fn curl(cluster: &Cluster, host: &str, script: &str) -> Answer {
    let script = format!("{script} -sS -o - -w '\\n%{{http_code}}'");
    let out = cluster.exec(host, &["sh", "-c", &script]);
    let stdout = text(&out.stdout);
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Answer {
        status: status.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{script}: no status ({}): {stdout:?}",
                text(&out.stderr).trim()
            )
        }),
        body: body.to_string(),
    }
}

/// `METHOD PATH [BODY]` on `host`'s unix socket, JSON bodies as fleetctl sends them.
fn api_on(cluster: &Cluster, host: &str, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let data = body.map_or(String::new(), |b| {
        format!(" -H 'Content-Type: application/json' --data-binary '{b}'")
    });
    curl(
        cluster,
        host,
        &format!("curl --unix-socket {SOCKET} -X {method} 'http://x{path}'{data}"),
    )
}

/// [`api_on`] h1.
fn api(cluster: &Cluster, method: &str, path: &str, body: Option<&Value>) -> Answer {
    api_on(cluster, "h1", method, path, body)
}

/// GET that must answer 200.
fn get(cluster: &Cluster, path: &str) -> Value {
    let answer = api(cluster, "GET", path, None);
    assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
    answer.json()
}

/// PUT `body` to unit `name`, expecting `status`.
fn put(cluster: &Cluster, name: &str, body: &Value, status: u16) {
    let answer = api(
        cluster,
        "PUT",
        &format!("/fleet/v1/units/{name}"),
        Some(body),
    );
    assert_eq!(answer.status, status, "PUT {name} {body}: {answer:?}");
}

/// Polls GET units/NAME as fleetctl does until `check` holds; returns the unit.
fn wait_unit(cluster: &Cluster, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/fleet/v1/units/{name}");
    let (unit, took) = wait_for(Duration::from_secs(20), what, || {
        let answer = api(cluster, "GET", &path, None);
        (answer.status == 200 && check(&answer.json())).then(|| answer.json())
    });
    eprintln!("{what}: {took:?}");
    unit
}

fn options(description: &str, exec_start: &str) -> Value {
    json!([
        {"section": "Unit", "name": "Description", "value": description},
        {"section": "Service", "name": "ExecStart", "value": exec_start},
    ])
}

/// systemd's `is-active` of `unit` on `host`.
fn is_active(cluster: &Cluster, host: &str, unit: &str) -> String {
    let out = cluster.exec(host, &["systemctl", "is-active", unit]);
    text(&out.stdout).trim().to_string()
}

#[test]
fn fleetctl_sequences_run_on_real_systemd() {
    let cluster = Cluster::up(3, 5);
    let started = Instant::now();

    // The socket is root-only.
    let out = cluster.exec("h1", &["stat", "-c", "%a %U %F", SOCKET]);
    assert_eq!(text(&out.stdout).trim(), "600 root socket", "{out:?}");

    // start, blocking: create (201; the store may still be electing: 503),
    // wait for inactive, set launched, wait for launched, then state/NAME.
    let web = "api-web.service";
    let create = json!({"name": web, "options": options("v1", "/bin/sleep infinity")});
    let (created, took) = wait_for(Duration::from_secs(10), "the PUT to be served", || {
        let answer = api(
            &cluster,
            "PUT",
            &format!("/fleet/v1/units/{web}"),
            Some(&create),
        );
        (answer.status != 503).then_some(answer)
    });
    assert_eq!(
        created.status, 201,
        "PUT answered {created:?} after {took:?}"
    );
    wait_unit(&cluster, web, "created unit inactive", |u| {
        u["currentState"] == "inactive"
    });
    put(
        &cluster,
        web,
        &json!({"name": web, "desiredState": "launched"}),
        204,
    );
    let unit = wait_unit(&cluster, web, "start: launched", |u| {
        u["currentState"] == "launched"
    });
    let machine = unit["machineID"].as_str().unwrap().to_string();
    let host = cluster.host_of(&machine).to_string();
    let (state, took) = wait_for(Duration::from_secs(10), "state/NAME active", || {
        let answer = api(&cluster, "GET", &format!("/fleet/v1/state/{web}"), None);
        (answer.status == 200 && answer.json()["systemdActiveState"] == "active")
            .then(|| answer.json())
    });
    eprintln!("launched to active in state/NAME: {took:?}");
    assert_eq!(state["systemdLoadState"], "loaded", "{state}");
    assert_eq!(state["systemdSubState"], "running", "{state}");
    assert_eq!(state["machineID"], machine.as_str(), "{state}");
    assert_eq!(is_active(&cluster, &host, web), "active");

    // restart: PUT loaded, the very next GET still says launched (fleetctl
    // waits for launched), PUT launched; it ends running.
    put(&cluster, web, &json!({"desiredState": "loaded"}), 204);
    let now = get(&cluster, &format!("/fleet/v1/units/{web}"));
    assert_eq!(now["currentState"], "launched", "{now}");
    put(&cluster, web, &json!({"desiredState": "launched"}), 204);
    wait_unit(&cluster, web, "restart: launched", |u| {
        u["currentState"] == "launched"
    });
    wait_for(Duration::from_secs(10), "the restarted unit active", || {
        (is_active(&cluster, &host, web) == "active").then_some(())
    });
    // stop: loaded, and systemd stopped it.
    put(&cluster, web, &json!({"desiredState": "loaded"}), 204);
    wait_unit(&cluster, web, "stop: loaded", |u| {
        u["currentState"] == "loaded"
    });
    wait_for(Duration::from_secs(10), "the stopped unit inactive", || {
        (is_active(&cluster, &host, web) != "active").then_some(())
    });
    put(&cluster, web, &json!({"desiredState": "launched"}), 204);
    wait_unit(&cluster, web, "start again", |u| {
        u["currentState"] == "launched"
    });

    // A failing ExecStart: launched all the same (fleetctl's wait ends), and
    // state/NAME shows the failure.
    let bad = "api-fails.service";
    let failing = json!({"desiredState": "launched", "options": options("fails", "/bin/false")});
    put(&cluster, bad, &failing, 201);
    wait_unit(&cluster, bad, "failing unit launched", |u| {
        u["currentState"] == "launched"
    });
    wait_for(Duration::from_secs(10), "state/NAME failed", || {
        let answer = api(&cluster, "GET", &format!("/fleet/v1/state/{bad}"), None);
        (answer.status == 200 && answer.json()["systemdActiveState"] == "failed").then_some(())
    });

    // Lists with filters.
    let states = get(
        &cluster,
        &format!("/fleet/v1/state?unitName={web}&alt=json"),
    );
    let rows = states["states"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{states}");
    assert_eq!(rows[0]["machineID"], machine.as_str());
    let elsewhere = cluster
        .hosts
        .iter()
        .find(|h| h.machine_id != machine)
        .unwrap();
    let path = format!(
        "/fleet/v1/state?unitName={web}&machineID={}",
        elsewhere.machine_id
    );
    let none = get(&cluster, &path);
    assert!(none["states"].as_array().unwrap().is_empty(), "{none}");
    let units = get(&cluster, "/fleet/v1/units");
    let names: Vec<&str> = units["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [bad, web], "sorted by name");

    // --replace of the running unit: other options replace the body and set
    // it inactive (fleetctl waits for that), then launched runs the new body.
    let v2 = json!({"name": web, "options": options("v2", "/bin/sleep infinity")});
    put(&cluster, web, &v2, 201);
    let unit = wait_unit(&cluster, web, "replaced unit inactive", |u| {
        u["currentState"] == "inactive"
    });
    assert_eq!(unit["desiredState"], "inactive", "{unit}");
    assert_eq!(unit["options"], options("v2", "/bin/sleep infinity"));
    put(&cluster, web, &json!({"desiredState": "launched"}), 204);
    let unit = wait_unit(&cluster, web, "replaced unit launched", |u| {
        u["currentState"] == "launched"
    });
    let host = cluster
        .host_of(unit["machineID"].as_str().unwrap())
        .to_string();
    wait_for(Duration::from_secs(10), "systemd to run v2", || {
        let out = cluster.exec(&host, &["systemctl", "show", "-P", "Description", web]);
        (text(&out.stdout).trim() == "v2" && is_active(&cluster, &host, web) == "active")
            .then_some(())
    });

    // Hostile names and bad bodies are 400 and store nothing; no JSON is 415.
    for target in [
        "/fleet/v1/units/..%2F..%2Fetc%2Fx",
        "/fleet/v1/units/..%2F..%2Fetc%2Fx.service",
    ] {
        let answer = api(&cluster, "PUT", target, Some(&failing));
        assert_eq!(answer.status, 400, "{target}: {answer:?}");
    }
    let form = curl(
        &cluster,
        "h1",
        &format!(
            "curl --unix-socket {SOCKET} -X PUT http://x/fleet/v1/units/form.service \
             --data-binary '{failing}'"
        ),
    );
    assert_eq!(form.status, 415, "{form:?}");
    let oversized = curl(
        &cluster,
        "h1",
        &format!(
            "head -c 1100000 /dev/zero | tr '\\0' ' ' | curl --unix-socket {SOCKET} \
             -H 'Content-Type: application/json' \
             -X PUT http://x/fleet/v1/units/big.service --data-binary @-"
        ),
    );
    assert_eq!(oversized.status, 413, "{oversized:?}");
    assert_eq!(
        get(&cluster, "/fleet/v1/units")["units"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // TCP (the lab's hosts listen on every address with TLS, with the lab's
    // token): HTTPS only, checked against the lab's CA under the cluster's
    // name; a caller needs the token or a certificate of the cluster.
    let ca = flotilla::tls::stream::certs_in(std::path::Path::new(&cluster.tls[0])).unwrap();
    let cluster_id = flotilla::tls::identity::cluster_id_of_ca(&ca[0]).unwrap();
    let name = flotilla::tls::identity::server_name(&cluster_id);
    let https = format!(
        "curl --cacert /etc/flotilla/tls/ca.pem --resolve {name}:4003:127.0.0.1 \
         https://{name}:4003/fleet/v1/units"
    );
    let tcp = curl(&cluster, "h1", &https);
    assert_eq!(tcp.status, 401, "{tcp:?}");
    let tcp = curl(
        &cluster,
        "h1",
        &format!("{https} -H 'Authorization: Bearer {}'", cluster.api_token),
    );
    assert_eq!(tcp.status, 200, "{tcp:?}");
    let tcp = curl(
        &cluster,
        "h1",
        &format!("{https} --cert /etc/flotilla/tls/h1.pem --key /etc/flotilla/tls/h1.key"),
    );
    assert_eq!(tcp.status, 200, "a member's certificate: {tcp:?}");
    let plain = curl(&cluster, "h1", "curl http://127.0.0.1:4003/fleet/v1/units");
    assert_eq!(plain.status, 400, "plain HTTP to the TLS port: {plain:?}");

    // destroy: gone from the registry, from /state and from systemd; again: 404.
    for unit in [web, bad] {
        assert_eq!(
            api(&cluster, "DELETE", &format!("/fleet/v1/units/{unit}"), None).status,
            204
        );
    }
    wait_for(
        Duration::from_secs(10),
        "the units gone from /state",
        || {
            get(&cluster, "/fleet/v1/state")["states"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        },
    );
    wait_for(Duration::from_secs(10), "systemd to stop it", || {
        (is_active(&cluster, &host, web) != "active").then_some(())
    });
    let again = api(&cluster, "DELETE", &format!("/fleet/v1/units/{web}"), None);
    assert_eq!(again.status, 404, "{again:?}");
    eprintln!("lab time after boot: {:?}", started.elapsed());
}

#[test]
fn loaded_units_templates_status_journal_and_explain() {
    let cluster = Cluster::up(3, 5);
    let (h1, h2, h3) = (
        cluster.id_of("h1").to_string(),
        cluster.id_of("h2").to_string(),
        cluster.id_of("h3").to_string(),
    );
    wait_for(
        Duration::from_secs(10),
        "the API to reach the store",
        || (api(&cluster, "GET", "/fleet/v1/machines", None).status == 200).then_some(()),
    );
    wait_for(Duration::from_secs(10), "3 machines", || {
        (get(&cluster, "/fleet/v1/machines")["machines"]
            .as_array()?
            .len()
            == 3)
            .then_some(())
    });

    // A unit loaded beside the unit that wants it: systemd starts it when
    // that unit starts, and the agent leaves it running (desired: loaded).
    let dep = json!({"desiredState": "loaded", "options": [
        {"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"},
        {"section": "Install", "name": "WantedBy", "value": "hello.service"},
        {"section": "X-Fleet", "name": "MachineID", "value": h1},
    ]});
    put(&cluster, "dep.service", &dep, 201);
    wait_unit(&cluster, "dep.service", "dep loaded", |u| {
        u["currentState"] == "loaded"
    });
    let hello = json!({"desiredState": "launched", "options": [
        {"section": "Service", "name": "ExecStart",
         "value": "/bin/sh -c \"echo hello-from-the-api; exec sleep infinity\""},
        {"section": "X-Fleet", "name": "MachineID", "value": h1},
    ]});
    put(&cluster, "hello.service", &hello, 201);
    wait_unit(&cluster, "hello.service", "hello launched", |u| {
        u["currentState"] == "launched"
    });
    wait_for(
        Duration::from_secs(10),
        "systemd to start dep with hello",
        || (is_active(&cluster, "h1", "dep.service") == "active").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        is_active(&cluster, "h1", "dep.service"),
        "active",
        "the agent left it running"
    );
    let unit = get(&cluster, "/fleet/v1/units/dep.service");
    assert_eq!(
        (unit["desiredState"].as_str(), unit["currentState"].as_str()),
        (Some("loaded"), Some("loaded"))
    );

    // status and journal through the API, from the unit's host; another
    // host's daemon asks the unit's host (over mutual TLS) and says which
    // machine answered.
    let status = api_on(
        &cluster,
        "h1",
        "GET",
        "/flotilla/v1/units/hello.service/status",
        None,
    );
    assert_eq!(status.status, 200, "{status:?}");
    assert!(
        status.body.contains("Active: active (running)"),
        "{}",
        status.body
    );
    let (journal, took) = wait_for(
        Duration::from_secs(10),
        "the unit's output in its journal",
        || {
            let answer = api_on(
                &cluster,
                "h1",
                "GET",
                "/flotilla/v1/units/hello.service/journal?lines=20",
                None,
            );
            (answer.status == 200 && answer.body.contains("hello-from-the-api")).then_some(answer)
        },
    );
    eprintln!(
        "journal shows the output after {took:?}: {} bytes",
        journal.body.len()
    );
    let out = cluster.exec(
        "h1",
        &[
            "sh",
            "-c",
            &format!(
                "curl -sS --max-time 2 --unix-socket {SOCKET} \
                 'http://x/flotilla/v1/units/hello.service/journal?follow=true&lines=5'; true"
            ),
        ],
    );
    assert!(text(&out.stdout).contains("hello-from-the-api"), "{out:?}");
    let remote = api_on(
        &cluster,
        "h2",
        "GET",
        "/flotilla/v1/units/hello.service/status",
        None,
    );
    assert_eq!(remote.status, 200, "{remote:?}");
    assert!(
        remote.body.contains("Active: active (running)"),
        "{}",
        remote.body
    );
    let headers = cluster.exec(
        "h2",
        &[
            "sh",
            "-c",
            &format!(
                "curl -sS -D - -o /dev/null --unix-socket {SOCKET} \
                 'http://x/flotilla/v1/units/hello.service/status'"
            ),
        ],
    );
    let headers = text(&headers.stdout).to_ascii_lowercase();
    assert!(
        headers.contains(&format!("flotilla-machine: {h1}")),
        "answered by the unit's host: {headers}"
    );

    // A template whose MachineMetadata uses %i (fleet's metadata@.service):
    // accepted as a template; its instance runs where hostname=%i, which
    // only PATCH sets.
    let patch = json!([{"op": "add", "path": format!("/{h2}/metadata/hostname"), "value": "h2"}]);
    assert_eq!(
        api(&cluster, "PATCH", "/fleet/v1/machines", Some(&patch)).status,
        204
    );
    let template = json!({"options": [
        {"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"},
        {"section": "X-Fleet", "name": "MachineMetadata", "value": "hostname=%i"},
    ]});
    put(&cluster, "meta@.service", &template, 201);
    put(
        &cluster,
        "meta@h2.service",
        &json!({"desiredState": "launched"}),
        204,
    );
    let unit = wait_unit(&cluster, "meta@h2.service", "meta@h2 launched", |u| {
        u["currentState"] == "launched"
    });
    assert_eq!(unit["machineID"], h2.as_str(), "{unit}");
    wait_for(Duration::from_secs(10), "meta@h2 active on h2", || {
        (is_active(&cluster, "h2", "meta@h2.service") == "active").then_some(())
    });
    put(
        &cluster,
        "meta@h3.service",
        &json!({"desiredState": "launched"}),
        204,
    );
    let unit = wait_unit(&cluster, "meta@h3.service", "meta@h3's reason", |u| {
        u["reason"].is_string()
    });
    assert!(
        unit["reason"]
            .as_str()
            .unwrap()
            .contains("metadata hostname"),
        "{unit}"
    );
    let explained = get(&cluster, "/flotilla/v1/explain/meta@h3.service");
    for machine in explained["machines"].as_array().unwrap() {
        assert_eq!(machine["eligible"], false, "{explained}");
        assert_eq!(
            machine["why"], "metadata hostname does not match",
            "{explained}"
        );
    }

    // explain on a draining host.
    assert_eq!(
        api(&cluster, "POST", "/flotilla/v1/machines/h3/drain", None).status,
        204
    );
    let explained = get(&cluster, "/flotilla/v1/explain/hello.service");
    let on = |id: &str| {
        explained["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()
            .clone()
    };
    assert!(
        on(&h3)["why"].as_str().unwrap().starts_with("drained"),
        "{explained}"
    );
    assert_eq!(on(&h1)["eligible"], true, "{explained}");
    assert!(
        on(&h2)["why"].as_str().unwrap().contains("MachineID"),
        "{explained}"
    );
    assert_eq!(explained["placedOn"], json!([h1]));
    assert_eq!(
        api(&cluster, "DELETE", "/flotilla/v1/machines/h3/drain", None).status,
        204
    );
}

#[test]
fn a_host_cut_off_past_its_lease_claims_back_what_nobody_took() {
    let cluster = Cluster::up(3, 2);
    let cut = "h3";
    let id = cluster.id_of(cut).to_string();
    wait_for(Duration::from_secs(10), "3 machines", || {
        let answer = api(&cluster, "GET", "/fleet/v1/machines", None);
        (answer.status == 200 && answer.json()["machines"].as_array()?.len() == 3).then_some(())
    });
    // pinned.service can run only on h3; free.service runs there too (the
    // others drained while it is placed) but may run anywhere.
    let pinned = json!({"desiredState": "launched", "options": [
        {"section": "Service", "name": "ExecStart", "value": "/bin/sleep infinity"},
        {"section": "X-Fleet", "name": "MachineID", "value": id},
    ]});
    put(&cluster, "pinned.service", &pinned, 201);
    for host in ["h1", "h2"] {
        let path = format!("/flotilla/v1/machines/{host}/drain");
        assert_eq!(api(&cluster, "POST", &path, None).status, 204);
    }
    let free =
        json!({"desiredState": "launched", "options": options("free", "/bin/sleep infinity")});
    put(&cluster, "free.service", &free, 201);
    for unit in ["pinned.service", "free.service"] {
        wait_unit(&cluster, unit, "launched on h3", |u| {
            u["currentState"] == "launched" && u["machineID"] == id.as_str()
        });
        wait_for(Duration::from_secs(10), "active on h3", || {
            (is_active(&cluster, cut, unit) == "active").then_some(())
        });
    }
    for host in ["h1", "h2"] {
        let path = format!("/flotilla/v1/machines/{host}/drain");
        assert_eq!(api(&cluster, "DELETE", &path, None).status, 204);
    }
    let entered = cluster.entered(cut, "pinned.service");

    // Cut off past the lease: free.service moves, pinned.service has nowhere
    // to go; h3 keeps running both meanwhile.
    cluster.lab(&["partition", cut]);
    let cut_at = Instant::now();
    let unit = wait_unit(&cluster, "free.service", "free.service elsewhere", |u| {
        u["currentState"] == "launched" && u["machineID"].as_str().is_some_and(|m| m != id)
    });
    let other = cluster
        .host_of(unit["machineID"].as_str().unwrap())
        .to_string();
    while cut_at.elapsed() < cluster.ttl * 2 + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(is_active(&cluster, cut, "pinned.service"), "active");

    // Heal: h3 stops only what runs elsewhere now, and claims pinned.service
    // back without restarting it.
    cluster.lab(&["heal", cut]);
    let (_, took) = wait_for(
        Duration::from_secs(20),
        "h3 back with pinned.service",
        || {
            let answer = api(&cluster, "GET", "/fleet/v1/units/pinned.service", None);
            let unit = answer.json();
            (answer.status == 200
                && unit["machines"] == json!([id])
                && unit["currentState"] == "launched")
                .then_some(())
        },
    );
    eprintln!("h3 claimed pinned.service back {took:?} after the heal");
    wait_for(
        Duration::from_secs(10),
        "h3 to stop its copy of free.service",
        || (is_active(&cluster, cut, "free.service") != "active").then_some(()),
    );
    assert_eq!(is_active(&cluster, &other, "free.service"), "active");
    assert_eq!(is_active(&cluster, cut, "pinned.service"), "active");
    assert_eq!(
        cluster.entered(cut, "pinned.service"),
        entered,
        "pinned.service was never restarted"
    );
    let state = get(&cluster, "/fleet/v1/state/pinned.service");
    assert_eq!(state["machineID"], id.as_str(), "{state}");
}
