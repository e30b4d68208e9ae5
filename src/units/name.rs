//! Unit names: what systemd accepts, minus everything that could escape a directory.
//!
//! A unit name becomes a file name under `/run/flotilla/units/` on every host that
//! runs it and an argument to systemctl, ssh and journalctl. So the rules are
//! stricter than systemd's: only `[a-zA-Z0-9:_.@-]`, at most 255 bytes, no `..`,
//! no leading `.` or `-`, a known unit type suffix, and at most one `@`.

use std::fmt;
use std::sync::Arc;

use super::Error;

/// systemd's limit on a unit name (`UNIT_NAME_MAX` minus the NUL byte).
pub const MAX_NAME_LEN: usize = 255;

/// The unit types systemd knows, as written after the last `.`.
pub const UNIT_SUFFIXES: [&str; 11] = [
    "service",
    "socket",
    "timer",
    "path",
    "mount",
    "automount",
    "target",
    "slice",
    "swap",
    "device",
    "scope",
];

/// What role a name plays in systemd's template mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// `web.service`: an ordinary unit.
    Plain,
    /// `web@.service`: a template; never scheduled itself, only its instances.
    Template,
    /// `web@1.service`: an instance of the template `web@.service`.
    Instance,
}

/// A validated unit name such as `web@1.service`.
///
/// Holding one proves the name is safe to use as a file name and a command
/// argument; the only ways to build one run the checks in this module.
///
/// The text is shared (`Arc<str>`), so a clone costs a count, not an
/// allocation: the scheduler's indexes on the Raft leader key several maps
/// by the same names, which at 100,000 units was one heap copy of every name
/// per map (issue 14).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitName(Arc<str>);

impl UnitName {
    /// Validates `name` exactly as given: it must already carry a unit type suffix.
    pub fn parse(name: &str) -> Result<UnitName, Error> {
        check(name).map_err(|reason| Error::InvalidName {
            name: name.to_string(),
            reason,
        })?;
        Ok(UnitName(Arc::from(name)))
    }

    /// Validates a name typed by a user, appending `.service` when it has no suffix at all.
    ///
    /// This is fleetctl's behaviour: `flotilla start web@1` means `web@1.service`.
    /// A name that has a dot but an unknown suffix is an error with a hint rather
    /// than a silent `.service`, so a typo like `web.sevice` is caught.
    pub fn from_user(name: &str) -> Result<UnitName, Error> {
        if !name.is_empty() && !name.contains('.') {
            let with_suffix = format!("{name}.service");
            return UnitName::parse(&with_suffix).map_err(|_| {
                // Report against what the user typed, not our rewrite of it.
                match UnitName::parse(name) {
                    Err(err) => err,
                    Ok(_) => unreachable!("a name without '.' never has a valid suffix"),
                }
            });
        }
        UnitName::parse(name)
    }

    /// The name as a string, e.g. `web@1.service`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Plain, template or instance.
    pub fn kind(&self) -> UnitKind {
        match self.instance() {
            None => UnitKind::Plain,
            Some("") => UnitKind::Template,
            Some(_) => UnitKind::Instance,
        }
    }

    /// The unit type after the last dot: `service` for `web@1.service`.
    pub fn suffix(&self) -> &str {
        let dot = self.0.rfind('.').expect("validated names have a suffix");
        &self.0[dot + 1..]
    }

    /// The name without its suffix: `web@1` for `web@1.service` (systemd's `%N`).
    pub fn stem(&self) -> &str {
        let dot = self.0.rfind('.').expect("validated names have a suffix");
        &self.0[..dot]
    }

    /// The part before `@`, or the whole stem: `web` for `web@1.service` (systemd's `%p`).
    pub fn prefix(&self) -> &str {
        let stem = self.stem();
        stem.split_once('@').map_or(stem, |(prefix, _)| prefix)
    }

    /// The instance string: `Some("1")` for `web@1.service`, `Some("")` for a
    /// template, `None` for a plain unit (systemd's `%i`).
    pub fn instance(&self) -> Option<&str> {
        self.stem().split_once('@').map(|(_, instance)| instance)
    }

