//! The `[X-Fleet]` section: where a unit may run, with fleet v1.0.0's semantics.
//!
//! * `MachineID=` a full machine id or its 8-character prefix; only the first value counts.
//! * `MachineOf=` exact unit names that must all run on the chosen machine (AND).
//! * `MachineMetadata=` `key=value`: OR within a key, AND across keys. A value holds
//!   several entries only when quoted, as in `"region=eu" "region=us"`. Beyond
//!   fleet, `key!=value` excludes machines with that value (fleet issue #1424).
//! * `Conflicts=` globs (whitespace-separated or repeated) of units that must not
//!   share the machine; symmetric: either side's globs keep the two apart.
//! * `Global=` true/yes/1/on/t (any case) runs the unit on every eligible machine;
//!   the last value wins.
//! * `Replaces=` globs of units this one displaces to another machine.
//!
//! The specifiers `%n %N %p %i` are expanded in every value, so a template can
//! say `MachineOf=app@%i.service`. A template is checked as a template: a
//! `MachineID=` or `MachineMetadata=` value that uses `%i` means something
//! only for an instance (fleet's `MachineMetadata=hostname=%i`), so it is
//! checked, and counts, when an instance is made. As in systemd, an empty value clears the
//! values given before it for that key. fleet's deprecated spellings
//! (`X-ConditionMachineOf=`, `X-Conflicts=`, ...) are accepted with a warning;
//! unknown keys are a warning, not an error, so newer unit files still load.

use std::collections::{BTreeMap, BTreeSet};

use super::Error;
use super::file::UnitFile;
use super::glob::UnitGlob;
use super::name::{UnitKind, UnitName};
use super::problem::{Problem, Problems};

/// The section name fleet and flotilla read scheduling requirements from.
pub const SECTION: &str = "X-Fleet";

/// The keys flotilla understands in `[X-Fleet]`, in documentation order.
pub const KEYS: [&str; 7] = [
    "MachineID",
    "MachineOf",
    "MachineMetadata",
    "Conflicts",
    "Global",
    "Replaces",
    "FenceAfter",
];

/// The longest `FenceAfter=` accepted, in seconds (a day).
pub const MAX_FENCE_AFTER_SECS: u64 = 86_400;

/// Which values one `MachineMetadata` key accepts and refuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataRule {
    /// The machine's value must be one of these (when non-empty).
    pub allowed: BTreeSet<String>,
    /// The machine's value must be none of these; a machine without the key passes.
    pub denied: BTreeSet<String>,
}

impl MetadataRule {
    fn admits(&self, value: Option<&str>) -> bool {
        let allowed = self.allowed.is_empty() || value.is_some_and(|v| self.allowed.contains(v));
        let denied = value.is_some_and(|v| self.denied.contains(v));
        allowed && !denied
    }
}

/// A unit's scheduling requirements, read from its `[X-Fleet]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requirements {
    /// Required machine: a full 32-digit id or an 8-digit prefix, lowercase.
    pub machine_id: Option<String>,
    /// Units that must already run on the chosen machine.
    pub machine_of: Vec<UnitName>,
    /// Metadata rules per key; all keys must be satisfied.
    pub metadata: BTreeMap<String, MetadataRule>,
    /// Globs of units that must not share a machine with this one.
    pub conflicts: Vec<UnitGlob>,
    /// Run on every eligible machine instead of one.
    pub global: bool,
    /// Globs of units this one displaces to another machine.
    pub replaces: Vec<UnitGlob>,
    /// flotilla's own key: stop the unit on a host cut off from the cluster
    /// this many seconds, for singletons where two copies are worse than none.
    pub fence_after_secs: Option<u64>,
}

impl Requirements {
    /// Reads the requirements of the unit `name` from `file`.
    ///
    /// Returns the requirements and any warnings, or every error found.
    pub fn parse(name: &UnitName, file: &UnitFile) -> Result<(Requirements, Vec<Problem>), Error> {
        let (requirements, problems) = Self::read(name, file);
        let warnings = problems.into_result()?;
        Ok((requirements, warnings))
    }

