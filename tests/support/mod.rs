//! Helpers shared by the lab test binaries (each includes this with `mod support;`).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// The flotilla binary under test.
pub const FLOTILLA: &str = env!("CARGO_BIN_EXE_flotilla");

/// A template whose instances conflict, and prove it: each takes a per-host
/// `flock -n` on /run/hello.lock and exits 99 (failing loudly) when another
/// instance already holds it, so two instances on one host never go unnoticed.
pub const HELLO: &str = "\
[Unit]
Description=hello %i: holds this host's hello lock or fails
[Service]
ExecStart=/usr/bin/flock -n -E 99 /run/hello.lock /bin/sleep infinity
[X-Fleet]
Conflicts=hello@*.service
";

/// Runs `flotilla lab ARGS...` for the lab in `dir`.
pub fn lab_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(FLOTILLA)
        .arg("lab")
        .args(args)
        .env("FLOTILLA_LAB_DIR", dir)
        .env_remove("FLOTILLA_ENDPOINT")
        .output()
        .unwrap()
}

/// Process output as text, for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub mod cluster;
