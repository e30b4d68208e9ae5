//! Shell-style globs over unit names, as fleet's `Conflicts=` and `Replaces=` use them.
//!
//! fleet matched with Go's `path.Match`: `*`, `?`, `[...]` classes and `\` escapes.
//! Matching is delegated to `globset`; this type keeps the source text for
//! messages and compares by it.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

/// A compiled glob such as `web@*.service`.
#[derive(Clone)]
pub struct UnitGlob {
    text: String,
    matcher: GlobMatcher,
}

impl UnitGlob {
    /// Compiles `text`, or says why it is not a valid glob.
    pub fn new(text: &str) -> Result<UnitGlob, String> {
        let glob = GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("invalid glob {text:?}: {}", e.kind()))?;
        Ok(UnitGlob {
            text: text.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    /// True when `name` matches this glob.
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for UnitGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for UnitGlob {}

impl fmt::Debug for UnitGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitGlob({:?})", self.text)
    }
}

impl fmt::Display for UnitGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_glob_semantics() {
        let cases = [
            ("web@*.service", "web@1.service", true),
            ("web@*.service", "web@.service", true),
            ("web@*.service", "web.service", false),
            ("web?.service", "web1.service", true),
            ("web?.service", "web12.service", false),
            ("web[0-9].service", "web7.service", true),
            ("web[!0-9].service", "web7.service", false),
            ("db.service", "db.service", true),
            ("db.service", "db.socket", false),
            ("*", "anything.service", true),
            ("\\*.service", "*.service", true),
            ("\\*.service", "a.service", false),
        ];
        for (glob, name, expected) in cases {
            let g = UnitGlob::new(glob).unwrap();
            assert_eq!(g.matches(name), expected, "{glob} vs {name}");
        }
    }

    #[test]
    fn invalid_globs_are_reported() {
        assert!(UnitGlob::new("web[.service").is_err());
    }
}
