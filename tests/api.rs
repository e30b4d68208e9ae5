//! fleet's `/fleet/v1` and flotilla's `/flotilla/v1` over a real daemon: one
//! store member on loopback (its scheduler runs; no agent, no systemd), with
//! its API on TCP, called over plain HTTP/1.1 as fleetctl and curl call it.
//!
//! Where a test needs machines, it plays them through the registry's own
//! machine-side operations ([`MachineStore`]: presence on a lease, claims,
//! reports), exactly the transactions a real agent makes; the real agent on
//! real systemd is tested in `lab_api.rs`.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use flotilla::consensus::client::Client;
use flotilla::registry::records::Target;

mod support;

use support::machine::Machine;
use support::{Answer, free_port};

/// The daemon's `api_token`: TCP wants it, loopback included.
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A store-only daemon with its API on loopback TCP.
struct Daemon {
    child: Child,
    api: String,
    store: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts it and waits until its API reaches the store.
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer, api) = (free_port(), free_port(), free_port());
        let store = format!("127.0.0.1:{client}");
        let peer = format!("127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["daemon", "--name", "m0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--client-listen", &store, "--peer-listen", &peer])
            .args(["--initial-cluster", &format!("m0={peer}")])
            .args([
                "--election-timeout-ms",
                "300",
                "--log",
                "warn",
                "--no-agent",
            ])
            .env_remove("FLOTILLA_CONFIG")
            .env("FLOTILLA_API_SOCKET", "")
            .env("FLOTILLA_API_LISTEN", format!("127.0.0.1:{api}"))
            .env("FLOTILLA_API_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            api: format!("127.0.0.1:{api}"),
            store,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Some(answer) = daemon.try_call("GET", "/fleet/v1/units", "", b"").await
                && answer.status == 200
            {
                return daemon;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the daemon's API did not reach its store; log: {}",
                std::fs::read_to_string(daemon._dir.path().join("daemon.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `flotilla ARGS` pointed at this API over TCP with the token, as a user
    /// elsewhere runs it; must succeed; returns its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .env("FLOTILLA_ENDPOINT", format!("http://{}", self.api))
            .env("FLOTILLA_API_TOKEN", TOKEN)
            .env("XDG_CACHE_HOME", self._dir.path().join("cache"))
            .env_remove("FLOTILLA_TUNNEL")
            .env_remove("FLOTILLA_TLS_CA")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "flotilla {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// One raw request with the token; `None` if nothing answers yet.
    async fn try_call(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Option<Answer> {
        let mut stream = tokio::net::TcpStream::connect(&self.api).await.ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\
             Authorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.ok()?;
        stream.write_all(body).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Some(Answer { status, body })
    }

    async fn raw(&self, method: &str, path: &str, headers: &str, body: &[u8]) -> Answer {
        self.try_call(method, path, headers, body)
            .await
            .unwrap_or_else(|| panic!("{method} {path}: no answer"))
    }

    /// A request with a JSON body, as fleetctl sends it.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Answer {
        let body = body.map(Value::to_string).unwrap_or_default();
        let headers = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/json\r\n"
        };
        self.raw(method, path, headers, body.as_bytes()).await
    }

    async fn get(&self, path: &str) -> Value {
        let answer = self.call("GET", path, None).await;
        assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
        answer.json()
    }

    /// Polls GET `path` until `check` holds of its JSON; returns that JSON.
    async fn wait_for(&self, path: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let answer = self.call("GET", path, None).await;
            if answer.status == 200 && check(&answer.json()) {
                return answer.json();
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}: last {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A machine played through the registry, with `metadata`.
    async fn machine(&self, id: &str, hostname: &str, metadata: &[(&str, &str)]) -> Machine {
        Machine::join(&self.store, id, hostname, metadata, None).await
    }
}

fn service(exec: &str, xfleet: &[(&str, &str)]) -> Value {
    let mut options = vec![json!({"section": "Service", "name": "ExecStart", "value": exec})];
    for (key, value) in xfleet {
        options.push(json!({"section": "X-Fleet", "name": key, "value": value}));
    }
    Value::Array(options)
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list[key]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|u| u["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_page_replace_and_refuse_as_fleet_did() {
    let daemon = Daemon::start().await;

    // 250 units, created as fleetctl's submit creates them: 201 each.
    for i in 0..250 {
        let body =
            json!({"name": format!("p{i:03}.service"), "options": service("/bin/true", &[])});
        let answer = daemon
            .call(
                "PUT",
                &format!("/fleet/v1/units/p{i:03}.service"),
                Some(&body),
            )
            .await;
        assert_eq!(answer.status, 201, "{answer:?}");
    }
    // Pages of 100, by name, with fleet's tokens; fleetctl's alt=json is fine.
    let first = daemon.get("/fleet/v1/units?alt=json").await;
    assert_eq!(first["nextPageToken"], "ZAACAA==");
    let first_names = names(&first, "units");
    assert_eq!(first_names.len(), 100);
    assert_eq!(
        (first_names[0].as_str(), first_names[99].as_str()),
        ("p000.service", "p099.service")
    );
    assert_eq!(first["units"][0]["desiredState"], "inactive");
    assert_eq!(first["units"][0]["currentState"], "inactive");
    assert_eq!(first["units"][0]["hash"].as_str().unwrap().len(), 64);
    let second = daemon
        .get("/fleet/v1/units?nextPageToken=ZAACAA%3D%3D&alt=json")
        .await;
    assert_eq!(second["nextPageToken"], "ZAADAA==");
    assert_eq!(names(&second, "units")[0], "p100.service");
    let third = daemon
        .get("/fleet/v1/units?nextPageToken=ZAADAA%3D%3D")
        .await;
    assert_eq!(names(&third, "units").len(), 50);
    assert!(third.get("nextPageToken").is_none(), "{third}");

    // Bad tokens are 400 with fleet's error body, on every list.
    for list in ["units", "state", "machines"] {
        for token in [
            "EwBMLg%3D%3D",
            "garbage!",
            "ZAAAAA%3D%3D",
            "",
            "ZAACAA%3D%3D&nextPageToken=ZAACAA%3D%3D",
        ] {
            let path = format!("/fleet/v1/{list}?nextPageToken={token}");
            let answer = daemon.call("GET", &path, None).await;
            assert_eq!(answer.status, 400, "{path}: {answer:?}");
            assert_eq!(answer.json()["error"]["code"], 400, "{path}");
        }
    }

    // PUT without options for a unit that does not exist: 409, as fleet.
    let launched = json!({"desiredState": "launched"});
    let answer = daemon
        .call("PUT", "/fleet/v1/units/nosuch.service", Some(&launched))
        .await;
    assert_eq!(answer.status, 409, "{answer:?}");
    assert_eq!(
        answer.message(),
        "unit does not exist and options field empty"
    );
    // ... and without desiredState for one that does.
    let answer = daemon
        .call("PUT", "/fleet/v1/units/p000.service", Some(&json!({})))
        .await;
    assert_eq!(answer.status, 409, "{answer:?}");
    assert_eq!(
        answer.message(),
        "must provide DesiredState to update existing unit"
    );
    // Not JSON: 415 before anything else.
    let body = launched.to_string();
    for headers in ["", "Content-Type: text/plain\r\n"] {
        let answer = daemon
            .raw(
                "PUT",
                "/fleet/v1/units/p000.service",
                headers,
                body.as_bytes(),
            )
            .await;
        assert_eq!(answer.status, 415, "{headers:?}: {answer:?}");
    }
    let renamed = json!({"name": "other.service", "desiredState": "launched"});
    let answer = daemon
        .call("PUT", "/fleet/v1/units/p000.service", Some(&renamed))
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(
        daemon.get("/fleet/v1/units/p000.service").await["desiredState"],
        "inactive"
    );

    // --replace: other options replace the body, desired back to inactive.
    let path = "/fleet/v1/units/p000.service";
    assert_eq!(daemon.call("PUT", path, Some(&launched)).await.status, 204);
    let v2 = json!({"name": "p000.service", "options": service("/bin/sleep 2", &[])});
    assert_eq!(daemon.call("PUT", path, Some(&v2)).await.status, 201);
    let unit = daemon.get(path).await;
    assert_eq!(unit["options"], service("/bin/sleep 2", &[]), "{unit}");
    assert_eq!(unit["desiredState"], "inactive", "{unit}");
    // The same options again: the desired-state rules apply.
    assert_eq!(daemon.call("PUT", path, Some(&v2)).await.status, 409);
    let v3 = json!({"options": service("/bin/sleep 3", &[]), "desiredState": "loaded"});
    assert_eq!(daemon.call("PUT", path, Some(&v3)).await.status, 201);
    assert_eq!(daemon.get(path).await["desiredState"], "loaded");

    // destroy: 204, then 404.
    assert_eq!(daemon.call("DELETE", path, None).await.status, 204);
    let again = daemon.call("DELETE", path, None).await;
    assert_eq!(
        (again.status, again.message().as_str()),
        (404, "unit does not exist")
    );
    assert_eq!(daemon.call("GET", path, None).await.status, 404);

    // The discovery document, GET only (400 otherwise, as fleet).
    let doc = daemon.get("/fleet/v1/discovery").await;
    assert_eq!(doc["id"], "fleet:v1");
    assert_eq!(
        doc["resources"]["UnitState"]["methods"]["Get"]["path"],
        "state/{unitName}"
    );
    assert_eq!(
        daemon
            .call("POST", "/fleet/v1/discovery", None)
            .await
            .status,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_are_patched_drained_explained_and_report_states() {
    let daemon = Daemon::start().await;
    let (id1, id2) = (
        "aa000000000000000000000000000001",
        "aa000000000000000000000000000002",
    );
    let mut m1 = daemon
        .machine(id1, "fake-1", &[("region", "eu"), ("disk", "ssd")])
        .await;
    let m2 = daemon.machine(id2, "fake-2", &[("region", "us")]).await;
    let metadata_of = |list: &Value, id: &str| -> BTreeMap<String, String> {
        let machine = list["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap();
        serde_json::from_value(machine["metadata"].clone()).unwrap()
    };
    let machines = daemon.get("/fleet/v1/machines").await;
    let first = &machines["machines"][0];
    assert_eq!(
        (first["id"].as_str(), first["hostname"].as_str()),
        (Some(id1), Some("fake-1"))
    );
    assert!(first["renewedSecsAgo"].as_u64().unwrap() < 5, "{first}");
    assert_eq!(
        (first["overdue"].as_bool(), first["drained"].as_bool()),
        (Some(false), Some(false))
    );

    // PATCH: add, replace, remove (of a configured key), all in one go.
    let patch = json!([
        {"op": "add", "path": format!("/{id1}/metadata/role"), "value": "web"},
        {"op": "replace", "path": format!("/{id2}/metadata/region"), "value": "ap"},
        {"op": "remove", "path": format!("/{id1}/metadata/disk")},
    ]);
    let answer = daemon
        .call("PATCH", "/fleet/v1/machines", Some(&patch))
        .await;
    assert_eq!(answer.status, 204, "{answer:?}");
    let machines = daemon.get("/fleet/v1/machines").await;
    let expected1 = BTreeMap::from([
        ("region".into(), "eu".into()),
        ("role".into(), "web".into()),
    ]);
    assert_eq!(metadata_of(&machines, id1), expected1);
    assert_eq!(
        metadata_of(&machines, id2),
        BTreeMap::from([("region".into(), "ap".into())])
    );
    // As fleetctl's list-machines shows it, through the CLI.
    let listed = "aa000000000000000000000000000001\t10.0.0.1\tregion=eu,role=web\n\
                  aa000000000000000000000000000002\t10.0.0.2\tregion=ap\n";
    assert_eq!(daemon.cli(&["list-machines", "--no-legend", "-l"]), listed);
    // A bad operation anywhere: 400, and nothing of the patch applied.
    for bad in [
        json!([{"op": "add", "path": format!("/{id1}/metadata/rack"), "value": "r1"},
               {"op": "add", "path": format!("/{id1}/foo"), "value": "x"}]),
        json!([{"op": "add", "path": format!("/{id1}/metadata/rack"), "value": "r1"},
               {"op": "move", "path": format!("/{id1}/metadata/rack"), "value": "x"}]),
        json!([{"op": "add", "path": format!("/{id1}/metadata/rack"), "value": ""}]),
        json!({"op": "add"}),
    ] {
        let answer = daemon.call("PATCH", "/fleet/v1/machines", Some(&bad)).await;
        assert_eq!(answer.status, 400, "{bad}: {answer:?}");
    }
    assert_eq!(
        daemon
            .call("PATCH", "/fleet/v1/machines", Some(&json!([])))
            .await
            .status,
        204
    );
    assert_eq!(
        metadata_of(&daemon.get("/fleet/v1/machines").await, id1),
        expected1
    );
    assert_eq!(
        daemon.cli(&["list-machines", "--no-legend", "-l"]),
        listed,
        "refused patches changed nothing"
    );
    // The patch outlives the machine's presence: it leaves and rejoins.
    m1.rejoin().await;
    assert_eq!(
        metadata_of(&daemon.get("/fleet/v1/machines").await, id1),
        expected1
    );

    // The patched metadata places units: role=web exists only through PATCH.
    let start = |options: Value| json!({"desiredState": "launched", "options": options});
    let web = start(service("/bin/true", &[("MachineMetadata", "role=web")]));
    assert_eq!(
        daemon
            .call("PUT", "/fleet/v1/units/web.service", Some(&web))
            .await
            .status,
        201
    );
    daemon
        .wait_for("/fleet/v1/units/web.service", "web placed on m1", |u| {
            u["machineID"] == id1
        })
        .await;
    let db = start(service("/bin/true", &[("MachineID", id2)]));
    assert_eq!(
        daemon
            .call("PUT", "/fleet/v1/units/db.service", Some(&db))
            .await
            .status,
        201
    );
    let cache = start(service("/bin/true", &[("Conflicts", "db.service")]));
    assert_eq!(
        daemon
            .call("PUT", "/fleet/v1/units/cache.service", Some(&cache))
            .await
            .status,
        201
    );
    let mars = start(service("/bin/true", &[("MachineMetadata", "region=mars")]));
    assert_eq!(
        daemon
            .call("PUT", "/fleet/v1/units/mars.service", Some(&mars))
            .await
            .status,
        201
    );
    daemon
        .wait_for("/fleet/v1/units/db.service", "db placed on m2", |u| {
            u["machineID"] == id2
        })
        .await;
    daemon
        .wait_for("/fleet/v1/units/cache.service", "cache placed on m1", |u| {
            u["machineID"] == id1
        })
        .await;
    // An unplaceable unit carries the scheduler's reason.
    let unit = daemon
        .wait_for("/fleet/v1/units/mars.service", "mars's reason", |u| {
            u["reason"].is_string()
        })
        .await;
    assert!(
        unit["reason"].as_str().unwrap().contains("metadata region"),
        "{unit}"
    );

    // explain: the rule per machine, from the scheduler's own decision.
    let verdict = |explained: &Value, id: &str| -> (bool, String) {
        let m = explained["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap();
        (
            m["eligible"].as_bool().unwrap(),
            m["why"].as_str().unwrap().to_string(),
        )
    };
    let explained = daemon.get("/flotilla/v1/explain/cache.service").await;
    assert_eq!(
        verdict(&explained, id2),
        (false, "conflicts with db.service".to_string())
    );
    assert!(verdict(&explained, id1).0, "{explained}");
    let explained = daemon.get("/flotilla/v1/explain/web.service").await;
    assert_eq!(
        verdict(&explained, id2),
        (false, "metadata role does not match".to_string())
    );
    let explained = daemon.get("/flotilla/v1/explain/mars.service").await;
    assert!(
        explained["reason"]
            .as_str()
            .unwrap()
            .contains("none of the 2 machines"),
        "{explained}"
    );
    assert_eq!(explained["machines"][0]["hostname"], "fake-1");
    // The same three verdicts as `flotilla explain` prints them (words
    // compared: the table pads its columns with tabs).
    let explain = |unit: &str| -> String {
        let shown = daemon.cli(&["explain", unit]);
        shown.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let shown = explain("cache");
    assert!(
        shown.starts_with(
            "cache.service (desired launched): proposed to aa000000.../10.0.0.1, \
             not claimed by its agent yet MACHINE HOSTNAME ELIGIBLE WHY"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("fake-2 no conflicts with db.service"),
        "{shown}"
    );
    let shown = explain("web.service");
    assert!(
        shown.contains("fake-2 no metadata role does not match"),
        "{shown}"
    );
    let shown = explain("mars");
    assert!(
        shown.starts_with("mars.service (desired launched): not placed: none of the 2 machines"),
        "{shown}"
    );

    // Drain by host name; an ambiguous prefix is 409, an unknown one 404.
    let answer = daemon
        .call("POST", "/flotilla/v1/machines/aa/drain", None)
        .await;
    assert_eq!(answer.status, 409, "{answer:?}");
    assert!(
        answer.message().contains(id1) && answer.message().contains(id2),
        "{answer:?}"
    );
    assert_eq!(
        daemon
            .call("POST", "/flotilla/v1/machines/nosuch/drain", None)
            .await
            .status,
        404
    );
    assert_eq!(
        daemon
            .call("POST", "/flotilla/v1/machines/fake-1/drain", None)
            .await
            .status,
        204
    );
    let explained = daemon.get("/flotilla/v1/explain/web.service").await;
    let (eligible, why) = verdict(&explained, id1);
    assert!(!eligible && why.starts_with("drained"), "{why}");
    let shown = explain("web");
    assert!(shown.contains("fake-1 no drained"), "{shown}");
    let machines = daemon.get("/fleet/v1/machines").await;
    assert_eq!(machines["machines"][0]["drained"], true);
    let path = "/flotilla/v1/machines/10.0.0.1/drain";
    assert_eq!(daemon.call("DELETE", path, None).await.status, 204);
    daemon
        .wait_for("/fleet/v1/units/web.service", "web back on m1", |u| {
            u["machineID"] == id1
        })
        .await;

    // States, as agents report them: filters, one unit's state, currentState.
    let web = daemon.get("/fleet/v1/units/web.service").await;
    let db = daemon.get("/fleet/v1/units/db.service").await;
    assert_eq!(
        daemon
            .call("GET", "/fleet/v1/state/web.service", None)
            .await
            .status,
        404
    );
    m1.claim("web.service").await;
    m1.report(&web, "active", Target::Launched).await;
    m2.claim("db.service").await;
    // db's ExecStart failed: still launched (what the agent did), failed in /state.
    m2.report(&db, "failed", Target::Launched).await;
    let all = daemon.get("/fleet/v1/state").await;
    assert_eq!(names(&all, "states"), ["db.service", "web.service"]);
    let by_unit = daemon
        .get("/fleet/v1/state?unitName=web.service&alt=json")
        .await;
    assert_eq!(names(&by_unit, "states"), ["web.service"]);
    let by_machine = daemon
        .get(&format!("/fleet/v1/state?machineID={id2}"))
        .await;
    assert_eq!(names(&by_machine, "states"), ["db.service"]);
    let both = daemon
        .get(&format!(
            "/fleet/v1/state?machineID={id2}&unitName=web.service"
        ))
        .await;
    assert!(names(&both, "states").is_empty(), "{both}");
    let state = daemon.get("/fleet/v1/state/db.service").await;
    assert_eq!(
        (
            state["machineID"].as_str(),
            state["systemdActiveState"].as_str()
        ),
        (Some(id2), Some("failed"))
    );
    let db = daemon.get("/fleet/v1/units/db.service").await;
    assert_eq!(db["currentState"], "launched", "{db}");
    assert_eq!(db["machines"], json!([id2]));
    let answer = daemon
        .call("GET", "/fleet/v1/state/nosuch.service", None)
        .await;
    assert_eq!(
        (answer.status, answer.message().as_str()),
        (404, "unit state does not exist")
    );

    // fleetctl restart: PUT loaded, and the GET right after still says
    // launched though the agent has already acknowledged loaded.
    let loaded = json!({"desiredState": "loaded"});
    assert_eq!(
        daemon
            .call("PUT", "/fleet/v1/units/web.service", Some(&loaded))
            .await
            .status,
        204
    );
    m1.report(&web, "inactive", Target::Loaded).await;
    assert_eq!(
        daemon.get("/fleet/v1/units/web.service").await["currentState"],
        "launched"
    );
    daemon
        .wait_for(
            "/fleet/v1/units/web.service",
            "web loaded after the grace",
            |u| u["currentState"] == "loaded",
        )
        .await;
}

/// The read routes answer from the API's copy of the registry
/// (`registry::mirror`), yet every read sees every change acknowledged
/// before it, whether it came through the API or straight to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_the_registry_copy_see_every_write_acknowledged_before_them() {
    let daemon = Daemon::start().await;
    let client = Client::connect(std::slice::from_ref(&daemon.store))
        .await
        .unwrap();
    for i in 0..30 {
        let name = format!("rw{i:02}.service");
        let path = format!("/fleet/v1/units/{name}");
        let body = json!({"desiredState": "loaded", "options": service("/bin/true", &[])});
        let answer = daemon.call("PUT", &path, Some(&body)).await;
        assert_eq!(answer.status, 201, "{answer:?}");
        // Through the API, then read at once: there.
        assert_eq!(daemon.get(&path).await["desiredState"], "loaded");
        let listed = names(&daemon.get("/fleet/v1/units").await, "units");
        assert!(listed.contains(&name), "{name} not listed: {listed:?}");
        // Straight to the store, then read at once through the API: there.
        let unit = flotilla::units::UnitName::parse(&name).unwrap();
        flotilla::registry::ops::set_desired(
            &client,
            std::slice::from_ref(&unit),
            flotilla::registry::records::DesiredState::Inactive,
        )
        .await
        .unwrap();
        assert_eq!(daemon.get(&path).await["desiredState"], "inactive");
        assert!(
            flotilla::registry::ops::destroy(&client, &unit)
                .await
                .unwrap()
        );
        let answer = daemon.call("GET", &path, None).await;
        assert_eq!(
            answer.status, 404,
            "{name} destroyed in the store: {answer:?}"
        );
    }
    // And the copy answered (reads that found it behind went to the store).
    let metrics = daemon.call("GET", "/metrics", None).await.body;
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{metrics}"))
    };
    let (mirrored, direct) = (
        count("flotilla_api_mirror_reads_total "),
        count("flotilla_api_store_reads_total "),
    );
    assert!(
        mirrored >= 100 && direct <= 5,
        "reads from the copy {mirrored}, from the store {direct}"
    );
}

/// Setting desired states makes instances from their submitted template and
/// writes nothing when one name cannot be made, whether the call names a few
/// units (read key by key) or many (one read of every unit record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_states_are_set_for_a_few_or_many_units_with_instances_from_their_template() {
    use flotilla::registry::ops;
    use flotilla::registry::records::DesiredState;
    use flotilla::units::{Unit, UnitName};
    let daemon = Daemon::start().await;
    let client = Client::connect(std::slice::from_ref(&daemon.store))
        .await
        .unwrap();
    let name = |n: &str| UnitName::parse(n).unwrap();
    let template = name("app@.service");
    let unit = Unit::from_text(&template, "[Service]\nExecStart=/bin/true\n").unwrap();
    ops::submit(&client, &unit, false).await.unwrap();
    for count in [3usize, 100] {
        let names: Vec<UnitName> = (0..count)
            .map(|i| name(&format!("app@{count}x{i}.service")))
            .collect();
        // One name without a submitted template: the call fails whole.
        let mut with_orphan = names.clone();
        with_orphan.push(name("orphan@1.service"));
        let refused = ops::set_desired(&client, &with_orphan, DesiredState::Launched).await;
        assert!(refused.is_err(), "{count} names and an orphan: {refused:?}");
        for n in &names {
            assert!(
                ops::unit_record(&client, n).await.is_err(),
                "{n} was written"
            );
        }
        let changed = ops::set_desired(&client, &names, DesiredState::Launched)
            .await
            .unwrap();
        assert_eq!(changed, count);
        for n in &names {
            let record = ops::unit_record(&client, n).await.unwrap();
            assert_eq!(record.desired, DesiredState::Launched, "{n}");
        }
        // Asked again: nothing to change.
        let again = ops::set_desired(&client, &names, DesiredState::Launched)
            .await
            .unwrap();
        assert_eq!(again, 0);
        let stopped = ops::set_desired(&client, &names[..1], DesiredState::Loaded)
            .await
            .unwrap();
        assert_eq!(stopped, 1);
    }
}

/// A daemon whose status page has something on every table: machine
/// `fake-7` (metadata with markup in it) running `page.service`, active,
/// and holding the reboot lock. Returns the machine too: dropping it would
/// end its presence.
async fn status_page_daemon() -> (Daemon, Machine) {
    let daemon = Daemon::start().await;
    let id = "bb000000000000000000000000000001";
    let machine = daemon
        .machine(id, "fake-7", &[("role", "<b>web</b>")])
        .await;
    let unit = json!({"desiredState": "launched", "options": service("/bin/true", &[])});
    let answer = daemon
        .call("PUT", "/fleet/v1/units/page.service", Some(&unit))
        .await;
    assert_eq!(answer.status, 201, "{answer:?}");
    daemon
        .wait_for("/fleet/v1/units/page.service", "placed", |u| {
            u["machineID"] == id
        })
        .await;
    machine.claim("page.service").await;
    let stored = daemon.get("/fleet/v1/units/page.service").await;
    machine.report(&stored, "active", Target::Launched).await;
    let client = Client::connect(std::slice::from_ref(&daemon.store))
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    flotilla::registry::lock::acquire(&client, "reboot", id, now, None)
        .await
        .unwrap();
    (daemon, machine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_members_machines_units_and_locks() {
    let (daemon, _machine) = status_page_daemon().await;
    let page = daemon.raw("GET", "/ui", "", b"").await;
    assert_eq!(page.status, 200, "{page:?}");
    let html = page.body;
    for shown in [
        "leader <b>m0</b>",
        "<p>alarms: none</p>",
        "<meta http-equiv=refresh",
        "<td>page.service<td>launched<td>fake-7<td class=ok>active<td>running</tr>",
        "<td>fake-7<td>10.0.0.7<td>1<td>",
        // Metadata is shown as text, never as markup.
        "role=&lt;b&gt;web&lt;/b&gt;",
        "<td>reboot<td>1<td>fake-7 (",
    ] {
        assert!(html.contains(shown), "the page lacks {shown:?}:\n{html}");
    }
    assert!(!html.contains("<b>web</b>"), "{html}");
    assert_eq!(daemon.raw("POST", "/ui", "", b"").await.status, 405);
}

/// Serves the daemon's TCP API on another loopback port, adding the bearer
/// token to each request: a browser cannot send the header from its command
/// line, and a token in the URL would leak into logs and history, so the
/// test stands in for the authenticating reverse proxy an operator would
/// put in front of the page. One request per connection (`Connection:
/// close` both ways). Returns the proxy's address.
async fn token_proxy(api: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut browser, _)) = listener.accept().await {
            let api = api.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match browser.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let (request_line, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
                let kept: String = headers
                    .split("\r\n")
                    .filter(|h| {
                        let name = h.split(':').next().unwrap_or("").to_ascii_lowercase();
                        !h.is_empty() && name != "connection" && name != "authorization"
                    })
                    .map(|h| format!("{h}\r\n"))
                    .collect();
                let forwarded = format!(
                    "{request_line}\r\n{kept}Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
                );
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&api).await else {
                    return;
                };
                if upstream.write_all(forwarded.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut upstream, &mut browser).await;
                }
                let _ = browser.shutdown().await;
            });
        }
    });
    addr
}

/// Runs headless Chromium with `args` (a private profile in `profile`);
/// its stdout. Fails the test, saying how to install it, when it is missing.
async fn chromium(profile: &std::path::Path, args: &[&str]) -> String {
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium finished within 90 s")
        .unwrap_or_else(|e| {
            panic!(
                "cannot run chromium ({e}): install it with `apt-get install chromium` \
                 (scripts/test.sh does)"
            )
        });
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 15: the status page in a real browser. Chromium renders `/ui`
/// (through [`token_proxy`]): the DOM it built shows the leader, the
/// machine, the unit with its states and the lock; the screenshot is a PNG
/// of the window's size with the page on it (compared for content, not
/// pixels: dark text, the green of an active unit, the striped rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_headless_chromium() {
    let (daemon, _machine) = status_page_daemon().await;
    let proxy = token_proxy(daemon.api.clone()).await;
    let url = format!("http://{proxy}/ui");
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile");

    let started = Instant::now();
    // Straight at the API, without the token, the browser gets the 401.
    let refused = chromium(
        &profile,
        &["--dump-dom", &format!("http://{}/ui", daemon.api)],
    )
    .await;
    assert!(
        refused.contains("Authorization: Bearer TOKEN") && !refused.contains("leader <b>"),
        "without the token the page is refused:\n{refused}"
    );
    let dom = chromium(&profile, &["--dump-dom", &url]).await;
    for shown in [
        "<title>flotilla</title>",
        "leader <b>m0</b>",
        "<p>alarms: none</p>",
        "<td>page.service</td><td>launched</td><td>fake-7</td><td class=\"ok\">active</td><td>running</td>",
        "<td>fake-7</td><td>10.0.0.7</td><td>1</td>",
        "role=&lt;b&gt;web&lt;/b&gt;",
        "<td>reboot</td><td>1</td><td>fake-7 (",
    ] {
        assert!(
            dom.contains(shown),
            "the rendered DOM lacks {shown:?}:\n{dom}"
        );
    }

    let (width, height) = (1000, 700);
    let png = dir.path().join("ui.png");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", png.display()),
            &format!("--window-size={width},{height}"),
            &url,
        ],
    )
    .await;
    eprintln!("chromium: DOM and screenshot in {:?}", started.elapsed());
    let decoder = png::Decoder::new(std::fs::File::open(&png).expect("a screenshot"));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (width, height));
    let channels = frame.color_type.samples();
    assert!(
        channels >= 3 && frame.bit_depth == png::BitDepth::Eight,
        "{frame:?}"
    );
    let rgb: Vec<[u8; 3]> = pixels[..frame.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let dark = rgb.iter().filter(|[r, g, b]| r.max(g).max(b) < &96).count();
    let green = rgb
        .iter()
        .filter(|[r, g, b]| *g > r.saturating_add(40) && *g > b.saturating_add(40))
        .count();
    let striped = rgb.iter().filter(|p| **p == [0xf3, 0xf3, 0xf3]).count();
    let colours: std::collections::BTreeSet<[u8; 3]> = rgb.iter().copied().collect();
    eprintln!(
        "screenshot {width}x{height}: {} colours, {dark} dark, {green} green, {striped} striped pixels",
        colours.len()
    );
    assert!(
        dark > 2000,
        "text is drawn: {dark} dark pixels of {}",
        rgb.len()
    );
    assert!(green > 20, "the active unit is green: {green} pixels");
    assert!(striped > 1000, "the tables' striped rows: {striped} pixels");
    assert!(
        colours.len() > 16,
        "anti-aliased text: {} colours",
        colours.len()
    );
}
