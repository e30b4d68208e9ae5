//! The fleetctl-shaped verbs: submit, start, stop, load, unload, destroy, cat,
//! list-units, list-unit-files, list-machines, drain. Each checks all of its
//! input before writing anything.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use flotilla::cli::{ListArgs, SubmitArgs, UnitsArgs};
use flotilla::consensus::client::Client;
use flotilla::registry::ops::{self, Submitted, UnitRow};
use flotilla::registry::records::{DesiredState, Target};
use flotilla::units::{Unit, UnitName};
use flotilla::verify;

/// Reads and validates a unit file; the error lists every problem.
fn read_unit(path: &Path) -> Result<Unit> {
    let checked = verify::check_path(path);
    match checked.unit {
        Some(unit) if !checked.has_errors() => Ok(unit),
        _ => bail!(
            "{} is not a valid unit file:\n{}",
            path.display(),
            verify::report(path, &checked, false).trim_end()
        ),
    }
}

/// Whether a command-line argument names a file rather than a unit.
fn is_path(arg: &str) -> bool {
    arg.contains('/') || Path::new(arg).is_file()
}

/// Reads and validates every file of `flotilla submit`, before connecting.
pub fn submit_units(args: &SubmitArgs) -> Result<Vec<Unit>> {
    args.files.iter().map(|p| read_unit(p)).collect()
}

