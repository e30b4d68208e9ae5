//! Why a registry operation changed nothing: one error type for every
//! transaction the registry runs (user operations, bodies, one machine's
//! presence and claims), so callers match on one set of facts.

use super::records::RecordError;
use crate::consensus::client::ClientError;
use crate::units::{self, UnitName};

/// Why an operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The cluster could not be asked.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A stored record is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// No such unit was submitted.
    #[error("unit {0} is not submitted; submit its file first (flotilla submit FILE)")]
    NoSuchUnit(UnitName),
    /// The unit exists with another body.
    #[error(
        "unit {0} is already submitted with different contents; \
         use `flotilla submit --replace` to change it"
    )]
    Exists(UnitName),
    /// The unit's body is invalid.
    #[error("unit {name} is invalid: {source}")]
    Invalid {
        /// The unit.
        name: UnitName,
        /// What is wrong.
        #[source]
        source: units::Error,
    },
    /// Templates are never scheduled themselves.
    #[error(
        "{0} is a template; start an instance of it instead, e.g. {example}",
        example = example_instance(.0)
    )]
    Template(UnitName),
    /// Someone else changed the unit at the same moment.
    #[error("unit {0} changed while this request ran; nothing was changed, try again")]
    Raced(UnitName),
    /// No machine matches the id, prefix, host name or address.
    #[error(
        "no machine has the id, id prefix, host name or address {0:?}; see flotilla list-machines"
    )]
    NoSuchMachine(String),
    /// More than one machine matches.
    #[error(
        "{given:?} matches more than one machine ({}); give more of the id",
        candidates.join(", ")
    )]
    AmbiguousMachine {
        /// What was given.
        given: String,
        /// The machines it matches, as `id (hostname, ip)`.
        candidates: Vec<String>,
    },
}

fn example_instance(template: &UnitName) -> String {
    template
        .instantiate("1")
        .map(|n| n.to_string())
        .unwrap_or_default()
}
