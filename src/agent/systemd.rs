//! The agent's client for systemd's D-Bus API.
//!
//! Two hand-written proxies cover exactly what the agent needs: [`ManagerProxy`]
//! (`org.freedesktop.systemd1.Manager`: link, reload, start, stop, ...) and
//! [`UnitProxy`] (`org.freedesktop.systemd1.Unit`: the LOAD/ACTIVE/SUB states).
//! [`Systemd`] wraps them in the handful of verbs the agent calls, and turns
//! systemd's answers into [`Error`]s that say what to do next.
//! [`Systemd::watch_changes`] turns systemd's signals into the names of units
//! whose state may have changed, and [`unit_object_path`] /
//! [`unit_name_from_path`] map unit names to their D-Bus objects and back.
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

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use zbus::message::Type as MessageType;
use zbus::proxy::CacheProperties;
use zbus::{Connection, MatchRule, Message, MessageStream, ObjectPath, OwnedObjectPath, proxy};

use crate::metrics::time_systemd;
use crate::registry::unit_state::OCCUPYING_STATES;

/// The D-Bus error systemd answers when a unit it was asked about is not loaded.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// How long one call may wait for systemd's answer. A daemon-reload on a busy
/// host takes seconds; anything past this means systemd is stuck, and the
/// agent should say so rather than hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The object path under which systemd publishes every unit: each unit's object
/// is this plus its name escaped by [`unit_object_path`].
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// The interface whose properties hold LOAD/ACTIVE/SUB. systemd emits
/// PropertiesChanged for it every time it emits one for the unit's type
/// interface (`...Service`, `...Socket`, ...), so watching it alone misses no
/// state change and halves the signals the watcher reads.
const UNIT_INTERFACE: &str = "org.freedesktop.systemd1.Unit";

/// How many signals zbus may queue for the watcher before its socket reader
/// waits (which stalls every call on the connection). The watcher drains the
/// queue at once, so this only has to absorb a burst, such as the signals of a
/// daemon-reload on a host with a few hundred units.
const WATCH_QUEUE: NonZeroUsize = NonZeroUsize::new(1024).expect("1024 is not zero");

/// One change systemd made to its unit-file directories while linking, enabling
/// or disabling: `(kind, file, destination)`, for example
/// `("symlink", "/run/systemd/system/web.service", "/run/flotilla/units/web.service")`.
pub type Change = (String, String, String);

/// One unit as `ListUnits` and `ListUnitsByPatterns` describe it: `(name,
/// description, load state, active state, sub state, followed unit, unit
/// object, job id, job type, job object)`; the job fields are 0, "" and "/"
/// when no job is queued.
pub type UnitListing = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

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

    /// The named units with their states, loading any that are not loaded.
    fn list_units_by_names(&self, names: &[&str]) -> zbus::Result<Vec<UnitListing>>;

    /// The loaded units whose name matches one of the glob `patterns` and one
    /// of whose LoadState, ActiveState or SubState is in `states`. An empty list
    /// matches everything, in both arguments.
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitListing>>;

    /// Sent to subscribers when a job finishes, however it ended: `result` is
    /// "done", "canceled", "timeout", "failed", "dependency" or "skipped".
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
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

    /// The unit file systemd loaded it from (empty: none, e.g. transient).
    #[zbus(property)]
    fn fragment_path(&self) -> zbus::Result<String>;
}

/// A unit's three states, the registry's own type: what systemd reports is
/// what the store holds.
pub use crate::registry::UnitState;

