//! Which units may share a machine: the one home of fleet's co-location rules.
//!
//! `Conflicts=` and `Replaces=` keep units apart; `MachineOf=` keeps them
//! together. Three parts of flotilla ask these questions: placement (where the
//! scheduler proposes a unit, [`super::placement`]), the scheduler's eviction of
//! two units that ended up on one machine (`scheduler::plan`) and the agent's
//! claim check (what a machine may take now, [`super::claim`]). They all ask
//! through the functions here, so they cannot disagree, and a change to what
//! one of these options means is one edit in this file.
//!
//! The rules, for two units on one machine:
//!
//! * A unit never excludes itself: `Conflicts=web@*.service` in `web@.service`
//!   keeps its instances apart, not an instance from itself.
//! * Either unit's `Conflicts` glob matching the other: they never share it.
//! * One unit's `Replaces` glob matching the other: the replaced unit makes way
//!   for the replacing one. Both replacing each other: they are kept apart and
//!   neither makes way.
//! * Of two units found together that may not share (rules changed after they
//!   were placed), the one the other's rules name leaves, so the unit whose file
//!   asked for the separation keeps its place; named by both, the greater name
//!   leaves, so every node evicts the same one.
//! * A `MachineOf` peer must be on the machine; the caller says which units
//!   count as there (placed, or claimed: a unit being stopped is no peer).

use super::fleet::Requirements;
use super::name::UnitName;

/// A unit with its `[X-Fleet]` rules: all the co-location rules need to know of it.
pub type Ruled<'a> = (&'a UnitName, &'a Requirements);

/// Which of a unit's own options names another unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A `Conflicts=` glob matches it.
    Conflicts,
    /// A `Replaces=` glob matches it (and no `Conflicts=` glob does).
    Replaces,
}

/// What two units' rules say about sharing one machine, read from each side.
///
/// Callers need both sides: placement tells "this one replaces that one" from
/// "that one replaces this one", and eviction keeps the unit that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exclusion {
    /// The first unit's option that names the second, if any.
    pub by_first: Option<Rule>,
    /// The second unit's option that names the first, if any.
    pub by_second: Option<Rule>,
}

impl Exclusion {
    /// True when neither unit's rules keep them apart.
    #[inline]
    pub fn allows_sharing(self) -> bool {
        self.by_first.is_none() && self.by_second.is_none()
    }
}

/// What the rules of `first` and `second` say about sharing one machine.
///
/// Placement asks this for every unit on every machine it considers, so it is
/// kept cheap: names are compared only when a rule matched.
#[inline]
pub fn between(first: Ruled<'_>, second: Ruled<'_>) -> Exclusion {
    let exclusion = Exclusion {
        by_first: naming(first.1, second.0),
        by_second: naming(second.1, first.0),
    };
    if exclusion.allows_sharing() || first.0 != second.0 {
        exclusion
    } else {
        // A unit never excludes itself.
        Exclusion {
            by_first: None,
            by_second: None,
        }
    }
}

/// Which of two units found on one machine must leave it, if they may not share it.
#[inline]
pub fn evicted<'a>(first: Ruled<'a>, second: Ruled<'a>) -> Option<&'a UnitName> {
    let exclusion = between(first, second);
    match (exclusion.by_first.is_some(), exclusion.by_second.is_some()) {
        (false, false) => None,
        (true, false) => Some(second.0),
        (false, true) => Some(first.0),
        (true, true) => Some(first.0.max(second.0)),
    }
}

/// The first `MachineOf` peer in `rules` that is not on the machine, by `here`.
pub fn missing_peer(rules: &Requirements, here: impl Fn(&UnitName) -> bool) -> Option<&UnitName> {
    rules.machine_of.iter().find(|peer| !here(peer))
}

/// The globs of the units a unit with `rules` may not share a machine with
/// (its `Conflicts=` and `Replaces=`): what the agent asks systemd about before
/// claiming, so a unit systemd runs outside flotilla is respected too.
pub fn excluded_globs(rules: &Requirements) -> impl Iterator<Item = &str> {
    rules
        .conflicts
        .iter()
        .chain(&rules.replaces)
        .map(|glob| glob.as_str())
}

/// Whether a unit with `rules` can keep any other unit off its machine (it
/// has `Conflicts=` or `Replaces=` globs). Two units of which neither can
/// always share a machine, which lets placement skip them (see
/// [`super::placement::decide_with`]).
pub fn excludes_any(rules: &Requirements) -> bool {
    !rules.conflicts.is_empty() || !rules.replaces.is_empty()
}