    /// Like [`Requirements::parse`], but hands back the problems for the caller to merge.
    pub(crate) fn read(name: &UnitName, file: &UnitFile) -> (Requirements, Problems) {
        let mut problems = Problems::default();
        let values = collect_values(name, file, &mut problems);
        let requirements = build(name, &values, &mut problems);
        check_combinations(&requirements, &values, &mut problems);
        (requirements, problems)
    }

    /// True when a machine with this id satisfies `MachineID=` (or there is none).
    pub fn admits_machine_id(&self, machine_id: &str) -> bool {
        self.machine_id
            .as_deref()
            .is_none_or(|wanted| id_matches(wanted, machine_id))
    }

    /// The first metadata key whose rule a machine with `metadata` fails, if any.
    pub fn unmet_metadata<'a>(&'a self, metadata: &BTreeMap<String, String>) -> Option<&'a str> {
        self.metadata
            .iter()
            .find(|(key, rule)| !rule.admits(metadata.get(*key).map(String::as_str)))
            .map(|(key, _)| key.as_str())
    }

    /// This unit's `Conflicts=` glob that matches `other`, if any.
    pub fn conflict_glob_for(&self, other: &UnitName) -> Option<&UnitGlob> {
        self.conflicts.iter().find(|g| g.matches(other.as_str()))
    }

    /// This unit's `Replaces=` glob that matches `other`, if any.
    pub fn replace_glob_for(&self, other: &UnitName) -> Option<&UnitGlob> {
        self.replaces.iter().find(|g| g.matches(other.as_str()))
    }
}

/// The `[X-Fleet]` options of `file` whose key flotilla does not know, with
/// their lines. They are only a warning to the cluster (newer files still
/// load), but a typo among them silently drops a placement rule, so the CLI
/// refuses them unless forced.
pub fn unknown_keys(file: &UnitFile) -> Vec<(&str, Option<u32>)> {
    file.section(SECTION)
        .filter(|(option, _)| Key::lookup(&option.name).is_none())
        .map(|(option, line)| (option.name.as_str(), line))
        .collect()
}

/// True when `key` may name a machine metadata key: letters, digits, `-`, `_`, `.`.
///
/// The same rule binds `MachineMetadata=` in unit files and `metadata` in the
/// daemon's configuration, so every key a machine can have is one a unit can ask for.
pub fn is_metadata_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// True when `wanted` (a full id or an 8-character prefix) names `machine_id`.
pub fn id_matches(wanted: &str, machine_id: &str) -> bool {
    wanted == machine_id || (wanted.len() == 8 && machine_id.get(..8) == Some(wanted))
}

/// How a key spelled in the file maps onto the requirement it sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    MachineId,
    MachineIdDeprecated,
    MachineBootIdLegacy,
    MachineOf,
    MachineMetadata,
    Conflicts,
    Global,
    Replaces,
    FenceAfter,
}

impl Key {
    /// The key for a spelling, and the modern spelling when this one is deprecated.
    fn lookup(spelling: &str) -> Option<(Key, Option<&'static str>)> {
        Some(match spelling {
            "MachineID" => (Key::MachineId, None),
            "MachineOf" => (Key::MachineOf, None),
            "MachineMetadata" => (Key::MachineMetadata, None),
            "Conflicts" => (Key::Conflicts, None),
            "Global" => (Key::Global, None),
            "Replaces" => (Key::Replaces, None),
            "FenceAfter" => (Key::FenceAfter, None),
            "X-ConditionMachineID" => (Key::MachineIdDeprecated, Some("MachineID")),
            "X-ConditionMachineBootID" => (Key::MachineBootIdLegacy, Some("MachineID")),
            "X-ConditionMachineOf" => (Key::MachineOf, Some("MachineOf")),
            "X-ConditionMachineMetadata" => (Key::MachineMetadata, Some("MachineMetadata")),
            "X-Conflicts" => (Key::Conflicts, Some("Conflicts")),
            _ => return None,
        })
    }

    /// Keys whose values are unit names or globs, which can never contain spaces.
    fn splits_on_whitespace(self) -> bool {
        matches!(self, Key::MachineOf | Key::Conflicts | Key::Replaces)
    }

