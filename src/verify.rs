//! `flotilla verify`: checks unit files on disk with the same rules the cluster applies.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use crate::units::{self, Problem, Unit, UnitName};

/// The result of checking one file: its problems, and the unit when it is valid.
#[derive(Debug)]
pub struct Checked {
    /// Errors and warnings, in line order.
    pub problems: Vec<Problem>,
    /// The validated unit, when there were no errors.
    pub unit: Option<Unit>,
}

impl Checked {
    fn failed(problem: Problem) -> Checked {
        Checked {
            problems: vec![problem],
            unit: None,
        }
    }

    /// True when the file has at least one error.
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }
}

/// Reads and checks the unit file at `path`; its base name is the unit's name.
///
/// Never reads more than [`units::MAX_UNIT_BYTES`] plus one byte, so pointing it
/// at a huge file or a device fails fast.
pub fn check_path(path: &Path) -> Checked {
    let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
        return Checked::failed(Problem::error(
            None,
            "the path has no file name to use as the unit name",
        ));
    };
    let name = match UnitName::from_user(file_name) {
        Ok(name) => name,
        Err(err) => return Checked::failed(Problem::error(None, err.to_string())),
    };
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|file| {
        file.take(units::MAX_UNIT_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
    });
    if let Err(err) = read {
        return Checked::failed(Problem::error(None, format!("cannot read the file: {err}")));
    }
    if bytes.len() > units::MAX_UNIT_BYTES {
        return Checked::failed(Problem::error(
            None,
            format!(
                "the file is larger than {} bytes, the limit for a unit file",
                units::MAX_UNIT_BYTES
            ),
        ));
    }
    check_bytes(&name, &bytes)
}

/// Checks a unit body given as raw bytes, reporting bad UTF-8 with its line.
pub fn check_bytes(name: &UnitName, bytes: &[u8]) -> Checked {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let line = bytes[..err.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            return Checked::failed(Problem::error(
                u32::try_from(line).ok(),
                "the file is not valid UTF-8",
            ));
        }
    };
    match Unit::from_text(name, text) {
        Ok(unit) => Checked {
            problems: unit.warnings().to_vec(),
            unit: Some(unit),
        },
        Err(err) => Checked {
            problems: err.problems(),
            unit: None,
        },
    }
}

/// Renders one file's report: `FILE:LINE: error: message` per problem, then
/// optionally the canonical form of a valid unit.
pub fn report(path: &Path, checked: &Checked, print: bool) -> String {
    let mut out = String::new();
    let shown = path.display();
    for problem in &checked.problems {
        let kind = if problem.is_error() {
            "error"
        } else {
            "warning"
        };
        match problem.line {
            Some(line) => writeln!(out, "{shown}:{line}: {kind}: {}", problem.message),
            None => writeln!(out, "{shown}: {kind}: {}", problem.message),
        }
        .expect("writing to a String cannot fail");
    }
    if let Some(unit) = &checked.unit {
        let kind = match unit.kind() {
            units::UnitKind::Plain => "unit",
            units::UnitKind::Template => "template",
            units::UnitKind::Instance => "instance",
        };
        writeln!(out, "{shown}: ok: {kind} {} ({})", unit.name(), unit.hash())
            .expect("writing to a String cannot fail");
        if print {
            out.push_str(&unit.file().to_text());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_is_reported_on_its_line() {
        let name = UnitName::parse("a.service").unwrap();
        let checked = check_bytes(&name, b"[Service]\nExecStart=/bin/\xff\n");
        assert!(checked.has_errors());
        assert_eq!(checked.problems[0].line, Some(2));
    }

    #[test]
    fn report_prefixes_file_and_line() {
        let name = UnitName::parse("a.service").unwrap();
        let checked = check_bytes(&name, b"[Service]\nbroken\n");
        let text = report(Path::new("dir/a.service"), &checked, false);
        assert!(
            text.starts_with("dir/a.service:2: error: missing '='"),
            "{text}"
        );
    }
}
