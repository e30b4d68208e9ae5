//! The systemd unit-file parser and the canonical options list.
//!
//! Parsing follows systemd's own reader (`src/shared/conf-parser.c`): lines end
//! at `\n`, `\r\n` or `\r`; a line whose first non-blank character is `#` or `;`
//! is a comment wherever it appears, even inside a continuation; a line continues
//! when its last backslash is unescaped, that backslash becoming a space; keys
//! and values are trimmed; there are no inline comments and no quoting; repeated
//! keys are kept in order and an empty value is kept (it resets a list in systemd).
//!
//! Where systemd only logs a warning and skips a line (missing `=`, assignment
//! before any section), flotilla refuses the file: a scheduler should not
//! silently run something other than what the user wrote.
//!
//! The parsed form is the ordered list of `(section, name, value)` options, the
//! same shape fleet's API carries. Serialising it gives a file that parses back
//! to the same list, so comments and layout never change a unit's identity.

use serde::{Deserialize, Serialize};

use super::Error;
use super::MAX_UNIT_BYTES;
use super::hash::UnitHash;
use super::problem::Problems;

/// One `Name=Value` assignment and the section it belongs to; also fleet's
/// API's option object, `{"section","name","value"}` (nothing else).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitOption {
    /// Section name without brackets, e.g. `Service`.
    pub section: String,
    /// Key, e.g. `ExecStart`.
    pub name: String,
    /// Value with surrounding whitespace removed; may be empty.
    pub value: String,
}

/// A parsed unit file: its options in file order, and where each came from.
#[derive(Debug, Clone, Default)]
pub struct UnitFile {
    options: Vec<UnitOption>,
    /// 1-based first line of each option in the source text, parallel to `options`.
    lines: Vec<u32>,
}

impl PartialEq for UnitFile {
    /// Two files are equal when their canonical options are; layout does not count.
    fn eq(&self, other: &Self) -> bool {
        self.options == other.options
    }
}

impl Eq for UnitFile {}

impl UnitFile {
    /// Parses unit-file text; every error found is reported, each with its line.
    pub fn parse(text: &str) -> Result<UnitFile, Error> {
        let (file, problems) = UnitFile::parse_collecting(text)?;
        problems.into_result()?;
        Ok(file)
    }

    /// Parses as much as it can and hands back the problems beside the options.
    ///
    /// Lines with errors are left out of the file, so later checks (the
    /// `[X-Fleet]` rules) can still run and report everything in one pass.
    /// Only an oversized body fails outright.
    pub(crate) fn parse_collecting(text: &str) -> Result<(UnitFile, Problems), Error> {
        if text.len() > MAX_UNIT_BYTES {
            return Err(Error::TooLarge {
                size: text.len(),
                limit: MAX_UNIT_BYTES,
            });
        }
        let mut parser = Parser::default();
        let mut pending: Option<(u32, String)> = None;
        for (number, raw) in physical_lines(text) {
            if let Some(bad) = raw.chars().find(|c| c.is_control() && *c != '\t') {
                parser.problems.error(
                    Some(number),
                    format!("control character {bad:?} is not allowed in a unit file"),
                );
                continue;
            }
            let raw = if number == 1 {
                raw.strip_prefix('\u{feff}').unwrap_or(raw)
            } else {
                raw
            };
            if is_comment(raw) {
                continue;
            }
            let (start, mut logical) = match pending.take() {
                Some((start, mut joined)) => {
                    joined.push_str(raw);
                    (start, joined)
                }
                None => (number, raw.to_string()),
            };
            if ends_with_unescaped_backslash(&logical) {
                logical.pop();
                logical.push(' ');
                pending = Some((start, logical));
                continue;
            }
            parser.line(start, &logical);
        }
        if let Some((start, logical)) = pending {
            parser.line(start, &logical);
        }
        Ok((parser.file, parser.problems))
    }