    fn display(self) -> &'static str {
        match self {
            Key::MachineId | Key::MachineIdDeprecated | Key::MachineBootIdLegacy => "MachineID",
            Key::MachineOf => "MachineOf",
            Key::MachineMetadata => "MachineMetadata",
            Key::Conflicts => "Conflicts",
            Key::Global => "Global",
            Key::Replaces => "Replaces",
            Key::FenceAfter => "FenceAfter",
        }
    }
}

/// One value of one key after splitting and specifier expansion, with its line.
#[derive(Debug, Clone)]
struct Value {
    text: String,
    line: Option<u32>,
    /// A template's value that uses `%i`: it has a meaning only per instance.
    per_instance: bool,
}

type Values = BTreeMap<Key, Vec<Value>>;

/// Gathers the `[X-Fleet]` values per key, applying resets, splitting and specifiers.
fn collect_values(name: &UnitName, file: &UnitFile, problems: &mut Problems) -> Values {
    let mut values = Values::new();
    for (option, line) in file.section(SECTION) {
        let Some((key, modern)) = Key::lookup(&option.name) else {
            let hint = match super::suggest::closest(&option.name, &KEYS) {
                Some(known) => format!("did you mean {known}=?"),
                None => format!("known keys: {}", KEYS.join(", ")),
            };
            problems.warning(
                line,
                format!("unknown [X-Fleet] key {:?} is ignored; {hint}", option.name),
            );
            continue;
        };
        if let Some(modern) = modern {
            problems.warning(
                line,
                format!("{} is deprecated; write {modern}= instead", option.name),
            );
        }
        let list = values.entry(key).or_default();
        if option.value.is_empty() {
            list.clear();
            continue;
        }
        for entry in split_quoted(&option.value) {
            let expanded = expand_specifiers(&entry, name);
            let per_instance = name.kind() == UnitKind::Template && entry.contains("%i");
            if key.splits_on_whitespace() {
                list.extend(expanded.split_whitespace().map(|text| Value {
                    text: text.to_string(),
                    line,
                    per_instance,
                }));
            } else {
                list.push(Value {
                    text: expanded,
                    line,
                    per_instance,
                });
            }
        }
    }
    values.retain(|_, list| !list.is_empty());
    values
}

/// fleet's multi-value rule: `"a=1" "b=2"` is two values only when the whole value is quoted.
fn split_quoted(value: &str) -> Vec<String> {
    if value.len() < 2 || !value.starts_with('"') || !value.ends_with('"') {
        return vec![value.to_string()];
    }
    let mut entries = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => entries.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    entries.push(current);
    entries.retain(|e| !e.is_empty());
    entries
}

/// Expands `%n %N %p %i` the way fleet's `unitPrintf` does, in that order.
fn expand_specifiers(value: &str, name: &UnitName) -> String {
    if !value.contains('%') {
        return value.to_string();
    }
    value
        .replace("%n", name.as_str())
        .replace("%N", name.stem())
        .replace("%p", name.prefix())
        .replace("%i", name.instance().unwrap_or(""))
}

fn first_line(values: &Values, keys: &[Key]) -> Option<u32> {
    keys.iter()
        .filter_map(|key| values.get(key))
        .filter_map(|list| list.first())
        .find_map(|v| v.line)
}

