//! A unit: a safe name, a parsed body and the requirements read from it.

use super::Error;
use super::file::UnitFile;
use super::fleet::Requirements;
use super::hash::UnitHash;
use super::name::{UnitKind, UnitName};
use super::problem::{Problem, Problems};

/// A validated unit, ready to store or schedule.
///
/// Building one runs every check flotilla has: the name, the file's syntax and
/// the `[X-Fleet]` rules, so the API, the scheduler and `flotilla verify` agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    name: UnitName,
    file: UnitFile,
    requirements: Requirements,
    hash: UnitHash,
    warnings: Vec<Problem>,
}

impl Unit {
    /// Parses and validates the body `text` of the unit `name`.
    ///
    /// On failure the error lists every problem in the file, each with its line.
    pub fn from_text(name: &UnitName, text: &str) -> Result<Unit, Error> {
        let (file, problems) = UnitFile::parse_collecting(text)?;
        Unit::check(name, file, problems)
    }

    /// Validates an already parsed body for the unit `name`.
    pub fn from_file(name: &UnitName, file: UnitFile) -> Result<Unit, Error> {
        Unit::check(name, file, Problems::default())
    }

    /// Runs the unit-level checks on `file`, adding to the problems already found in it.
    fn check(name: &UnitName, file: UnitFile, mut problems: Problems) -> Result<Unit, Error> {
        if file.is_empty() && !problems.has_errors() {
            problems.error(
                None,
                "the unit file has no options; systemd would have nothing to run \
                 (was the right file given?)",
            );
        }
        if name.suffix() == "service"
            && !problems.has_errors()
            && !file.is_empty()
            && file.section("Service").next().is_none()
        {
            problems.warning(
                None,
                "the file has no [Service] section, so systemd has no command to run \
                 (was [Service] misspelt?)",
            );
        }
        let (requirements, found) = Requirements::read(name, &file);
        problems.extend(found);
        let warnings = problems.into_result()?;
        Ok(Unit {
            name: name.clone(),
            hash: file.hash(),
            file,
            requirements,
            warnings,
        })
    }

    /// The instance `instance` of this template, with specifiers expanded for it.
    ///
    /// The body is shared, so the instance has the template's hash.
    pub fn instantiate(&self, instance: &str) -> Result<Unit, Error> {
        let name = self.name.instantiate(instance)?;
        Unit::from_file(&name, self.file.clone())
    }

    /// The unit's name.
    pub fn name(&self) -> &UnitName {
        &self.name
    }

    /// Plain, template or instance.
    pub fn kind(&self) -> UnitKind {
        self.name.kind()
    }

    /// The parsed body.
    pub fn file(&self) -> &UnitFile {
        &self.file
    }

    /// Where the unit may run.
    pub fn requirements(&self) -> &Requirements {
        &self.requirements
    }

    /// The content address of the body.
    pub fn hash(&self) -> UnitHash {
        self.hash
    }

    /// Problems that did not stop the unit (unknown `[X-Fleet]` keys, ...).
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIDEKICK: &str = "[Unit]\nDescription=sidekick for %i\n\n[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineOf=app@%i.service\n";

    #[test]
    fn a_template_instantiates_with_specifiers_expanded() {
        let template =
            Unit::from_text(&UnitName::parse("side@.service").unwrap(), SIDEKICK).unwrap();
        assert_eq!(template.kind(), UnitKind::Template);
        let instance = template.instantiate("3").unwrap();
        assert_eq!(instance.name().as_str(), "side@3.service");
        assert_eq!(
            instance.requirements().machine_of[0].as_str(),
            "app@3.service"
        );
        assert_eq!(instance.hash(), template.hash(), "instances share the body");
        assert!(
            instance.instantiate("4").is_err(),
            "only templates instantiate"
        );
    }

    #[test]
    fn empty_files_are_refused() {
        let name = UnitName::parse("a.service").unwrap();
        assert!(Unit::from_text(&name, "").is_err());
        assert!(Unit::from_text(&name, "# only a comment\n\n").is_err());
    }

    #[test]
    fn syntax_and_rule_errors_are_reported_together() {
        let name = UnitName::parse("a.service").unwrap();
        let text = "[Service]\nbroken line\n[X-Fleet]\nGlobal=true\nReplaces=b*\n";
        let Err(Error::Invalid { problems }) = Unit::from_text(&name, text) else {
            panic!("expected errors");
        };
        // The syntax error does not hide the rule violation below it.
        let lines: Vec<_> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(2), Some(5)]);

        let text = "[Service]\nExecStart=/bin/true\n[X-Fleet]\nGlobal=true\nReplaces=b*\nMachineOf=x@.service\nFoo=1\n";
        let Err(Error::Invalid { problems }) = Unit::from_text(&name, text) else {
            panic!("expected errors");
        };
        let lines: Vec<_> = problems.iter().map(|p| (p.line, p.is_error())).collect();
        assert_eq!(
            lines,
            [
                (Some(5), true),  // Global with Replaces
                (Some(6), true),  // MachineOf names a template
                (Some(6), true),  // Global with MachineOf
                (Some(7), false), // unknown key warns
            ]
        );
    }

    #[test]
    fn a_service_without_a_service_section_is_a_warning() {
        let name = UnitName::parse("a.service").unwrap();
        let unit = Unit::from_text(
            &name,
            "[Unit]\nDescription=x\n[Servce]\nExecStart=/bin/true\n",
        )
        .unwrap();
        assert!(unit.warnings()[0].message.contains("no [Service] section"));
        let socket = UnitName::parse("a.socket").unwrap();
        let unit = Unit::from_text(&socket, "[Socket]\nListenStream=80\n").unwrap();
        assert!(unit.warnings().is_empty());
    }

    #[test]
    fn warnings_are_kept_on_accepted_units() {
        let name = UnitName::parse("a.service").unwrap();
        let unit =
            Unit::from_text(&name, "[Service]\nExecStart=/bin/true\n[X-Fleet]\nFoo=1\n").unwrap();
        assert_eq!(unit.warnings().len(), 1);
        assert_eq!(unit.warnings()[0].line, Some(4));
    }
}
