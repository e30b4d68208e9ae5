//! The scheduler: on the Raft leader only, turns units that should run into
//! proposals under each chosen machine's own prefix.
//!
//! It reads the world through the registry ([`crate::registry::schedule`]),
//! runs one pure [`plan`] pass and has the registry write the changes as
//! guarded transactions; then it sleeps until something it reads changes (a
//! watch on the registry, ignoring state reports) or a short tick passes,
//! which is how unclaimed proposals age into being moved. A deposed leader's
//! scheduler stops; any stale write it still makes fails its compares.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::consensus::client::{Client, ClientError};
use crate::consensus::runner::Handle;
use crate::registry::schedule::{self, World};
use crate::registry::{BodyCache, Revision};
use crate::units::UnitName;

/// How often the scheduler runs a pass when nothing wakes it.
const TICK: Duration = Duration::from_millis(500);

/// Runs the scheduler whenever this member leads, until the member stops,
/// reading unit bodies through `bodies` (the daemon's one cache).
pub async fn run(
    node: Handle,
    endpoints: Vec<String>,
    claim_timeout: Duration,
    bodies: Arc<BodyCache>,
) {
    let mut scheduler = Scheduler {
        claim_timeout,
        bodies,
        first_seen: HashMap::new(),
        unplaceable: BTreeMap::new(),
    };
    loop {
        match node.status().await {
            Err(_) => return,
            Ok(status) if status.leader == status.id && status.id != 0 => {
                tracing::info!("this member leads: scheduling");
                if let Err(e) = scheduler.lead(&node, &endpoints).await {
                    tracing::warn!("scheduler: {e}; retrying");
                }
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Scheduler {
    claim_timeout: Duration,
    /// Unit bodies, for their `[X-Fleet]` rules.
    bodies: Arc<BodyCache>,
    /// When each unclaimed proposal (unit, machine, revision) was first seen.
    first_seen: HashMap<(UnitName, String, Revision), Instant>,
    /// The last reason logged for each unit that cannot be placed, to log
    /// changes only.
    unplaceable: BTreeMap<UnitName, String>,
}

impl Scheduler {
    /// Schedules until this member no longer leads.
    async fn lead(&mut self, node: &Handle, endpoints: &[String]) -> Result<(), ClientError> {
        let client = Client::connect(endpoints).await?;
        let wake = Arc::new(Notify::new());
        let revision = schedule::revision(&client).await?;
        let watcher = tokio::spawn(schedule::wake_on_changes(
            endpoints.to_vec(),
            revision + 1,
            wake.clone(),
        ));
        self.first_seen.clear();
        let result = async {
            loop {
                self.pass(&client).await?;
                tokio::select! {
                    _ = wake.notified() => {
                        // Let a burst of writes land before the next pass.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    _ = tokio::time::sleep(TICK) => {}
                }
                match node.status().await {
                    Ok(status) if status.leader == status.id => {}
                    _ => return Ok(()),
                }
            }
        }
        .await;
        watcher.abort();
        result
    }

    async fn pass(&mut self, client: &Client) -> Result<(), ClientError> {
        let mut reading = schedule::read_world(client, &self.bodies).await?;
        self.age_proposals(&mut reading.world);
        let plan = plan::plan(&reading.world);
        let unplaceable: Vec<&(UnitName, String)> = reading
            .unschedulable
            .iter()
            .chain(&plan.unplaceable)
            .collect();
        for (unit, reason) in &unplaceable {
            if self.unplaceable.get(unit) != Some(reason) {
                tracing::warn!("cannot place {unit}: {reason}");
                self.unplaceable.insert(unit.clone(), reason.clone());
            }
        }
        let still: BTreeSet<&UnitName> = unplaceable.iter().map(|(u, _)| u).collect();
        self.unplaceable.retain(|u, _| still.contains(u));
        schedule::record_reasons(client, &reading.reasons, &unplaceable).await?;
        if !plan.changes.is_empty() {
            tracing::debug!("scheduler: {} changes", plan.changes.len());
            schedule::apply(client, &plan.changes).await?;
        }
        Ok(())
    }

    /// Marks proposals nobody claimed within the bound as stale.
    fn age_proposals(&mut self, world: &mut World) {
        let now = Instant::now();
        let mut live = HashMap::new();
        for (unit, on) in &world.proposals {
            for (machine, seen) in on {
                let claimed = world.claims.get(unit).is_some_and(|c| c.contains(machine));
                if claimed {
                    continue;
                }
                let key = (unit.clone(), machine.clone(), seen.mod_revision);
                let since = self.first_seen.get(&key).copied().unwrap_or(now);
                if now.duration_since(since) >= self.claim_timeout {
                    world.stale.insert((unit.clone(), machine.clone()));
                }
                live.insert(key, since);
            }
        }
        self.first_seen = live;
    }
}