/// `flotilla submit`, with the units from [`submit_units`].
pub async fn submit(client: &Client, units: &[Unit], args: &SubmitArgs) -> Result<ExitCode> {
    for unit in units {
        let outcome = ops::submit(client, unit, args.replace)
            .await
            .with_context(|| format!("cannot submit {}", unit.name()))?;
        match outcome {
            Submitted::Created => println!("submitted {}", unit.name()),
            Submitted::Unchanged => println!("{} is already submitted, unchanged", unit.name()),
            Submitted::Replaced => println!("replaced {}", unit.name()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a verb's arguments name: units, and files to submit first.
pub struct Targets {
    /// The units, in argument order.
    pub names: Vec<UnitName>,
    /// Unit files given as paths (start, load), validated.
    pub files: Vec<Unit>,
}

/// Checks every argument before anything is sent: names must be unit names,
/// files (only where `files_allowed`) must be valid unit files.
pub fn targets(args: &[String], files_allowed: bool) -> Result<Targets> {
    let mut targets = Targets {
        names: Vec::new(),
        files: Vec::new(),
    };
    for arg in args {
        if is_path(arg) {
            if !files_allowed {
                bail!(
                    "{arg} looks like a file; give the unit's name (e.g. {})",
                    file_unit_hint(arg)
                );
            }
            let unit = read_unit(Path::new(arg))?;
            targets.names.push(unit.name().clone());
            targets.files.push(unit);
        } else {
            targets.names.push(
                UnitName::from_user(arg).with_context(|| format!("{arg:?} is not a unit name"))?,
            );
        }
    }
    Ok(targets)
}

/// Submits the files among `targets` (unchanged ones are fine).
async fn submit_files(client: &Client, targets: &Targets) -> Result<()> {
    for unit in &targets.files {
        ops::submit(client, unit, false)
            .await
            .with_context(|| format!("cannot submit {}", unit.name()))?;
    }
    Ok(())
}

fn file_unit_hint(arg: &str) -> String {
    Path::new(arg)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "web.service".to_string())
}

/// start, load, unload: set the desired state, optionally wait for it.
pub async fn set_state(
    client: &Client,
    targets: &Targets,
    args: &UnitsArgs,
    desired: DesiredState,
) -> Result<ExitCode> {
    submit_files(client, targets).await?;
    let names = &targets.names;
    let changed = ops::set_desired(client, names, desired).await?;
    let verb = match desired {
        DesiredState::Launched => "started",
        DesiredState::Loaded => "loaded",
        DesiredState::Inactive => "unloaded",
    };
    println!("{verb} {} unit(s) ({changed} changed)", names.len());
    if args.block {
        let timeout = Duration::from_secs(args.block_timeout);
        return block(client, names, desired, timeout).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla stop`: launched → loaded (units must exist).
pub async fn stop(client: &Client, targets: &Targets, args: &UnitsArgs) -> Result<ExitCode> {
    let names = &targets.names;
    for name in names {
        ops::unit_record(client, name).await?;
    }
    let changed = ops::set_desired(client, names, DesiredState::Loaded).await?;
    println!("stopped {} unit(s) ({changed} changed)", names.len());
    if args.block {
        let timeout = Duration::from_secs(args.block_timeout);
        return block(client, names, DesiredState::Loaded, timeout).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until every unit is where `desired` puts it; fails on a failed unit.
async fn block(
    client: &Client,
    names: &[UnitName],
    desired: DesiredState,
    timeout: Duration,
) -> Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    loop {
        if desired == DesiredState::Inactive {
            let placed = ops::still_placed(client, names).await?;
            if placed.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            if Instant::now() >= deadline {
                let placed: Vec<String> = placed.iter().map(|u| u.to_string()).collect();
                bail!(
                    "timed out after {timeout:?}: still on a machine: {}",
                    placed.join(" ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let target = Target::of(desired).expect("inactive is handled above");
        let rows = ops::unit_rows(client).await?;
        let mut pending = Vec::new();
        for name in names {
            let mine: Vec<&UnitRow> = rows.iter().filter(|r| &r.name == name).collect();
            if let Some(failed) = mine
                .iter()
                .find(|r| r.state.as_ref().is_some_and(|s| s.state.is_failed()))
            {
                bail!(
                    "{name} failed on machine {}; read its log there: journalctl -u {name}",
                    failed.machine.as_deref().unwrap_or("?")
                );
            }
            let done = !mine.is_empty()
                && mine
                    .iter()
                    .all(|r| r.state.as_ref().is_some_and(|s| s.state.reached(target)));
            if !done {
                pending.push(name.to_string());
            }
        }
        if pending.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {} unit(s): {}",
                pending.len(),
                pending.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `flotilla destroy`
pub async fn destroy(client: &Client, targets: &Targets, args: &UnitsArgs) -> Result<ExitCode> {
    let names = &targets.names;
    let mut missing = 0;
    for name in names {
        if ops::destroy(client, name).await? {
            println!("destroyed {name}");
        } else {
            eprintln!("{name} was not submitted");
            missing += 1;
        }
    }
    if args.block {
        let timeout = Duration::from_secs(args.block_timeout);
        block(client, names, DesiredState::Inactive, timeout).await?;
    }
    Ok(if missing > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `flotilla cat`
pub async fn cat(client: &Client, name: &UnitName) -> Result<ExitCode> {
    let record = ops::unit_record(client, name).await?;
    print!("{}", ops::body_text(client, &record).await?);
    Ok(ExitCode::SUCCESS)
}

fn short(id: &str, full: bool) -> &str {
    if full { id } else { &id[..id.len().min(8)] }
}

/// `flotilla list-units`
pub async fn list_units(client: &Client, args: &ListArgs) -> Result<ExitCode> {
    let rows = ops::unit_rows(client).await?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "unit": r.name.to_string(),
                    "desired": r.desired.to_string(),
                    "machine": r.machine,
                    "ip": r.ip,
                    "claimed": r.claimed,
                    "load": r.state.as_ref().map(|s| s.state.load.clone()),
                    "active": r.state.as_ref().map(|s| s.state.active.clone()),
                    "sub": r.state.as_ref().map(|s| s.state.sub.clone()),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<26} {:<9} {:<10} {:<12} SUB",
        "UNIT", "MACHINE", "DESIRED", "LOAD", "ACTIVE"
    );
    for r in rows {
        let machine = match (&r.machine, &r.ip) {
            (Some(id), Some(ip)) => format!("{}/{ip}", short(id, args.full)),
            (Some(id), None) => short(id, args.full).to_string(),
            (None, _) => "-".to_string(),
        };
        let (load, active, sub) = match &r.state {
            Some(s) => (
                s.state.load.as_str(),
                s.state.active.as_str(),
                s.state.sub.as_str(),
            ),
            None if r.claimed => ("-", "-", "-"),
            None if r.machine.is_some() => ("-", "proposed", "-"),
            None => ("-", "unplaced", "-"),
        };
        println!(
            "{:<32} {machine:<26} {:<9} {load:<10} {active:<12} {sub}",
            r.name.as_str(),
            r.desired.to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla list-unit-files`
pub async fn list_unit_files(client: &Client, args: &ListArgs) -> Result<ExitCode> {
    let records = ops::unit_records(client).await?;
    if args.json {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                json!({
                    "unit": r.name.to_string(),
                    "hash": r.hash.to_string(),
                    "desired": r.desired.to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<40} {:<12} DESIRED", "UNIT", "HASH");
    for r in records {
        let hash = r.hash.to_string();
        println!(
            "{:<40} {:<12} {}",
            r.name.as_str(),
            if args.full {
                hash.as_str()
            } else {
                &hash[..hash.len().min(7)]
            },
            r.desired
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla list-machines`
pub async fn list_machines(client: &Client, args: &ListArgs) -> Result<ExitCode> {
    let rows = ops::machines(client).await?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "machine": r.record.id,
                    "hostname": r.record.hostname,
                    "ip": r.record.ip,
                    "metadata": r.record.metadata,
                    "units": r.units,
                    "drained": r.drained,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<34} {:<16} {:<6} {:<8} METADATA",
        "MACHINE", "IP", "UNITS", "DRAINED"
    );
    for r in rows {
        let metadata: Vec<String> = r
            .record
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<34} {:<16} {:<6} {:<8} {}",
            short(&r.record.id, args.full),
            r.record.ip,
            r.units,
            if r.drained { "yes" } else { "no" },
            if metadata.is_empty() {
                "-".to_string()
            } else {
                metadata.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `flotilla drain`
pub async fn drain(client: &Client, machine: &str, undo: bool) -> Result<ExitCode> {
    let record = ops::find_machine(client, machine).await?;
    ops::set_drained(client, &record.id, !undo).await?;
    if undo {
        println!("machine {} takes units again", record.id);
    } else {
        println!("draining machine {}: its units move elsewhere", record.id);
    }
    Ok(ExitCode::SUCCESS)
}