/// The name and states of a listed unit.
fn listed(unit: UnitListing) -> (String, UnitState) {
    let (name, _, load, active, sub, ..) = unit;
    (name, UnitState { load, active, sub })
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

    /// `enable` was asked of a unit file with nothing to enable.
    #[error(
        "cannot enable {file}: it has no [Install] section (WantedBy=, RequiredBy=, \
         Alias= or Also=), so systemd has nothing to enable; add one, \
         or start the unit without enabling it"
    )]
    NoInstallSection {
        /// The unit file, as systemd sees it.
        file: String,
        /// What systemd changed anyway: for a file outside its search path, the
        /// link that makes the unit visible.
        changes: Vec<Change>,
    },

    /// The signals behind [`Systemd::watch_changes`] could not be requested.
    #[error(
        "cannot watch systemd's unit changes: {source}; \
         check `systemctl status dbus.service` on the host"
    )]
    Watch {
        /// Why it failed.
        #[source]
        source: zbus::Error,
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

    /// A service manager other than systemd's D-Bus API behind the agent's
    /// [`super::backend::Backend`] (the scale simulator's model) refused a call.
    #[error("the service manager could not {action} {unit}: {reason}")]
    Refused {
        /// What was asked, e.g. "start".
        action: &'static str,
        /// The unit it was asked about.
        unit: String,
        /// Why it refused.
        reason: String,
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
        let text = unit_file_text(file)?;
        self.manager
            .link_unit_files(&[text], true, true)
            .await
            .map_err(call("link", text))
    }

    /// Links many files at once, like [`Systemd::link_runtime`] (one call,
    /// however many units a batch loads).
    pub async fn link_runtime_all(&self, files: &[PathBuf]) -> Result<Vec<Change>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let texts = files
            .iter()
            .map(|f| unit_file_text(f))
            .collect::<Result<Vec<&str>>>()?;
        time_systemd(
            "LinkUnitFiles",
            self.manager.link_unit_files(&texts, true, true),
        )
        .await
        .map_err(call("link", &texts.join(" ")))
    }

    /// Removes the runtime links of many units at once.
    pub async fn disable_runtime_all(&self, names: &[&str]) -> Result<Vec<Change>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        time_systemd(
            "DisableUnitFiles",
            self.manager.disable_unit_files(names, true),
        )
        .await
        .map_err(call("disable", &names.join(" ")))
    }

    /// The LOAD/ACTIVE/SUB states of many units in one call. A unit systemd
    /// does not list (never loaded, or garbage-collected) reads
    /// `not-found`/`inactive`/`dead`, as [`Systemd::state`] has it.
    pub async fn states(&self, names: &[&str]) -> Result<Vec<(String, UnitState)>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let units = time_systemd("ListUnitsByNames", self.manager.list_units_by_names(names))
            .await
            .map_err(call("list", &names.join(" ")))?;
        let mut found: std::collections::HashMap<String, UnitState> =
            units.into_iter().map(listed).collect();
        Ok(names
            .iter()
            .map(|name| {
                let state = found.remove(*name).unwrap_or_else(UnitState::not_found);
                (name.to_string(), state)
            })
            .collect())
    }

    /// Enables `file` (a path as systemd sees it) until the next boot, as
    /// `systemctl enable --runtime --force` does: links it into systemd's
    /// runtime unit directory if it lies outside the search path, and adds the
    /// links its `[Install]` section asks for (such as
    /// `multi-user.target.wants/NAME`), replacing links of the same names. A
    /// file without an `[Install]` section is [`Error::NoInstallSection`]. Call
    /// [`Systemd::reload`] afterwards so systemd reads it.
    pub async fn enable_runtime(&self, file: &Path) -> Result<Vec<Change>> {
        let text = unit_file_text(file)?;
        let (has_install_section, changes) = self
            .manager
            .enable_unit_files(&[text], true, true)
            .await
            .map_err(call("enable", text))?;
        if !has_install_section {
            return Err(Error::NoInstallSection {
                file: text.to_string(),
                changes,
            });
        }
        Ok(changes)
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
        time_systemd("Reload", self.manager.reload())
            .await
            .map_err(call("reload", "its unit files"))
    }

    /// Queues a start job (mode "replace"); returns the job's object path. The
    /// job runs after this returns: watch [`Systemd::state`] or the signals.
    pub async fn start(&self, name: &str) -> Result<OwnedObjectPath> {
        time_systemd("StartUnit", self.manager.start_unit(name, "replace"))
            .await
            .map_err(call("start", name))
    }

    /// Queues a stop job (mode "replace"). A unit that is not loaded is already
    /// stopped, so that answer is success (`None`), not an error.
    pub async fn stop(&self, name: &str) -> Result<Option<OwnedObjectPath>> {
        match time_systemd("StopUnit", self.manager.stop_unit(name, "replace")).await {
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
        let unit = self.unit(path).await.map_err(&read)?;
        Ok(UnitState {
            load: unit.load_state().await.map_err(&read)?,
            active: unit.active_state().await.map_err(&read)?,
            sub: unit.sub_state().await.map_err(&read)?,
        })
    }

    /// When `name` last became active, in µs since the epoch; 0 if it never
    /// did since systemd loaded it. A unit that is not loaded reads 0 and stays
    /// unloaded. A value that stays the same across two reads proves the unit
    /// was not restarted in between.
    pub async fn active_enter_timestamp(&self, name: &str) -> Result<u64> {
        let read = call("read the start time of", name);
        let path = match self.manager.get_unit(name).await {
            Ok(path) => path,
            Err(e) if is_no_such_unit(&e) => return Ok(0),
            Err(e) => return Err(read(e)),
        };
        let unit = self.unit(path).await.map_err(&read)?;
        unit.active_enter_timestamp().await.map_err(&read)
    }

    /// The file systemd loaded the unit `name` from (its FragmentPath; empty
    /// for a unit without one, such as a transient unit), or `None` when
    /// systemd holds no unit of that name. Tells the host's own units from
    /// flotilla's, whose files lie in the agent's units directory.
    pub async fn fragment_path(&self, name: &str) -> Result<Option<String>> {
        let read = call("read the unit file of", name);
        let path = match self.manager.get_unit(name).await {
            Ok(path) => path,
            Err(e) if is_no_such_unit(&e) => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        let unit = self.unit(path).await.map_err(&read)?;
        unit.fragment_path().await.map(Some).map_err(&read)
    }

    /// The names of the loaded units that match one of the glob `patterns`
    /// (`*`, `?`, `[...]`, as `systemctl list-units` takes them) and whose
    /// ActiveState is active, activating, reloading or deactivating. No
    /// patterns match no units (systemd would read an empty list as "all").
    pub async fn active_units_matching(&self, patterns: &[String]) -> Result<Vec<String>> {
        if patterns.is_empty() {
            return Ok(Vec::new());
        }
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let units = self
            .manager
            .list_units_by_patterns(&OCCUPYING_STATES, &patterns)
            .await
            .map_err(call("list the units matching", &patterns.join(" ")))?;
        // systemd keeps a unit when any of its three states is in the list, and
        // some SubStates share a name with an ActiveState, so check ActiveState.
        Ok(units
            .into_iter()
            .map(listed)
            .filter(|(_, state)| state.is_occupying())
            .map(|(name, _)| name)
            .collect())
    }

    /// Reports, by name, every unit whose state may have changed: one whose
    /// properties changed (LoadState, ActiveState, SubState, ...) or whose job
    /// finished. Read [`Systemd::state`] after a name arrives; a name can come
    /// several times for one change, and the states may have moved on again.
    ///
    /// A spawned task reads the signals and sends the names; it ends, closing
    /// the channel, when the connection closes or the receiver is dropped, and
    /// keeps the connection open until then. The signals are requested before
    /// this returns, so every change after it is reported.
    ///
    /// The channel is UNBOUNDED on purpose: the task MUST NOT wait for the
    /// reader, because zbus stalls the whole connection, calls included, while
    /// a signal queue it feeds is full. A reader that falls behind costs one
    /// `String` per signal.
    ///
    /// Needs a connection subscribed to systemd's signals, as
    /// [`Systemd::connect_system`] and [`Systemd::connect_system_at`] make; call
    /// [`ManagerProxy::subscribe`] first on a private one.
    pub async fn watch_changes(&self) -> Result<mpsc::UnboundedReceiver<String>> {
        let failed = |source| Error::Watch { source };
        let properties = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender("org.freedesktop.systemd1")
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace(UNIT_PATH_PREFIX.trim_end_matches('/'))
            .arg(0, UNIT_INTERFACE)
            .build()
            .map_err(failed)?;
        let jobs = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender("org.freedesktop.systemd1")
            .interface("org.freedesktop.systemd1.Manager")
            .member("JobRemoved")
            .path("/org/freedesktop/systemd1")
            .build()
            .map_err(failed)?;
        let queue = Some(WATCH_QUEUE);
        let properties = MessageStream::for_match_rule(properties, &self.connection, queue)
            .await
            .map_err(failed)?;
        let jobs = MessageStream::for_match_rule(jobs, &self.connection, queue)
            .await
            .map_err(failed)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(forward_changes(properties, jobs, sender));
        Ok(receiver)
    }

    /// A Unit proxy for the unit object at `path`, reading properties afresh
    /// on every call (a cache would need the signals this connection may lack).
    async fn unit(&self, path: OwnedObjectPath) -> zbus::Result<UnitProxy<'static>> {
        UnitProxy::builder(&self.connection)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
    }
}

