//! This host as the agent drives it: systemd and the unit files flotilla
//! wrote, and the [`Action`]s of [`super::reconcile`] carried out on them.
//!
//! systemd's states of local units are cached here and read again, in one
//! call for many units, once a signal says a unit changed or an action
//! touched it. Runs of loads and of unloads go to systemd as one link or
//! disable call each; runs of starts or stops are queued all at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use super::backend::Backend;
use super::files::{LocalUnit, UnitFiles};
use super::reconcile::{self, Action};
use super::systemd::{self, UnitState};
use crate::registry::machine::MachineStore;
use crate::units::UnitName;

/// systemd, the agent's unit files, and what systemd last said of them.
pub struct Host {
    systemd: Arc<dyn Backend>,
    files: UnitFiles,
    /// systemd's states of local units, as last read.
    states: BTreeMap<UnitName, UnitState>,
}

impl Host {
    /// The service manager `systemd` (D-Bus in production), unit files
    /// under `units_dir`.
    pub fn new(systemd: Arc<dyn Backend>, units_dir: &Path) -> Host {
        Host {
            systemd,
            files: UnitFiles::new(units_dir),
            states: BTreeMap::new(),
        }
    }

    /// Every unit file flotilla wrote here (`None`: it no longer parses).
    pub async fn local(&mut self) -> BTreeMap<UnitName, Option<LocalUnit>> {
        self.files.list().await.unwrap_or_default()
    }

    /// Notes that systemd says `unit` changed: its state is read again.
    pub fn changed(&mut self, unit: &str) {
        if let Ok(name) = UnitName::parse(unit) {
            self.states.remove(&name);
        }
    }

    /// Forgets every state read, so each is read again (the full resync).
    pub fn forget_states(&mut self) {
        self.states.clear();
    }

    /// systemd's state of `unit`, as last read by [`Host::read_states`].
    pub fn state(&self, unit: &UnitName) -> Option<&UnitState> {
        self.states.get(unit)
    }

