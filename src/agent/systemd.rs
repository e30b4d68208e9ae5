//! The agent's client for systemd's D-Bus API.
//!
//! Two hand-written proxies cover exactly what the agent needs: [`ManagerProxy`]
//! (`org.freedesktop.systemd1.Manager`: link, reload, start, stop, ...) and
//! [`UnitProxy`] (`org.freedesktop.systemd1.Unit`: the LOAD/ACTIVE/SUB states).
//! [`Systemd`] wraps them in the handful of verbs the agent calls, and turns
//! systemd's answers into [`Error`]s that say what to do next.
//!
//! The agent talks to systemd over its private socket (`/run/systemd/private`),
//! peer to peer, so it keeps working when dbus-daemon is down or restarting, which
//! is exactly when a host most needs its units looked after. A connection to the
//! system bus is also offered, and for now it is the one that works: zbus 6.2.1
//! rejects systemd's replies on the private socket (see
//! [`Systemd::connect_private`]).
//!
//! zbus is built with its `tokio` feature and without its own runtime
//! (`default-rt`), so a connection must be made from inside a Tokio runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, proxy};

/// The D-Bus error systemd answers when a unit it was asked about is not loaded.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// How long one call may wait for systemd's answer. A daemon-reload on a busy
/// host takes seconds; anything past this means systemd is stuck, and the
/// agent should say so rather than hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One change systemd made to its unit-file directories while linking, enabling
/// or disabling: `(kind, file, destination)`, for example
/// `("symlink", "/run/systemd/system/web.service", "/run/flotilla/units/web.service")`.
pub type Change = (String, String, String);

/// `org.freedesktop.systemd1.Manager`, limited to the methods the agent calls.
#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    /// Asks systemd to send unit and job signals to this connection. On the
    /// system bus systemd sends none until a client subscribes.
    fn subscribe(&self) -> zbus::Result<()>;

    /// `systemctl daemon-reload`: rereads every unit file.
    fn reload(&self) -> zbus::Result<()>;

    /// Queues a start job for `name`; `mode` is "replace", "fail", ...
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Queues a stop job for `name`.
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    /// Forgets that `name` failed, so it reads `inactive` again.
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    /// `systemctl link`: makes unit files outside the search path visible.
    fn link_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<Vec<Change>>;

    /// `systemctl enable`: follows the files' `[Install]` sections.
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<Change>)>;

    /// `systemctl disable`: removes the links that `link` and `enable` made.
    fn disable_unit_files(&self, files: &[&str], runtime: bool) -> zbus::Result<Vec<Change>>;

    /// The object of a loaded unit; `NoSuchUnit` if it is not loaded.
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// The object of a unit, loading it first if needed (a missing file gives a
    /// unit whose LoadState is "not-found", not an error).
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
}

/// `org.freedesktop.systemd1.Unit`, limited to the states the agent reports.
#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    /// "active", "inactive", "failed", "activating", "deactivating", ...
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;

    /// The unit type's finer state, e.g. "running", "dead", "exited".
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;

    /// "loaded", "not-found", "bad-setting", "error", "masked", ...
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;

    /// When the unit last became active, in µs since the epoch (0: never).
    #[zbus(property)]
    fn active_enter_timestamp(&self) -> zbus::Result<u64>;
}

/// A unit's three states as systemd reports them (fleet's LOAD/ACTIVE/SUB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// LoadState, e.g. "loaded" or "not-found".
    pub load: String,
    /// ActiveState, e.g. "active" or "failed".
    pub active: String,
    /// SubState, e.g. "running" or "dead".
    pub sub: String,
}

