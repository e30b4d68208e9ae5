//! "Did you mean ...?": the closest known word to one that was mistyped.
//!
//! A typo in a unit type (`web.serivce`), an `[X-Fleet]` key (`MachinOf=`) or
//! a unit name (`myap@3`) silently does the wrong thing or fails with a bare
//! "not found"; naming the closest known word turns that into a fix. One rule
//! serves the name checks here, the `[X-Fleet]` warnings and the CLI.

/// The number of single-character insertions, deletions, substitutions and
/// swaps of two neighbours that turn `a` into `b`, compared without case.
pub fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    // Three rows of the optimal-string-alignment table: two back, one back, now.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (previous[j] + 1)
                .min(row[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut previous, row);
    }
    previous[b.len()]
}

/// The candidate closest to `typed`, if it is close enough to be a typo of
/// it: at most one edit in a word of up to four characters, two up to
/// twelve, three beyond. Ties go to the first candidate; `typed` itself
/// (in any case) is never suggested.
pub fn closest<'a, I, S>(typed: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a S>,
    S: AsRef<str> + ?Sized + 'a,
{
    let limit = match typed.chars().count() {
        0..=4 => 1,
        5..=12 => 2,
        _ => 3,
    };
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let candidate = candidate.as_ref();
        let d = distance(typed, candidate);
        if d == 0 || d > limit {
            continue;
        }
        if best.is_none_or(|(known, _)| d < known) {
            best = Some((d, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        let cases = [
            ("", "", 0),
            ("service", "service", 0),
            ("serivce", "service", 1),
            ("sevice", "service", 1),
            ("Service", "service", 0),
            ("MachinOf", "MachineOf", 1),
            ("Conflict", "Conflicts", 1),
            ("myap@3", "myapp@3", 1),
            ("abc", "", 3),
            ("kitten", "sitting", 3),
        ];
        for (a, b, d) in cases {
            assert_eq!(distance(a, b), d, "{a} -> {b}");
            assert_eq!(distance(b, a), d, "{b} -> {a}");
        }
    }

    #[test]
    fn closest_only_within_reach() {
        let types = ["service", "socket", "timer"];
        assert_eq!(closest("serivce", &types), Some("service"));
        assert_eq!(closest("sockt", &types), Some("socket"));
        assert_eq!(closest("bogus", &types), None);
        assert_eq!(closest("service", &types), None, "never itself");
        let names = vec!["myapp@3.service".to_string(), "db.service".to_string()];
        assert_eq!(closest("myap@3.service", &names), Some("myapp@3.service"));
        assert_eq!(closest("zzz.socket", &names), None);
        assert_eq!(closest("ab", &["ax", "ay"]), Some("ax"), "ties: the first");
    }
}
