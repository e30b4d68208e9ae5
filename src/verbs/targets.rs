//! A verb's arguments as units: names checked, unit files found, read and
//! verified before the cluster is asked anything.
//!
//! As with fleetctl, an argument is a unit name and a path at once:
//! `web@1` names `web@1.service`, whose file, if it is needed and the cluster
//! does not have the unit, is `./web@1.service`, else its template's
//! `./web@.service`; `units/web@1.service` looks in `units/`. Files that exist
//! are read now, with the warnings `flotilla verify` prints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use flotilla::api::units::UnitJson;
use flotilla::client::ApiClient;
use flotilla::units::{self, Unit, UnitKind, UnitName, suggest};
use flotilla::verify;

/// One argument of submit, start, load or restart.
#[derive(Debug, Clone)]
pub struct Target {
    /// The unit it names.
    pub name: UnitName,
    /// Where its file would be.
    pub path: PathBuf,
    /// Its own file, when one exists: read and validated.
    pub file: Option<Unit>,
    /// For an instance without a file: its template's file beside it, if any,
    /// made into this instance.
    pub template_file: Option<(PathBuf, Unit)>,
}

impl Target {
    /// The unit from a local file: its own, else its template's.
    pub fn local(&self) -> Option<(&Path, &Unit)> {
        match (&self.file, &self.template_file) {
            (Some(unit), _) => Some((&self.path, unit)),
            (None, Some((path, unit))) => Some((path, unit)),
            (None, None) => None,
        }
    }
}

/// The unit name an argument means: its last path component, with
/// `.service` added when it has no type.
fn name_of(arg: &str) -> Result<UnitName> {
    let base = arg.rsplit('/').next().unwrap_or(arg);
    UnitName::from_user(base).map_err(Into::into)
}

/// The names of stop, unload, destroy, cat, status and journal: names only.
pub fn names(args: &[String]) -> Result<Vec<UnitName>> {
    args.iter()
        .map(|arg| {
            if arg.contains('/') {
                bail!(
                    "{arg} looks like a file; give the unit's name (e.g. {})",
                    arg.rsplit('/').next().unwrap_or(arg)
                );
            }
            name_of(arg)
        })
        .collect()
}

/// Reads a unit file: errors refuse it, warnings are printed; unknown
/// `[X-Fleet]` keys refuse it too unless `force`.
fn read(path: &Path, force: bool) -> Result<Unit> {
    let checked = verify::check_path(path);
    let report = verify::report(path, &checked, false);
    let problems: String = report
        .lines()
        .filter(|line| !line.contains(": ok: "))
        .map(|line| format!("{line}\n"))
        .collect();
    let unit = match checked.unit {
        Some(unit) if !checked.has_errors() => unit,
        _ => bail!(
            "{} is not a valid unit file:\n{}",
            path.display(),
            problems.trim_end()
        ),
    };
    if !problems.is_empty() {
        eprint!("{problems}");
    }
    let unknown = units::fleet::unknown_keys(unit.file());
    if !unknown.is_empty() && !force {
        let keys: Vec<&str> = unknown.iter().map(|(key, _)| *key).collect();
        bail!(
            "{} has unknown [X-Fleet] keys ({}), which would be ignored and drop a placement \
             rule; fix them, or pass --force to submit it as it is",
            path.display(),
            keys.join(", ")
        );
    }
    Ok(unit)
}

/// The arguments of submit, start, load and restart, with their files.
pub fn with_files(args: &[String], force: bool) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    for arg in args {
        let name = name_of(arg)?;
        let given = PathBuf::from(arg);
        let path = if given.is_file() {
            given
        } else {
            given.with_file_name(name.as_str())
        };
        let file = if path.is_file() {
            let unit = read(&path, force)?;
            if unit.kind() == UnitKind::Template && name.kind() != UnitKind::Template {
                bail!("{} is a template, not {name}", path.display());
            }
            Some(unit)
        } else if arg.contains('/') && name.kind() != UnitKind::Instance {
            bail!("{arg}: no such file");
        } else {
            None
        };
        let template_file = match (&file, name.template()) {
            (None, Some(template)) => {
                let template_path = path.with_file_name(template.as_str());
                if template_path.is_file() {
                    let unit = read(&template_path, force)?;
                    let instance = name.instance().expect("instances have one");
                    Some((template_path, unit.instantiate(instance)?))
                } else if arg.contains('/') {
                    bail!(
                        "{arg}: no such file, nor its template {}",
                        template_path.display()
                    );
                } else {
                    None
                }
            }
            _ => None,
        };
        targets.push(Target {
            name,
            path,
            file,
            template_file,
        });
    }
    Ok(targets)
}