    /// Builds a file from an options list (as fleet's API carries it), validating each option.
    ///
    /// The checks are the ones a parsed option passes by construction, so any
    /// list this accepts serialises to text that parses back to the same list.
    pub fn from_options(options: Vec<UnitOption>) -> Result<UnitFile, Error> {
        let mut problems = Problems::default();
        for (index, option) in options.iter().enumerate() {
            if let Err(reason) = check_option(option) {
                problems.error(None, format!("option {}: {reason}", index + 1));
            }
        }
        problems.into_result()?;
        let file = UnitFile {
            lines: vec![0; options.len()],
            options,
        };
        let size = file.to_text().len();
        if size > MAX_UNIT_BYTES {
            return Err(Error::TooLarge {
                size,
                limit: MAX_UNIT_BYTES,
            });
        }
        Ok(file)
    }

    /// The canonical options list, in file order.
    pub fn options(&self) -> &[UnitOption] {
        &self.options
    }

    /// Each option with the 1-based line it started on (`None` when built from a list).
    pub fn options_with_lines(&self) -> impl Iterator<Item = (&UnitOption, Option<u32>)> {
        self.options
            .iter()
            .zip(self.lines.iter().map(|&line| (line > 0).then_some(line)))
    }

    /// The options of one section, in order, with their lines.
    pub fn section<'a>(
        &'a self,
        section: &'a str,
    ) -> impl Iterator<Item = (&'a UnitOption, Option<u32>)> + 'a {
        self.options_with_lines()
            .filter(move |(option, _)| option.section == section)
    }

    /// True when the file has no options at all.
    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// The canonical form as unit-file text: what `flotilla cat` prints.
    ///
    /// A section header is written whenever the section changes, so options keep
    /// their order even when a section appears twice.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let mut current: Option<&str> = None;
        for option in &self.options {
            if current != Some(option.section.as_str()) {
                if current.is_some() {
                    text.push('\n');
                }
                text.push('[');
                text.push_str(&option.section);
                text.push_str("]\n");
                current = Some(&option.section);
            }
            text.push_str(&option.name);
            text.push('=');
            text.push_str(&option.value);
            if ends_with_unescaped_backslash(&option.value) {
                // `Key=\ ` means a value ending in a backslash; without the space
                // the backslash would continue the line.
                text.push(' ');
            }
            text.push('\n');
        }
        text
    }

    /// The SHA-256 of the canonical form: the unit's content address.
    pub fn hash(&self) -> UnitHash {
        UnitHash::of_text(&self.to_text())
    }
}

/// Splits text into numbered physical lines at `\n`, `\r\n` and `\r`, as systemd does.
fn physical_lines(text: &str) -> impl Iterator<Item = (u32, &str)> {
    let mut rest = Some(text);
    let mut number: u32 = 0;
    std::iter::from_fn(move || {
        let current = rest?;
        number = number.saturating_add(1);
        match current.find(['\n', '\r']) {
            Some(end) => {
                let after = if current[end..].starts_with("\r\n") {
                    end + 2
                } else {
                    end + 1
                };
                rest = Some(&current[after..]).filter(|r| !r.is_empty());
                Some((number, &current[..end]))
            }
            None => {
                rest = None;
                Some((number, current))
            }
        }
    })
}

fn is_comment(line: &str) -> bool {
    matches!(line.trim_start().chars().next(), Some('#' | ';'))
}

/// True when the line's last character is a backslash that is not itself escaped.
fn ends_with_unescaped_backslash(line: &str) -> bool {
    let mut escaped = false;
    for c in line.chars() {
        escaped = !escaped && c == '\\';
    }
    escaped
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_section(section: &str) -> Result<(), String> {
    if section.is_empty() {
        return Err("empty section name".to_string());
    }
    if let Some(bad) = section.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "section name {section:?} contains {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key before '='".to_string());
    }
    if let Some(bad) = key.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "key {key:?} contains {bad:?}; keys use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The rules a parsed option meets by construction, checked for options built from a list.
