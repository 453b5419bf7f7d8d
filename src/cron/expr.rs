//! Cron expressions and time zones: parsing (croner, chrono-tz), the error
//! messages for bad input, and the ticks of an expression in its zone,
//! daylight-saving transitions included (the rules are in
//! `docs/scheduling.md` and pinned by the tests below).
//!
//! It is pure computation: it must never read the clock or the database;
//! callers pass the instant (the database's `now()`) they reason from.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::error::{Error, Result};

/// What the expectation part of every bad-expression message says.
const EXPECTED_CRON: &str = "expected 5 fields (minute hour day-of-month month day-of-week) \
or 6 with seconds first, such as \"*/5 * * * *\" or \"0 30 2 * * MON-FRI\", or one of @yearly, \
@monthly, @weekly, @daily, @hourly";

/// Parse a cron expression: 5 fields, or 6 with seconds first; ranges,
/// steps, lists, month and weekday names, `L`, `W`, `#`, `?` and the
/// @nicknames. The error quotes the expression and says what is expected.
pub fn parse_cron(expr: &str) -> Result<Cron> {
    let trimmed = expr.trim();
    let fields = trimmed.split_whitespace().count();
    if trimmed.is_empty() {
        return Err(Error::InvalidSchedule(format!(
            "invalid cron expression {expr:?}: it is empty; {EXPECTED_CRON}"
        )));
    }
    if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
        return Err(Error::InvalidSchedule(format!(
            "invalid cron expression {expr:?}: {fields} fields; {EXPECTED_CRON}"
        )));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| {
            Error::InvalidSchedule(format!(
                "invalid cron expression {expr:?}: {e}; {EXPECTED_CRON}"
            ))
        })
}

/// Parse an IANA time zone name (`UTC`, `Europe/Berlin`).
pub fn parse_tz(name: &str) -> Result<Tz> {
    name.parse::<Tz>().map_err(|_| {
        Error::InvalidSchedule(format!(
            "unknown time zone {name:?}: expected an IANA time zone name such as \"UTC\", \
             \"Europe/Berlin\" or \"America/New_York\""
        ))
    })
}

/// A parsed expression in its time zone: the "when" of a schedule.
///
/// Daylight saving (croner's rules, see `docs/scheduling.md`): a wall-clock
/// time that does not exist (spring forward) fires at the first instant after
/// the gap when the expression names one fixed second, minute and hour
/// (`30 2 * * *` fires at 03:00 on that day), and is simply absent for
/// expressions with a wildcard, range, list or step in those fields (hourly
/// jobs skip the hour that does not exist). A wall-clock time that occurs
/// twice (fall back) fires once, at its first occurrence, for a fixed time,
/// and at both occurrences for the others (an hourly job keeps firing every
/// real hour).
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

impl CronSchedule {
    pub fn parse(expr: &str, tz: &str) -> Result<CronSchedule> {
        let cron = parse_cron(expr)?;
        let tz = parse_tz(tz)?;
        let schedule = CronSchedule {
            expr: expr.trim().to_string(),
            cron,
            tz,
        };
        // An expression that never matches (31 February) is useless; croner
        // gives up on the search, and so do we, here rather than at a tick.
        schedule
            .next_after(DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(20_000))
            .map_err(|_| {
                Error::InvalidSchedule(format!(
                    "cron expression {expr:?} never matches a date (such as 31 February); \
                     {EXPECTED_CRON}"
                ))
            })?;
        Ok(schedule)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// croner's English description of the expression.
    pub fn describe(&self) -> String {
        self.cron.describe()
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let next = self
            .cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .map_err(|e| self.search_error(e))?
            .with_timezone(&Utc);
        if next > t {
            return Ok(next);
        }
        // croner works in whole seconds: `t` with a fraction can come back
        // as its own second.
        Ok(self
            .cron
            .find_next_occurrence(&next.with_timezone(&self.tz), false)
            .map_err(|e| self.search_error(e))?
            .with_timezone(&Utc))
    }

    /// The first tick at or after `t`.
    pub fn first_at_or_after(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let at = self
            .cron
            .find_next_occurrence(&t.with_timezone(&self.tz), true)
            .map_err(|e| self.search_error(e))?
            .with_timezone(&Utc);
        if at >= t {
            Ok(at)
        } else {
            self.next_after(at)
        }
    }

    /// The latest tick at or before `t`, if any.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            .filter(|d| *d <= t)
    }

