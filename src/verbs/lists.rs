//! The verbs that read: list-units, list-unit-files, list-machines, cat and
//! explain, plus drain; fleetctl's tables, or JSON with `--json`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use flotilla::api::machines::MachineJson;
use flotilla::api::units::{StateJson, UnitJson};
use flotilla::cli::{ApiArgs, DrainArgs, ListArgs, UnitArg};
use flotilla::registry::records::DesiredState;
use flotilla::units::UnitName;

use super::targets::no_such_unit;
use super::{connect, create, machine_legend, out, outln, table};

/// Fields of list-units; the first four are fleetctl's default.
const UNIT_FIELDS: [&str; 11] = [
    "unit", "machine", "active", "sub", "load", "hash", "desired", "reason", "hostname", "ip",
    "overdue",
];

/// Fields of list-unit-files; the first five are fleetctl's default.
const FILE_FIELDS: [&str; 9] = [
    "unit", "hash", "dstate", "state", "target", "global", "desc", "desired", "reason",
];

/// Fields of list-machines; the first three are fleetctl's default.
const MACHINE_FIELDS: [&str; 6] = [
    "machine", "ip", "metadata", "hostname", "drained", "renewed",
];

/// Prints rows as a table, or as JSON objects (`--json`: every field).
fn print(args: &ListArgs, chosen: &[&str], rows: Vec<BTreeMap<&str, Value>>) -> Result<ExitCode> {
    if args.json {
        let rows: Vec<Value> = rows.into_iter().map(|r| json!(r)).collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            chosen
                .iter()
                .map(|field| match row.get(field) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                })
                .collect()
        })
        .collect();
    out!("{}", table::render(chosen, &cells, !args.no_legend))?;
    Ok(ExitCode::SUCCESS)
}

/// A hash as a table shows it: 7 digits, or all with `--full`.
fn shown_hash(hash: &str, full: bool) -> String {
    if full {
        hash.to_string()
    } else {
        hash.chars().take(7).collect()
    }
}

/// `flotilla list-units`: one row per unit and machine systemd reported
/// on, plus one row for each loaded or launched unit reported nowhere yet.
pub async fn list_units(args: ListArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let chosen = table::fields(
        "list-units",
        args.fields.as_deref(),
        &UNIT_FIELDS,
        &UNIT_FIELDS[..4],
    )?;
    let client = connect::client(&connect::api_args(args.api.clone(), outer)?)?;
    let units = create::unit_map(&client).await?;
    let states = client.states(None).await?;
    let machines = machine_map(client.machines().await?);
    let mut rows = Vec::new();
    let mut reported: Vec<&str> = Vec::new();
    for state in &states {
        reported.push(&state.name);
        rows.push(unit_row(
            &args,
            units.get(&state.name),
            Some(state),
            &state.name,
            &machines,
        ));
    }
    for unit in units.values() {
        let wanted = unit.desired_state != DesiredState::Inactive;
        let template = UnitName::parse(&unit.name).is_ok_and(|n| n.instance() == Some(""));
        if wanted && !template && !reported.contains(&unit.name.as_str()) {
            rows.push(unit_row(&args, Some(unit), None, &unit.name, &machines));
        }
    }
    rows.sort_by(|a, b| a["unit"].as_str().cmp(&b["unit"].as_str()));
    print(&args, &chosen, rows)
}

fn machine_map(machines: Vec<MachineJson>) -> BTreeMap<String, MachineJson> {
    machines.into_iter().map(|m| (m.id.clone(), m)).collect()
}