/// What went wrong talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The private socket could not be opened or the handshake failed.
    #[error(
        "cannot connect to systemd's private socket {}: {source}; \
         is systemd PID 1 there, and does this process run as root?",
        path.display()
    )]
    ConnectPrivate {
        /// The socket path tried.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: zbus::Error,
    },

    /// The system bus could not be reached.
    #[error(
        "cannot connect to the system D-Bus{}: {source}; \
         check `systemctl status dbus.service`, or use systemd's private socket",
        path.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default()
    )]
    ConnectSystem {
        /// The bus socket tried, if not the default one.
        path: Option<PathBuf>,
        /// Why it failed.
        #[source]
        source: zbus::Error,
    },

    /// A unit file path systemd cannot be given.
    #[error(
        "cannot link {}: systemd needs an absolute, UTF-8 path to a unit file",
        path.display()
    )]
    BadPath {
        /// The path given.
        path: PathBuf,
    },

    /// systemd answered a call with an error.
    #[error(
        "systemd could not {action} {unit}: {source}; \
         see `systemctl status {unit}` and `journalctl -u {unit}` on the host"
    )]
    Call {
        /// What was asked, e.g. "start".
        action: &'static str,
        /// The unit (or file) it was asked about.
        unit: String,
        /// systemd's answer.
        #[source]
        source: zbus::Error,
    },
}

/// The result of a call to systemd.
pub type Result<T> = std::result::Result<T, Error>;

/// A connection to one host's systemd.
#[derive(Debug, Clone)]
pub struct Systemd {
    connection: Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connects peer to peer to systemd's private socket, normally
    /// `/run/systemd/private` (any path reaching it works, such as
    /// `/proc/PID/root/run/systemd/private` from outside a container).
    /// Needs root: systemd only accepts root on that socket.
    ///
    /// KNOWN LIMITATIONS, seen with systemd 252 and zbus 6.2.1:
    /// * systemd stamps every message on this socket with the sender
    ///   `org.freedesktop.systemd1`, which zbus rejects as not a unique name, so
    ///   the connection is made but every call fails with "Invalid unique name".
    ///   Use [`Systemd::connect_system`] until that is fixed in zbus.
    /// * systemd authenticates a peer by SO_PEERCRED, so a process outside
    ///   systemd's PID namespace (pid 0 as systemd sees it) is disconnected in the
    ///   handshake ("Broken pipe").
    pub async fn connect_private(path: &Path) -> Result<Systemd> {
        let failed = |source| Error::ConnectPrivate {
            path: path.to_path_buf(),
            source,
        };
        let stream = connect_unix(path).await.map_err(failed)?;
        let connection = zbus::connection::Builder::unix_stream(stream)
            .p2p()
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .map_err(failed)?;
        Systemd::over(connection).await.map_err(failed)
    }

    /// Connects to systemd through the system bus. systemd sends unit and job
    /// signals there only to subscribers, so this subscribes right away.
    pub async fn connect_system() -> Result<Systemd> {
        let failed = |source| Error::ConnectSystem { path: None, source };
        let connection = zbus::connection::Builder::system()
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .map_err(failed)?;
        Systemd::subscribed(connection).await.map_err(failed)
    }

    /// Connects to systemd through a system bus whose socket is at `path`, such
    /// as `/proc/PID/root/run/dbus/system_bus_socket` for a container's bus.
    /// Subscribes, like [`Systemd::connect_system`].
    pub async fn connect_system_at(path: &Path) -> Result<Systemd> {
        let failed = |source| Error::ConnectSystem {
            path: Some(path.to_path_buf()),
            source,
        };
        let stream = connect_unix(path).await.map_err(failed)?;
        let connection = zbus::connection::Builder::unix_stream(stream)
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .map_err(failed)?;
        Systemd::subscribed(connection).await.map_err(failed)
    }

    async fn subscribed(connection: Connection) -> zbus::Result<Systemd> {
        let systemd = Systemd::over(connection).await?;
        systemd.manager.subscribe().await?;
        Ok(systemd)
    }

