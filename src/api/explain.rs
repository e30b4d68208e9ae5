//! `GET /flotilla/v1/explain/UNIT`: why a unit runs where it runs, or why
//! not: every machine, and the rule that excludes it.
//!
//! The answer is the scheduler's own decision ([`crate::scheduler::plan::explain`],
//! over [`crate::units::placement::decide`]) from the world the scheduler
//! reads ([`crate::registry::schedule::read_world`]), so it cannot drift from
//! what the scheduler does. A unit that is not wanted now (desired state
//! `inactive`) is explained as if it were started. Drained machines take no
//! units and are named as such.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::Shared;
use super::error::ApiError;
use super::units::unit_name;
use crate::registry::RegistryError;
use crate::registry::ops;
use crate::registry::records::{DesiredState, Proposal, Target};
use crate::registry::schedule::{self, Wanted};
use crate::scheduler::plan;
use crate::units::UnitKind;
use crate::units::placement::{Decision, Outcome};

/// The answer of `explain` (the CLI reads it back, every field but the
/// unit optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Explanation {
    /// The unit.
    pub unit: String,
    /// What the user asked for.
    pub desired_state: DesiredState,
    /// The machines that claimed it.
    pub placed_on: Vec<String>,
    /// The machines the scheduler proposed it to, claimed or not yet.
    pub proposed_on: Vec<String>,
    /// Why it cannot be placed, when it cannot; else why a machine that
    /// claimed it refused to load it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every machine present, with the verdict on it.
    pub machines: Vec<Verdict>,
}

/// One machine's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verdict {
    /// The machine id.
    pub id: String,
    /// Its host name.
    pub hostname: String,
    /// Its address.
    pub ip: String,
    /// Whether the unit may run there.
    pub eligible: bool,
    /// Why (not), in words.
    pub why: String,
}

/// `GET /flotilla/v1/explain/UNIT`
pub async fn explain(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Explanation>, ApiError> {
    let name = unit_name(path)?;
    if name.kind() == UnitKind::Template {
        return Err(RegistryError::Template(name).into());
    }
    let client = shared.client().await?;
    let record = ops::unit_record(client, &name).await?;
    let reading = schedule::read_world(client, &shared.bodies).await?;
    let machines = ops::machines(client).await?;
    // Why a machine that claimed the unit refused to load it, by machine.
    let refused: std::collections::BTreeMap<String, String> = ops::unit_rows(client)
        .await?
        .into_iter()
        .filter(|row| row.name == name)
        .filter_map(|row| Some((row.machine?, row.state?.reason?)))
        .collect();
    let mut world = reading.world;
    let unschedulable = reading
        .unschedulable
        .iter()
        .find(|(unit, _)| *unit == name)
        .map(|(_, why)| why.clone());
    if !world.wanted.contains_key(&name) && unschedulable.is_none() {
        // Not wanted now: explained as if it were started.
        let body = shared.bodies.of(client, &record).await?;
        if let Ok(requirements) = body.requirements(&name) {
            let proposal = Proposal {
                hash: record.hash,
                target: Target::Launched,
            };
            let wanted = Wanted {
                proposal,
                requirements,
            };
            world.wanted.insert(name.clone(), wanted);
        }
    }
    let decision = plan::explain(&world, &name);
    let placed_on: Vec<String> = world
        .claims
        .get(&name)
        .map(|on| on.iter().cloned().collect())
        .unwrap_or_default();
    let proposed_on: Vec<String> = world
        .proposals
        .get(&name)
        .map(|on| on.keys().cloned().collect())
        .unwrap_or_default();
    let verdicts = machines
        .into_iter()
        .map(|row| {
            let id = row.record.id;
            let (eligible, why) = if row.drained {
                (
                    false,
                    format!("drained: it takes no units (undo: flotilla drain --undo {id})"),
                )
            } else {
                let situation = if let Some(why) = refused.get(&id) {
                    Some(format!("claimed here but not loaded: {why}"))
                } else if placed_on.contains(&id) {
                    Some("the unit runs here".to_string())
                } else if proposed_on.contains(&id) {
                    Some("the unit is proposed here".to_string())
                } else {
                    None
                };
                verdict(
                    decision.as_ref(),
                    unschedulable.as_deref(),
                    &id,
                    situation.as_deref(),
                )
            };
            Verdict {
                hostname: row.record.hostname,
                ip: row.record.ip,
                id,
                eligible,
                why,
            }
        })
        .collect();
    let reason = reading
        .reasons
        .get(&name)
        .cloned()
        .or(unschedulable)
        .or_else(|| match decision.map(|d| d.outcome) {
            Some(Outcome::NotPlaceable { reason }) => Some(reason),
            _ => None,
        })
        .or_else(|| refused.values().next().cloned());
    Ok(Json(Explanation {
        unit: name.to_string(),
        desired_state: record.desired,
        placed_on,
        proposed_on,
        reason,
        machines: verdicts,
    }))
}

/// One undrained machine's verdict from the decision.
fn verdict(
    decision: Option<&Decision>,
    unschedulable: Option<&str>,
    id: &str,
    situation: Option<&str>,
) -> (bool, String) {
    let Some(decision) = decision else {
        let why = unschedulable.unwrap_or("the unit cannot be scheduled");
        return (false, why.to_string());
    };
    if let Some(position) = decision.eligible.iter().position(|m| m == id) {
        let why = match (situation, position, &decision.outcome) {
            (Some(situation), _, _) => format!("eligible; {situation}"),
            (None, 0, Outcome::One { .. }) => "eligible; placement's first choice".to_string(),
            _ => "eligible".to_string(),
        };
        return (true, why);
    }
    match decision.rejected.iter().find(|(m, _)| m == id) {
        Some((_, why)) => (false, why.to_string()),
        None => match &decision.outcome {
            Outcome::NotPlaceable { reason } => (false, reason.clone()),
            _ => (false, "not eligible".to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::UnitName;
    use crate::units::placement::Ineligible;

    #[test]
    fn verdicts_name_the_rule() {
        let decision = Decision {
            eligible: vec!["b".into(), "c".into()],
            rejected: vec![(
                "a".into(),
                Ineligible::Conflict {
                    with: UnitName::parse("db.service").unwrap(),
                },
            )],
            outcome: Outcome::One {
                machine: "b".into(),
                displaces: vec![],
            },
        };
        let d = Some(&decision);
        assert_eq!(
            verdict(d, None, "a", None),
            (false, "conflicts with db.service".into())
        );
        assert_eq!(
            verdict(d, None, "b", None),
            (true, "eligible; placement's first choice".into())
        );
        assert_eq!(
            verdict(d, None, "c", Some("the unit runs here")),
            (true, "eligible; the unit runs here".into())
        );
        assert_eq!(
            verdict(None, Some("its stored body is invalid"), "a", None),
            (false, "its stored body is invalid".into())
        );
    }
}
