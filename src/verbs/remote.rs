//! ssh, status and journal: the system ssh to the host of a machine or a
//! unit, as fleetctl's verbs of those names; status and journal run locally
//! when the unit is on this host, and through the API with `--via-api`.
//!
//! A machine is named by its id (or a prefix of it), its host name or its
//! IP; a unit by its name (its host is the machine it is scheduled on). A
//! name that matches more than one host is an error that lists them.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use flotilla::api::machines::MachineJson;
use flotilla::api::units::UnitJson;
use flotilla::cli::{ApiArgs, JournalArgs, SshVerbArgs, StatusArgs};
use flotilla::client::ApiClient;
use flotilla::registry::records::DesiredState;
use flotilla::units::UnitName;

use super::targets;
use super::{connect, machine_legend, outln};

/// The machines `given` names: by exact id, id prefix, host name or IP.
fn matching<'a>(machines: &'a [MachineJson], given: &str) -> Vec<&'a MachineJson> {
    if given.is_empty() {
        return Vec::new();
    }
    if let Some(exact) = machines.iter().find(|m| m.id == given) {
        return vec![exact];
    }
    machines
        .iter()
        .filter(|m| m.id.starts_with(given) || m.primary_ip == given || m.hostname == given)
        .collect()
}

/// The one machine `given` names, or an error saying why not.
fn one_machine<'a>(machines: &'a [MachineJson], given: &str) -> Result<Option<&'a MachineJson>> {
    let found = matching(machines, given);
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => {
            let listed: Vec<String> = many
                .iter()
                .map(|m| {
                    format!(
                        "{} ({})",
                        machine_legend(&m.id, Some(&m.primary_ip), false),
                        if m.hostname.is_empty() {
                            "-"
                        } else {
                            &m.hostname
                        }
                    )
                })
                .collect();
            bail!(
                "{given:?} matches {} machines: {}; give more of the id",
                many.len(),
                listed.join(", ")
            )
        }
    }
}

/// The machine a non-global, scheduled unit is on.
fn host_of<'a>(unit: &UnitJson, machines: &'a [MachineJson]) -> Result<&'a MachineJson> {
    if unit.is_global() {
        bail!(
            "{} is a global unit: it runs on every machine; name a machine instead",
            unit.name
        );
    }
    let Some(id) = unit.machine_id.as_deref() else {
        bail!(
            "unit {} does not appear to be scheduled anywhere (its state is {})",
            unit.name,
            unit.current_state
        );
    };
    machines.iter().find(|m| m.id == id).with_context(|| {
        format!(
            "{}'s machine {id} is not in the cluster any more",
            unit.name
        )
    })
}

/// Runs a command, passing its exit code through (a signal is exit 1).
fn run(mut command: Command) -> Result<ExitCode> {
    let shown = format!("{:?}", command.get_program());
    let status = command
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// `flotilla ssh MACHINE|UNIT [CMD...]`
pub async fn ssh(args: SshVerbArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let api = connect::api_args(args.api.clone(), outer)?;
    let client = connect::client(&api)?;
    let machines = client.machines().await?;
    let (as_machine, as_unit) = match (&args.machine, &args.unit, &args.target) {
        (Some(m), _, _) => (Some(m.as_str()), None),
        (_, Some(u), _) => (None, Some(u.as_str())),
        (None, None, Some(t)) => (Some(t.as_str()), Some(t.as_str())),
        (None, None, None) => unreachable!("clap requires a target"),
    };
    // With --machine/--unit, TARGET is the first word of the command.
    let mut command = args.command.clone();
    if (args.machine.is_some() || args.unit.is_some())
        && let Some(first) = &args.target
    {
        command.insert(0, first.clone());
    }
    let by_machine = match as_machine {
        Some(given) => one_machine(&machines, given)?,
        None => None,
    };
    let by_unit = match as_unit.map(UnitName::from_user) {
        Some(Ok(name)) => match client.unit(&name).await? {
            Some(unit) if !unit.is_global() && unit.machine_id.is_some() => {
                Some(host_of(&unit, &machines)?)
            }
            Some(unit) if args.unit.is_some() => Some(host_of(&unit, &machines)?),
            _ => None,
        },
        Some(Err(err)) if args.unit.is_some() => return Err(err.into()),
        _ => None,
    };
    let host = match (by_machine, by_unit) {
        (Some(m), Some(u)) if m.id != u.id => bail!(
            "{:?} names both machine {} and a unit on machine {}; use --machine or --unit",
            args.target.as_deref().unwrap_or_default(),
            machine_legend(&m.id, Some(&m.primary_ip), false),
            machine_legend(&u.id, Some(&u.primary_ip), false)
        ),
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => {
            let given = as_machine.or(as_unit).unwrap_or_default();
            bail!(
                "no machine or scheduled unit matches {given:?} (see flotilla list-machines \
                 --fields machine,ip,hostname and flotilla list-units)"
            )
        }
    };
    let options = connect::ssh_options(&api, args.forward_agent);
    let mut ssh = options
        .command(&host.primary_ip, options.port)
        .map_err(anyhow::Error::msg)?;
    if !command.is_empty() {
        ssh.arg("--").args(&command);
    }
    drop(client);
    run(ssh)
}

/// This machine's id, to run status and journal here without ssh.
fn local_machine_id() -> Option<String> {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|id| id.trim().to_string())
}

/// The unit for status/journal: it must exist and be scheduled somewhere.
async fn loaded_unit(client: &ApiClient, name: &UnitName, running: &str) -> Result<UnitJson> {
    let Some(unit) = client.unit(name).await? else {
        return Err(targets::no_such_unit(client, name).await);
    };
    if unit.is_global() {
        bail!(
            "Unable to determine status of global unit {name}: use flotilla ssh MACHINE systemctl status {name}"
        );
    }
    if unit.current_state == DesiredState::Inactive || unit.machine_id.is_none() {
        bail!("Unit {name} does not appear to be {running}.");
    }
    Ok(unit)
}

