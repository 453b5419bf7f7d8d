//! Misfire planning: for one claimed schedule, which of its due ticks fire
//! a task, which are dropped, and its next tick. A tick is on time when it
//! is at most the grace late, and the grace is
//! `max(scheduler.misfire_grace, misfire_grace_fraction × period)`, so a
//! short outage never drops a tick that comes once a day; later ticks follow
//! the schedule's [`Misfire`] policy.
//!
//! It is pure computation over the database's `now()` handed in by the
//! scheduler: it must never read the local clock or the database, never plan
//! a tick after `now`, and never plan a tick for an unusable row (it returns
//! `last_error` instead).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::expr::CronSchedule;
use super::inner;
use super::schedule::Misfire;
use crate::error::Error;

/// The scheduler settings a plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct MisfireRules {
    /// A tick later than this when a scheduler gets to it was missed…
    pub grace: Duration,
    /// …or later than this fraction of the schedule's period, when that is
    /// longer: a daily tick 10 s late (a failover) is late, not missed.
    pub grace_fraction: f64,
    /// Most ticks one `all` catch-up fires (the latest ones).
    pub max_backfill: usize,
}

impl MisfireRules {
    pub fn from_config(config: &crate::config::SchedulerConfig) -> MisfireRules {
        MisfireRules {
            grace: config.misfire_grace,
            grace_fraction: config.misfire_grace_fraction,
            max_backfill: config.max_backfill,
        }
    }
}

/// One task to insert for a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Fire {
    pub tick: DateTime<Utc>,
    pub backfilled: bool,
    pub misfire_once: bool,
}

/// What to do with one claimed schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub fires: Vec<Fire>,
    /// Ticks that were due but fire no task (skip, once, or above the cap).
    pub dropped: usize,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Decide which ticks of a schedule fire at database time `now`, given its
