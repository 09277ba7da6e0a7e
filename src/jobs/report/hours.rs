//! Working hours: which event times are "after hours" for the HIPAA report.
//! Pure (parsing and a time test), so it is unit-tested on its own.

use chrono::{DateTime, Datelike, FixedOffset, NaiveTime, Timelike, Utc, Weekday};

use crate::config::ReportConfig;

/// Working hours in a fixed UTC offset: `[start, end)` on working days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingHours {
    start: NaiveTime,
    end: NaiveTime,
    /// Indexed by `Weekday::num_days_from_monday`.
    days: [bool; 7],
    offset: FixedOffset,
}

/// Parses `"HH:MM"`.
fn parse_clock(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map_err(|_| format!("{s:?} is not a time of day: use HH:MM, e.g. 08:00"))
}

/// Parses a fixed UTC offset: `Z`, `UTC`, `+HH:MM` or `-HH:MM`.
pub fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0).ok_or_else(|| "offset 0".into());
    }
    let bad = || {
        format!(
            "report.timezone {s:?} is not a fixed UTC offset: use e.g. \"+00:00\", \"-05:00\" or \"Z\" (named zones are not supported)"
        )
    };
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

fn parse_day(s: &str) -> Result<Weekday, String> {
    s.trim().parse::<Weekday>().map_err(|_| {
        format!("report.working_days: {s:?} is not a day: use Mon, Tue, Wed, Thu, Fri, Sat, Sun")
    })
}

impl WorkingHours {
    /// Parses `"08:00-18:00"`, day names and an offset.
    pub fn parse(hours: &str, days: &[String], offset: &str) -> Result<Self, String> {
        let (a, b) = hours.split_once('-').ok_or_else(|| {
            format!("report.working_hours {hours:?} is not a range: use \"HH:MM-HH:MM\", e.g. \"08:00-18:00\"")
        })?;
        let start = parse_clock(a).map_err(|e| format!("report.working_hours: {e}"))?;
        let end = parse_clock(b).map_err(|e| format!("report.working_hours: {e}"))?;
        if start >= end {
            return Err(format!(
                "report.working_hours {hours:?}: the start must be before the end (shifts across midnight are not supported; use \"00:00-06:00\" style ranges within one day)"
            ));
        }
        let mut set = [false; 7];
        for d in days {
            set[parse_day(d)?.num_days_from_monday() as usize] = true;
        }
        Ok(Self {
            start,
            end,
            days: set,
            offset: parse_offset(offset)?,
        })
    }

    /// From `[report]`.
    pub fn from_config(c: &ReportConfig) -> Result<Self, String> {
        Self::parse(&c.working_hours, &c.working_days, &c.timezone)
    }

    /// Whether `t` falls outside working hours (or on a non-working day).
    pub fn is_after_hours(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.offset);
        if !self.days[local.weekday().num_days_from_monday() as usize] {
            return true;
        }
        let clock = NaiveTime::from_hms_opt(local.hour(), local.minute(), local.second())
            .unwrap_or_default();
        clock < self.start || clock >= self.end
    }

    /// The setting as shown in reports, e.g. `08:00-18:00 Mon,Tue +00:00`.
    pub fn describe(&self) -> String {
        let days: Vec<String> = (0..7)
            .filter(|&i| self.days[i])
            .filter_map(|i| Weekday::try_from(i as u8).ok())
            .map(|d| d.to_string())
            .collect();
        format!(
            "{}-{} {} UTC{}",
            self.start.format("%H:%M"),
            self.end.format("%H:%M"),
            days.join(","),
            self.offset
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn weekdays() -> Vec<String> {
        ["Mon", "Tue", "Wed", "Thu", "Fri"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn start_is_inside_end_is_outside_and_weekends_are_after_hours() {
        let w = WorkingHours::parse("08:00-18:00", &weekdays(), "+00:00").unwrap();
        // 2024-03-04 is a Monday.
        assert!(!w.is_after_hours(t("2024-03-04T08:00:00Z")));
        assert!(!w.is_after_hours(t("2024-03-04T17:59:59.999Z")));
        assert!(w.is_after_hours(t("2024-03-04T18:00:00Z")));
        assert!(w.is_after_hours(t("2024-03-04T07:59:59Z")));
        assert!(w.is_after_hours(t("2024-03-02T12:00:00Z")), "Saturday");
        assert_eq!(w.describe(), "08:00-18:00 Mon,Tue,Wed,Thu,Fri UTC+00:00");
    }

    #[test]
    fn a_fixed_offset_moves_the_window_and_the_day() {
        let w = WorkingHours::parse("08:00-18:00", &weekdays(), "-05:00").unwrap();
        // 13:00Z is 08:00 at -05:00.
        assert!(!w.is_after_hours(t("2024-03-04T13:00:00Z")));
        assert!(w.is_after_hours(t("2024-03-04T12:59:00Z")));
        // Saturday 02:00Z is Friday 21:00 local: after hours, but a Friday.
        assert!(w.is_after_hours(t("2024-03-09T02:00:00Z")));
        // Monday 04:00Z is Sunday 23:00 local.
        let w = WorkingHours::parse("00:00-23:59", &weekdays(), "-05:00").unwrap();
        assert!(w.is_after_hours(t("2024-03-04T04:00:00Z")));
        assert!(!w.is_after_hours(t("2024-03-04T06:00:00Z")));
    }

    #[test]
    fn bad_settings_say_what_to_write() {
        let e = WorkingHours::parse("8-18", &weekdays(), "Z").unwrap_err();
        assert!(e.contains("HH:MM"), "{e}");
        let e = WorkingHours::parse("18:00-08:00", &weekdays(), "Z").unwrap_err();
        assert!(e.contains("before the end"), "{e}");
        let e = WorkingHours::parse("08:00-18:00", &["Funday".into()], "Z").unwrap_err();
        assert!(e.contains("Mon, Tue"), "{e}");
        let e = WorkingHours::parse("08:00-18:00", &weekdays(), "Europe/Berlin").unwrap_err();
        assert!(e.contains("fixed UTC offset"), "{e}");
        assert!(parse_offset("+15:00").is_err());
        assert_eq!(parse_offset("+05:30").unwrap().local_minus_utc(), 19800);
        assert_eq!(parse_offset("utc").unwrap().local_minus_utc(), 0);
    }
}