/// A command run on a unit's host: locally when that is this machine,
/// else through ssh.
async fn on_host_of(
    client: &ApiClient,
    unit: &UnitJson,
    api: &ApiArgs,
    forward_agent: bool,
    words: &[String],
) -> Result<Command> {
    let id = unit.machine_id.as_deref().unwrap_or_default();
    if local_machine_id().as_deref() == Some(id) {
        let mut command = Command::new(&words[0]);
        command.args(&words[1..]);
        return Ok(command);
    }
    let machines = client.machines().await?;
    let host = host_of(unit, &machines)?;
    let options = connect::ssh_options(api, forward_agent);
    let mut ssh = options
        .command(&host.primary_ip, options.port)
        .map_err(anyhow::Error::msg)?;
    ssh.arg("--").args(words);
    Ok(ssh)
}

/// `flotilla status UNIT...`: `systemctl status -l` on each unit's host.
pub async fn status(args: StatusArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let names = targets::names(&args.units)?;
    let api = connect::api_args(args.api.clone(), outer)?;
    let client = connect::client(&api)?;
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            outln!()?;
        }
        if args.via_api {
            let (text, exit) = client
                .status_text(name)
                .await
                .map_err(|e| via_api_error(e, "status", name))?;
            super::out!("{text}")?;
            if exit != 0 {
                return Ok(ExitCode::from(u8::try_from(exit).unwrap_or(1)));
            }
            continue;
        }
        let unit = loaded_unit(&client, name, "loaded").await?;
        let words: Vec<String> = ["systemctl", "status", "-l", "--no-pager", name.as_str()]
            .map(String::from)
            .to_vec();
        let command = on_host_of(&client, &unit, &api, args.forward_agent, &words).await?;
        let code = run(command)?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--via-api` failed at: the unit, or reaching its host's API (502:
/// the daemon asked could not ask the unit's host, whose name it gives).
fn via_api_error(err: flotilla::client::Error, verb: &str, name: &UnitName) -> anyhow::Error {
    let context = match err.status() {
        Some(502) => format!("cannot read {name}'s {verb} from its host through the API"),
        Some(404) => format!("no unit {name} in the cluster (see flotilla list-unit-files)"),
        _ => format!("cannot read {name}'s {verb} through the API"),
    };
    anyhow::Error::new(err).context(context)
}

/// journalctl's `--output` modes are single words.
fn check_output_mode(mode: &str) -> Result<(), super::Usage> {
    if !mode.is_empty() && mode.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(())
    } else {
        Err(super::Usage(format!(
            "--output {mode:?} is not a journalctl output mode (short, json, cat, verbose, ...)"
        )))
    }
}

/// `flotilla journal UNIT`: journalctl on the unit's host.
pub async fn journal(args: JournalArgs, outer: &ApiArgs) -> Result<ExitCode> {
    let name = targets::names(std::slice::from_ref(&args.unit))?.remove(0);
    check_output_mode(&args.output)?;
    let api = connect::api_args(args.api.clone(), outer)?;
    let client = connect::client(&api)?;
    if args.via_api {
        client
            .journal(&name, args.lines, args.follow, &args.output, |bytes| {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes)?;
                stdout.flush()
            })
            .await
            .map_err(|e| match e {
                flotilla::client::JournalError::Api(err) => via_api_error(err, "journal", &name),
                flotilla::client::JournalError::Output(io) => io.into(),
            })?;
        return Ok(ExitCode::SUCCESS);
    }
    let unit = loaded_unit(&client, &name, "running").await?;
    let mut words: Vec<String> = Vec::new();
    if args.sudo {
        words.push("sudo".into());
    }
    words.extend(
        [
            "journalctl",
            "--unit",
            name.as_str(),
            "--no-pager",
            "-n",
            &args.lines.to_string(),
            "--output",
            &args.output,
        ]
        .map(String::from),
    );
    if args.follow {
        words.push("-f".into());
    }
    let command = on_host_of(&client, &unit, &api, args.forward_agent, &words).await?;
    drop(client);
    run(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, ip: &str, host: &str) -> MachineJson {
        serde_json::from_value(serde_json::json!({"id": id, "primaryIP": ip, "hostname": host}))
            .unwrap()
    }

    #[test]
    fn machines_by_prefix_hostname_or_ip_and_ambiguity_is_an_error() {
        let all = [
            machine("1a2b3c4d00", "10.0.0.1", "h1"),
            machine("1a2b9999ff", "10.0.0.2", "h2"),
        ];
        assert_eq!(
            one_machine(&all, "1a2b3").unwrap().unwrap().id,
            "1a2b3c4d00"
        );
        assert_eq!(one_machine(&all, "h2").unwrap().unwrap().id, "1a2b9999ff");
        assert_eq!(
            one_machine(&all, "10.0.0.1").unwrap().unwrap().id,
            "1a2b3c4d00"
        );
        assert!(one_machine(&all, "h3").unwrap().is_none());
        let err = one_machine(&all, "1a2b").unwrap_err().to_string();
        assert!(err.contains("matches 2 machines"), "{err}");
        assert!(err.contains("(h1)") && err.contains("(h2)"), "{err}");
    }

    #[test]
    fn output_modes_are_words() {
        assert!(check_output_mode("short-monotonic").is_ok());
        assert!(check_output_mode("json; rm -rf /").is_err());
        assert!(check_output_mode("").is_err());
    }
}