/// The watcher's task: sends the unit named by each signal on either stream
/// until a stream ends (the connection closed) or nobody listens.
async fn forward_changes(
    mut properties: MessageStream,
    mut jobs: MessageStream,
    sender: mpsc::UnboundedSender<String>,
) {
    loop {
        let message = tokio::select! {
            message = next_message(&mut properties) => message,
            message = next_message(&mut jobs) => message,
            () = sender.closed() => return,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::warn!("skipping a systemd signal that zbus could not read: {e}");
                continue;
            }
            None => return,
        };
        if let Some(unit) = changed_unit(&message)
            && sender.send(unit).is_err()
        {
            return;
        }
    }
}

/// The next message of `stream`, or `None` once it has ended. Cancel-safe: a
/// message is only taken from the stream when this returns it.
///
/// zbus's streams are `futures_core` streams, and flotilla has no direct
/// dependency to bring the `Stream` trait into scope (futures-util's `next`
/// would replace this), so it is reached through zbus's own re-export.
async fn next_message(stream: &mut MessageStream) -> Option<zbus::Result<Message>> {
    use zbus::export::futures_core::Stream;
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// The unit a signal from systemd is about: the object's unit for a
/// PropertiesChanged of the Unit interface on a unit object, the `unit`
/// argument for JobRemoved; `None` for any other message.
fn changed_unit(message: &Message) -> Option<String> {
    if let Some(signal) = zbus::fdo::PropertiesChanged::from_message(message.clone()) {
        let args = signal.args().ok()?;
        if args.interface_name().as_str() != UNIT_INTERFACE {
            return None;
        }
        return unit_name_from_path(message.header().path()?.as_str());
    }
    if let Some(signal) = JobRemoved::from_message(message.clone()) {
        return Some(signal.args().ok()?.unit().to_string());
    }
    None
}

/// The D-Bus object of unit `name`, as systemd names it: `name` escaped the
/// way systemd's `bus_label_escape` does (every byte other than an ASCII letter
/// or digit becomes `_` and two lowercase hex digits; "" becomes "_") after
/// `/org/freedesktop/systemd1/unit/`. For example `web@1.service` is
/// `/org/freedesktop/systemd1/unit/web_401_2eservice`.
pub fn unit_object_path(name: &str) -> String {
    let mut path = String::with_capacity(UNIT_PATH_PREFIX.len() + 3 * name.len().max(1));
    path.push_str(UNIT_PATH_PREFIX);
    if name.is_empty() {
        path.push('_');
    }
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() {
            path.push(char::from(byte));
        } else {
            write!(path, "_{byte:02x}").expect("writing to a String cannot fail");
        }
    }
    path
}

