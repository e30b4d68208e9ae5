//! The HTTP API end to end: on a 3-host lab, a unit PUT through fleet's
//! `/fleet/v1` on h1's unix socket runs on real systemd, shows in `/state`,
//! and goes away on DELETE; hostile names and oversized bodies are refused and
//! change nothing; the socket is root-only and TCP answers only with the token.
//!
//! Every request is made with curl INSIDE a lab host (the hosts see the outer
//! machine's files, curl included). Root on Debian 12 is needed; nextest runs
//! the lab binaries one test at a time.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod support;

use support::cluster::{Cluster, wait_for};
use support::text;

const UNIT: &str = "api-hello.service";
const SOCKET: &str = "/run/flotilla/api.sock";

/// One answer of the API: the status and the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

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

/// `METHOD PATH [BODY]` on h1's unix socket.
fn api(cluster: &Cluster, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let data = body.map_or(String::new(), |b| format!(" --data-binary '{b}'"));
    curl(
        cluster,
        "h1",
        &format!("curl --unix-socket {SOCKET} -X {method} 'http://x{path}'{data}"),
    )
}

fn options(exec_start: &str) -> Value {
    json!([
        {"section": "Unit", "name": "Description", "value": "put through the API"},
        {"section": "Service", "name": "ExecStart", "value": exec_start},
    ])
}

/// The `/state` entries of [`UNIT`].
fn states(cluster: &Cluster) -> Vec<Value> {
    let answer = api(cluster, "GET", "/fleet/v1/state", None);
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == UNIT)
        .cloned()
        .collect()
}

fn unit_names(cluster: &Cluster) -> Vec<String> {
    let answer = api(cluster, "GET", "/fleet/v1/units", None);
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn fleet_api_runs_lists_refuses_and_destroys() {
    let cluster = Cluster::up(3, 5);
    let started = Instant::now();

    // The socket is root-only.
    let out = cluster.exec("h1", &["stat", "-c", "%a %U %F", SOCKET]);
    assert_eq!(text(&out.stdout).trim(), "600 root socket", "{out:?}");

    // PUT a unit with options and launched; the store may still be electing (503).
    let unit = json!({"desiredState": "launched", "options": options("/bin/sleep infinity")});
    let path = format!("/fleet/v1/units/{UNIT}");
    let (created, took) = wait_for(Duration::from_secs(10), "the PUT to be served", || {
        let answer = api(&cluster, "PUT", &path, Some(&unit));
        (answer.status != 503).then_some(answer)
    });
    assert!(
        matches!(created.status, 201 | 204),
        "PUT answered {created:?} after {took:?}"
    );

    let (state, took) = wait_for(Duration::from_secs(15), "the unit active in /state", || {
        states(&cluster)
            .into_iter()
            .find(|s| s["systemdActiveState"] == "active")
    });
    eprintln!("PUT to active in /state: {took:?}");
    assert_eq!(state["systemdLoadState"], "loaded", "{state}");
    assert_eq!(state["systemdSubState"], "running", "{state}");
    assert_eq!(state["hash"].as_str().unwrap().len(), 64, "{state}");
    let machine = state["machineID"].as_str().unwrap().to_string();
    let host = cluster.host_of(&machine).to_string();
    let out = cluster.exec(&host, &["systemctl", "is-active", UNIT]);
    assert_eq!(text(&out.stdout).trim(), "active", "systemd on {host}");

    let shown = api(&cluster, "GET", &path, None);
    assert_eq!(shown.status, 200, "{shown:?}");
    let shown = shown.json();
    assert_eq!(shown["desiredState"], "launched", "{shown}");
    assert_eq!(shown["currentState"], "launched", "{shown}");
    assert_eq!(shown["machineID"], machine.as_str(), "{shown}");
    assert_eq!(shown["options"], options("/bin/sleep infinity"), "{shown}");

    let machines = api(&cluster, "GET", "/fleet/v1/machines", None).json();
    let mut ids: Vec<&str> = machines["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected: Vec<&str> = cluster
        .hosts
        .iter()
        .map(|h| h.machine_id.as_str())
        .collect();
    expected.sort();
    assert_eq!(ids, expected);

    // The same PUT again changes nothing; other options are a conflict.
    assert_eq!(api(&cluster, "PUT", &path, Some(&unit)).status, 204);
    let other = json!({"options": options("/bin/sleep 1000")});
    let conflict = api(&cluster, "PUT", &path, Some(&other));
    assert_eq!(conflict.status, 409, "{conflict:?}");
    assert_eq!(conflict.json()["error"]["code"], 409);

    // Hostile names and bad bodies are 400 and store nothing.
    let hostile = [
        "/fleet/v1/units/..%2F..%2Fetc%2Fx",
        "/fleet/v1/units/..%2F..%2Fetc%2Fx.service",
    ];
    for target in hostile {
        let answer = api(&cluster, "PUT", target, Some(&unit));
        assert_eq!(answer.status, 400, "{target}: {answer:?}");
        assert_eq!(answer.json()["error"]["code"], 400, "{answer:?}");
    }
    let raw = curl(
        &cluster,
        "h1",
        &format!(
            "curl --path-as-is --unix-socket {SOCKET} -X PUT \
             'http://x/fleet/v1/units/../../etc/x.service' --data-binary '{unit}'"
        ),
    );
    assert_eq!(raw.status, 400, "{raw:?}");
    let bogus = json!({"desiredState": "launched", "bogusField": 1});
    assert_eq!(
        api(&cluster, "PUT", "/fleet/v1/units/b.service", Some(&bogus)).status,
        400
    );
    let oversized = curl(
        &cluster,
        "h1",
        &format!(
            "head -c 1100000 /dev/zero | tr '\\0' ' ' | curl --unix-socket {SOCKET} \
             -X PUT http://x/fleet/v1/units/big.service --data-binary @-"
        ),
    );
    assert_eq!(oversized.status, 413, "{oversized:?}");
    assert_eq!(unit_names(&cluster), [UNIT], "nothing else was stored");

    // TCP (the lab's hosts listen on every address, with the lab's token).
    let tcp = curl(&cluster, "h1", "curl http://127.0.0.1:4003/fleet/v1/units");
    assert_eq!(tcp.status, 401, "{tcp:?}");
    let tcp = curl(
        &cluster,
        "h1",
        &format!(
            "curl -H 'Authorization: Bearer {}' http://127.0.0.1:4003/fleet/v1/units",
            cluster.api_token
        ),
    );
    assert_eq!(tcp.status, 200, "{tcp:?}");
    assert_eq!(tcp.json()["units"][0]["name"], UNIT);

    // DELETE: gone from the registry, from /state and from systemd.
    assert_eq!(api(&cluster, "DELETE", &path, None).status, 204);
    let ((), took) = wait_for(Duration::from_secs(10), "the unit gone from /state", || {
        states(&cluster).is_empty().then_some(())
    });
    eprintln!("DELETE to gone from /state: {took:?}");
    let (_, took) = wait_for(Duration::from_secs(10), "systemd to stop it", || {
        let out = cluster.exec(&host, &["systemctl", "is-active", UNIT]);
        (text(&out.stdout).trim() != "active").then_some(())
    });
    eprintln!("stopped on {host} within {took:?}");
    assert_eq!(api(&cluster, "GET", &path, None).status, 404);
    let again = api(&cluster, "DELETE", &path, None);
    assert_eq!(again.status, 404, "{again:?}");
    assert!(unit_names(&cluster).is_empty());
    eprintln!("lab time after boot: {:?}", started.elapsed());
}