/// The option of a unit with `rules` that names `other`; `Conflicts` first.
#[inline]
fn naming(rules: &Requirements, other: &UnitName) -> Option<Rule> {
    if rules.conflict_glob_for(other).is_some() {
        Some(Rule::Conflicts)
    } else if rules.replace_glob_for(other).is_some() {
        Some(Rule::Replaces)
    } else {
        None
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::units::Unit;

    /// The unit `name` with `xfleet` as its `[X-Fleet]` section, as the rules see it.
    pub(in crate::units) fn unit(name: &str, xfleet: &str) -> (UnitName, Requirements) {
        let name = UnitName::parse(name).unwrap();
        let text = format!("[Service]\nExecStart=/bin/true\n[X-Fleet]\n{xfleet}\n");
        let unit = Unit::from_text(&name, &text).unwrap();
        (name, unit.requirements().clone())
    }

    fn ruled(u: &(UnitName, Requirements)) -> Ruled<'_> {
        (&u.0, &u.1)
    }

    #[test]
    fn each_side_is_read_separately() {
        use Rule::{Conflicts, Replaces};
        let plain = unit("web@2.service", "");
        // Validation refuses a unit with both options; were one built, its
        // Conflicts would decide.
        let mut both = unit("web@1.service", "Conflicts=web@*.service");
        both.1.replaces = unit("web@1.service", "Replaces=web@2.service").1.replaces;
        let rows = [
            (
                unit("web@1.service", "Conflicts=web@*.service"),
                Some(Conflicts),
            ),
            (
                unit("web@1.service", "Replaces=web@2.service"),
                Some(Replaces),
            ),
            (both, Some(Conflicts)),
            (unit("web@1.service", "Conflicts=db*.service"), None),
            (unit("web@1.service", "Replaces=x.service"), None),
        ];
        for (asking, expected) in &rows {
            let (rules, expected) = (&asking.1, *expected);
            assert_eq!(
                between(ruled(asking), ruled(&plain)),
                Exclusion {
                    by_first: expected,
                    by_second: None
                },
                "{rules:?}"
            );
            assert_eq!(
                between(ruled(&plain), ruled(asking)),
                Exclusion {
                    by_first: None,
                    by_second: expected
                },
                "{rules:?}"
            );
            assert_eq!(
                between(ruled(asking), ruled(&plain)).allows_sharing(),
                expected.is_none(),
                "{rules:?}"
            );
        }
    }

    #[test]
    fn a_unit_never_excludes_itself() {
        for xfleet in ["Conflicts=web@*.service", "Replaces=web@*.service"] {
            let web = unit("web@1.service", xfleet);
            assert!(
                between(ruled(&web), ruled(&web)).allows_sharing(),
                "{xfleet}"
            );
            assert_eq!(evicted(ruled(&web), ruled(&web)), None, "{xfleet}");
        }
    }

    #[test]
    fn the_unit_named_leaves_and_of_two_named_the_greater() {
        let asker = unit("b.service", "Conflicts=a.service");
        let named = unit("a.service", "");
        assert_eq!(evicted(ruled(&asker), ruled(&named)), Some(&named.0));
        assert_eq!(evicted(ruled(&named), ruled(&asker)), Some(&named.0));
        let replacer = unit("a.service", "Replaces=b.service");
        let replaced = unit("b.service", "");
        assert_eq!(
            evicted(ruled(&replacer), ruled(&replaced)),
            Some(&replaced.0)
        );
        let a = unit("a.service", "Replaces=b.service");
        let b = unit("b.service", "Conflicts=a.service");
        assert_eq!(evicted(ruled(&a), ruled(&b)), Some(&b.0));
        assert_eq!(evicted(ruled(&b), ruled(&a)), Some(&b.0));
        let free = unit("c.service", "");
        assert_eq!(evicted(ruled(&a), ruled(&free)), None);
    }

    #[test]
    fn the_first_peer_not_here_is_missing() {
        let app = unit("app.service", "MachineOf=db.service cache.service");
        let db = UnitName::parse("db.service").unwrap();
        let cache = UnitName::parse("cache.service").unwrap();
        assert_eq!(missing_peer(&app.1, |_| false), Some(&db));
        assert_eq!(missing_peer(&app.1, |p| *p == db), Some(&cache));
        assert_eq!(missing_peer(&app.1, |_| true), None);
        let alone = unit("alone.service", "");
        assert_eq!(missing_peer(&alone.1, |_| false), None);
    }
}
