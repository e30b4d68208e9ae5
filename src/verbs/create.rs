//! Submitting units as fleetctl's lazyCreateUnits did, for submit, load,
//! start and restart.
//!
//! A unit the cluster has is used as it is: a local file that differs only
//! gets a warning, unless `--replace` asks to replace it. A unit the cluster
//! lacks is created from its file, or, for an instance, from its template
//! (the cluster's, else the file beside it). Each unit made or replaced is
//! one PUT with its options and the desired state the verb wants (start:
//! launched, load: loaded; submit: inactive for a new unit and, beyond
//! fleetctl, the state it had for a replaced one), so a replaced unit that
//! runs restarts in place with its new body.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

use flotilla::api::units::UnitJson;
use flotilla::client::ApiClient;
use flotilla::registry::records::DesiredState;
use flotilla::units::{Unit, UnitName};

use super::outln;
use super::targets::{Target, did_you_mean};

/// What [`create`] did to one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The cluster had it and keeps it as it was.
    Kept,
    /// It was created.
    New,
    /// Its body was replaced.
    Replaced,
}

/// Makes sure the cluster has every target's unit, with `desired` as its
/// desired state where it was made or replaced (`None`: inactive for a new
/// unit, unchanged for a replaced one). Returns what it did to each, in
/// order; `units` (the cluster's list) is updated with what was made.
pub async fn create(
    client: &ApiClient,
    targets: &[Target],
    units: &mut BTreeMap<String, UnitJson>,
    replace: bool,
    desired: Option<DesiredState>,
) -> Result<Vec<Created>> {
    let mut outcomes = Vec::new();
    for target in targets {
        let name = &target.name;
        let stored = units.get(name.as_str());
        let (unit, created, state) = match stored {
            Some(stored) => match keep_or_replace(target, stored, replace)? {
                Some(unit) => (
                    unit,
                    Created::Replaced,
                    desired.unwrap_or(stored.desired_state),
                ),
                None => {
                    outcomes.push(Created::Kept);
                    continue;
                }
            },
            None => (
                new_body(target, units)?,
                Created::New,
                desired.unwrap_or(DesiredState::Inactive),
            ),
        };
        let options = unit.file().options();
        client
            .create_unit(name, options, state)
            .await
            .with_context(|| format!("cannot submit {name}"))?;
        units.insert(
            name.to_string(),
            serde_json::from_value(serde_json::json!({
                "name": name.as_str(),
                "options": options,
                "desiredState": state,
            }))
            .expect("a unit's JSON reads back"),
        );
        outcomes.push(created);
    }
    Ok(outcomes)
}

/// For a unit the cluster has: the local body to replace it with, if any.
fn keep_or_replace(target: &Target, stored: &UnitJson, replace: bool) -> Result<Option<Unit>> {
    let name = &target.name;
    let Some((path, local)) = target.local() else {
        if replace {
            eprintln!(
                "warning: --replace: there is no file {} for {name}; it is kept as it is",
                target.path.display()
            );
        }
        return Ok(None);
    };
    if stored.unit().is_ok_and(|s| s.hash() == local.hash()) {
        if replace {
            outln!("Found same Unit({name}) in Registry, nothing to do")?;
        }
        return Ok(None);
    }
    if !replace {
        eprintln!(
            "warning: unit {name} in the cluster differs from the local file {}; add --replace \
             to use the file",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(local.clone()))
}

/// For a unit the cluster lacks: its body from its file or its template.
fn new_body(target: &Target, units: &BTreeMap<String, UnitJson>) -> Result<Unit> {
    let name = &target.name;
    if let Some(unit) = &target.file {
        return Ok(unit.clone());
    }
    if let Some(template) = name.template() {
        if let Some(stored) = units.get(template.as_str()) {
            let template_unit = stored
                .unit()
                .with_context(|| format!("the cluster's template {template} is unreadable"))?;
            if let Some((path, local)) = &target.template_file
                && local.hash() != template_unit.hash()
            {
                eprintln!(
                    "warning: template {template} in the cluster differs from the local file {}; \
                     {name} is made from the cluster's",
                    path.display()
                );
            }
            let instance = name.instance().expect("instances have one");
            return template_unit
                .instantiate(instance)
                .with_context(|| format!("cannot make {name} from {template}"));
        }
        if let Some((_, local)) = &target.template_file {
            return Ok(local.clone());
        }
        bail!(
            "unit {name} is not in the cluster, and neither its template {template} nor a file \
             {} or {} is here{}",
            target.path.display(),
            target.path.with_file_name(template.as_str()).display(),
            did_you_mean(name, &units.values().cloned().collect::<Vec<_>>())
        );
    }
    bail!(
        "unit {name} is not in the cluster and there is no file {} to submit{}",
        target.path.display(),
        did_you_mean(name, &units.values().cloned().collect::<Vec<_>>())
    )
}

/// The cluster's units by name.
pub async fn unit_map(client: &ApiClient) -> Result<BTreeMap<String, UnitJson>> {
    Ok(client
        .units()
        .await?
        .into_iter()
        .map(|u| (u.name.clone(), u))
        .collect())
}

/// Names and their units, failing for names the cluster does not have (with
/// a "did you mean"); `verb` says what could not be done.
pub fn existing<'a>(
    names: &[UnitName],
    units: &'a BTreeMap<String, UnitJson>,
    verb: &str,
) -> Result<Vec<(UnitName, &'a UnitJson)>> {
    let all: Vec<UnitJson> = units.values().cloned().collect();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        match units.get(name.as_str()) {
            Some(unit) => found.push((name.clone(), unit)),
            None => missing.push(format!("{name}{}", did_you_mean(name, &all))),
        }
    }
    if !missing.is_empty() {
        bail!(
            "cannot {verb}: no unit {} in the cluster (see flotilla list-unit-files); \
             nothing was changed",
            missing.join(", no unit ")
        );
    }
    Ok(found)
}