    async fn over(connection: Connection) -> zbus::Result<Systemd> {
        let manager = ManagerProxy::builder(&connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        Ok(Systemd {
            connection,
            manager,
        })
    }

    /// The Manager proxy, for calls this wrapper does not cover (such as
    /// [`ManagerProxy::subscribe`] on a private connection).
    pub fn manager(&self) -> &ManagerProxy<'static> {
        &self.manager
    }

    /// Links `file` (a path as systemd sees it) into systemd's runtime unit
    /// directory, replacing any link of the same name. Call [`Systemd::reload`]
    /// afterwards so systemd reads it.
    pub async fn link_runtime(&self, file: &Path) -> Result<Vec<Change>> {
        let text = file
            .to_str()
            .filter(|_| file.is_absolute())
            .ok_or_else(|| Error::BadPath {
                path: file.to_path_buf(),
            })?;
        self.manager
            .link_unit_files(&[text], true, true)
            .await
            .map_err(call("link", text))
    }

    /// Removes the runtime links of unit `name` (undoes [`Systemd::link_runtime`]).
    pub async fn disable_runtime(&self, name: &str) -> Result<Vec<Change>> {
        self.manager
            .disable_unit_files(&[name], true)
            .await
            .map_err(call("disable", name))
    }

    /// `systemctl daemon-reload`.
    pub async fn reload(&self) -> Result<()> {
        self.manager
            .reload()
            .await
            .map_err(call("reload", "its unit files"))
    }

    /// Queues a start job (mode "replace"); returns the job's object path. The
    /// job runs after this returns: watch [`Systemd::state`] or the signals.
    pub async fn start(&self, name: &str) -> Result<OwnedObjectPath> {
        self.manager
            .start_unit(name, "replace")
            .await
            .map_err(call("start", name))
    }

    /// Queues a stop job (mode "replace"). A unit that is not loaded is already
    /// stopped, so that answer is success (`None`), not an error.
    pub async fn stop(&self, name: &str) -> Result<Option<OwnedObjectPath>> {
        match self.manager.stop_unit(name, "replace").await {
            Ok(job) => Ok(Some(job)),
            Err(e) if is_no_such_unit(&e) => Ok(None),
            Err(e) => Err(call("stop", name)(e)),
        }
    }

    /// Forgets that `name` failed. A unit that is not loaded has nothing to
    /// forget, so that is success too.
    pub async fn reset_failed(&self, name: &str) -> Result<()> {
        match self.manager.reset_failed_unit(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_unit(&e) => Ok(()),
            Err(e) => Err(call("reset the failed state of", name)(e)),
        }
    }

    /// The unit's LOAD/ACTIVE/SUB states. A unit with no file reads
    /// `not-found`/`inactive`/`dead`, as `systemctl show` has it.
    pub async fn state(&self, name: &str) -> Result<UnitState> {
        let read = call("read the state of", name);
        let path = self.manager.load_unit(name).await.map_err(&read)?;
        let unit = UnitProxy::builder(&self.connection)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(&read)?;
        Ok(UnitState {
            load: unit.load_state().await.map_err(&read)?,
            active: unit.active_state().await.map_err(&read)?,
            sub: unit.sub_state().await.map_err(&read)?,
        })
    }
}

/// Connects a unix socket ourselves rather than through a `unix:path=`
/// address, so a path with characters that addresses must escape still works.
async fn connect_unix(path: &Path) -> zbus::Result<std::os::unix::net::UnixStream> {
    let stream = tokio::net::UnixStream::connect(path).await?;
    Ok(stream.into_std()?)
}

/// Builds the [`Error::Call`] for a failed `action` on `unit`.
fn call(action: &'static str, unit: &str) -> impl Fn(zbus::Error) -> Error {
    let unit = unit.to_string();
    move |source| Error::Call {
        action,
        unit: unit.clone(),
        source,
    }
}

/// Whether systemd answered "unit not loaded". systemd 252 answers a stop of a
/// unit it never loaded this way, and an agent must read that as "stopped".
fn is_no_such_unit(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == NO_SUCH_UNIT)
}
