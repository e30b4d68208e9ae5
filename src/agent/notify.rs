//! sd_notify without libsystemd: tells the service manager that started this
//! process how it is doing ("READY=1", "STATUS=...", "STOPPING=1").
//!
//! The protocol is one datagram of newline-separated `KEY=VALUE` lines, sent to
//! the unix socket named by `$NOTIFY_SOCKET`. systemd learns who sent it from
//! the socket's credentials, so nothing else goes into the message.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable in which systemd passes a `Type=notify` service its socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (for example "READY=1\nSTATUS=serving 3 units") to the
/// service manager. Returns `Ok(false)`, having sent nothing, when
/// `$NOTIFY_SOCKET` is unset, which is the case whenever flotilla is not run
/// by systemd as a `Type=notify` service; `Ok(true)` once the datagram is sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let socket = socket.into_string().map_err(|socket| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("${NOTIFY_SOCKET} is not UTF-8: {}", socket.display()),
        )
    })?;
    notify_to(&socket, state)?;
    Ok(true)
}

/// Sends `state` as one datagram to `socket`, spelled as `$NOTIFY_SOCKET`
/// spells it: an absolute path, or an abstract socket's name after `@`.
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let address = if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name)?
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot notify the service manager at {socket:?}: \
                 ${NOTIFY_SOCKET} must be an absolute path or start with '@'"
            ),
        ));
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        // A datagram is sent whole or not at all; this would be a kernel bug.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes to {socket}", state.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Reads the one datagram `receiver` got.
    fn received(receiver: &UnixDatagram) -> String {
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = [0; 256];
        let length = receiver.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..length].to_vec()).unwrap()
    }

    #[test]
    fn notifies_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        assert_eq!(received(&receiver), "READY=1\nSTATUS=serving");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("flotilla-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(&name).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(received(&receiver), "STOPPING=1");
    }

    #[test]
    fn refuses_sockets_it_cannot_address() {
        let error = notify_to("relative/notify", "READY=1").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("absolute path"), "{error}");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens");
        assert!(notify_to(path.to_str().unwrap(), "READY=1").is_err());
    }
}