fn build(name: &UnitName, values: &Values, problems: &mut Problems) -> Requirements {
    let mut requirements = Requirements::default();

    // fleet's precedence: the modern key, then the deprecated one, then the legacy boot id.
    let machine_ids = [
        Key::MachineId,
        Key::MachineIdDeprecated,
        Key::MachineBootIdLegacy,
    ]
    .iter()
    .find_map(|key| values.get(key));
    if let Some(ids) = machine_ids {
        let first = &ids[0];
        if ids.len() > 1 {
            problems.warning(
                ids[1].line,
                format!(
                    "MachineID is given {} times; only the first ({}) counts",
                    ids.len(),
                    first.text
                ),
            );
        }
        let id = first.text.to_ascii_lowercase();
        if first.per_instance {
            // Checked when an instance is made; a template never runs itself.
        } else if (id.len() == 32 || id.len() == 8) && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            requirements.machine_id = Some(id);
        } else {
            problems.error(
                first.line,
                format!(
                    "MachineID={:?} is not a machine id: give the 32 hex digits of /etc/machine-id \
                     or their first 8 (flotilla list-machines shows both)",
                    first.text
                ),
            );
        }
    }

    for value in values.get(&Key::MachineOf).into_iter().flatten() {
        match UnitName::parse(&value.text) {
            Err(err) => problems.error(value.line, format!("MachineOf: {err}")),
            Ok(peer) if peer == *name => problems.error(
                value.line,
                format!("MachineOf names the unit itself ({peer}); it could never be placed"),
            ),
            Ok(peer) if peer.kind() == UnitKind::Template && name.kind() != UnitKind::Template => {
                problems.error(
                    value.line,
                    format!(
                        "MachineOf names the template {peer}, which never runs itself; \
                         name an instance such as {}",
                        peer.instantiate("1")
                            .map_or_else(|_| peer.to_string(), |n| n.to_string())
                    ),
                )
            }
            Ok(peer) => {
                if !requirements.machine_of.contains(&peer) {
                    requirements.machine_of.push(peer);
                }
            }
        }
    }

    let metadata = values.get(&Key::MachineMetadata).into_iter().flatten();
    for value in metadata.filter(|v| !v.per_instance) {
        match parse_metadata(&value.text) {
            Err(reason) => problems.error(value.line, reason),
            Ok((key, wanted, negated)) => {
                let rule = requirements.metadata.entry(key.to_string()).or_default();
                let (set, other) = if negated {
                    (&mut rule.denied, &rule.allowed)
                } else {
                    (&mut rule.allowed, &rule.denied)
                };
                if other.contains(wanted) {
                    problems.error(
                        value.line,
                        format!(
                            "MachineMetadata both requires and excludes {key}={wanted}; \
                             no machine can match"
                        ),
                    );
                }
                set.insert(wanted.to_string());
            }
        }
    }

    for (key, target) in [
        (Key::Conflicts, &mut requirements.conflicts),
        (Key::Replaces, &mut requirements.replaces),
    ] {
        for value in values.get(&key).into_iter().flatten() {
            match UnitGlob::new(&value.text) {
                Ok(glob) if !target.contains(&glob) => target.push(glob),
                Ok(_) => {}
                Err(reason) => problems.error(value.line, format!("{}: {reason}", key.display())),
            }
        }
    }

    if let Some(last) = values.get(&Key::Global).and_then(|list| list.last()) {
        requirements.global = is_truthy(&last.text);
        if !requirements.global && !is_falsy(&last.text) {
            problems.warning(
                last.line,
                format!(
                    "Global={:?} is not a boolean and counts as false; write true or false",
                    last.text
                ),
            );
        }
    }
    if let Some(last) = values.get(&Key::FenceAfter).and_then(|list| list.last()) {
        match last.text.parse::<u64>() {
            Ok(secs) if (1..=MAX_FENCE_AFTER_SECS).contains(&secs) => {
                requirements.fence_after_secs = Some(secs);
            }
            _ => problems.error(
                last.line,
                format!(
                    "FenceAfter={:?} must be a whole number of seconds from 1 to {MAX_FENCE_AFTER_SECS}",
                    last.text
                ),
            ),
        }
    }
    requirements
}

/// Splits `key=value` or `key!=value`; returns (key, value, negated).
fn parse_metadata(text: &str) -> Result<(&str, &str, bool), String> {
    let (key, value, negated) = match text.split_once('=') {
        Some((key, value)) => match key.strip_suffix('!') {
            Some(key) => (key, value, true),
            None => (key, value, false),
        },
        None => ("", "", false),
    };
    if !is_metadata_key(key) || value.is_empty() || value.contains('=') {
        return Err(format!(
            "MachineMetadata entry {text:?} is not key=value or key!=value \
             (keys use letters, digits, '-', '_', '.'; quote several entries as \"a=1\" \"b=2\")"
        ));
    }
    Ok((key, value, negated))
}

fn is_truthy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "true" | "yes" | "1" | "on" | "t"
    )
}

fn is_falsy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "false" | "no" | "0" | "off" | "f"
    )
}