/// The unit whose D-Bus object is `path`: the inverse of [`unit_object_path`].
/// `None` for a path outside `/org/freedesktop/systemd1/unit/`, and for one
/// that [`unit_object_path`] cannot produce (a bad or uppercase escape, an
/// escaped letter or digit, bytes that are not UTF-8), so the two are exact
/// inverses of each other.
pub fn unit_name_from_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_PREFIX)?;
    if label == "_" {
        return Some(String::new());
    }
    let mut name = Vec::with_capacity(label.len());
    let mut bytes = label.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'_' => {
                let high = lower_hex_digit(bytes.next()?)?;
                let low = lower_hex_digit(bytes.next()?)?;
                let escaped = high << 4 | low;
                if escaped.is_ascii_alphanumeric() {
                    return None;
                }
                name.push(escaped);
            }
            byte if byte.is_ascii_alphanumeric() => name.push(byte),
            _ => return None,
        }
    }
    if name.is_empty() {
        return None;
    }
    String::from_utf8(name).ok()
}

/// The value of one lowercase hex digit, as [`unit_object_path`] writes them.
fn lower_hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    }
}

/// `file` as systemd can be given it: absolute and UTF-8.
fn unit_file_text(file: &Path) -> Result<&str> {
    file.to_str()
        .filter(|_| file.is_absolute())
        .ok_or_else(|| Error::BadPath {
            path: file.to_path_buf(),
        })
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use zbus::zvariant::Variant;

    use super::*;

    #[test]
    fn unit_object_paths_escape_as_systemd_does() {
        let cases = [
            ("web@1.service", "web_401_2eservice"),
            ("hello.service", "hello_2eservice"),
            ("dev-sda1.device", "dev_2dsda1_2edevice"),
            ("a_b.service", "a_5fb_2eservice"),
            ("ü.service", "_c3_bc_2eservice"),
            ("ABC", "ABC"),
            ("", "_"),
        ];
        for (name, label) in cases {
            let path = format!("/org/freedesktop/systemd1/unit/{label}");
            assert_eq!(unit_object_path(name), path, "{name}");
            assert_eq!(unit_name_from_path(&path).as_deref(), Some(name), "{path}");
        }
    }

    #[test]
    fn paths_that_are_no_unit_object_have_no_name() {
        let paths = [
            "/org/freedesktop/systemd1",
            "/org/freedesktop/systemd1/job/42",
            "/org/freedesktop/systemd1/unit",
            "/org/freedesktop/systemd1/unit/",
            "/org/freedesktop/systemd1/unit/web_4",
            "/org/freedesktop/systemd1/unit/web_",
            "/org/freedesktop/systemd1/unit/web_4g",
            "/org/freedesktop/systemd1/unit/web_2Eservice",
            "/org/freedesktop/systemd1/unit/_41",
            "/org/freedesktop/systemd1/unit/a/b",
            "/org/freedesktop/systemd1/unit/a.service",
            "/org/freedesktop/systemd1/unit/_ff",
            "/other/unit/web_2eservice",
        ];
        for path in paths {
            assert_eq!(unit_name_from_path(path), None, "{path}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn names_survive_the_object_path(name in any::<String>()) {
            let path = unit_object_path(&name);
            prop_assert!(zbus::ObjectPath::try_from(path.as_str()).is_ok(), "{}", path);
            prop_assert_eq!(unit_name_from_path(&path), Some(name));
        }

        #[test]
        fn paths_with_a_name_are_that_name_s_path(label in "[A-Za-z0-9_]{1,12}") {
            let path = format!("{UNIT_PATH_PREFIX}{label}");
            if let Some(name) = unit_name_from_path(&path) {
                prop_assert_eq!(unit_object_path(&name), path);
            }
        }
    }

    fn properties_changed(path: &str, interface: &str) -> Message {
        let changed: HashMap<&str, Variant<'_>> =
            HashMap::from([("ActiveState", Variant::from("failed"))]);
        let invalidated: Vec<&str> = Vec::new();
        Message::signal(path, "org.freedesktop.DBus.Properties", "PropertiesChanged")
            .build(&(interface, changed, invalidated))
            .unwrap()
    }

    #[test]
    fn signals_name_the_unit_they_are_about() {
        let unit = unit_object_path("web@1.service");
        let job_removed = Message::signal(
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "JobRemoved",
        )
        .build(&(
            7u32,
            ObjectPath::try_from("/org/freedesktop/systemd1/job/7").unwrap(),
            "db.service",
            "done",
        ))
        .unwrap();
        let unit_new = Message::signal(
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "UnitNew",
        )
        .build(&("db.service", ObjectPath::try_from(unit.as_str()).unwrap()))
        .unwrap();
        let cases = [
            (
                properties_changed(&unit, UNIT_INTERFACE),
                Some("web@1.service"),
            ),
            (job_removed, Some("db.service")),
            // The type interface's twin of the Unit signal adds nothing.
            (
                properties_changed(&unit, "org.freedesktop.systemd1.Service"),
                None,
            ),
            (
                properties_changed("/org/freedesktop/systemd1/job/7", UNIT_INTERFACE),
                None,
            ),
            (unit_new, None),
        ];
        for (message, unit) in cases {
            assert_eq!(changed_unit(&message).as_deref(), unit, "{message:?}");
        }
    }
}
