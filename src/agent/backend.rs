//! The seam between the agent and systemd: [`Backend`] is everything the
//! agent asks of a host's service manager, and nothing more.
//!
//! Production implements it with [`Systemd`], systemd's D-Bus API. The seam
//! exists so the scale simulator (`flotilla-bench sim`) and its CI smoke test
//! can run thousands of copies of the SAME agent code in one process, each
//! against a modelled systemd, with a real Raft cluster behind them: nothing
//! of the agent is rewritten for them, only the service manager is swapped.
//!
//! The methods return boxed futures (the trait is used as `dyn Backend`, so
//! the agent is not generic over it); a D-Bus round trip dwarfs the box.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::sync::mpsc::UnboundedReceiver;

use super::systemd::{Result, Systemd, UnitState};

/// The future of one call to the service manager.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What the agent asks of a host's service manager. Each method has the
/// meaning of the [`Systemd`] method of the same name, which implements it
/// over D-Bus; another implementation MUST keep those meanings (a unit that
/// is not loaded reads `not-found`/`inactive`/`dead`; stopping it succeeds;
/// a start is queued and finishes later, announced on [`Backend::watch_changes`]).
pub trait Backend: Send + Sync + 'static {
    /// The LOAD/ACTIVE/SUB states of `names`, one entry per name, in one call.
    fn states<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, Vec<(String, UnitState)>>;

    /// The active units (not only flotilla's) matching one of the globs.
    fn active_units_matching<'a>(&'a self, patterns: &'a [String]) -> Call<'a, Vec<String>>;

    /// Queues a start job ("replace").
    fn start<'a>(&'a self, name: &'a str) -> Call<'a, ()>;

    /// Queues a stop job ("replace"); a unit that is not loaded is stopped.
    fn stop<'a>(&'a self, name: &'a str) -> Call<'a, ()>;

    /// Rereads every unit file (`daemon-reload`).
    fn reload(&self) -> Call<'_, ()>;

    /// Links unit files into the runtime unit directory, in one call.
    fn link_runtime_all<'a>(&'a self, files: &'a [PathBuf]) -> Call<'a, ()>;

    /// Follows a linked file's `[Install]` section, until the next boot.
    fn enable_runtime<'a>(&'a self, file: &'a Path) -> Call<'a, ()>;

    /// Removes the runtime links of many units, in one call.
    fn disable_runtime_all<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, ()>;

    /// The file a unit was loaded from (empty: none, e.g. transient), or
    /// `None` when no unit of that name is loaded.
    fn fragment_path<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>>;

    /// Forgets that a unit failed; a unit that is not loaded is fine.
    fn reset_failed<'a>(&'a self, name: &'a str) -> Call<'a, ()>;

    /// The names of units whose state may have changed, from now on, until
    /// the backend goes away. MUST NOT wait for the reader (see
    /// [`Systemd::watch_changes`]).
    fn watch_changes(&self) -> Call<'_, UnboundedReceiver<String>>;
}

impl Backend for Systemd {
    fn fragment_path<'a>(&'a self, name: &'a str) -> Call<'a, Option<String>> {
        Box::pin(Systemd::fragment_path(self, name))
    }

    fn states<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, Vec<(String, UnitState)>> {
        Box::pin(Systemd::states(self, names))
    }

    fn active_units_matching<'a>(&'a self, patterns: &'a [String]) -> Call<'a, Vec<String>> {
        Box::pin(Systemd::active_units_matching(self, patterns))
    }

    fn start<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move { Systemd::start(self, name).await.map(drop) })
    }

    fn stop<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(async move { Systemd::stop(self, name).await.map(drop) })
    }

    fn reload(&self) -> Call<'_, ()> {
        Box::pin(Systemd::reload(self))
    }

    fn link_runtime_all<'a>(&'a self, files: &'a [PathBuf]) -> Call<'a, ()> {
        Box::pin(async move { Systemd::link_runtime_all(self, files).await.map(drop) })
    }

    fn enable_runtime<'a>(&'a self, file: &'a Path) -> Call<'a, ()> {
        Box::pin(async move { Systemd::enable_runtime(self, file).await.map(drop) })
    }

    fn disable_runtime_all<'a>(&'a self, names: &'a [&'a str]) -> Call<'a, ()> {
        Box::pin(async move { Systemd::disable_runtime_all(self, names).await.map(drop) })
    }

    fn reset_failed<'a>(&'a self, name: &'a str) -> Call<'a, ()> {
        Box::pin(Systemd::reset_failed(self, name))
    }

    fn watch_changes(&self) -> Call<'_, UnboundedReceiver<String>> {
        Box::pin(Systemd::watch_changes(self))
    }
}