/// The error for a unit the cluster does not have, naming the closest one
/// it has.
pub async fn no_such_unit(client: &ApiClient, name: &UnitName) -> anyhow::Error {
    match client.units().await {
        Ok(units) => anyhow::anyhow!(
            "no unit {name} in the cluster{} (see flotilla list-unit-files)",
            did_you_mean(name, &units)
        ),
        Err(err) => err.into(),
    }
}

/// A "did you mean" for a unit the cluster does not have: the closest
/// name among its units of the same type, and among the instances its
/// templates would make (names compared without their type, so a short
/// name is not matched to any other short name).
pub fn did_you_mean(name: &UnitName, units: &[UnitJson]) -> String {
    let known: Vec<UnitName> = units
        .iter()
        .filter_map(|u| UnitName::parse(&u.name).ok())
        .filter(|u| u.suffix() == name.suffix())
        .collect();
    let mut stems: BTreeSet<String> = known.iter().map(|u| u.stem().to_string()).collect();
    if let Some(instance) = name.instance().filter(|i| !i.is_empty()) {
        for template in &known {
            if let Ok(made) = template.instantiate(instance) {
                stems.insert(made.stem().to_string());
            }
        }
    }
    match suggest::closest(name.stem(), &stems) {
        Some(stem) if name.suffix() == "service" => format!(" (did you mean {stem}?)"),
        Some(stem) => format!(" (did you mean {stem}.{}?)", name.suffix()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str) -> UnitJson {
        serde_json::from_value(serde_json::json!({ "name": name })).unwrap()
    }

    #[test]
    fn typos_get_the_closest_unit_or_instance() {
        let units = [unit("myapp@.service"), unit("db.service")];
        let name = |n| UnitName::from_user(n).unwrap();
        assert_eq!(
            did_you_mean(&name("myap@3"), &units),
            " (did you mean myapp@3?)"
        );
        assert_eq!(did_you_mean(&name("dv"), &units), " (did you mean db?)");
        assert_eq!(did_you_mean(&name("web"), &units), "");
    }

    #[test]
    fn names_only_where_files_make_no_sense() {
        assert!(
            names(&["../x.service".into()])
                .unwrap_err()
                .to_string()
                .contains("looks like a file")
        );
        assert_eq!(
            names(&["web@1".into()]).unwrap()[0].as_str(),
            "web@1.service"
        );
    }

    #[test]
    fn an_instance_falls_back_to_its_templates_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x@.service"),
            "[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nConflicts=x@*.service\n",
        )
        .unwrap();
        let arg = dir.path().join("x@1.service").display().to_string();
        let targets = with_files(&[arg], false).unwrap();
        let (path, unit) = targets[0].local().unwrap();
        assert!(path.ends_with("x@.service"));
        assert_eq!(unit.name().as_str(), "x@1.service");
        let missing = dir.path().join("y@1.service").display().to_string();
        assert!(
            with_files(&[missing], false)
                .unwrap_err()
                .to_string()
                .contains("nor its template")
        );
    }

    #[test]
    fn unknown_fleet_keys_need_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.service");
        std::fs::write(
            &path,
            "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachinOf=a.service\n",
        )
        .unwrap();
        let arg = path.display().to_string();
        let err = with_files(std::slice::from_ref(&arg), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown [X-Fleet] keys (MachinOf)"), "{err}");
        assert!(with_files(&[arg], true).is_ok());
    }
}
