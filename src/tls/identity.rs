//! Roles and identities, and where a certificate carries them.
//!
//! Every certificate the cluster CA issues has one subject alternative name
//! of the form `flotilla://<cluster>/<role>/<name>`: the cluster id (derived
//! from the CA's public key, so certificates of another cluster's CA are told
//! apart by name as well as by signature), the role, and the holder's name
//! (a member's `name`, an agent's machine id, an admin's user name). It also
//! has the DNS name `<cluster>.flotilla`, the name a client checks a member's
//! certificate against.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::TlsError;

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A Raft server: peer traffic, and anything on the client port.
    Member,
    /// One machine's agent: its own presence, claims and states.
    Agent,
    /// A person or tool: units, membership, anything on the client port.
    Admin,
}

impl Role {
    /// Every role, for messages.
    pub const ALL: [Role; 3] = [Role::Member, Role::Agent, Role::Admin];

    /// The role's name in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: use member, agent or admin"))
    }
}

/// Who holds a certificate: read from the certificate the other end of a
/// connection presented (the CA's signature already checked).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The cluster id of the CA that issued it.
    pub cluster: String,
    /// What its holder may do.
    pub role: Role,
    /// Its holder's name.
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

const SCHEME: &str = "flotilla://";

impl Identity {
    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.cluster, self.role, self.name)
    }

    /// Reads an identity back from [`Identity::uri`]'s form.
    pub fn parse_uri(uri: &str) -> Option<Identity> {
        let mut parts = uri.strip_prefix(SCHEME)?.split('/');
        let (cluster, role, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || check_name(name).is_err() || cluster.is_empty() {
            return None;
        }
        Some(Identity {
            cluster: cluster.to_string(),
            role: role.parse().ok()?,
            name: name.to_string(),
        })
    }

    /// The identity in a DER certificate; an error when it has none.
    pub fn from_der(der: &[u8]) -> Result<Identity, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Identity(format!("unreadable certificate: {e}")))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::Identity(format!("unreadable certificate names: {e}")))?;
        names
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Identity::parse_uri(uri),
                _ => None,
            })
            .ok_or_else(|| {
                TlsError::Identity(
                    "the certificate names no flotilla role (was it made by `flotilla tls issue`?)"
                        .into(),
                )
            })
    }
}

/// The cluster id of a CA: the first 16 hex digits of the SHA-256 of its
/// public key. Stable across re-signing the CA with the same key.
pub fn cluster_id(public_key: &[u8]) -> String {
    Sha256::digest(public_key)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cluster id of the CA certificate `der` (see [`cluster_id`]).
pub fn cluster_id_of_ca(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable: {e}"))?;
    Ok(cluster_id(cert.public_key().subject_public_key.as_ref()))
}

/// The DNS name every certificate of cluster `cluster` carries, which a
/// client checks a member's certificate against.
pub fn server_name(cluster: &str) -> String {
    format!("{cluster}.flotilla")
}

/// Whether `name` may name a certificate's holder: 1 to 63 characters from
/// `a-z`, `0-9`, `-`, `_` and `.`, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_strangers_are_refused() {
        let who = Identity {
            cluster: "0123456789abcdef".into(),
            role: Role::Agent,
            name: "4f2a".into(),
        };
        assert_eq!(who.uri(), "flotilla://0123456789abcdef/agent/4f2a");
        assert_eq!(Identity::parse_uri(&who.uri()), Some(who));
        for bad in [
            "https://x/agent/a",
            "flotilla://c/root/a",
            "flotilla://c/agent/A",
            "flotilla://c/agent/a/b",
            "flotilla:///agent/a",
            "flotilla://c/agent",
        ] {
            assert_eq!(Identity::parse_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_and_roles_are_checked() {
        for good in ["h1", "web-01.example", "4f2a9c", "a_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "H1", "a/b", "-a", ".a", "a b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("member, agent or admin")
        );
    }
}