    /// Reads from systemd, in one call, the states of `units` not cached.
    pub async fn read_states<'u>(&mut self, units: impl Iterator<Item = &'u UnitName>) {
        let missing: Vec<&str> = units
            .filter(|u| !self.states.contains_key(*u))
            .map(UnitName::as_str)
            .collect();
        match self.systemd.states(&missing).await {
            Ok(states) => {
                for (name, state) in states {
                    if let Ok(name) = UnitName::parse(&name) {
                        self.states.insert(name, state);
                    }
                }
            }
            Err(e) => tracing::debug!("agent: {e}"),
        }
    }

    /// Among `held`, names systemd holds while flotilla has no file for them
    /// here, those it has from anywhere but flotilla's units directory: the
    /// host's own `ssh.service` from `/lib/systemd/system`, a transient or a
    /// masked unit. Loading flotilla's unit under such a name would override
    /// the host's own (the runtime link comes first in systemd's search
    /// path), so it is refused; each with why, in words for list-units. A
    /// unit systemd cannot be asked about is refused too, until it can.
    pub async fn taken(&self, held: &BTreeSet<UnitName>) -> BTreeMap<UnitName, String> {
        let mut taken = BTreeMap::new();
        for unit in held {
            let ours = self.files.path(unit);
            let why = match self.systemd.fragment_path(unit.as_str()).await {
                Ok(None) => continue,
                Ok(Some(path)) if Path::new(&path) == ours => continue,
                Ok(Some(path)) if path.is_empty() => format!(
                    "this host's systemd already has a unit {unit} (without a unit file: \
                     transient or generated); flotilla does not load its own over it; give \
                     the flotilla unit another name"
                ),
                Ok(Some(path)) => format!(
                    "this host's systemd already has {unit} from {path}; flotilla does not \
                     load its own over it; give the flotilla unit another name"
                ),
                Err(e) => format!("cannot ask systemd whether {unit} is the host's own: {e}"),
            };
            taken.insert(unit.clone(), why);
        }
        taken
    }

    /// The active units here, not managed by flotilla, that match one of
    /// `patterns` (a candidate's `Conflicts=`/`Replaces=` globs).
    pub async fn foreign_units_matching(
        &self,
        patterns: &[String],
        managed: &BTreeSet<String>,
    ) -> systemd::Result<Vec<String>> {
        let active = self.systemd.active_units_matching(patterns).await?;
        Ok(active
            .into_iter()
            .filter(|n| !managed.contains(n))
            .collect())
    }

    /// Stops `unit` now (FenceAfter), outside any batch.
    pub async fn stop(&mut self, unit: &UnitName) {
        if let Err(e) = self.systemd.stop(unit.as_str()).await {
            tracing::warn!("agent: {e}");
        }
        self.states.remove(unit);
    }

    /// Stops and unloads every unit file this agent ever wrote here.
    pub async fn unload_everything(&mut self, store: &MachineStore, why: &str) {
        self.unload_all_but(store, &[], why).await;
    }

    /// Stops and unloads every unit file this agent wrote here but `keep`.
    pub async fn unload_all_but(&mut self, store: &MachineStore, keep: &[UnitName], why: &str) {
        let gone: Vec<UnitName> = self
            .local()
            .await
            .into_keys()
            .filter(|unit| !keep.contains(unit))
            .collect();
        if gone.is_empty() {
            return;
        }
        tracing::info!("agent: {why}: stopping {} units from before", gone.len());
        // Not retried early: the next pass finds what is left.
        let _ = self.execute(store, &reconcile::remove(&gone)).await;
    }

    /// Asks systemd for each action in order; failures are logged and the
    /// next pass tries again (soon: the agent's loop retries a failed call
    /// with a short backoff, [`super::run`]). Runs of loads and of unloads
    /// go to systemd as one link or disable call each. Bodies to load come
    /// from `store`. Returns false when any call failed.
    pub async fn execute(&mut self, store: &MachineStore, actions: &[Action]) -> bool {
        let mut all_done = true;
        let mut i = 0;
        while i < actions.len() {
            let run = actions[i..]
                .iter()
                .take_while(|a| std::mem::discriminant(*a) == std::mem::discriminant(&actions[i]))
                .count();
            let batch = &actions[i..i + run];
            i += run;
            let result = match &batch[0] {
                Action::Load(..) => self.load_all(store, batch).await,
                Action::Unload(_) => self.unload_all(batch).await,
                Action::Reload => self.systemd.reload().await,
                Action::Stop(_) | Action::Start(_) => {
                    all_done &= self.jobs(batch).await;
                    Ok(())
                }
            };
            for action in batch {
                if let Action::Stop(unit)
                | Action::Unload(unit)
                | Action::Start(unit)
                | Action::Load(unit, _) = action
                {
                    self.states.remove(unit);
                }
            }
            if let Err(e) = result {
                tracing::warn!("agent: {e}");
                all_done = false;
            }
        }
        all_done
    }

    /// Queues the start or stop jobs of a run of units, all calls in flight at
    /// once so systemd never waits on a round trip between them; false when
    /// any call failed.
    async fn jobs(&self, batch: &[Action]) -> bool {
        let mut all_done = true;
        let mut calls = tokio::task::JoinSet::new();
        for action in batch {
            let systemd = self.systemd.clone();
            let action = action.clone();
            calls.spawn(async move {
                match &action {
                    Action::Stop(unit) => systemd.stop(unit.as_str()).await,
                    Action::Start(unit) => systemd.start(unit.as_str()).await,
                    _ => Ok(()),
                }
            });
        }
        while let Some(done) = calls.join_next().await {
            match done {
                Ok(Err(e)) => tracing::warn!("agent: {e}"),
                Err(e) => tracing::warn!("agent: a systemd call failed to run: {e}"),
                Ok(Ok(())) => continue,
            }
            all_done = false;
        }
        all_done
    }

    /// Unloads a run of units: one disable call, then reset-failed and the files.
    async fn unload_all(&mut self, batch: &[Action]) -> systemd::Result<()> {
        let units: Vec<&UnitName> = batch
            .iter()
            .filter_map(|a| match a {
                Action::Unload(unit) => Some(unit),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = units.iter().map(|u| u.as_str()).collect();
        self.systemd.disable_runtime_all(&names).await?;
        for unit in &units {
            self.systemd.reset_failed(unit.as_str()).await?;
        }
        let units: Vec<UnitName> = units.into_iter().cloned().collect();
        let removed = self.files.remove_all(units.clone()).await;
        for (unit, removed) in units.iter().zip(removed) {
            if let Err(e) = removed {
                tracing::warn!("agent: cannot remove the file of {unit}: {e}");
            }
        }
        Ok(())
    }

    /// Loads a run of units: writes every file, links them in one call, then
    /// enables those with an `[Install]` section.
    async fn load_all(&mut self, store: &MachineStore, batch: &[Action]) -> systemd::Result<()> {
        let mut texts = Vec::new();
        let mut has_install = Vec::new();
        for action in batch {
            let Action::Load(unit, hash) = action else {
                continue;
            };
            let Ok(Some(body)) = store.body(hash).await else {
                tracing::warn!("agent: the body of {unit} is not in the store; not loading it");
                continue;
            };
            let text = match body.verified_text(hash) {
                Ok(text) => text,
                Err(e) => {
                    tracing::error!("agent: not loading {unit}: {e}");
                    continue;
                }
            };
            has_install.push(
                body.file()
                    .is_ok_and(|f| f.section("Install").next().is_some()),
            );
            texts.push((unit.clone(), text.to_string()));
        }
        let names: Vec<UnitName> = texts.iter().map(|(unit, _)| unit.clone()).collect();
        let written = self.files.write_all(texts).await;
        let mut paths = Vec::new();
        let mut installs = Vec::new();
        for ((unit, written), install) in names.iter().zip(written).zip(has_install) {
            match written {
                Ok(path) => {
                    if install {
                        installs.push(path.clone());
                    }
                    paths.push(path);
                }
                Err(e) => tracing::warn!("agent: cannot write the file of {unit}: {e}"),
            }
        }
        self.systemd.link_runtime_all(&paths).await?;
        for path in installs {
            self.systemd.enable_runtime(&path).await?;
        }
        Ok(())
    }
}
