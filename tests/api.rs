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
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use flotilla::consensus::client::Client;
use flotilla::registry::machine::MachineStore;
use flotilla::registry::records::{MachineRecord, ReportedState, Target};
use flotilla::registry::{BodyCache, UnitState};
use flotilla::units::{Requirements, UnitName};

mod support;

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
        let client = Client::connect(std::slice::from_ref(&self.store))
            .await
            .unwrap();
        let bodies = Arc::new(BodyCache::new());
        let mut store =
            MachineStore::new(client, id, "test-instance", Duration::from_secs(30), bodies);
        store.take_lease().await.unwrap();
        let record = MachineRecord {
            id: id.to_string(),
            instance: "test-instance".to_string(),
            hostname: hostname.to_string(),
            ip: format!("10.0.0.{}", hostname.trim_start_matches("fake-")),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(store.publish(&record, None).await.unwrap(), "presence");
        Machine { store, record }
    }
}

/// A machine the test plays: its registry handle and presence record.
struct Machine {
    store: MachineStore,
    record: MachineRecord,
}

impl Machine {
    /// Claims `unit` as proposed here (the proposal must exist), as an agent
    /// does: a claim that lost a race with the scheduler (its proposal or this
    /// machine's generation changed between the read and the transaction) is
    /// tried again on a fresh read, for up to 5 s.
    async fn claim(&self, unit: &str) {
        let name = UnitName::parse(unit).unwrap();
        let rules = Requirements::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut view = self.store.own_view().await.unwrap();
            if self
                .store
                .claim(&mut view, &[(&name, &rules)])
                .await
                .unwrap()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "claim {unit}: still refused after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reports systemd's states of `unit` here, and the agent's target.
    async fn report(&self, unit: &Value, active: &str, target: Target) {
        let name = UnitName::parse(unit["name"].as_str().unwrap()).unwrap();
        let state = ReportedState {
            hash: unit["hash"].as_str().unwrap().parse().unwrap(),
            state: UnitState {
                load: "loaded".into(),
                active: active.into(),
                sub: if active == "active" {
                    "running"
                } else {
                    "failed"
                }
                .into(),
            },
            target: Some(target),
            reason: None,
        };
        self.store.report(&[(name, Some(state))]).await.unwrap();
    }

    /// Leaves (lease revoked: presence gone) and joins again on a new lease.
    async fn rejoin(&mut self) {
        self.store.revoke().await.unwrap();
        self.store.take_lease().await.unwrap();
        assert!(self.store.publish(&self.record, None).await.unwrap());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_members_machines_units_and_locks() {
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
    flotilla::registry::lock::acquire(&client, "reboot", id, 1, None)
        .await
        .unwrap();

    let page = daemon.raw("GET", "/ui", "", b"").await;
    assert_eq!(page.status, 200, "{page:?}");
    let html = page.body;
    for shown in [
        "leader <b>m0</b>",
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