/// One row of list-units.
fn unit_row<'a>(
    args: &ListArgs,
    unit: Option<&UnitJson>,
    state: Option<&StateJson>,
    name: &str,
    machines: &BTreeMap<String, MachineJson>,
) -> BTreeMap<&'a str, Value> {
    let id = state
        .map(|s| s.machine_id.clone())
        .or_else(|| unit.and_then(|u| u.machine_id.clone()));
    let machine = id.as_ref().and_then(|id| machines.get(id));
    let ip = machine.map(|m| m.primary_ip.clone());
    // The machine missed two renewals: its states are getting stale and
    // it is about to lose its units.
    let overdue = machine.is_some_and(|m| m.overdue);
    let hash = match (state, unit.and_then(|u| u.unit().ok())) {
        (Some(s), _) if !s.hash.is_empty() => Some(s.hash.clone()),
        (_, Some(u)) => Some(u.hash().to_string()),
        _ => None,
    };
    let mut row = BTreeMap::new();
    row.insert("unit", json!(name));
    if args.json {
        row.insert("machine", json!(id));
        row.insert("hash", json!(hash));
    } else {
        let legend = id
            .as_ref()
            .map(|id| machine_legend(id, ip.as_deref(), args.full))
            .map(|l| if overdue { format!("{l} (overdue)") } else { l });
        row.insert("machine", json!(legend));
        row.insert("hash", json!(hash.map(|h| shown_hash(&h, args.full))));
    }
    row.insert("ip", json!(ip));
    row.insert(
        "hostname",
        json!(machine.map(|m| &m.hostname).filter(|h| !h.is_empty())),
    );
    row.insert("load", json!(state.map(|s| &s.load)));
    row.insert("active", json!(state.map(|s| &s.active)));
    row.insert("sub", json!(state.map(|s| &s.sub)));
    row.insert("desired", json!(unit.map(|u| u.desired_state.to_string())));
    row.insert("reason", json!(unit.and_then(|u| u.reason.clone())));
    row.insert("overdue", json!(overdue));
    row
}

/// `flotilla list-unit-files`: every submitted unit, sorted by name.
pub async fn list_unit_files(args: ListArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let chosen = table::fields(
        "list-unit-files",
        args.fields.as_deref(),
        &FILE_FIELDS,
        &FILE_FIELDS[..5],
    )?;
    let client = connect::client(&connect::api_args(args.api.clone(), outer)?)?;
    let units = create::unit_map(&client).await?;
    let machines = machine_map(client.machines().await?);
    let mut rows = Vec::new();
    for unit in units.values() {
        let body = unit.unit().ok();
        let global = body.as_ref().is_some_and(|b| b.requirements().global);
        let hash = body
            .as_ref()
            .map(|b| b.hash().to_string())
            .unwrap_or_default();
        let desc = body.as_ref().and_then(|b| {
            b.file()
                .options()
                .iter()
                .find(|o| o.section == "Unit" && o.name == "Description")
                .map(|o| o.value.clone())
        });
        let target = if global {
            Some("global".to_string())
        } else {
            unit.machine_id.as_ref().map(|id| {
                let ip = machines.get(id).map(|m| m.primary_ip.as_str());
                if args.json {
                    id.clone()
                } else {
                    machine_legend(id, ip, args.full)
                }
            })
        };
        let state = (!global).then(|| unit.current_state.to_string());
        let mut row = BTreeMap::new();
        row.insert("unit", json!(unit.name));
        row.insert(
            "hash",
            json!(if args.json {
                hash
            } else {
                shown_hash(&hash, args.full)
            }),
        );
        row.insert("dstate", json!(unit.desired_state.to_string()));
        row.insert("desired", json!(unit.desired_state.to_string()));
        row.insert("state", json!(state));
        row.insert("target", json!(target));
        row.insert("global", json!(global.to_string()));
        row.insert("desc", json!(desc));
        row.insert("reason", json!(unit.reason));
        rows.push(row);
    }
    print(&args, &chosen, rows)
}

