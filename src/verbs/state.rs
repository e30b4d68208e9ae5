//! The verbs that change units: submit, start, load, stop, unload, restart
//! and destroy, with fleetctl's call sequences and output.
//!
//! They block by default until every unit is where it was asked to be
//! (`--no-block` returns at once, `--block-attempts=N` gives up after N
//! checks), and fail naming every unit that did not get there and why.
//! Global units are set and announced (`Triggered global unit X start`), not
//! waited for, as in fleetctl.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use flotilla::api::units::UnitJson;
use flotilla::cli::{BlockArgs, DestroyArgs, RestartArgs, StartArgs, StateArgs, SubmitArgs};
use flotilla::client::ApiClient;
use flotilla::registry::records::DesiredState;
use flotilla::units::UnitName;

use super::create::{self, Created};
use super::targets::{self, did_you_mean};
use super::wait::{self, Machines};
use super::{connect, outln};
use flotilla::cli::ApiArgs;

/// Block attempts: `None` for `--no-block`, else checks (0 = for ever).
fn attempts(block: &BlockArgs) -> Option<u32> {
    (!block.no_block).then_some(block.block_attempts)
}

/// `flotilla submit`
pub async fn submit(args: SubmitArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let targets = targets::with_files(&args.units, args.force)?;
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let mut units = create::unit_map(&client).await?;
    let outcomes = create::create(&client, &targets, &mut units, args.replace, None).await?;
    for (target, outcome) in targets.iter().zip(outcomes) {
        match outcome {
            Created::New => outln!("Unit {} inactive", target.name)?,
            Created::Replaced => {
                let desired = units[target.name.as_str()].desired_state;
                outln!("Unit {} replaced ({desired})", target.name)?;
            }
            Created::Kept => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla start` (`desired` launched) and `flotilla load` (loaded).
pub async fn start_or_load(
    args: StartArgs,
    outer: &ApiArgs,
    desired: DesiredState,
) -> Result<ExitCode> {
    let verb = match desired {
        DesiredState::Launched => "start",
        _ => "load",
    };
    let targets = targets::with_files(&args.units, args.force)?;
    let block = attempts(&args.block);
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let mut units = create::unit_map(&client).await?;
    create::create(&client, &targets, &mut units, args.replace, Some(desired)).await?;
    let names: Vec<UnitName> = targets.iter().map(|t| t.name.clone()).collect();
    let waited = set_all(&client, &names, &units, desired, verb).await?;
    finish(&client, waited, desired, block, verb).await
}

/// Sets `desired` on every unit that is not there yet; returns the units to
/// wait for (globals are announced instead).
async fn set_all(
    client: &ApiClient,
    names: &[UnitName],
    units: &BTreeMap<String, UnitJson>,
    desired: DesiredState,
    verb: &str,
) -> Result<Vec<UnitName>> {
    let mut waited = Vec::new();
    for name in names {
        let unit = units.get(name.as_str());
        if unit.is_none_or(|u| u.desired_state != desired) {
            client
                .set_desired(name, desired)
                .await
                .with_context(|| format!("cannot {verb} {name}"))?;
        }
        if unit.is_some_and(UnitJson::is_global) {
            outln!("Triggered global unit {name} {verb}")?;
        } else {
            waited.push(name.clone());
        }
    }
    Ok(waited)
}

/// Waits (unless `--no-block`) and turns what did not arrive into the error.
async fn finish(
    client: &ApiClient,
    names: Vec<UnitName>,
    goal: DesiredState,
    block: Option<u32>,
    verb: &str,
) -> Result<ExitCode> {
    let Some(attempts) = block else {
        for name in &names {
            outln!("Triggered unit {name} {verb}")?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let stuck = wait::wait(client, &names, goal, attempts, &mut Machines::default()).await?;
    if stuck.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    Err(wait::stuck_error(verb, names.len(), &stuck))
}

/// `flotilla stop`: launched units to loaded.
pub async fn stop(args: StateArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let names = targets::names(&args.units)?;
    let block = attempts(&args.block);
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let units = create::unit_map(&client).await?;
    let found = create::existing(&names, &units, "stop")?;
    let idle: Vec<String> = found
        .iter()
        .filter(|(_, u)| u.desired_state == DesiredState::Inactive && !u.is_global())
        .map(|(n, _)| n.to_string())
        .collect();
    if !idle.is_empty() {
        bail!(
            "cannot stop {}: not loaded anywhere (desired state inactive); nothing was changed",
            idle.join(", ")
        );
    }
    let waited = set_all(&client, &names, &units, DesiredState::Loaded, "stop").await?;
    finish(&client, waited, DesiredState::Loaded, block, "stop").await
}

/// `flotilla unload`: units to inactive (still submitted).
pub async fn unload(args: StateArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let names = targets::names(&args.units)?;
    let block = attempts(&args.block);
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let units = create::unit_map(&client).await?;
    create::existing(&names, &units, "unload")?;
    let waited = set_all(&client, &names, &units, DesiredState::Inactive, "unload").await?;
    finish(&client, waited, DesiredState::Inactive, block, "unload").await
}

/// `flotilla restart`, as fleetctl v1.0.0's: each unit fleet's
/// `currentState` says is launched is set loaded, then launched again,
/// waiting for each step unless `--no-block` ("Triggered unit X stop/start").
/// A unit that is only loaded runs nothing to restart and is skipped; an
/// inactive one ends the verb with an error. A global unit is set loaded,
/// then launched, without waiting.
pub async fn restart(args: RestartArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let targets = targets::with_files(&args.units, false)?;
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let mut units = create::unit_map(&client).await?;
    create::create(&client, &targets, &mut units, false, None).await?;
    let mut machines = Machines::default();
    let mut stuck = Vec::new();
    let attempts = args.block.block_attempts;
    for target in &targets {
        let name = &target.name;
        let unit = &units[name.as_str()];
        let one = std::slice::from_ref(name);
        let global = unit.is_global();
        if !global {
            match unit.current_state {
                DesiredState::Inactive => bail!(
                    "cannot restart {name}: it is inactive, so nothing runs to restart \
                     (start it: flotilla start {name})"
                ),
                DesiredState::Loaded => {
                    eprintln!(
                        "warning: {name} is loaded, not launched: nothing runs to restart; \
                         skipped (start it: flotilla start {name})"
                    );
                    continue;
                }
                DesiredState::Launched => {}
            }
        }
        for (state, step) in [
            (DesiredState::Loaded, "stop"),
            (DesiredState::Launched, "start"),
        ] {
            client.set_desired(name, state).await?;
            if global {
                outln!("Triggered global unit {name} {step}")?;
            } else if args.block.no_block {
                outln!("Triggered unit {name} {step}")?;
            } else {
                let late = wait::wait(&client, one, state, attempts, &mut machines).await?;
                if let Some(s) = late.first() {
                    stuck.push(format!("{name} ({})", s.why));
                    break;
                }
            }
        }
    }
    if stuck.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    bail!(
        "{} of {} unit(s) did not restart: {}",
        stuck.len(),
        targets.len(),
        stuck.join("; ")
    )
}

/// `flotilla destroy`: a unit that does not exist is already destroyed.
pub async fn destroy(args: DestroyArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let names = targets::names(&args.units)?;
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let units = create::unit_map(&client).await?;
    let all: Vec<UnitJson> = units.values().cloned().collect();
    for name in &names {
        if !units.contains_key(name.as_str()) {
            eprintln!(
                "warning: unit {name} does not exist; nothing to destroy{}",
                did_you_mean(name, &all)
            );
            continue;
        }
        client
            .destroy(name)
            .await
            .with_context(|| format!("cannot destroy {name}"))?;
        outln!("Destroyed {name}")?;
    }
    Ok(ExitCode::SUCCESS)
}
