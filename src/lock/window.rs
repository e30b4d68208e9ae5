//! Reboot windows and wall-clock times, as pure functions of the time given.
//!
//! A window is a start (`"Thu 04:00"` weekly, or `"04:00"` daily) and a
//! length; a host only takes the reboot lock while one is open. Times are UTC
//! unless the start names an offset (`"Thu 04:00 +02:00"`): flotilla reads
//! no time-zone database, so a zone with daylight saving shifts by an hour
//! twice a year (write the offset you mean, or use UTC).

use std::fmt;
use std::time::Duration;

use crate::duration::show_duration;

const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// Day names as written in a window start, Monday first.
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// When reboots may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The weekday (0 = Monday); `None`: every day.
    day: Option<u64>,
    /// Seconds after midnight, in the window's own time.
    start: u64,
    /// Seconds east of UTC of the window's time.
    offset: i64,
    /// How long it stays open.
    length: Duration,
}

/// Whether a window is open at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Open; it closes after this long.
    Open(Duration),
    /// Closed; it opens after this long.
    Closed(Duration),
}

impl Window {
    /// Parses a start such as `"Thu 04:00"`, `"04:00"` or `"Sun 23:30 -05:00"`
    /// (day names in any case, three letters or whole) and a length, which
    /// must be at least a minute and at most the window's period (a day, or a
    /// week when a day is named).
    pub fn parse(start: &str, length: Duration) -> Result<Window, String> {
        let bad = |why: &str| {
            format!(
                "{start:?} is not a window start ({why}); write e.g. \"Thu 04:00\" or \"04:00\""
            )
        };
        let mut words: Vec<&str> = start.split_whitespace().collect();
        let offset = match words.last() {
            Some(last) if last.starts_with(['+', '-']) || last.eq_ignore_ascii_case("utc") => {
                let offset = parse_offset(last).ok_or_else(|| bad("unknown UTC offset"))?;
                words.pop();
                offset
            }
            _ => 0,
        };
        let (day, time) = match words.as_slice() {
            [time] => (None, *time),
            [day, time] => {
                let lower = day.to_ascii_lowercase();
                let found = DAYS
                    .iter()
                    .position(|d| lower.len() >= 3 && full_day(d).starts_with(&lower))
                    .ok_or_else(|| bad("unknown day"))?;
                (Some(found as u64), *time)
            }
            _ => return Err(bad("expected [DAY] HH:MM")),
        };
        let (hours, minutes) = time.split_once(':').ok_or_else(|| bad("no HH:MM"))?;
        let hours: u64 = hours.parse().map_err(|_| bad("bad hour"))?;
        let minutes: u64 = minutes.parse().map_err(|_| bad("bad minute"))?;
        if hours > 23 || minutes > 59 {
            return Err(bad("no such time of day"));
        }
        let period = if day.is_some() { WEEK } else { DAY };
        if length < Duration::from_secs(60) || length.as_secs() > period {
            return Err(format!(
                "a reboot window of {} must last from 1m up to its period ({})",
                show_duration(length),
                if day.is_some() { "a week" } else { "a day" }
            ));
        }
        Ok(Window {
            day,
            start: hours * 3600 + minutes * 60,
            offset,
            length,
        })
    }

    /// Whether the window is open at `now` (seconds since the Unix epoch).
    pub fn state(&self, now: u64) -> WindowState {
        let local = now.saturating_add_signed(self.offset);
        let period = if self.day.is_some() { WEEK } else { DAY };
        let today = local / DAY;
        // 1970-01-01 was a Thursday (3 when Monday is 0).
        let weekday = (today + 3) % 7;
        let days_back = self.day.map_or(0, |d| (weekday + 7 - d) % 7);
        let mut start = (today - days_back.min(today)) * DAY + self.start;
        if start > local {
            start = start.saturating_sub(period);
        }
        let end = start + self.length.as_secs();
        if local < end {
            WindowState::Open(Duration::from_secs(end - local))
        } else {
            WindowState::Closed(Duration::from_secs(start + period - local))
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(day) = self.day {
            let name = full_day(DAYS[day as usize]);
            write!(f, "{}{} ", name[..1].to_ascii_uppercase(), &name[1..3])?;
        }
        write!(f, "{:02}:{:02}", self.start / 3600, self.start / 60 % 60)?;
        if self.offset != 0 {
            let sign = if self.offset < 0 { '-' } else { '+' };
            let abs = self.offset.unsigned_abs();
            write!(f, " {sign}{:02}:{:02}", abs / 3600, abs / 60 % 60)?;
        } else {
            f.write_str(" UTC")?;
        }
        write!(f, " for {}", show_duration(self.length))
    }
}

fn full_day(short: &str) -> &'static str {
    match short {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

/// `UTC`, `+02:00`, `-0530`: seconds east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    if text.eq_ignore_ascii_case("utc") {
        return Some(0);
    }
    let sign = if text.starts_with('-') { -1 } else { 1 };
    let digits: String = text[1..].chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hours: i64 = digits[..2].parse().ok()?;
    let minutes: i64 = digits[2..].parse().ok()?;
    (hours <= 14 && minutes <= 59).then_some(sign * (hours * 3600 + minutes * 60))
}

