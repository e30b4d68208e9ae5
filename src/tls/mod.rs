//! Who is at the other end of a store connection, or of an HTTPS call to
//! the API.
//!
//! Whoever writes the store runs commands as root on every host, so the
//! store's peer and client ports speak mutual TLS: a cluster CA
//! (`flotilla tls init`) signs one certificate per member, agent and admin
//! (`flotilla tls issue`), and each certificate names its holder's role and
//! name. Both ends present a certificate; neither trusts anything the CA did
//! not sign.
//!
//! * [`identity`]: [`Role`], [`Identity`] and how they are written into a
//!   certificate (a SAN URI `flotilla://<cluster>/<role>/<name>`).
//! * [`ca`]: making the CA and issuing certificates.
//! * [`stream`]: the rustls configurations, and the handshakes that yield the
//!   other end's [`Identity`].
//! * [`https`]: the configuration of an HTTPS client of the daemon's API.

pub mod ca;
pub mod https;
pub mod identity;
pub mod stream;

use std::path::PathBuf;

pub use identity::{Identity, Role};
pub use stream::{ClientTls, ServerTls, Trust};

/// Why a CA, a certificate or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A certificate name is not allowed.
    #[error(
        "invalid name {0:?}: use 1 to 63 characters from a-z, 0-9, '-', '_' and '.' (an agent's name is its machine id, /etc/machine-id)"
    )]
    BadName(String),
    /// The CA directory already holds a CA.
    #[error("{0} already holds a CA; use another directory, or remove it to start a new cluster")]
    Exists(PathBuf),
    /// Generating or signing failed.
    #[error("cannot make the certificate: {0}")]
    Generate(String),
    /// The other end's certificate carries no flotilla identity, or one of
    /// another cluster or role.
    #[error("{0}")]
    Identity(String),
    /// The TLS handshake failed or timed out.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}
