//! Shell-style globs over unit names, as fleet's `Conflicts=` and `Replaces=` use them.
//!
//! fleet matched with Go's `path.Match`: `*`, `?`, `[...]` classes and `\` escapes.
//! Matching is delegated to `globset`; this type keeps the source text for
//! messages and compares by it.
//!
//! Placement matches every unit's globs against the units on each machine it
//! considers, and most names a glob sees do not match it
//! (`Conflicts=excl@*.service` against `sim@17.service`). So each glob keeps
//! its literal start, the text before its first special character: a name
//! that does not begin with it cannot match and is turned away with one
//! comparison, and a glob that is all literal is a string comparison. Both are
//! the same answer `globset` gives (a property test checks it), only cheaper.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

/// A compiled glob such as `web@*.service`.
#[derive(Clone)]
pub struct UnitGlob {
    text: String,
    matcher: GlobMatcher,
    /// Bytes of `text` before its first special character, which every
    /// matching name starts with.
    literal: usize,
    /// Whether `text` has no special character (it matches itself only).
    exact: bool,
}

/// The characters that make a glob more than its literal text: wildcards,
/// classes, alternations and escapes.
const SPECIAL: [char; 5] = ['*', '?', '[', '{', '\\'];

impl UnitGlob {
    /// Compiles `text`, or says why it is not a valid glob.
    pub fn new(text: &str) -> Result<UnitGlob, String> {
        let glob = GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("invalid glob {text:?}: {}", e.kind()))?;
        let literal = text.find(SPECIAL).unwrap_or(text.len());
        Ok(UnitGlob {
            text: text.to_string(),
            matcher: glob.compile_matcher(),
            literal,
            exact: literal == text.len(),
        })
    }

    /// True when `name` matches this glob.
    pub fn matches(&self, name: &str) -> bool {
        if self.exact {
            return name == self.text;
        }
        name.as_bytes()
            .starts_with(&self.text.as_bytes()[..self.literal])
            && self.matcher.is_match(name)
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
    use proptest::prelude::*;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The literal-start shortcut gives globset's answer: names and globs
        /// from a small alphabet, so that they often share starts and match.
        #[test]
        fn the_shortcut_agrees_with_globset(
            glob in "[ab@.*?\\[\\]{},!\\\\-]{0,8}",
            name in "[ab@.*?{}\\[\\]\\\\-]{0,8}",
        ) {
            if let Ok(g) = UnitGlob::new(&glob) {
                prop_assert_eq!(g.matches(&name), g.matcher.is_match(&name), "{:?} vs {:?}", glob, name);
            }
        }
    }

    #[test]
    fn invalid_globs_are_reported() {
        assert!(UnitGlob::new("web[.service").is_err());
    }
}
