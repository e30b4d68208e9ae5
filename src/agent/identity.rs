//! Who this host is to the cluster: its machine id, this daemon install's
//! instance id, its host name and the address others reach it at.
//!
//! The machine id comes from `/etc/machine-id`, as fleet's did. The instance
//! id is made once per data directory and kept there, so a restarted daemon
//! recognises its own presence record (and adopts its units) while a second
//! host cloned with the same machine id is told apart and kept out.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};

/// Why the host's identity could not be established.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// `/etc/machine-id` is missing or unreadable.
    #[error("cannot read {path}: {source}; run `systemd-machine-id-setup` to create it")]
    ReadMachineId {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `/etc/machine-id` does not hold 32 hex digits.
    #[error(
        "{path} holds {found:?}, not 32 hex digits; run `systemd-machine-id-setup` to repair it"
    )]
    BadMachineId {
        /// The file.
        path: PathBuf,
        /// Its contents.
        found: String,
    },
    /// The instance id file could not be read or written.
    #[error("cannot keep the instance id in {path}: {source}; check data_dir's permissions")]
    Instance {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads and checks the machine id in `path` (normally `/etc/machine-id`).
pub fn machine_id(path: &Path) -> Result<String, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::ReadMachineId {
        path: path.to_path_buf(),
        source,
    })?;
    let id = text.trim().to_ascii_lowercase();
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(IdentityError::BadMachineId {
            path: path.to_path_buf(),
            found: text.trim().chars().take(64).collect(),
        })
    }
}

/// The instance id kept in `data_dir/instance-id`, made on first use.
pub fn instance_id(data_dir: &Path) -> Result<String, IdentityError> {
    let path = data_dir.join("instance-id");
    let failed = |source| IdentityError::Instance {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if is_instance_id(text.trim()) => return Ok(text.trim().to_string()),
        Ok(_) => tracing::warn!("{} is malformed; making a new instance id", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(failed)?;
    let id = random_hex().map_err(failed)?;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp).map_err(failed)?;
    file.write_all(format!("{id}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(failed)?;
    std::fs::rename(&temp, &path).map_err(failed)?;
    Ok(id)
}

fn is_instance_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 128 random bits as hex, from the kernel's generator.
fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The host name from the kernel, or "unknown".
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The local address this host uses to reach the first resolvable endpoint:
/// the address other hosts see it at. No packet is sent (a UDP "connect"
/// only picks the route).
pub fn detect_ip(endpoints: &[String]) -> Option<IpAddr> {
    endpoints.iter().find_map(|endpoint| {
        let target: SocketAddr = endpoint.to_socket_addrs().ok()?.next()?;
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(target).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    })
}

/// Where other hosts reach this host's API listening on `listen`, given
/// the address `ip` it publishes: `listen` itself when it names an address,
/// `ip` with its port when it listens on every address, `None` when only
/// this host can reach it (loopback) or its port is not known (0).
pub fn api_address(listen: &str, ip: &str) -> Option<String> {
    let (host, port) = listen.rsplit_once(':')?;
    if port == "0" || port.is_empty() {
        return None;
    }
    let bare = host.trim_matches(['[', ']']);
    match bare.parse::<IpAddr>() {
        Ok(addr) if addr.is_loopback() => None,
        Ok(addr) if addr.is_unspecified() => Some(match ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{ip}]:{port}"),
            _ => format!("{ip}:{port}"),
        }),
        Err(_) if bare == "localhost" || bare.is_empty() => None,
        _ => Some(listen.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_address_is_what_other_hosts_can_reach() {
        let cases = [
            ("0.0.0.0:4003", "10.0.0.5", Some("10.0.0.5:4003")),
            ("[::]:4003", "fd00::5", Some("[fd00::5]:4003")),
            ("10.0.0.7:4003", "10.0.0.5", Some("10.0.0.7:4003")),
            ("api.example:4003", "10.0.0.5", Some("api.example:4003")),
            ("127.0.0.1:4003", "10.0.0.5", None),
            ("[::1]:4003", "10.0.0.5", None),
            ("localhost:4003", "10.0.0.5", None),
            ("0.0.0.0:0", "10.0.0.5", None),
        ];
        for (listen, ip, expected) in cases {
            assert_eq!(api_address(listen, ip).as_deref(), expected, "{listen}");
        }
    }

    #[test]
    fn machine_id_must_be_32_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        std::fs::write(&path, "0123456789ABCDEF0123456789abcdef\n").unwrap();
        assert_eq!(
            machine_id(&path).unwrap(),
            "0123456789abcdef0123456789abcdef"
        );
        std::fs::write(&path, "uninitialized\n").unwrap();
        let err = machine_id(&path).unwrap_err().to_string();
        assert!(err.contains("systemd-machine-id-setup"), "{err}");
        assert!(machine_id(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn instance_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = instance_id(dir.path()).unwrap();
        assert!(is_instance_id(&first));
        assert_eq!(instance_id(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(instance_id(other.path()).unwrap(), first);
    }

    #[test]
    fn detects_the_loopback_route() {
        let ip = detect_ip(&["127.0.0.1:4001".to_string()]).unwrap();
        assert!(ip.is_loopback());
        assert_eq!(detect_ip(&[]), None);
    }
}