/// `next_run_at` (`None`: not computed yet, so nothing fires). When the
/// oldest due tick is within the grace, every due tick fires; otherwise the
/// due ticks follow the misfire policy. The next tick is always the first
/// after `now`.
pub fn plan(
    cron: &str,
    tz: &str,
    misfire: Misfire,
    next_run_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    rules: MisfireRules,
) -> Plan {
    let fail = |e: Error| Plan {
        fires: Vec::new(),
        dropped: 0,
        next_run_at: None,
        last_error: Some(inner(e)),
    };
    let when = match CronSchedule::parse(cron, tz) {
        Ok(w) => w,
        Err(e) => return fail(e),
    };
    let next = match when.next_after(now) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let mut plan = Plan {
        fires: Vec::new(),
        dropped: 0,
        next_run_at: Some(next),
        last_error: None,
    };
    let Some(due) = next_run_at else {
        return plan;
    };
    let mut grace = chrono::Duration::from_std(rules.grace).unwrap_or(chrono::Duration::zero());
    // The period at the due tick: the grace grows with it, so a short outage
    // never drops a tick that comes once a day.
    if rules.grace_fraction > 0.0 {
        let period = when
            .first_at_or_after(due)
            .and_then(|t| when.next_after(t).map(|n| n - t));
        if let Ok(period) = period {
            let scaled = period.num_milliseconds() as f64 * rules.grace_fraction.min(1.0);
            grace = grace.max(chrono::Duration::milliseconds(scaled as i64));
        }
    }
    let missed_before = now - grace;
    let cap = rules.max_backfill.max(1);
    if due >= missed_before {
        // On time (or a little late): every due tick fires.
        let mut t = match when.first_at_or_after(due) {
            Ok(t) => t,
            Err(e) => return fail(e),
        };
        while t <= now && plan.fires.len() < cap {
            plan.fires.push(Fire {
                tick: t,
                backfilled: false,
                misfire_once: false,
            });
            t = match when.next_after(t) {
                Ok(t) => t,
                Err(_) => break,
            };
        }
        return plan;
    }
    // Missed: collect the due ticks from the latest backwards, as far as
    // needed (a year of seconds is never walked).
    let latest = when.latest_at_or_before(now).filter(|t| *t >= due);
    match misfire {
        Misfire::Skip => {
            plan.dropped = latest.map(|_| 1).unwrap_or(0);
        }
        Misfire::Once => {
            if let Some(t) = latest {
                plan.fires.push(Fire {
                    tick: t,
                    backfilled: false,
                    misfire_once: true,
                });
            }
        }
        Misfire::All => {
            let mut t = latest;
            while let Some(tick) = t {
                if plan.fires.len() == cap {
                    plan.dropped = 1;
                    break;
                }
                plan.fires.push(Fire {
                    tick,
                    backfilled: tick < missed_before,
                    misfire_once: false,
                });
                t = when.previous_before(tick).filter(|p| *p >= due);
            }
            plan.fires.reverse();
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn rules() -> MisfireRules {
        MisfireRules {
            grace: Duration::from_secs(5),
            grace_fraction: 0.1,
            max_backfill: 100,
        }
    }

    #[test]
    fn the_grace_scales_with_the_period() {
        // A daily tick 10 s late fires under skip; a minutely one 10 s late
        // is missed (its grace is max(5 s, 6 s)).
        let daily = plan(
            "0 2 * * *",
            "UTC",
            Misfire::Skip,
            Some(utc("2026-06-01T02:00:00Z")),
            utc("2026-06-01T02:00:10Z"),
            rules(),
        );
        assert_eq!(daily.fires.len(), 1);
        assert_eq!(daily.dropped, 0);
        let minutely = plan(
            "* * * * *",
            "UTC",
            Misfire::Skip,
            Some(utc("2026-06-01T02:00:00Z")),
            utc("2026-06-01T02:00:10Z"),
            rules(),
        );
        assert!(minutely.fires.is_empty());
        let off = plan(
            "0 2 * * *",
            "UTC",
            Misfire::Skip,
            Some(utc("2026-06-01T02:00:00Z")),
            utc("2026-06-01T02:00:10Z"),
            MisfireRules {
                grace_fraction: 0.0,
                ..rules()
            },
        );
        assert!(off.fires.is_empty(), "fraction 0: the fixed grace alone");
    }

    #[test]
    fn plans_follow_the_misfire_policy() {
        let now = utc("2026-06-01T12:00:30.25Z");
        let due = Some(utc("2026-06-01T11:55:00Z"));
        let next = Some(utc("2026-06-01T12:01:00Z"));
        let skip = plan("* * * * *", "UTC", Misfire::Skip, due, now, rules());
        assert!(skip.fires.is_empty());
        assert_eq!(skip.next_run_at, next);
        let once = plan("* * * * *", "UTC", Misfire::Once, due, now, rules());
        assert_eq!(once.fires.len(), 1);
        assert_eq!(once.fires[0].tick, utc("2026-06-01T12:00:00Z"));
        assert!(once.fires[0].misfire_once);
        assert_eq!(once.next_run_at, next);
        let all = plan("* * * * *", "UTC", Misfire::All, due, now, rules());
        let ticks: Vec<_> = all.fires.iter().map(|f| f.tick).collect();
        assert_eq!(
            ticks,
            (0..6)
                .map(|m| utc("2026-06-01T11:55:00Z") + chrono::Duration::minutes(m))
                .collect::<Vec<_>>()
        );
        assert!(all.fires.iter().all(|f| f.backfilled));
        let capped = plan(
            "* * * * *",
            "UTC",
            Misfire::All,
            due,
            now,
            MisfireRules {
                max_backfill: 2,
                ..rules()
            },
        );
        assert_eq!(
            capped.fires.iter().map(|f| f.tick).collect::<Vec<_>>(),
            [utc("2026-06-01T11:59:00Z"), utc("2026-06-01T12:00:00Z")]
        );
        // On time: the due tick fires whatever the policy.
        let on_time = plan(
            "* * * * *",
            "UTC",
            Misfire::Skip,
            Some(utc("2026-06-01T12:00:00Z")),
            utc("2026-06-01T12:00:00.002Z"),
            rules(),
        );
        assert_eq!(on_time.fires.len(), 1);
        assert!(!on_time.fires[0].backfilled);
        // Not computed yet: nothing fires, the next tick is after now.
        let fresh = plan("* * * * *", "UTC", Misfire::All, None, now, rules());
        assert!(fresh.fires.is_empty());
        assert_eq!(fresh.next_run_at, next);
        // Unusable rows get an error, never a tick.
        let bad = plan("* * *", "UTC", Misfire::All, due, now, rules());
        assert!(bad.fires.is_empty() && bad.next_run_at.is_none());
        assert!(bad.last_error.unwrap().contains("\"* * *\""));
        let zone = plan(
            "* * * * *",
            "Europe/Nowhere",
            Misfire::All,
            due,
            now,
            rules(),
        );
        assert!(zone.last_error.unwrap().contains("Europe/Nowhere"));
    }

    #[test]
    fn catch_up_across_dst_matches_the_forward_ticks() {
        // `all` walks backwards from now; it must find exactly the ticks the
        // forward walk fires, through both transitions.
        for (tz, from, to) in [
            (
                "Europe/Berlin",
                "2026-03-28T20:00:00Z",
                "2026-03-29T06:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2026-10-24T20:00:00Z",
                "2026-10-25T06:00:00Z",
            ),
            (
                "America/New_York",
                "2026-11-01T02:00:00Z",
                "2026-11-01T10:00:00Z",
            ),
        ] {
            for expr in ["0 * * * *", "30 2 * * *", "*/20 * * * *"] {
                let when = CronSchedule::parse(expr, tz).unwrap();
                let due = when.next_after(utc(from)).unwrap();
                let forward: Vec<_> = std::iter::successors(Some(due), |t| {
                    when.next_after(*t).ok().filter(|n| *n <= utc(to))
                })
                .collect();
                let all = plan(expr, tz, Misfire::All, Some(due), utc(to), rules());
                let ticks: Vec<_> = all.fires.iter().map(|f| f.tick).collect();
                assert_eq!(ticks, forward, "{expr} in {tz}");
                let once = plan(expr, tz, Misfire::Once, Some(due), utc(to), rules());
                assert_eq!(
                    once.fires[0].tick,
                    *forward.last().unwrap(),
                    "{expr} in {tz}"
                );
            }
        }
    }
}