/// A time as `2024-05-02 04:00:12 UTC`, from seconds since the Unix epoch.
pub fn format_utc(secs: u64) -> String {
    let days = secs / DAY;
    let rest = secs % DAY;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The calendar date (year, month, day) of a day number (days since
/// 1970-01-01), by the well-known era arithmetic of the proleptic Gregorian
/// calendar; also what the API's RFC 3339 times are written with.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::parse_duration;

    /// 2024-05-02 was a Thursday; this is its midnight UTC.
    const THU: u64 = 1_714_608_000;
    const H: u64 = 3600;

    fn window(start: &str, length: &str) -> Window {
        Window::parse(start, parse_duration(length).unwrap()).unwrap()
    }

    #[test]
    fn weekly_window_opens_and_closes() {
        let w = window("Thu 04:00", "1h");
        let at = |secs| w.state(secs);
        assert_eq!(at(THU + 3 * H), WindowState::Closed(Duration::from_secs(H)));
        assert_eq!(at(THU + 4 * H), WindowState::Open(Duration::from_secs(H)));
        assert_eq!(
            at(THU + 4 * H + 1800),
            WindowState::Open(Duration::from_secs(1800))
        );
        assert_eq!(
            at(THU + 5 * H),
            WindowState::Closed(Duration::from_secs(WEEK - H))
        );
        // Friday: six days and a few hours to go.
        assert_eq!(
            at(THU + DAY),
            WindowState::Closed(Duration::from_secs(6 * DAY + 4 * H))
        );
        // Wednesday night, just before.
        assert_eq!(
            at(THU - 60),
            WindowState::Closed(Duration::from_secs(4 * H + 60))
        );
    }

    #[test]
    fn daily_window_and_one_that_spans_midnight() {
        let w = window("23:30", "1h");
        assert!(matches!(w.state(THU + 23 * H + 1800), WindowState::Open(_)));
        assert_eq!(
            w.state(THU + DAY + 10 * 60),
            WindowState::Open(Duration::from_secs(20 * 60))
        );
        assert_eq!(
            w.state(THU + DAY + 1800),
            WindowState::Closed(Duration::from_secs(23 * H))
        );
        let sunday = window("Sun 23:00", "2h");
        // Monday 00:30 is still inside Sunday's window.
        assert!(matches!(
            sunday.state(THU + 4 * DAY + 30 * 60),
            WindowState::Open(_)
        ));
    }

    #[test]
    fn offsets_shift_the_window() {
        let w = window("thursday 04:00 +02:00", "1h");
        assert!(matches!(w.state(THU + 2 * H), WindowState::Open(_)));
        assert!(matches!(w.state(THU + 4 * H), WindowState::Closed(_)));
        assert_eq!(w.to_string(), "Thu 04:00 +02:00 for 1h");
        assert_eq!(
            window("04:00 UTC", "90m").to_string(),
            "04:00 UTC for 1h30m"
        );
    }

    #[test]
    fn bad_windows_say_what_to_write() {
        let hour = Duration::from_secs(H);
        for bad in [
            "",
            "Thu",
            "Thx 04:00",
            "25:00",
            "04:61",
            "4",
            "Thu 04:00 +99:00",
        ] {
            let err = Window::parse(bad, hour).unwrap_err();
            assert!(err.contains("Thu 04:00"), "{bad}: {err}");
        }
        assert!(Window::parse("04:00", Duration::from_secs(2 * DAY)).is_err());
        assert!(Window::parse("Thu 04:00", Duration::from_secs(2 * DAY)).is_ok());
        assert!(Window::parse("04:00", Duration::from_secs(30)).is_err());
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(THU + 4 * H + 12), "2024-05-02 04:00:12 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