/// The combinations fleet's API refuses, with the reason a user can act on.
fn check_combinations(requirements: &Requirements, values: &Values, problems: &mut Problems) {
    let machine_id = [
        Key::MachineId,
        Key::MachineIdDeprecated,
        Key::MachineBootIdLegacy,
    ];
    let has = |keys: &[Key]| keys.iter().any(|k| values.contains_key(k));
    let global = requirements.global;
    let rules: [(bool, &[Key], &str); 7] = [
        (
            has(&machine_id) && has(&[Key::MachineOf]),
            &[Key::MachineOf],
            "MachineID cannot be used with MachineOf: a pinned unit cannot also follow another unit",
        ),
        (
            has(&machine_id) && has(&[Key::Conflicts]),
            &[Key::Conflicts],
            "MachineID cannot be used with Conflicts: a pinned unit has no other machine to avoid to",
        ),
        (
            has(&machine_id) && global,
            &[Key::Global],
            "MachineID cannot be used with Global: use MachineMetadata to limit a global unit",
        ),
        (
            has(&machine_id) && has(&[Key::Replaces]),
            &[Key::Replaces],
            "MachineID cannot be used with Replaces: a pinned unit cannot displace others elsewhere",
        ),
        (
            global && has(&[Key::MachineOf]),
            &[Key::MachineOf],
            "Global cannot be used with MachineOf: a global unit already runs everywhere eligible",
        ),
        (
            has(&[Key::Conflicts]) && has(&[Key::Replaces]),
            &[Key::Replaces],
            "Conflicts cannot be used with Replaces: choose one way to keep the units apart",
        ),
        (
            global && has(&[Key::Replaces]),
            &[Key::Replaces],
            "Global cannot be used with Replaces: a global unit has nowhere to displace others to",
        ),
    ];
    for (broken, at, message) in rules {
        if broken {
            problems.error(first_line(values, at), message);
        }
    }
    for peer in &requirements.machine_of {
        let line = values
            .get(&Key::MachineOf)
            .and_then(|list| list.iter().find(|v| v.text == peer.as_str()))
            .and_then(|v| v.line);
        if let Some(glob) = requirements.conflict_glob_for(peer) {
            problems.error(
                line,
                format!(
                    "unresolvable requirements: MachineOf peer {peer} matches this unit's Conflicts glob {glob}"
                ),
            );
        }
        if let Some(glob) = requirements.replace_glob_for(peer) {
            problems.error(
                line,
                format!(
                    "unresolvable requirements: MachineOf peer {peer} matches this unit's Replaces glob {glob}"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Severity;

    fn read(name: &str, xfleet: &str) -> (Requirements, Vec<Problem>) {
        let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}");
        let file = UnitFile::parse(&text).unwrap();
        let (req, problems) = Requirements::read(&UnitName::parse(name).unwrap(), &file);
        (req, problems.into_sorted())
    }

    fn ok(name: &str, xfleet: &str) -> Requirements {
        let (req, problems) = read(name, xfleet);
        assert!(
            problems.iter().all(|p| !p.is_error()),
            "{xfleet:?}: {problems:?}"
        );
        req
    }

    /// The errors for `xfleet`, as (line, message) pairs; lines count from the [X-Fleet] header (line 3).
    fn errors(name: &str, xfleet: &str) -> Vec<(Option<u32>, String)> {
        let (_, problems) = read(name, xfleet);
        let errors: Vec<_> = problems
            .into_iter()
            .filter(|p| p.severity == Severity::Error)
            .map(|p| (p.line, p.message))
            .collect();
        assert!(!errors.is_empty(), "expected an error for {xfleet:?}");
        errors
    }

    fn warnings(name: &str, xfleet: &str) -> Vec<String> {
        read(name, xfleet)
            .1
            .into_iter()
            .filter(|p| p.severity == Severity::Warning)
            .map(|p| p.message)
            .collect()
    }

    fn names(globs: &[UnitGlob]) -> Vec<&str> {
        globs.iter().map(UnitGlob::as_str).collect()
    }

    #[test]
    fn no_section_means_no_requirements() {
        assert_eq!(ok("a.service", ""), Requirements::default());
    }

    #[test]
    fn machine_id_full_or_prefix_first_value_only() {
        let full = "0123456789abcdef0123456789abcdef";
        let req = ok("a.service", &format!("MachineID={full}\n"));
        assert_eq!(req.machine_id.as_deref(), Some(full));
        assert!(req.admits_machine_id(full));
        assert!(!req.admits_machine_id("f123456789abcdef0123456789abcdef"));

        let req = ok("a.service", "MachineID=01234567\nMachineID=89abcdef\n");
        assert_eq!(req.machine_id.as_deref(), Some("01234567"));
        assert!(req.admits_machine_id(full));
        assert!(!req.admits_machine_id("89abcdef00000000000000000000000"));
        assert!(
            warnings("a.service", "MachineID=01234567\nMachineID=89abcdef\n")[0]
                .contains("only the first")
        );

        // Uppercase is normalised; a 7-digit prefix or a non-hex id is refused.
        assert_eq!(
            ok("a.service", "MachineID=ABCDEF01\n")
                .machine_id
                .as_deref(),
            Some("abcdef01")
        );
        assert_eq!(errors("a.service", "MachineID=0123456\n")[0].0, Some(4));
        errors(
            "a.service",
            "MachineID=not-a-machine-id-at-all-xxxxxxxxxx\n",
        );
    }

    #[test]
    fn prefix_matching_is_exactly_eight_characters() {
        assert!(id_matches("01234567", "0123456789abcdef0123456789abcdef"));
        assert!(!id_matches("0123456", "0123456789abcdef0123456789abcdef"));
        assert!(!id_matches("012345678", "0123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn deprecated_machine_id_spellings_and_precedence() {
        let req = ok("a.service", "X-ConditionMachineID=aaaaaaaa\n");
        assert_eq!(req.machine_id.as_deref(), Some("aaaaaaaa"));
        assert!(warnings("a.service", "X-ConditionMachineID=aaaaaaaa\n")[0].contains("deprecated"));
        let req = ok(
            "a.service",
            "X-ConditionMachineBootID=bbbbbbbb\nX-ConditionMachineID=aaaaaaaa\nMachineID=cccccccc\n",
        );
        assert_eq!(req.machine_id.as_deref(), Some("cccccccc"));
    }

    #[test]
    fn machine_of_is_a_list_of_exact_names() {
        let req = ok(
            "a.service",
            "MachineOf=db.service cache.service\nMachineOf=log.service\nX-ConditionMachineOf=x.service\n",
        );
        let peers: Vec<_> = req.machine_of.iter().map(UnitName::as_str).collect();
        assert_eq!(
            peers,
            ["db.service", "cache.service", "log.service", "x.service"]
        );
        errors("a.service", "MachineOf=../etc/x.service\n");
        errors("a.service", "MachineOf=db@*.service\n");
        errors("a.service", "MachineOf=a.service\n");
        assert!(
            errors("a.service", "MachineOf=db@.service\n")[0]
                .1
                .contains("db@1.service")
        );
    }

    #[test]
    fn metadata_or_within_key_and_across_keys() {
        let req = ok(
            "a.service",
            "MachineMetadata=\"region=eu\" \"region=us\"\nMachineMetadata=disk=ssd\n",
        );
        let md = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            req.unmet_metadata(&md(&[("region", "eu"), ("disk", "ssd")])),
            None
        );
        assert_eq!(
            req.unmet_metadata(&md(&[("region", "us"), ("disk", "ssd")])),
            None
        );
        assert_eq!(
            req.unmet_metadata(&md(&[("region", "ap"), ("disk", "ssd")])),
            Some("region")
        );
        assert_eq!(req.unmet_metadata(&md(&[("region", "eu")])), Some("disk"));
        assert_eq!(req.unmet_metadata(&md(&[])), Some("disk"));
    }

    #[test]
    fn metadata_value_is_multi_valued_only_when_quoted() {
        // Unquoted: one entry whose value contains a space (fleet: exact match on "eu us").
        let req = ok("a.service", "MachineMetadata=region=eu us\n");
        let rule = &req.metadata["region"];
        assert_eq!(rule.allowed.iter().collect::<Vec<_>>(), ["eu us"]);
    }

    #[test]
    fn metadata_negation_excludes_and_admits_machines_without_the_key() {
        let req = ok("a.service", "MachineMetadata=disk!=hdd\n");
        let md = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(req.unmet_metadata(&md(&[("disk", "hdd")])), Some("disk"));
        assert_eq!(req.unmet_metadata(&md(&[("disk", "ssd")])), None);
        assert_eq!(req.unmet_metadata(&md(&[])), None);
        // Mixed with a positive rule on another key: AND across keys.
        let req = ok("a.service", "MachineMetadata=\"disk!=hdd\" \"region=eu\"\n");
        assert_eq!(
            req.unmet_metadata(&md(&[("disk", "nvme"), ("region", "eu")])),
            None
        );
        assert_eq!(
            req.unmet_metadata(&md(&[("disk", "hdd"), ("region", "eu")])),
            Some("disk")
        );
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        for bad in ["x", "=v", "k=", "a=b=c", "k!=", "!=v", "k y=v"] {
            errors("a.service", &format!("MachineMetadata={bad}\n"));
        }
        errors("a.service", "MachineMetadata=\"disk=ssd\" \"disk!=ssd\"\n");
    }

    #[test]
    fn conflicts_whitespace_separated_repeated_and_deprecated() {
        let req = ok(
            "a.service",
            "Conflicts=web@*.service  db.service\nConflicts=cache*\nX-Conflicts=old.service\n",
        );
        assert_eq!(
            names(&req.conflicts),
            ["web@*.service", "db.service", "cache*", "old.service"]
        );
        assert!(
            errors("a.service", "Conflicts=web[.service\n")[0]
                .1
                .contains("invalid glob")
        );
    }

    #[test]
    fn global_truthy_values_last_wins() {
        for truthy in ["true", "TRUE", "yes", "Yes", "1", "on", "ON", "t", "T"] {
            assert!(
                ok("a.service", &format!("Global={truthy}\n")).global,
                "{truthy}"
            );
        }
        for falsy in ["false", "no", "0", "off", "f"] {
            assert!(
                !ok("a.service", &format!("Global={falsy}\n")).global,
                "{falsy}"
            );
        }
        assert!(!ok("a.service", "Global=true\nGlobal=false\n").global);
        assert!(ok("a.service", "Global=false\nGlobal=true\n").global);
        assert!(!ok("a.service", "Global=maybe\n").global);
        assert!(warnings("a.service", "Global=maybe\n")[0].contains("not a boolean"));
    }

    #[test]
    fn replaces_are_globs() {
        let req = ok("b.service", "Replaces=a*.service\n");
        assert!(
            req.replace_glob_for(&UnitName::parse("a1.service").unwrap())
                .is_some()
        );
        assert!(
            req.replace_glob_for(&UnitName::parse("b1.service").unwrap())
                .is_none()
        );
    }

    #[test]
    fn empty_value_resets_the_key() {
        let req = ok(
            "a.service",
            "Conflicts=x.service\nConflicts=\nConflicts=y.service\n",
        );
        assert_eq!(names(&req.conflicts), ["y.service"]);
        assert!(ok("a.service", "Global=true\nGlobal=\n").global.eq(&false));
        assert_eq!(
            ok("a.service", "MachineID=aaaaaaaa\nMachineID=\n").machine_id,
            None
        );
    }

    #[test]
    fn specifiers_expand_for_instances() {
        let req = ok(
            "app-sidekick@7.service",
            "MachineOf=app@%i.service\nConflicts=%p@*.service other-%N\nMachineMetadata=unit=%n\n",
        );
        assert_eq!(req.machine_of[0].as_str(), "app@7.service");
        assert_eq!(
            names(&req.conflicts),
            ["app-sidekick@*.service", "other-app-sidekick@7"]
        );
        assert!(
            req.metadata["unit"]
                .allowed
                .contains("app-sidekick@7.service")
        );
        // A template checks out with %i empty, as fleet did; its peer is a template then.
        let req = ok("app-sidekick@.service", "MachineOf=app@%i.service\n");
        assert_eq!(req.machine_of[0].as_str(), "app@.service");
    }

    #[test]
    fn templates_are_checked_as_templates_and_instances_when_made() {
        // fleet's own fixtures: metadata@.service and pin@.service.
        let xfleet = "MachineMetadata=hostname=%i\nMachineMetadata=region=eu\n";
        let template = ok("metadata@.service", xfleet);
        assert_eq!(template.metadata.keys().collect::<Vec<_>>(), ["region"]);
        let instance = ok("metadata@smoke1.service", xfleet);
        assert!(instance.metadata["hostname"].allowed.contains("smoke1"));
        assert!(ok("pin@.service", "MachineID=%i\n").machine_id.is_none());
        let id = "0123456789abcdef0123456789abcdef";
        let pinned = ok(&format!("pin@{id}.service"), "MachineID=%i\n");
        assert_eq!(pinned.machine_id.as_deref(), Some(id));
        // An instance whose expanded value is wrong is refused when made.
        assert!(!errors("pin@web1.service", "MachineID=%i\n").is_empty());
        assert!(
            ok("whole@.service", "MachineMetadata=%i\n")
                .metadata
                .is_empty()
        );
        assert!(!errors("whole@x.service", "MachineMetadata=%i\n").is_empty());
        // Values without %i are still checked on the template itself, and
        // so are combinations.
        assert!(!errors("pin@.service", "MachineID=web1\n").is_empty());
        assert!(!errors("pin@.service", "MachineID=%i\nGlobal=true\n").is_empty());
    }

    #[test]
    fn unknown_keys_warn_and_are_ignored() {
        let (req, problems) = read("a.service", "Conflict=typo.service\n");
        assert_eq!(req, Requirements::default());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].severity, Severity::Warning);
        assert_eq!(problems[0].line, Some(4));
        assert!(problems[0].message.contains("did you mean Conflicts=?"));
        let file = UnitFile::parse("[X-Fleet]\nMachinOf=a.service\nGlobal=true\n").unwrap();
        assert_eq!(unknown_keys(&file), [("MachinOf", Some(2))]);
    }

    #[test]
    fn every_rejected_combination() {
        let id = "MachineID=0123456789abcdef0123456789abcdef\n";
        let cases = [
            (
                format!("{id}MachineOf=b.service\n"),
                "MachineID cannot be used with MachineOf",
            ),
            (
                format!("{id}Conflicts=b*\n"),
                "MachineID cannot be used with Conflicts",
            ),
            (
                format!("{id}Global=true\n"),
                "MachineID cannot be used with Global",
            ),
            (
                format!("{id}Replaces=b*\n"),
                "MachineID cannot be used with Replaces",
            ),
            (
                "Global=true\nMachineOf=b.service\n".to_string(),
                "Global cannot be used with MachineOf",
            ),
            (
                "Conflicts=b*\nReplaces=c*\n".to_string(),
                "Conflicts cannot be used with Replaces",
            ),
            (
                "Global=yes\nReplaces=c*\n".to_string(),
                "Global cannot be used with Replaces",
            ),
            (
                "MachineOf=db.service\nConflicts=d*\n".to_string(),
                "MachineOf peer db.service matches this unit's Conflicts glob d*",
            ),
            (
                "MachineOf=db.service\nReplaces=db.*\n".to_string(),
                "MachineOf peer db.service matches this unit's Replaces glob db.*",
            ),
        ];
        for (xfleet, expected) in cases {
            let errors = errors("a.service", &xfleet);
            assert!(
                errors
                    .iter()
                    .any(|(line, m)| m.contains(expected) && line.is_some()),
                "{xfleet:?}: {errors:?}"
            );
        }
        // Allowed combinations stay allowed.
        ok(
            "a.service",
            "Global=true\nConflicts=b*\nMachineMetadata=role=web\n",
        );
        ok("a.service", "MachineOf=b.service\nConflicts=c*\n");
        ok("a.service", "Global=false\nMachineOf=b.service\n");
    }

    #[test]
    fn quoted_split_ignores_unbalanced_or_partial_quotes() {
        assert_eq!(split_quoted("\"a=1\" \"b=2\""), ["a=1", "b=2"]);
        assert_eq!(split_quoted("a=1 \"b=2\""), ["a=1 \"b=2\""]);
        assert_eq!(split_quoted("\"a=1 b=2\""), ["a=1 b=2"]);
        assert_eq!(split_quoted("\""), ["\""]);
    }
}