    /// The template an instance was made from: `web@.service` for `web@1.service`.
    pub fn template(&self) -> Option<UnitName> {
        match self.kind() {
            UnitKind::Instance => Some(UnitName(Arc::from(format!(
                "{}@.{}",
                self.prefix(),
                self.suffix()
            )))),
            _ => None,
        }
    }

    /// The instance `instance` of this template: `web@.service` + `1` = `web@1.service`.
    pub fn instantiate(&self, instance: &str) -> Result<UnitName, Error> {
        if self.kind() != UnitKind::Template {
            return Err(Error::InvalidName {
                name: self.0.to_string(),
                reason: "only a template (name@.type) has instances".to_string(),
            });
        }
        if instance.is_empty() {
            return Err(Error::InvalidName {
                name: self.0.to_string(),
                reason: "the instance string is empty".to_string(),
            });
        }
        UnitName::parse(&format!("{}@{instance}.{}", self.prefix(), self.suffix()))
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for UnitName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for UnitName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for UnitName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        UnitName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A name quoted for an error message, with control characters made visible.
pub(crate) fn show(name: &str) -> String {
    const SHOWN: usize = 80;
    let escaped: String = name.escape_debug().collect();
    if escaped.chars().count() > SHOWN {
        let cut: String = escaped.chars().take(SHOWN).collect();
        format!("\"{cut}\"... ({} bytes)", name.len())
    } else {
        format!("\"{escaped}\"")
    }
}

fn is_allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-')
}

/// Returns why `name` is not a safe unit name, or `Ok(())`.
fn check(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} bytes long; systemd's limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name.chars().find(|c| !is_allowed_char(*c)) {
        let why = match bad {
            '/' => " (unit names become file names on every host, so no paths)".to_string(),
            '\0' => " (NUL byte)".to_string(),
            c if c.is_control() => " (control character)".to_string(),
            _ => String::new(),
        };
        return Err(format!(
            "character {:?} is not allowed{why}; use only letters, digits and ':' '_' '.' '@' '-'",
            bad
        ));
    }
    if name.contains("..") {
        return Err("'..' is not allowed in a unit name".to_string());
    }
    if name.starts_with('.') {
        return Err("a unit name cannot start with '.'".to_string());
    }
    if name.starts_with('-') {
        return Err("a unit name cannot start with '-' (it would read as an option)".to_string());
    }
    let Some(dot) = name.rfind('.') else {
        return Err(format!(
            "the name has no unit type; add one such as '.service' (known: {})",
            UNIT_SUFFIXES.join(", ")
        ));
    };
    let (stem, suffix) = (&name[..dot], &name[dot + 1..]);
    if !UNIT_SUFFIXES.contains(&suffix) {
        let meant = match super::suggest::closest(suffix, &UNIT_SUFFIXES) {
            Some(known) => format!("{stem}.{known}"),
            None => format!("{name}.service"),
        };
        return Err(format!(
            "unknown unit type '.{suffix}'; known types: {} (did you mean {meant}?)",
            UNIT_SUFFIXES.join(", ")
        ));
    }
    if stem.is_empty() {
        return Err("the name before the unit type is empty".to_string());
    }
    match stem.matches('@').count() {
        0 => Ok(()),
        1 if stem.starts_with('@') => {
            Err("a template or instance needs a prefix before '@' (as in web@1.service)".into())
        }
        1 => Ok(()),
        _ => Err("a unit name may contain at most one '@'".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_template_and_instance_names() {
        let cases = [
            ("web.service", UnitKind::Plain),
            ("web@.service", UnitKind::Template),
            ("web@1.service", UnitKind::Instance),
            ("web@eu-1:a_b.c.service", UnitKind::Instance),
            ("db.socket", UnitKind::Plain),
            ("backup.timer", UnitKind::Plain),
            ("a.b.target", UnitKind::Plain),
        ];
        for (name, kind) in cases {
            let parsed = UnitName::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(parsed.kind(), kind, "{name}");
            assert_eq!(parsed.as_str(), name);
        }
    }

    #[test]
    fn accepts_every_known_suffix() {
        for suffix in UNIT_SUFFIXES {
            assert!(UnitName::parse(&format!("x.{suffix}")).is_ok(), "{suffix}");
        }
    }

    #[test]
    fn rejects_hostile_and_malformed_names() {
        let long = format!("{}.service", "a".repeat(248));
        let cases = [
            "",
            "..",
            "../../etc/x",
            "../../etc/x.service",
            "a/b.service",
            "/etc/passwd.service",
            "a..service",
            "foo..bar.service",
            ".service",
            ".hidden.service",
            "-.slice",
            "--help.service",
            "nul\0.service",
            "bell\u{7}.service",
            "new\nline.service",
            "tab\t.service",
            "sp ace.service",
            "quote\".service",
            "dollar$.service",
            "star*.service",
            "back\\slash.service",
            "caf\u{e9}.service",
            "web",
            "web.bogus",
            "web.",
            "@.service",
            "@1.service",
            "a@b@c.service",
            &long,
        ];
        for name in cases {
            let err = UnitName::parse(name).expect_err(name);
            assert!(
                matches!(err, Error::InvalidName { .. }),
                "{name:?} gave {err:?}"
            );
        }
        assert_eq!(long.len(), 256);
        assert!(UnitName::parse(&long[1..]).is_ok(), "255 bytes is allowed");
    }

    #[test]
    fn error_messages_show_control_characters_escaped() {
        let err = UnitName::parse("x\u{1b}[31m.service")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\\u{1b}"), "{err}");
        assert!(!err.contains('\u{1b}'), "{err}");
    }

    #[test]
    fn user_names_get_service_appended_only_without_a_suffix() {
        assert_eq!(UnitName::from_user("web").unwrap().as_str(), "web.service");
        assert_eq!(
            UnitName::from_user("web@1").unwrap().as_str(),
            "web@1.service"
        );
        assert_eq!(
            UnitName::from_user("db.socket").unwrap().as_str(),
            "db.socket"
        );
        let err = UnitName::from_user("web.sevice").unwrap_err().to_string();
        assert!(err.contains("did you mean web.service?"), "{err}");
        let err = UnitName::from_user("myapp@3.serivce")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean myapp@3.service?"), "{err}");
        let err = UnitName::from_user("web.conf").unwrap_err().to_string();
        assert!(err.contains("did you mean web.conf.service?"), "{err}");
        let err = UnitName::from_user("../x").unwrap_err().to_string();
        assert!(err.contains("\"../x\""), "reports the typed name: {err}");
        assert!(UnitName::from_user("").is_err());
    }

    #[test]
    fn parts_of_an_instance_name() {
        let name = UnitName::parse("web@eu.1.service").unwrap();
        assert_eq!(name.prefix(), "web");
        assert_eq!(name.stem(), "web@eu.1");
        assert_eq!(name.instance(), Some("eu.1"));
        assert_eq!(name.suffix(), "service");
        assert_eq!(name.template().unwrap().as_str(), "web@.service");
        let plain = UnitName::parse("db.service").unwrap();
        assert_eq!(plain.prefix(), "db");
        assert_eq!(plain.instance(), None);
        assert_eq!(plain.template(), None);
    }

    #[test]
    fn templates_instantiate_and_others_do_not() {
        let template = UnitName::parse("web@.service").unwrap();
        assert_eq!(template.instantiate("1").unwrap().as_str(), "web@1.service");
        assert!(template.instantiate("").is_err());
        assert!(template.instantiate("a/b").is_err());
        assert!(template.instantiate("a@b").is_err());
        let instance = UnitName::parse("web@1.service").unwrap();
        assert!(instance.instantiate("2").is_err());
        assert!(
            UnitName::parse("db.service")
                .unwrap()
                .instantiate("1")
                .is_err()
        );
    }

    #[test]
    fn deserializing_validates() {
        let ok: UnitName = toml::Value::String("a.service".into()).try_into().unwrap();
        assert_eq!(ok.as_str(), "a.service");
        let bad: Result<UnitName, _> = toml::Value::String("../a.service".into()).try_into();
        assert!(bad.is_err());
    }
}
