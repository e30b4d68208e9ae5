//! `flotilla lock ...`: locksmithctl's verbs on the reboot lock. Every
//! argument is checked before the cluster is contacted; every change is one
//! of the registry's compare-and-swap transactions.

use crate::verbs::outln;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::json;

use flotilla::cli::{LockArgs, LockCommand};
use flotilla::consensus::client::Client;
use flotilla::duration::show_duration;
use flotilla::lock::coordinator::unix_now;
use flotilla::lock::window::format_utc;
use flotilla::registry::lock::{self as store, Acquired, RebootMark, is_group_name};

/// Runs one `flotilla lock` verb.
pub async fn run(endpoints: &[String], args: LockArgs) -> Result<ExitCode> {
    let group = &args.group;
    if !is_group_name(group) {
        bail!("{group:?} is not a lock group name: use 1-63 letters, digits, '-', '_' or '.'");
    }
    let id = match &args.command {
        LockCommand::Acquire { id }
        | LockCommand::Release { id }
        | LockCommand::NeedReboot { id, .. } => Some(holder_id(id.as_deref())?),
        LockCommand::Status { .. } | LockCommand::SetMax { .. } => None,
    };
    let client = Client::connect(endpoints).await?;
    match args.command {
        LockCommand::Status { json } => status(&client, group, json).await?,
        LockCommand::Acquire { .. } => {
            let id = id.expect("checked above");
            match store::acquire(&client, group, &id, unix_now(), None).await? {
                Acquired::Taken => outln!("{id} took the reboot lock of group {group}")?,
                Acquired::AlreadyHeld => {
                    outln!("{id} already holds the reboot lock of group {group}")?
                }
            }
        }
        LockCommand::Release { .. } => {
            let id = id.expect("checked above");
            store::release(&client, group, &id)
                .await
                .with_context(|| format!("cannot release the reboot lock of group {group}"))?;
            outln!("{id} released the reboot lock of group {group}")?;
        }
        LockCommand::SetMax { max } => {
            let (old, new) = store::set_max(&client, group, max).await?;
            outln!("Old: {old}\nNew: {new}")?;
        }
        LockCommand::NeedReboot { force, .. } => {
            let id = id.expect("checked above");
            let mark = RebootMark {
                since: unix_now(),
                force,
                from_boot: None,
            };
            store::mark_reboot(&client, &id, &mark).await?;
            outln!(
                "{id} will reboot{}: its coordinator takes the lock in its window, drains, \
                 reboots and releases the lock when healthy (see flotilla lock status)",
                if force {
                    " even if its units cannot all move"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The id given, or this machine's; it becomes part of a key, so it must be
/// a plain token.
fn holder_id(given: Option<&str>) -> Result<String> {
    let id = match given {
        Some(id) => id.to_string(),
        None => flotilla::agent::identity::machine_id(Path::new("/etc/machine-id"))
            .context("cannot tell which machine this is; give the machine id as ID")?,
    };
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !ok {
        bail!(
            "{id:?} is not a machine id: use up to 128 letters, digits, '-', '_', '.' or '@' \
             (flotilla list-machines --full shows the ids)"
        );
    }
    Ok(id)
}

/// `flotilla lock status`
async fn status(client: &Client, group: &str, as_json: bool) -> Result<()> {
    let read = store::read(client, group).await?;
    let marks = store::reboot_marks(client).await?;
    let semaphore = &read.semaphore;
    let now = unix_now();
    if as_json {
        let holders: Vec<_> = semaphore
            .holders
            .iter()
            .map(|h| json!({"id": h.id, "since": h.since, "boot_id": h.boot_id}))
            .collect();
        let marks: Vec<_> = marks
            .iter()
            .map(|(id, m)| json!({"id": id, "since": m.since, "force": m.force, "rebooting_from": m.from_boot}))
            .collect();
        let shown = json!({
            "group": group,
            "available": semaphore.available(),
            "max": semaphore.max,
            "holders": holders,
            "need_reboot": marks,
        });
        outln!("{}", serde_json::to_string_pretty(&shown)?)?;
        return Ok(());
    }
    outln!("Group: {group}")?;
    outln!("Available: {}", semaphore.available())?;
    outln!("Max: {}", semaphore.max)?;
    if semaphore.holders.len() > semaphore.max as usize {
        outln!(
            "Held by {}, more than Max: set-max lowered the limit below the holders, who keep \
             their slots; nobody else gets one until enough of them release",
            semaphore.holders.len()
        )?;
    }
    if !semaphore.holders.is_empty() {
        outln!()?;
        outln!("{:<34} SINCE", "MACHINE")?;
        for holder in &semaphore.holders {
            outln!(
                "{:<34} {} ({} ago)",
                holder.id,
                format_utc(holder.since),
                show_duration(std::time::Duration::from_secs(
                    now.saturating_sub(holder.since)
                ))
            )?;
        }
    }
    if !marks.is_empty() {
        outln!()?;
        outln!("Asked to reboot:")?;
        for (id, mark) in &marks {
            let state = match (&mark.from_boot, mark.force) {
                (Some(_), _) => " (rebooting)",
                (None, true) => " (forced)",
                (None, false) => "",
            };
            outln!("{id:<34} since {}{state}", format_utc(mark.since))?;
        }
    }
    Ok(())
}
