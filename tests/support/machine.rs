//! A machine a test plays through the registry's own machine-side
//! operations ([`MachineStore`]: presence on a lease, claims, reports),
//! exactly the transactions a real agent makes, for API tests that need
//! machines but no systemd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use flotilla::consensus::client::Client;
use flotilla::registry::machine::MachineStore;
use flotilla::registry::records::{MachineRecord, ReportedState, Target};
use flotilla::registry::{BodyCache, UnitState};
use flotilla::units::{Requirements, UnitName};

/// A machine the test plays: its registry handle and presence record.
pub struct Machine {
    /// Its registry handle.
    pub store: MachineStore,
    /// Its presence record.
    pub record: MachineRecord,
}

impl Machine {
    /// Joins the store at `store` as machine `id` (host name `fake-N` gets
    /// the address 10.0.0.N), with `metadata`, publishing `api` as its API.
    pub async fn join(
        store: &str,
        id: &str,
        hostname: &str,
        metadata: &[(&str, &str)],
        api: Option<String>,
    ) -> Machine {
        let client = Client::connect(&[store.to_string()]).await.unwrap();
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
            api,
        };
        assert!(store.publish(&record, None).await.unwrap(), "presence");
        Machine { store, record }
    }

    /// Claims `unit` as proposed here (the proposal must exist), as an agent
    /// does: a claim that lost a race with the scheduler (its proposal or this
    /// machine's generation changed between the read and the transaction) is
    /// tried again on a fresh read, for up to 5 s.
    pub async fn claim(&self, unit: &str) {
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
    pub async fn report(&self, unit: &Value, active: &str, target: Target) {
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
    pub async fn rejoin(&mut self) {
        self.store.revoke().await.unwrap();
        self.store.take_lease().await.unwrap();
        assert!(self.store.publish(&self.record, None).await.unwrap());
    }
}
