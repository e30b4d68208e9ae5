//! The fleetctl verbs, as clients of the daemon's HTTP API: submit, load,
//! start, stop, unload, restart, destroy, cat, the lists, drain, explain,
//! and ssh, status and journal on a unit's host.
//!
//! Every verb checks all of its arguments (names, files) before it asks the
//! cluster anything, so bad input changes nothing and needs no cluster.
//!
//! * [`connect`]: the global flags as an API client and ssh options.
//! * [`targets`]: arguments as units and files; "did you mean" for typos.
//! * [`create`]: submitting units lazily, as fleetctl did (files, templates, --replace).
//! * [`wait`]: waiting for units to reach a state, with progress.
//! * [`state`]: start, load, stop, unload, restart, destroy.
//! * [`lists`]: list-units, list-unit-files, list-machines, cat, explain, drain.
//! * [`table`]: fleetctl's tab-aligned tables and `--fields`.
//! * [`remote`]: ssh, status and journal on a unit's host.
//! * [`snapshot`]: backups of the store (over the store's protocol, not the API).

pub mod connect;
pub mod create;
pub mod lists;
pub mod remote;
pub mod snapshot;
pub mod state;
pub mod table;
pub mod targets;
pub mod wait;

/// A mistake in how a verb was called (exit code 2, like clap's own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Prints a line to stdout; a closed pipe comes back as an error, which
/// `main` turns into a quiet exit (`flotilla list-units | head -1`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

/// Prints to stdout without a newline; see [`outln`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use out;

/// `id8.../ip`, the way fleetctl names a machine (the full id with `--full`).
pub fn machine_legend(id: &str, ip: Option<&str>, full: bool) -> String {
    let id = if full || id.len() <= 8 {
        id.to_string()
    } else {
        format!("{}...", &id[..8])
    };
    match ip.filter(|ip| !ip.is_empty()) {
        Some(ip) => format!("{id}/{ip}"),
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_are_named_as_fleetctl_did() {
        let id = "1a2b3c4d5e6f70819283746556473829";
        assert_eq!(
            machine_legend(id, Some("10.0.0.5"), false),
            "1a2b3c4d.../10.0.0.5"
        );
        assert_eq!(machine_legend(id, None, false), "1a2b3c4d...");
        assert_eq!(
            machine_legend(id, Some("10.0.0.5"), true),
            format!("{id}/10.0.0.5")
        );
    }
}
