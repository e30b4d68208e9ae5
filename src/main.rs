//! The `flotilla` binary: parses the command line, runs one verb, and is the
//! only place that prints errors and picks the exit code.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;

use flotilla::cli::{Cli, Command, DaemonArgs, VerifyArgs};
use flotilla::config;
use flotilla::verify;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `RUST_LOG` picks the level for CLI verbs (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Verify(args) => run_verify(&args),
        Command::Daemon(args) => run_daemon(&args),
    }
}

fn run_verify(args: &VerifyArgs) -> Result<ExitCode> {
    let mut failed = 0;
    for path in &args.files {
        let checked = verify::check_path(path);
        if checked.has_errors() {
            failed += 1;
        }
        print!("{}", verify::report(path, &checked, args.print));
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
    bail!(
        "this build of flotilla has no daemon roles yet (the Raft store and the agent come next); \
         `flotilla daemon --check-config` validates a configuration"
    )
}
