//! The `flotilla` binary: parses the command line, runs one verb, and is the
//! only place that prints errors and picks the exit code.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;

use flotilla::cli::{
    ApiArgs, Cli, ClusterCommand, Command, DaemonArgs, KvCommand, MemberCommand, TlsCommand,
    VerifyArgs,
};
use flotilla::config;
use flotilla::consensus::client::Client;
use flotilla::registry::records::DesiredState;
use flotilla::verify;

mod lock_verbs;
mod verbs;

use verbs::{Usage, out, outln};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // `flotilla list-units | head -1`: the reader is gone; so are we, quietly.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.is::<Usage>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether the error is a write to a pipe whose reader has left.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Verify(args) => {
            flotilla::logging::init("warn");
            run_verify(&args)
        }
        Command::Daemon(args) => run_daemon(&args),
        Command::Member(command) => {
            flotilla::logging::init("warn");
            store_identity(&cli.api)?;
            client_runtime()?.block_on(run_member(&cli.store_endpoint, command))
        }
        Command::Cluster(command) => {
            flotilla::logging::init("warn");
            store_identity(&cli.api)?;
            client_runtime()?.block_on(run_cluster(&cli.store_endpoint, command))
        }
        Command::Kv(command) => {
            flotilla::logging::init("warn");
            store_identity(&cli.api)?;
            client_runtime()?.block_on(run_kv(&cli.store_endpoint, command))
        }
        Command::Snapshot(command) => {
            flotilla::logging::init("warn");
            store_identity(&cli.api)?;
            client_runtime()?.block_on(verbs::snapshot::run(&cli.store_endpoint, command))
        }
        Command::Tls(command) => run_tls(command),
        Command::Lab(command) => flotilla::lab::run(command),
        Command::Lock(args) => {
            flotilla::logging::init("warn");
            store_identity(&cli.api)?;
            client_runtime()?.block_on(lock_verbs::run(&cli.store_endpoint, args))
        }
        Command::Completion { shell } => {
            flotilla::cli_docs::completion(shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            match dir {
                Some(dir) => flotilla::cli_docs::man_pages(&dir)
                    .with_context(|| format!("cannot write manual pages into {}", dir.display()))?,
                None => flotilla::cli_docs::man_page(&mut std::io::stdout())
                    .context("cannot write the manual page")?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            outln!("flotilla version {}", env!("CARGO_PKG_VERSION"))?;
            Ok(ExitCode::SUCCESS)
        }
        command => {
            flotilla::logging::init("warn");
            client_runtime()?.block_on(run_api_verb(&cli.api, command))
        }
    }
}

/// The verbs that talk to the API; `outer` holds the flags given before the verb.
async fn run_api_verb(outer: &flotilla::cli::ApiArgs, command: Command) -> Result<ExitCode> {
    use verbs::{lists, remote, state};
    match command {
        Command::Submit(args) => state::submit(args, outer).await,
        Command::Start(args) => state::start_or_load(args, outer, DesiredState::Launched).await,
        Command::Load(args) => state::start_or_load(args, outer, DesiredState::Loaded).await,
        Command::Stop(args) => state::stop(args, outer).await,
        Command::Unload(args) => state::unload(args, outer).await,
        Command::Restart(args) => state::restart(args, outer).await,
        Command::Destroy(args) => state::destroy(args, outer).await,
        Command::Cat(args) => lists::cat(args, outer).await,
        Command::ListUnits(args) => lists::list_units(args, outer).await,
        Command::ListUnitFiles(args) => lists::list_unit_files(args, outer).await,
        Command::ListMachines(args) => lists::list_machines(args, outer).await,
        Command::Drain(args) => lists::drain(args, outer).await,
        Command::Explain(args) => lists::explain(args, outer).await,
        Command::Ssh(args) => remote::ssh(args, outer).await,
        Command::Status(args) => remote::status(args, outer).await,
        Command::Journal(args) => remote::journal(args, outer).await,
        Command::Verify(_)
        | Command::Daemon(_)
        | Command::Member(_)
        | Command::Cluster(_)
        | Command::Kv(_)
        | Command::Snapshot(_)
        | Command::Tls(_)
        | Command::Lock(_)
        | Command::Lab(_)
        | Command::Completion { .. }
        | Command::Man { .. }
        | Command::Version => unreachable!("dispatched in run()"),
    }
}

/// Makes the store verbs present the certificate given with --tls-ca,
/// --tls-cert and --tls-key (or FLOTILLA_TLS_*); none of them: plaintext.
fn store_identity(args: &ApiArgs) -> Result<()> {
    let args = verbs::connect::resolve_tls(&args.tls);
    let (ca, cert, key) = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (None, None, None) => return Ok(()),
        (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
        _ => bail!(
            "give all of --tls-ca, --tls-cert and --tls-key (or FLOTILLA_TLS_CA, \
             FLOTILLA_TLS_CERT, FLOTILLA_TLS_KEY), or none"
        ),
    };
    let trust = flotilla::tls::Trust::load(ca, cert, key)
        .context("cannot load the certificate for the store (--tls-ca, --tls-cert, --tls-key)")?;
    flotilla::tls::stream::set_default_client(trust.client);
    Ok(())
}

