//! Diagnostics: one problem found in a unit file, with the line it is on.

use std::fmt;

/// Whether a problem stops the unit from being accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Accepted, but probably not what the user meant (unknown `[X-Fleet]` key, ...).
    Warning,
    /// Refused: the unit cannot be stored or scheduled as written.
    Error,
}

/// One thing wrong with a unit file, located by line so an editor can jump to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// 1-based line in the submitted text, when the problem has one.
    pub line: Option<u32>,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl Problem {
    /// A problem that makes the unit unacceptable.
    pub fn error(line: Option<u32>, message: impl Into<String>) -> Self {
        Problem {
            severity: Severity::Error,
            line,
            message: message.into(),
        }
    }

    /// A problem worth telling the user about that does not stop the unit.
    pub fn warning(line: Option<u32>, message: impl Into<String>) -> Self {
        Problem {
            severity: Severity::Warning,
            line,
            message: message.into(),
        }
    }

    /// True when this problem refuses the unit.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        match self.line {
            Some(line) => write!(f, "line {line}: {kind}: {}", self.message),
            None => write!(f, "{kind}: {}", self.message),
        }
    }
}

/// One line describing a list of problems: its errors, joined, for an error message.
pub(crate) fn summary(problems: &[Problem]) -> String {
    let errors: Vec<String> = problems
        .iter()
        .filter(|p| p.is_error())
        .map(|p| match p.line {
            Some(line) => format!("line {line}: {}", p.message),
            None => p.message.clone(),
        })
        .collect();
    match errors.len() {
        0 => "no errors".to_string(),
        1 => errors[0].clone(),
        n => format!("{n} errors: {}", errors.join("; ")),
    }
}

/// Problems collected while checking one input, errors and warnings together.
///
/// Checks push into it instead of returning at the first error, so `flotilla
/// verify` can show every mistake in a file at once.
#[derive(Debug, Default, Clone)]
pub(crate) struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    pub(crate) fn error(&mut self, line: Option<u32>, message: impl Into<String>) {
        self.list.push(Problem::error(line, message));
    }

    pub(crate) fn warning(&mut self, line: Option<u32>, message: impl Into<String>) {
        self.list.push(Problem::warning(line, message));
    }

    pub(crate) fn extend(&mut self, other: Problems) {
        self.list.extend(other.list);
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.list.iter().any(Problem::is_error)
    }

    /// The problems sorted by line (problems without a line first), stable otherwise.
    pub(crate) fn into_sorted(mut self) -> Vec<Problem> {
        self.list.sort_by_key(|p| p.line.unwrap_or(0));
        self.list
    }

    /// `Ok(warnings)` when there are no errors, else the whole list as [`super::Error::Invalid`].
    pub(crate) fn into_result(self) -> Result<Vec<Problem>, super::Error> {
        if self.has_errors() {
            Err(super::Error::Invalid {
                problems: self.into_sorted(),
            })
        } else {
            Ok(self.into_sorted())
        }
    }
}
