//! Durations as the configuration and the CLI write them: `90s`, `5m`,
//! `1h30m`, `2d` (a bare number is seconds), parsed and shown, purely.
//!
//! One home for the format, so every setting that takes a duration
//! (`drain_timeout`, `api_header_timeout`, ...) reads it the same way and
//! every message shows one the way the user would write it.

use std::time::Duration;

const DAY: u64 = 86_400;

/// A duration as the configuration writes it: `90s`, `5m`, `1h30m`, `2d`.
pub fn show_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("d", DAY), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// Parses a duration written as numbers with units, `90s`, `5m`, `1h30m`,
/// `2d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration; write e.g. 90s, 5m, 1h30m or 2d");
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let size = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => DAY,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(size)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        for (text, secs) in [
            ("90s", 90),
            ("5m", 300),
            ("1h30m", 5400),
            ("2d", 172_800),
            ("7", 7),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(show_duration(Duration::from_secs(5400)), "1h30m");
        for bad in ["", "m", "5x", "1h5", "-5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