/// `flotilla tls init|issue`.
fn run_tls(command: TlsCommand) -> Result<ExitCode> {
    use flotilla::tls::{Role, ca};
    match command {
        TlsCommand::Init { dir } => {
            let made = ca::init(&dir).context("cannot make the cluster CA")?;
            outln!(
                "cluster {}: CA certificate {}, key {} (keep the key off the hosts)\n\
                 next: flotilla tls issue NAME --role member|agent|admin --ca {}",
                made.cluster,
                made.cert.display(),
                made.key.display(),
                dir.display()
            )?;
        }
        TlsCommand::Issue {
            name,
            role,
            ca: ca_dir,
            out,
            days,
        } => {
            let role: Role = role.parse().map_err(Usage)?;
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let issued = ca::issue(&name, role, &ca_dir, &out, days)
                .with_context(|| format!("cannot issue a certificate for {name}"))?;
            outln!(
                "{} of cluster {}: certificate {}, key {}, CA {}",
                issued.identity,
                issued.identity.cluster,
                issued.cert.display(),
                issued.key.display(),
                issued.ca.display()
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run_member(endpoints: &[String], command: MemberCommand) -> Result<ExitCode> {
    let client = Client::connect(endpoints).await?;
    match command {
        MemberCommand::List => {
            let status = client.status().await?;
            outln!("{:<18} {:<16} {:<24} LEADER", "ID", "NAME", "PEER ADDRESS")?;
            for (id, member) in &status.members {
                let leader = if *id == status.leader { "yes" } else { "" };
                outln!(
                    "{id:<18x} {:<16} {:<24} {leader}",
                    member.name,
                    member.peer_addr
                )?;
            }
            if status.leader == 0 {
                eprintln!(
                    "no leader is known to this member (election in progress or quorum lost)"
                );
            }
        }
        MemberCommand::Add { name, peer_addr } => {
            client
                .member_add(&name, &peer_addr)
                .await
                .with_context(|| format!("cannot add member {name}"))?;
            outln!(
                "added {name}; now start it with: flotilla daemon --name {name} \\
                 --peer-listen {peer_addr} --initial-cluster-state existing ..."
            )?;
        }
        MemberCommand::Remove { name } => {
            client
                .member_remove(&name)
                .await
                .with_context(|| format!("cannot remove member {name}"))?;
            outln!("removed {name}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_cluster(endpoints: &[String], command: ClusterCommand) -> Result<ExitCode> {
    match command {
        ClusterCommand::Health { json } => {
            let health = flotilla::health::check(endpoints).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&health).context("cannot print the report")?
                )?;
            } else {
                out!("{}", health.table())?;
            }
            Ok(if health.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn run_kv(endpoints: &[String], command: KvCommand) -> Result<ExitCode> {
    let client = Client::connect(endpoints).await?;
    match command {
        KvCommand::Get {
            key,
            prefix,
            serializable,
        } => {
            let (kvs, _) = client.range(&key, prefix, serializable).await?;
            if kvs.is_empty() && !prefix {
                bail!("key {key:?} not found");
            }
            for kv in kvs {
                if prefix {
                    outln!("{}={}", kv.key, String::from_utf8_lossy(&kv.value))?;
                } else {
                    outln!("{}", String::from_utf8_lossy(&kv.value))?;
                }
            }
        }
        KvCommand::Put { key, value } => {
            let revision = client.put(&key, value.into_bytes()).await?;
            outln!("revision {revision}")?;
        }
        KvCommand::Del { key, prefix } => {
            let deleted = client.delete(&key, prefix).await?;
            outln!("deleted {deleted}")?;
        }
        KvCommand::Watch { prefix, from } => {
            let from = match from {
                Some(from) => from,
                // The store's revision now (one key read, not the prefix:
                // a whole registry does not fit one answer).
                None => client.range(&prefix, false, false).await?.1 + 1,
            };
            let mut watch = client.watch(&prefix, from);
            loop {
                for event in watch.next().await? {
                    outln!(
                        "{} {:?} {}={}",
                        event.revision(),
                        event.kind,
                        event.kv.key,
                        String::from_utf8_lossy(&event.kv.value)
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_verify(args: &VerifyArgs) -> Result<ExitCode> {
    let mut failed = 0;
    for path in &args.files {
        let checked = verify::check_path(path);
        if checked.has_errors() {
            failed += 1;
        }
        out!("{}", verify::report(path, &checked, args.print))?;
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} unit file(s) have errors; fix the lines shown above",
            args.files.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(args: &DaemonArgs) -> Result<ExitCode> {
    let source = match &args.config {
        Some(path) => config::Source::Explicit(path.clone()),
        None => config::Source::DefaultPath,
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let overrides = args
        .overrides()
        .map_err(anyhow::Error::msg)
        .context("invalid flag")?;
    let loaded = config::load(&source, &env, &overrides).context("invalid configuration")?;
    flotilla::logging::init(&loaded.config.log);
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    if args.check_config {
        let file = loaded
            .file
            .as_ref()
            .map_or("no config file".to_string(), |p| p.display().to_string());
        println!("# configuration is valid ({file}); effective settings:");
        print!(
            "{}",
            toml::to_string(&loaded.config).context("cannot show the configuration")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let reload = || config::load(&source, &env, &overrides);
    flotilla::daemon::run(&loaded, &reload, args.force_new_cluster)?;
    Ok(ExitCode::SUCCESS)
}
