//! The unit model: everything flotilla knows about a unit file that needs no I/O.
//!
//! This module is pure on purpose. It never touches the file system, the network,
//! a clock or D-Bus, so the API's validation, the scheduler, the agent and the
//! simulator all share one definition of "a valid unit" and "where it may run",
//! and its tests run in microseconds.
//!
//! * [`name`]: unit names, templates and instances; the guard against hostile names.
//! * [`file`]: the systemd unit-file parser and its canonical options list.
//! * [`hash`]: the SHA-256 of the canonical form, the key bodies are stored under.
//! * [`fleet`]: the `[X-Fleet]` section's scheduling requirements.
//! * [`glob`]: shell globs over unit names for `Conflicts=` and `Replaces=`.
//! * [`unit`]: a named, validated unit file with its requirements.
//! * [`colocation`]: which units may share a machine (`Conflicts`, `Replaces`,
//!   `MachineOf`), the one rule placement, eviction and claims all ask.
//! * [`placement`]: the scheduling decision as a pure function.
//! * [`load_order`]: machines kept in (load, id) order, so placement can take
//!   the least-loaded eligible machine without scoring every one.
//! * [`claim`]: which proposed units a machine may claim now, beside placement.
//! * [`problem`]: diagnostics with line numbers, shared by all of the above.
//! * [`suggest`]: the closest known word to a mistyped one ("did you mean ...?").

pub mod claim;
pub mod colocation;
pub mod file;
pub mod fleet;
pub mod glob;
pub mod hash;
pub mod load_order;
pub mod name;
pub mod placement;
pub mod problem;
pub mod suggest;
pub mod unit;

pub use file::{UnitFile, UnitOption};
pub use fleet::Requirements;
pub use hash::UnitHash;
pub use name::{UnitKind, UnitName};
pub use problem::{Problem, Severity};
pub use unit::Unit;

/// The largest unit file flotilla accepts, in bytes.
///
/// Real unit files are a few kilobytes. Every body is replicated through Raft to
/// every server and written on every host that runs it, so an accidental
/// multi-megabyte "unit" (a binary, a log) must be refused at the door.
pub const MAX_UNIT_BYTES: usize = 256 * 1024;

/// Why a unit name, unit file or `[X-Fleet]` section was refused.
///
/// Every variant carries the facts a user needs to fix the input; the CLI
/// prints them with the file name in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The name cannot be used as a unit name (it becomes a file name on every host).
    #[error("invalid unit name {shown}: {reason}", shown = name::show(name))]
    InvalidName {
        /// The name as given.
        name: String,
        /// What rule it breaks.
        reason: String,
    },
    /// The body is larger than [`MAX_UNIT_BYTES`].
    #[error("unit file is {size} bytes; the limit is {limit} bytes")]
    TooLarge {
        /// Size of the rejected body in bytes.
        size: usize,
        /// The limit it exceeded.
        limit: usize,
    },
    /// The body or its `[X-Fleet]` section has errors; each one carries its line.
    #[error("{}", problem::summary(problems))]
    Invalid {
        /// All problems found, errors and warnings, in line order.
        problems: Vec<Problem>,
    },
}

impl Error {
    /// The problems behind this error, one per line of the input where possible.
    ///
    /// Name and size errors have no line, so they come back as one problem
    /// without a line number; the CLI prints every problem the same way.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            Error::Invalid { problems } => problems.clone(),
            other => vec![Problem::error(None, other.to_string())],
        }
    }
}
