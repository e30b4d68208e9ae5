//! Rebooting this host through D-Bus, and knowing which boot this is.
//!
//! logind's `Reboot` is the polite way where logind runs (it honours
//! inhibitors and does what `systemctl reboot` does). Where logind does not
//! run
//! (minimal hosts, containers, the lab) the reboot goes to systemd itself:
//! `StartUnit("reboot.target", "replace-irreversibly")` on its Manager, which
//! is what `systemctl reboot` falls back to. systemd's `Manager.Reboot()` is
//! NOT used: its documentation says it skips stopping services and is only
//! meant as the last step of a shutdown, and units that stay on the host
//! (pinned, global) deserve an orderly stop.

use std::path::Path;
use std::time::Duration;

use zbus::proxy;

use crate::agent::systemd::Systemd;

/// logind's name on the system bus.
const LOGIND: &str = "org.freedesktop.login1";

/// How long logind may take to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `org.freedesktop.login1.Manager`, only its reboot.
#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login {
    /// Reboots the machine; `interactive` would ask polkit for a password.
    fn reboot(&self, interactive: bool) -> zbus::Result<()>;
}

/// Why no reboot could be asked for.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// Neither logind nor systemd took the request.
    #[error(
        "cannot ask for a reboot: logind: {logind}; systemd: {systemd}; \
         is this process root, with systemd as PID 1?"
    )]
    Refused {
        /// What logind answered.
        logind: String,
        /// What systemd answered.
        systemd: String,
    },
    /// The boot id file is unreadable.
    #[error("cannot read this boot's id from {path}: {source}; check boot_id_file")]
    BootId {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Asks for a reboot: through logind if it runs (its name has an owner on
/// the system bus; it is never started just for this), else through
/// systemd. Returns which one took it.
pub async fn reboot(systemd: &Systemd) -> Result<&'static str, RebootError> {
    let logind = match logind_reboot().await {
        Ok(()) => return Ok("logind"),
        Err(e) => e,
    };
    // Said before the call: once systemd starts shutting down, a line logged
    // after it may never reach the journal.
    tracing::info!("reboot coordinator: rebooting now (asking systemd)");
    match systemd
        .manager()
        .start_unit("reboot.target", "replace-irreversibly")
        .await
    {
        Ok(_) => Ok("systemd"),
        Err(e) => Err(RebootError::Refused {
            logind,
            systemd: e.to_string(),
        }),
    }
}

/// logind's Reboot, if logind runs. A reply that never comes because
/// logind (or the bus) went down with the host counts as done: the
/// reboot is under way.
async fn logind_reboot() -> Result<(), String> {
    let connection = zbus::connection::Builder::system()
        .method_timeout(CALL_TIMEOUT)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let bus = zbus::fdo::DBusProxy::new(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let name = zbus::names::BusName::try_from(LOGIND).map_err(|e| e.to_string())?;
    if !bus.name_has_owner(name).await.map_err(|e| e.to_string())? {
        return Err("logind does not run here".to_string());
    }
    let login = LoginProxy::new(&connection)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("reboot coordinator: rebooting now (asking logind)");
    match login.reboot(false).await {
        Ok(()) => Ok(()),
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.DBus.Error.NoReply" =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The id of the current boot, read from `path` (normally the kernel's
/// `/proc/sys/kernel/random/boot_id`; the lab writes one per host boot).
pub fn boot_id(path: &Path) -> Result<String, RebootError> {
    let failed = |source| RebootError::BootId {
        path: path.display().to_string(),
        source,
    };
    let id = std::fs::read_to_string(path).map_err(failed)?;
    let id = id.trim();
    if id.is_empty() {
        return Err(failed(std::io::Error::other("the file is empty")));
    }
    Ok(id.to_string())
}