/// `flotilla list-machines`
pub async fn list_machines(args: ListArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let chosen = table::fields(
        "list-machines",
        args.fields.as_deref(),
        &MACHINE_FIELDS,
        &MACHINE_FIELDS[..3],
    )?;
    let client = connect::client(&connect::api_args(args.api.clone(), outer)?)?;
    let mut machines = client.machines().await?;
    machines.sort_by(|a, b| a.id.cmp(&b.id));
    let rows = machines
        .into_iter()
        .map(|m| {
            let metadata: Vec<String> =
                m.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let renewed = match (&m.renewed_secs_ago, &m.last_renewal) {
                (Some(secs), _) => Some(format!("{secs}s ago")),
                (None, Some(at)) => Some(at.clone()),
                (None, None) => None,
            }
            .map(|r| {
                if m.overdue {
                    format!("{r} (overdue)")
                } else {
                    r
                }
            });
            let mut row = BTreeMap::new();
            if args.json {
                row.insert("machine", json!(m.id));
                row.insert("metadata", json!(m.metadata));
            } else {
                row.insert("machine", json!(machine_legend(&m.id, None, args.full)));
                row.insert("metadata", json!(metadata.join(",")));
            }
            row.insert("ip", json!(m.primary_ip));
            row.insert(
                "hostname",
                json!(Some(&m.hostname).filter(|h| !h.is_empty())),
            );
            row.insert("drained", json!(m.drained.to_string()));
            row.insert("renewed", json!(renewed));
            row
        })
        .collect();
    print(&args, &chosen, rows)
}

/// `flotilla cat`
pub async fn cat(args: UnitArg, outer: &ApiArgs) -> Result<ExitCode> {
    let name = UnitName::from_user(&args.unit)?;
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let Some(unit) = client.unit(&name).await? else {
        return Err(no_such_unit(&client, &name).await);
    };
    let body = unit
        .unit()
        .with_context(|| format!("the cluster's body of {name} is unreadable"))?;
    out!("{}", body.file().to_text())?;
    Ok(ExitCode::SUCCESS)
}

/// `flotilla explain`: each machine and the rule that decided.
pub async fn explain(args: UnitArg, outer: &ApiArgs) -> Result<ExitCode> {
    let name = UnitName::from_user(&args.unit)?;
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    let Some(explained) = client.explain(&name).await? else {
        return Err(no_such_unit(&client, &name).await);
    };
    let desired = explained.desired_state.to_string();
    let legends = |ids: &[String]| -> Vec<String> {
        ids.iter()
            .map(|id| {
                let m = explained.machines.iter().find(|m| &m.id == id);
                machine_legend(id, m.map(|m| m.ip.as_str()), false)
            })
            .collect()
    };
    let placed = legends(&explained.placed_on);
    let proposed = legends(&explained.proposed_on);
    let place = match (&explained.reason, placed.is_empty(), proposed.is_empty()) {
        (Some(reason), _, _) => format!("not placed: {reason}"),
        (None, false, _) => format!("placed on {}", placed.join(", ")),
        (None, true, false) => format!(
            "proposed to {}, not claimed by its agent yet",
            proposed.join(", ")
        ),
        (None, true, true) => "not placed".to_string(),
    };
    outln!("{} (desired {desired}): {place}", explained.unit)?;
    let rows: Vec<Vec<String>> = explained
        .machines
        .iter()
        .map(|m| {
            vec![
                machine_legend(&m.id, Some(&m.ip), false),
                m.hostname.clone(),
                if m.eligible { "yes" } else { "no" }.to_string(),
                m.why.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table::render(&["machine", "hostname", "eligible", "why"], &rows, true)
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `flotilla drain [--undo]`
pub async fn drain(args: DrainArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let client = connect::client(&connect::api_args(args.api, outer)?)?;
    client
        .drain(&args.machine, args.undo)
        .await
        .with_context(|| {
            format!(
                "cannot {} {}",
                if args.undo { "undrain" } else { "drain" },
                args.machine
            )
        })?;
    if args.undo {
        outln!("Machine {} takes units again", args.machine)?;
    } else {
        outln!(
            "Draining machine {}: its units move elsewhere",
            args.machine
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
