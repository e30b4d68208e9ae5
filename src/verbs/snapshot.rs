//! `flotilla snapshot save` and `restore`: backups of the store as files,
//! and new clusters from them ([`flotilla::consensus::backup`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

use flotilla::cli::SnapshotCommand;
use flotilla::consensus::backup;
use flotilla::consensus::client::Client;
use flotilla::consensus::codec::MemberInfo;
use flotilla::consensus::node::member_id;

use super::{Usage, outln};

/// Runs one `flotilla snapshot` verb.
pub async fn run(endpoints: &[String], command: SnapshotCommand) -> Result<ExitCode> {
    match command {
        SnapshotCommand::Save { file } => save(endpoints, &file).await,
        SnapshotCommand::Restore {
            file,
            data_dir,
            initial_cluster,
        } => restore(&file, &data_dir, &initial_cluster),
    }
}

async fn save(endpoints: &[String], file: &Path) -> Result<ExitCode> {
    let client = Client::connect(endpoints).await?;
    let bytes = client
        .snapshot()
        .await
        .context("cannot read a snapshot from the store")?;
    // Checked before it is written: a file that would not restore is no backup.
    let data = backup::decode(&bytes).context("the member sent an unreadable snapshot")?;
    let partial = file.with_extension("partial");
    let write = || -> std::io::Result<()> {
        let mut out = std::fs::File::create(&partial)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        std::fs::rename(&partial, file)
    };
    write().with_context(|| format!("cannot write {}", file.display()))?;
    outln!(
        "saved the store at revision {} ({} keys, {} bytes) to {}",
        data.kv.revision(),
        data.kv.key_count(),
        bytes.len(),
        file.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

fn restore(file: &Path, data_dir: &Path, initial_cluster: &str) -> Result<ExitCode> {
    let members: BTreeMap<u64, MemberInfo> = flotilla::config::parse_members(initial_cluster)
        .map_err(|e| Usage(format!("invalid --initial-cluster: {e}")))?
        .into_iter()
        .map(|m| {
            let info = MemberInfo {
                name: m.name,
                peer_addr: m.peer_addr,
            };
            (member_id(&info.name), info)
        })
        .collect();
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let data =
        backup::decode(&bytes).with_context(|| format!("cannot restore {}", file.display()))?;
    let raft_dir = data_dir.join("raft");
    std::fs::create_dir_all(&raft_dir)
        .with_context(|| format!("cannot create {}", raft_dir.display()))?;
    backup::restore(&data, &raft_dir, &members)
        .with_context(|| format!("cannot restore into {}", data_dir.display()))?;
    outln!(
        "restored revision {} ({} keys) into {}; start each founding member with \
         flotilla daemon --name NAME --data-dir DIR (with its own restored DIR)",
        data.kv.revision(),
        data.kv.key_count(),
        data_dir.display()
    )?;
    Ok(ExitCode::SUCCESS)
}