    /// The tick before `t` (strictly), if any.
    pub(super) fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            .filter(|d| *d < t)
    }

    /// `n` ticks from `first` on (inclusive), in the schedule's zone.
    pub fn upcoming(&self, first: DateTime<Utc>, n: usize) -> Result<Vec<DateTime<Tz>>> {
        let mut out = Vec::with_capacity(n);
        let mut t = self.first_at_or_after(first)?;
        while out.len() < n {
            out.push(t.with_timezone(&self.tz));
            t = self.next_after(t)?;
        }
        Ok(out)
    }

    fn search_error(&self, e: croner::errors::CronError) -> Error {
        Error::InvalidSchedule(format!(
            "cron expression {:?} in {}: no next time: {e}",
            self.expr, self.tz
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Every tick in (from, to], as local RFC 3339 strings.
    fn ticks(expr: &str, tz: &str, from: &str, to: &str) -> Vec<String> {
        let when = CronSchedule::parse(expr, tz).unwrap();
        let (mut t, to) = (utc(from), utc(to));
        let mut out = Vec::new();
        loop {
            t = when.next_after(t).unwrap();
            if t > to {
                return out;
            }
            out.push(t.with_timezone(&when.tz()).to_rfc3339());
        }
    }

    #[test]
    fn berlin_daily_0230_fires_once_on_both_transition_days() {
        // 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 does not exist.
        assert_eq!(
            ticks(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-27T12:00:00Z",
                "2026-03-31T12:00:00Z"
            ),
            [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00",
                "2026-03-31T02:30:00+02:00",
            ]
        );
        // 2026-10-25: 03:00 CEST → 02:00 CET; 02:30 happens twice.
        assert_eq!(
            ticks(
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-23T12:00:00Z",
                "2026-10-27T12:00:00Z"
            ),
            [
                "2026-10-24T02:30:00+02:00",
                "2026-10-25T02:30:00+02:00",
                "2026-10-26T02:30:00+01:00",
                "2026-10-27T02:30:00+01:00",
            ]
        );
    }

    #[test]
    fn berlin_hourly_has_no_double_and_no_hole() {
        // Spring forward: 01:00 CET, then 03:00 CEST one real hour later.
        let spring = ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-03-28T23:30:00Z",
            "2026-03-29T03:30:00Z",
        );
        assert_eq!(
            spring,
            [
                "2026-03-29T01:00:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T04:00:00+02:00",
                "2026-03-29T05:00:00+02:00",
            ]
        );
        // Fall back: 02:00 happens twice, and fires at both, an hour apart.
        let fall = ticks(
            "0 * * * *",
            "Europe/Berlin",
            "2026-10-24T23:30:00Z",
            "2026-10-25T03:30:00Z",
        );
        assert_eq!(
            fall,
            [
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T02:00:00+01:00",
                "2026-10-25T03:00:00+01:00",
                "2026-10-25T04:00:00+01:00",
            ]
        );
        assert_hourly_in_utc("Europe/Berlin", "2026-03-28T20:00:00Z");
        assert_hourly_in_utc("Europe/Berlin", "2026-10-24T20:00:00Z");
    }

    /// Over a day around a transition, consecutive hourly ticks are exactly
    /// one real hour apart: no double, no hole.
    fn assert_hourly_in_utc(tz: &str, from: &str) {
        let when = CronSchedule::parse("0 * * * *", tz).unwrap();
        let mut t = when.next_after(utc(from)).unwrap();
        for _ in 0..24 {
            let next = when.next_after(t).unwrap();
            assert_eq!(next - t, chrono::Duration::hours(1), "after {t} in {tz}");
            t = next;
        }
    }

    #[test]
    fn new_york_daily_and_hourly_across_both_transitions() {
        // 2026-03-08: 02:00 EST → 03:00 EDT.
        assert_eq!(
            ticks(
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00Z",
                "2026-03-09T12:00:00Z"
            ),
            ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
        );
        // 2026-11-01: 02:00 EDT → 01:00 EST; 01:30 happens twice, fires once.
        assert_eq!(
            ticks(
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00Z",
                "2026-11-02T12:00:00Z"
            ),
            ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
        );
        assert_eq!(
            ticks(
                "0 * * * *",
                "America/New_York",
                "2026-03-08T05:30:00Z",
                "2026-03-08T08:30:00Z"
            ),
            [
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00",
            ]
        );
        assert_eq!(
            ticks(
                "0 * * * *",
                "America/New_York",
                "2026-11-01T04:30:00Z",
                "2026-11-01T07:30:00Z"
            ),
            [
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00",
            ]
        );
        assert_hourly_in_utc("America/New_York", "2026-03-07T20:00:00Z");
        assert_hourly_in_utc("America/New_York", "2026-10-31T20:00:00Z");
    }

    #[test]
    fn syntax_covers_seconds_names_l_w_and_hash() {
        let t = |e: &str, from: &str| {
            CronSchedule::parse(e, "UTC")
                .unwrap()
                .next_after(utc(from))
                .unwrap()
                .to_rfc3339()
        };
        assert_eq!(
            t("*/15 * * * * *", "2026-01-01T00:00:07Z"),
            "2026-01-01T00:00:15+00:00"
        );
        assert_eq!(
            t("0 9 L * *", "2026-02-01T00:00:00Z"),
            "2026-02-28T09:00:00+00:00"
        );
        // The weekday nearest the 1st of August 2026 (a Saturday) is Monday
        // the 3rd (W never crosses into another month).
        assert_eq!(
            t("0 9 1W * *", "2026-07-31T00:00:00Z"),
            "2026-08-03T09:00:00+00:00"
        );
        // Second Friday of December 2026.
        assert_eq!(
            t("0 18 * DEC FRI#2", "2026-11-01T00:00:00Z"),
            "2026-12-11T18:00:00+00:00"
        );
        assert_eq!(
            t("0 12 * * MON-FRI", "2026-11-28T00:00:00Z"),
            "2026-11-30T12:00:00+00:00"
        );
        assert_eq!(
            t("@daily", "2026-11-28T10:00:00Z"),
            "2026-11-29T00:00:00+00:00"
        );
        // Last Friday of December 2026; `?` as "any".
        assert_eq!(
            t("0 18 * DEC 5L", "2026-12-01T00:00:00Z"),
            "2026-12-25T18:00:00+00:00"
        );
        assert_eq!(
            t("0 0 12 ? * *", "2026-11-28T13:00:00Z"),
            "2026-11-29T12:00:00+00:00"
        );
        // A fraction of a second never comes back as its own tick.
        let when = CronSchedule::parse("* * * * * *", "UTC").unwrap();
        let now = utc("2026-01-01T00:00:00.5Z");
        assert_eq!(when.next_after(now).unwrap(), utc("2026-01-01T00:00:01Z"));
        assert_eq!(
            when.latest_at_or_before(now).unwrap(),
            utc("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            when.first_at_or_after(now).unwrap(),
            utc("2026-01-01T00:00:01Z")
        );
    }
}