fn check_option(option: &UnitOption) -> Result<(), String> {
    check_section(&option.section)?;
    check_key(&option.name)?;
    let value = &option.value;
    if let Some(bad) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(format!(
            "value of {} contains control character {bad:?}",
            option.name
        ));
    }
    if value.trim() != value {
        return Err(format!(
            "value of {} has surrounding whitespace, which systemd would strip",
            option.name
        ));
    }
    Ok(())
}

/// The parser's state between logical lines.
#[derive(Default)]
struct Parser {
    file: UnitFile,
    section: Option<String>,
    /// The last section header was invalid: its options are not reported one by one.
    header_broken: bool,
    problems: Problems,
}

impl Parser {
    /// Handles one logical line (continuations already joined) that started on `number`.
    fn line(&mut self, number: u32, line: &str) {
        let line = line.trim();
        if line.is_empty() || is_comment(line) {
            return;
        }
        let at = Some(number);
        if let Some(header) = line.strip_prefix('[') {
            let Some(section) = header.strip_suffix(']') else {
                self.problems.error(
                    at,
                    format!("invalid section header {line:?}: expected [Name] alone on the line"),
                );
                self.section = None;
                self.header_broken = true;
                return;
            };
            match check_section(section) {
                Ok(()) => {
                    self.section = Some(section.to_string());
                    self.header_broken = false;
                }
                Err(reason) => {
                    self.problems.error(at, reason);
                    self.section = None;
                    self.header_broken = true;
                }
            }
            return;
        }
        let Some((key, value)) = line.split_once('=') else {
            self.problems.error(
                at,
                format!(
                    "missing '=' in {line:?}; lines are [Section] headers, Key=Value or # comments"
                ),
            );
            return;
        };
        let Some(section) = self.section.clone() else {
            // A broken header already has its own error; don't pile one on each line below it.
            if !self.header_broken {
                self.problems.error(
                    at,
                    "assignment outside of any section; add a header such as [Service] above it",
                );
            }
            return;
        };
        let (key, value) = (key.trim(), value.trim());
        if let Err(reason) = check_key(key) {
            self.problems.error(at, reason);
            return;
        }
        self.file.options.push(UnitOption {
            section,
            name: key.to_string(),
            value: value.to_string(),
        });
        self.file.lines.push(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opt(section: &str, name: &str, value: &str) -> UnitOption {
        UnitOption {
            section: section.into(),
            name: name.into(),
            value: value.into(),
        }
    }

    fn parse_ok(text: &str) -> UnitFile {
        UnitFile::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn error_lines(text: &str) -> Vec<Option<u32>> {
        match UnitFile::parse(text) {
            Err(Error::Invalid { problems }) => problems.iter().map(|p| p.line).collect(),
            other => panic!("expected errors for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn sections_repeated_keys_and_order() {
        let file = parse_ok(
            "[Unit]\nDescription=Web\nAfter=a.service\nAfter=b.service\n\n[Service]\nExecStart=/bin/true\n",
        );
        assert_eq!(
            file.options(),
            &[
                opt("Unit", "Description", "Web"),
                opt("Unit", "After", "a.service"),
                opt("Unit", "After", "b.service"),
                opt("Service", "ExecStart", "/bin/true"),
            ]
        );
        let lines: Vec<_> = file.options_with_lines().map(|(_, l)| l).collect();
        assert_eq!(lines, [Some(2), Some(3), Some(4), Some(7)]);
    }

    #[test]
    fn comments_only_at_line_start_with_hash_or_semicolon() {
        let file = parse_ok(
            "# top\n; also\n[Service]\n   # indented comment\nExecStart=/bin/echo #not a comment ;nor this\n",
        );
        assert_eq!(
            file.options(),
            &[opt(
                "Service",
                "ExecStart",
                "/bin/echo #not a comment ;nor this"
            )]
        );
    }

    #[test]
    fn whitespace_around_keys_and_values_is_trimmed() {
        let file = parse_ok("  [Service]  \n\t ExecStart \t=   /bin/true  x \t\n");
        assert_eq!(
            file.options(),
            &[opt("Service", "ExecStart", "/bin/true  x")]
        );
    }

    #[test]
    fn empty_values_are_kept_because_they_reset_lists() {
        let file = parse_ok("[Service]\nExecStart=\nExecStart=/bin/true\nEnvironment=  \n");
        assert_eq!(
            file.options(),
            &[
                opt("Service", "ExecStart", ""),
                opt("Service", "ExecStart", "/bin/true"),
                opt("Service", "Environment", ""),
            ]
        );
    }

    #[test]
    fn backslash_continues_a_line_and_becomes_a_space() {
        let file = parse_ok("[Service]\nExecStart=/bin/echo \\\n  one\\\ntwo\nUser=x\n");
        assert_eq!(
            file.options(),
            &[
                opt("Service", "ExecStart", "/bin/echo    one two"),
                opt("Service", "User", "x"),
            ]
        );
        let lines: Vec<_> = file.options_with_lines().map(|(_, l)| l).collect();
        assert_eq!(
            lines,
            [Some(2), Some(5)],
            "an option reports its first line"
        );
    }

    #[test]
    fn escaped_backslash_at_end_does_not_continue() {
        let file = parse_ok("[Service]\nExecStart=/bin/echo \\\\\nUser=x\n");
        assert_eq!(
            file.options(),
            &[
                opt("Service", "ExecStart", "/bin/echo \\\\"),
                opt("Service", "User", "x"),
            ]
        );
        // Three backslashes: the last one is unescaped again.
        let file = parse_ok("[Service]\nExecStart=a\\\\\\\nb\n");
        assert_eq!(file.options(), &[opt("Service", "ExecStart", "a\\\\ b")]);
    }

    #[test]
    fn a_value_ending_in_a_backslash_round_trips() {
        // Trailing blank after the backslash: no continuation, value ends in '\'.
        let file = parse_ok("[Service]\nA=x\\ \nB=y\n");
        assert_eq!(file.options()[0], opt("Service", "A", "x\\"));
        assert_eq!(file.to_text(), "[Service]\nA=x\\ \nB=y\n");
        assert_eq!(parse_ok(&file.to_text()), file);
    }

    #[test]
    fn comments_inside_a_continuation_are_dropped() {
        let file =
            parse_ok("[Service]\nExecStart=/bin/echo \\\n# dropped\n ; dropped too\n  end\n");
        assert_eq!(
            file.options(),
            &[opt("Service", "ExecStart", "/bin/echo    end")]
        );
    }

    #[test]
    fn a_blank_line_ends_a_continuation() {
        let file = parse_ok("[Service]\nExecStart=/bin/echo \\\n\nUser=x\n");
        assert_eq!(
            file.options(),
            &[
                opt("Service", "ExecStart", "/bin/echo"),
                opt("Service", "User", "x"),
            ]
        );
    }

    #[test]
    fn continuation_at_end_of_file_is_kept() {
        let file = parse_ok("[Service]\nExecStart=/bin/echo a\\");
        assert_eq!(
            file.options(),
            &[opt("Service", "ExecStart", "/bin/echo a")]
        );
    }

    #[test]
    fn crlf_and_cr_line_endings_and_bom() {
        let file = parse_ok("\u{feff}[Service]\r\nUser=a\rGroup=b\r\n");
        assert_eq!(
            file.options(),
            &[opt("Service", "User", "a"), opt("Service", "Group", "b")]
        );
    }

    #[test]
    fn errors_carry_line_numbers_and_all_are_reported() {
        assert_eq!(error_lines("User=x\n"), [Some(1)]);
        assert_eq!(error_lines("[Service]\nno equals here\n"), [Some(2)]);
        assert_eq!(error_lines("[Service\nUser=x\n"), [Some(1)]);
        assert_eq!(error_lines("[]\n"), [Some(1)]);
        assert_eq!(error_lines("[Unit] trailing\n"), [Some(1)]);
        assert_eq!(error_lines("[Bad Name]\n"), [Some(1)]);
        assert_eq!(error_lines("[Service]\n=value\n"), [Some(2)]);
        assert_eq!(error_lines("[Service]\nExec Start=x\n"), [Some(2)]);
        assert_eq!(error_lines("[Service]\nUser=a\u{1}b\n"), [Some(2)]);
        assert_eq!(error_lines("[Service]\nUser=a\0b\n"), [Some(2)]);
        assert_eq!(
            error_lines("[Service]\nbad one\nUser=x\nbad two\n"),
            [Some(2), Some(4)]
        );
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let big = format!("[Service]\nEnvironment={}\n", "a".repeat(MAX_UNIT_BYTES));
        assert!(matches!(UnitFile::parse(&big), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn comment_only_changes_do_not_change_the_hash() {
        let a = parse_ok("[Service]\nExecStart=/bin/true\n");
        let b = parse_ok("# v2\n[Service]\n; note\n  ExecStart =  /bin/true\n\n");
        assert_eq!(a.hash(), b.hash());
        let c = parse_ok("[Service]\nExecStart=/bin/false\n");
        assert_ne!(a.hash(), c.hash());
    }

    #[test]
    fn serialisation_keeps_order_across_repeated_sections() {
        let file = parse_ok("[A]\nx=1\n[B]\ny=2\n[A]\nz=3\n");
        assert_eq!(file.to_text(), "[A]\nx=1\n\n[B]\ny=2\n\n[A]\nz=3\n");
        assert_eq!(parse_ok(&file.to_text()), file);
    }

    #[test]
    fn options_lists_are_validated() {
        assert!(UnitFile::from_options(vec![opt("Service", "ExecStart", "/bin/true")]).is_ok());
        for bad in [
            opt("", "a", "b"),
            opt("Se]rvice", "a", "b"),
            opt("Service", "", "b"),
            opt("Service", "a=b", "c"),
            opt("Service", "a", " padded"),
            opt("Service", "a", "line\nbreak"),
        ] {
            assert!(
                UnitFile::from_options(vec![bad.clone()]).is_err(),
                "{bad:?}"
            );
        }
    }

    /// Arbitrary text built from the characters that matter to the parser.
    fn unit_text() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            Just("[Service]".to_string()),
            Just("[X-Fleet]".to_string()),
            "[A-Za-z]{1,6}=[ a-z\\\\#;=\\[\\]]{0,10}",
            " *[#;][ a-z]{0,5}",
            "[ a-z\\\\]{0,8}",
            Just(String::new()),
        ];
        let ending = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        proptest::collection::vec((line, ending), 0..12).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(line, end)| format!("{line}{end}"))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn parsed_files_round_trip(text in unit_text()) {
            if let Ok(file) = UnitFile::parse(&text) {
                let again = UnitFile::parse(&file.to_text()).expect("canonical text parses");
                prop_assert_eq!(again.options(), file.options());
                prop_assert_eq!(again.hash(), file.hash());
            }
        }

        #[test]
        fn parser_never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = UnitFile::parse(&text);
        }

        #[test]
        fn valid_option_lists_round_trip(
            options in proptest::collection::vec(
                ("[A-Z][a-z-]{0,5}", "[A-Za-z][A-Za-z0-9_]{0,6}", "([!-~]([ -~]{0,10}[!-\\[\\]-~])?)?"),
                0..10,
            )
        ) {
            let options: Vec<UnitOption> = options
                .into_iter()
                .map(|(s, n, v)| opt(&s, &n, &v))
                .collect();
            let file = UnitFile::from_options(options.clone()).expect("generated options are valid");
            let again = UnitFile::parse(&file.to_text()).expect("canonical text parses");
            prop_assert_eq!(again.options(), &options[..]);
        }
    }
}
