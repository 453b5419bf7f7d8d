//! Cron schedules without pg_cron: `herald.schedules` rows that enqueue a
//! task on every tick of a cron expression in an IANA time zone.
//!
//! This module owns parsing and validating expressions and time zones
//! (croner, chrono-tz), computing ticks (with the daylight-saving rules
//! written in `docs/scheduling.md` and tested below), the [`Scheduler`]
//! service, the misfire policies, the sync of `[[schedules]]` from the
//! configuration, the Rust API ([`Schedule`], [`upsert`], [`pause`], …) and
//! the `herald schedules …` subcommands.
//!
//! It must never fire a tick twice: a tick's task is inserted, with the unique
//! key `cron:<name>:<tick RFC 3339>`, in the same transaction that holds the
//! schedule's row lock (`FOR UPDATE SKIP LOCKED`) and advances its
//! `next_run_at`. It must never decide that a tick is due by the local clock:
//! the database's `now()` decides, so skewed nodes cannot double-fire. It
//! must never let one unusable row (an expression croner rejects, a zone
//! chrono-tz does not know) stop the others: such a row gets `last_error` and
//! is skipped until its definition changes. NOTIFY `herald_schedules` is only
//! a wake-up; every decision is read from the table.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use deadpool_postgres::Pool;
use futures_util::future::poll_fn;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, GenericClient, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Error, Result};

/// The NOTIFY channel of `herald.schedules` (statement trigger).
pub const CHANNEL: &str = "herald_schedules";
const LISTEN_APPLICATION_NAME: &str = "herald-scheduler-listen";
/// Most due schedules claimed in one transaction.
const CLAIM_BATCH: i64 = 100;
/// Serializes configuration syncs of concurrently starting processes
/// ("hsched" in ASCII).
const SYNC_LOCK: i64 = 0x6873_6368_6564;

/// What the expectation part of every bad-expression message says.
const EXPECTED_CRON: &str = "expected 5 fields (minute hour day-of-month month day-of-week) \
or 6 with seconds first, such as \"*/5 * * * *\" or \"0 30 2 * * MON-FRI\", or one of @yearly, \
@monthly, @weekly, @daily, @hourly";

// ---------------------------------------------------------------------------
// Expressions, zones and ticks

/// What to do with ticks that passed while no scheduler ran (more than
/// `scheduler.misfire_grace`, or `scheduler.misfire_grace_fraction` of the
/// schedule's period when that is longer, late when a scheduler gets to
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Fire nothing for them; continue with the next future tick.
    #[default]
    Skip,
    /// Fire one task, for the latest of them.
    Once,
    /// Fire every one of them (the latest `scheduler.max_backfill`), flagged
    /// `herald_backfilled`.
    All,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::Once => "once",
            Misfire::All => "all",
        }
    }
}

impl fmt::Display for Misfire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Misfire {
    type Err = Error;

    fn from_str(s: &str) -> Result<Misfire> {
        match s {
            "skip" => Ok(Misfire::Skip),
            "once" => Ok(Misfire::Once),
            "all" => Ok(Misfire::All),
            other => Err(Error::InvalidSchedule(format!(
                "unknown misfire policy {other:?}: expected skip, once or all"
            ))),
        }
    }
}

impl Serialize for Misfire {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Misfire {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Misfire, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

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
    fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
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

/// The unique key of a tick's task: `cron:<name>:<tick in RFC 3339, UTC>`.
pub fn unique_key(name: &str, tick: DateTime<Utc>) -> String {
    format!("cron:{name}:{}", rfc3339(tick))
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

// ---------------------------------------------------------------------------
// Declaring schedules

fn default_tz() -> String {
    "UTC".into()
}
fn default_queue() -> String {
    crate::queue::DEFAULT_QUEUE.into()
}
fn default_payload() -> Value {
    Value::Object(Map::new())
}
fn default_max_attempts() -> i32 {
    crate::queue::DEFAULT_MAX_ATTEMPTS
}

/// A schedule as declared: in `[[schedules]]` of the configuration, in code
/// (next to the handler registration) or from the CLI.
///
/// ```no_run
/// # async fn demo(client: &tokio_postgres::Client) -> herald::Result<()> {
/// use herald::cron::{Misfire, Schedule};
/// let nightly = Schedule::new("nightly-report", "30 2 * * *", "report.build", &serde_json::json!({}))?
///     .tz("Europe/Berlin")
///     .misfire(Misfire::Once);
/// herald::cron::upsert(client, &nightly).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Unique name: letters, digits, `.`, `_`, `-`, `:` (at most 200).
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds first.
    pub cron: String,
    /// Task kind the schedule enqueues.
    pub kind: String,
    /// The task's payload.
    #[serde(default = "default_payload")]
    pub payload: Value,
    /// IANA time zone the expression is read in.
    #[serde(default = "default_tz")]
    pub tz: String,
    #[serde(default = "default_queue")]
    pub queue: String,
    #[serde(default)]
    pub misfire: Misfire,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// `Some(false)` pauses it; unset leaves an existing schedule as it is
    /// (a new one starts enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl Schedule {
    pub fn new<T: Serialize + ?Sized>(
        name: impl Into<String>,
        cron: impl Into<String>,
        kind: impl Into<String>,
        payload: &T,
    ) -> Result<Schedule> {
        let name = name.into();
        let payload = serde_json::to_value(payload).map_err(|error| Error::Json {
            what: format!("payload of schedule {name:?}"),
            error,
        })?;
        Ok(Schedule {
            name,
            cron: cron.into(),
            kind: kind.into(),
            payload,
            tz: default_tz(),
            queue: default_queue(),
            misfire: Misfire::Skip,
            priority: 0,
            max_attempts: default_max_attempts(),
            enabled: None,
        })
    }

    pub fn tz(mut self, tz: impl Into<String>) -> Schedule {
        self.tz = tz.into();
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Schedule {
        self.queue = queue.into();
        self
    }

    pub fn misfire(mut self, misfire: Misfire) -> Schedule {
        self.misfire = misfire;
        self
    }

    pub fn priority(mut self, priority: i32) -> Schedule {
        self.priority = priority;
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Schedule {
        self.max_attempts = n;
        self
    }

    pub fn enabled(mut self, enabled: bool) -> Schedule {
        self.enabled = Some(enabled);
        self
    }

    /// Check everything a scheduler will need; the error names the schedule
    /// and quotes the offending text.
    pub fn validate(&self) -> Result<CronSchedule> {
        validate_schedule_name(&self.name)?;
        let in_schedule =
            |e: Error| Error::InvalidSchedule(format!("schedule {:?}: {}", self.name, inner(e)));
        let when = CronSchedule::parse(&self.cron, &self.tz).map_err(in_schedule)?;
        crate::queue::validate_name("task kind", &self.kind, 255).map_err(in_schedule)?;
        crate::queue::validate_name("queue", &self.queue, 128).map_err(in_schedule)?;
        if self.max_attempts < 1 {
            return Err(Error::InvalidSchedule(format!(
                "schedule {:?}: max_attempts must be at least 1, got {}",
                self.name, self.max_attempts
            )));
        }
        Ok(when)
    }
}

/// The message of an error without its variant's prefix.
pub fn inner(e: Error) -> String {
    match e {
        Error::InvalidSchedule(m) | Error::InvalidTask(m) => m,
        other => other.to_string(),
    }
}

pub fn validate_schedule_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(Error::InvalidSchedule(format!(
            "invalid schedule name {name:?}: expected 1 to 200 letters, digits, '.', '_', '-' or ':'"
        )));
    }
    Ok(())
}

/// Where a schedule was declared. Only `config` rows are removed by the
/// configuration sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
}

const UPSERT: &str = "SELECT herald.upsert_schedule(name => $1, cron => $2, kind => $3, \
payload => $4::text::jsonb, tz => $5, queue => $6, misfire => $7, priority => $8, \
max_attempts => $9, enabled => $10, source => $11)";

/// Create or change a schedule (source `api`) through `client`, which may be
/// a transaction; validated here first, then by `herald.upsert_schedule`.
/// A change of its expression or zone makes the schedulers recompute its
/// next tick from now. Returns its id.
pub async fn upsert<C: GenericClient + Sync>(client: &C, schedule: &Schedule) -> Result<i64> {
    upsert_as(client, schedule, Source::Api).await
}

async fn upsert_as<C: GenericClient + Sync>(
    client: &C,
    schedule: &Schedule,
    source: Source,
) -> Result<i64> {
    schedule.validate()?;
    let payload = schedule.payload.to_string();
    let row = client
        .query_typed_one(
            UPSERT,
            &[
                (&schedule.name, Type::TEXT),
                (&schedule.cron, Type::TEXT),
                (&schedule.kind, Type::TEXT),
                (&payload, Type::TEXT),
                (&schedule.tz, Type::TEXT),
                (&schedule.queue, Type::TEXT),
                (&schedule.misfire.as_str(), Type::TEXT),
                (&schedule.priority, Type::INT4),
                (&schedule.max_attempts, Type::INT4),
                (&schedule.enabled, Type::BOOL),
                (&source.as_str(), Type::TEXT),
            ],
        )
        .await
        .context(format!("saving schedule {:?}", schedule.name))?;
    Ok(row.get(0))
}

async fn call_by_name<C: GenericClient + Sync>(
    client: &C,
    function: &str,
    name: &str,
    what: &str,
) -> Result<()> {
    client
        .execute(&format!("SELECT herald.{function}($1)"), &[&name])
        .await
        .context(format!("{what} schedule {name:?}"))?;
    Ok(())
}

/// Stop firing a schedule (it stays, with its definition).
pub async fn pause<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    call_by_name(client, "pause_schedule", name, "pausing").await
}

/// Fire again, from the next tick after now.
pub async fn resume<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    call_by_name(client, "resume_schedule", name, "resuming").await
}

pub async fn remove<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    call_by_name(client, "remove_schedule", name, "removing").await
}

/// Enqueue the schedule's task now, once; returns the task id.
pub async fn trigger<C: GenericClient + Sync>(client: &C, name: &str) -> Result<i64> {
    let row = client
        .query_one("SELECT herald.trigger_schedule($1)", &[&name])
        .await
        .context(format!("triggering schedule {name:?}"))?;
    Ok(row.get(0))
}

/// What a configuration sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

/// Make the `config` schedules in the database match `schedules`: create the
/// new ones, update the changed ones, remove those no longer declared.
/// Schedules of source `api` are never removed; one declared in the
/// configuration under the same name becomes a `config` schedule. One
/// transaction, serialized with other processes' syncs.
pub async fn sync_config(
    client: &mut tokio_postgres::Client,
    schedules: &[Schedule],
) -> Result<SyncReport> {
    for s in schedules {
        s.validate()?;
    }
    let tx = client
        .transaction()
        .await
        .context("beginning the schedule sync")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SYNC_LOCK])
        .await
        .context("taking the schedule sync lock")?;
    let before: std::collections::HashMap<String, DateTime<Utc>> = tx
        .query("SELECT name, updated_at FROM herald.schedules", &[])
        .await
        .context("reading herald.schedules")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut report = SyncReport::default();
    for s in schedules {
        upsert_as(&tx, s, Source::Config).await?;
    }
    let names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    for row in tx
        .query(
            "SELECT name, updated_at FROM herald.schedules WHERE name = ANY($1)",
            &[&names],
        )
        .await
        .context("reading herald.schedules")?
    {
        let name: String = row.get(0);
        match before.get(&name) {
            None => report.created.push(name),
            Some(at) if *at != row.get::<_, DateTime<Utc>>(1) => report.updated.push(name),
            Some(_) => {}
        }
    }
    report.removed = tx
        .query(
            "DELETE FROM herald.schedules WHERE source = 'config' AND NOT (name = ANY($1)) \
             RETURNING name",
            &[&names],
        )
        .await
        .context("removing schedules no longer in the configuration")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit().await.context("committing the schedule sync")?;
    Ok(report)
}

/// A schedule as stored, for listing.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleRow {
    pub name: String,
    pub cron: String,
    pub tz: String,
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub enabled: bool,
    pub misfire: String,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The database's now() when the list was read.
    #[serde(skip)]
    pub read_at: DateTime<Utc>,
}

impl ScheduleRow {
    /// The next `n` fire times in the schedule's zone: from `next_run_at`
    /// when a scheduler has computed it, else (new, or paused) from now.
    pub fn upcoming(&self, n: usize) -> Result<Vec<DateTime<Tz>>> {
        let when = CronSchedule::parse(&self.cron, &self.tz)?;
        match self.next_run_at.filter(|_| self.enabled) {
            Some(next) => when.upcoming(next, n),
            None => when.upcoming(when.next_after(self.read_at)?, n),
        }
    }
}

pub async fn list<C: GenericClient + Sync>(client: &C) -> Result<Vec<ScheduleRow>> {
    let rows = client
        .query(
            "SELECT name, cron, tz, queue, kind, payload::text, priority, max_attempts, enabled, \
                    misfire, CASE WHEN isfinite(next_run_at) THEN next_run_at END, \
                    CASE WHEN isfinite(last_run_at) THEN last_run_at END, last_error, source, \
                    created_at, updated_at, now() \
             FROM herald.schedules ORDER BY name",
            &[],
        )
        .await
        .context("listing herald.schedules")?;
    rows.iter()
        .map(|r| {
            let payload: String = r.get(5);
            Ok(ScheduleRow {
                name: r.get(0),
                cron: r.get(1),
                tz: r.get(2),
                queue: r.get(3),
                kind: r.get(4),
                payload: serde_json::from_str(&payload).map_err(|error| Error::Json {
                    what: "a schedule's payload".into(),
                    error,
                })?,
                priority: r.get(6),
                max_attempts: r.get(7),
                enabled: r.get(8),
                misfire: r.get(9),
                next_run_at: r.get(10),
                last_run_at: r.get(11),
                last_error: r.get(12),
                source: r.get(13),
                created_at: r.get(14),
                updated_at: r.get(15),
                read_at: r.get(16),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Planning one due schedule

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

// ---------------------------------------------------------------------------
// The scheduler service

/// Counters a caller (a test, the bench) can read while it runs.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Times the scheduler looked at the table (claim and next-tick query).
    pub cycles: AtomicU64,
    pub fired: AtomicU64,
    pub claims: AtomicU64,
    pub invalid: AtomicU64,
    pub listen_connects: AtomicU64,
    /// Whether the LISTEN connection is up now (`/readyz`).
    pub listening: std::sync::atomic::AtomicBool,
}

/// Fires due schedules until shut down. Run as many as you like, in as many
/// processes: each tick fires once across all of them.
pub struct Scheduler {
    config: Config,
    pool: Pool,
    declared: Vec<Schedule>,
    stats: Arc<SchedulerStats>,
}

const CLAIM: &str = "
SELECT id, name, cron, tz, queue, kind, payload::text, priority, max_attempts, misfire,
       CASE WHEN isfinite(next_run_at) THEN next_run_at END, now()
FROM herald.schedules
WHERE enabled
  AND ((next_run_at IS NULL AND last_error IS NULL) OR next_run_at <= now())
ORDER BY next_run_at NULLS FIRST, id
LIMIT $1
FOR UPDATE SKIP LOCKED";

const INSERT_TASKS: &str = "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, max_attempts, unique_key)
SELECT x.queue, x.kind, x.payload::jsonb, x.headers::jsonb, x.priority, x.max_attempts, x.unique_key
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[])
     AS x(queue, kind, payload, headers, priority, max_attempts, unique_key)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('ready', 'running')
DO NOTHING";

const ADVANCE: &str = "
UPDATE herald.schedules s
SET next_run_at = u.next_run_at,
    last_run_at = coalesce(u.last_run_at, s.last_run_at),
    last_error = u.last_error
FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::text[])
     AS u(id, next_run_at, last_run_at, last_error)
WHERE s.id = u.id";

/// Seconds from the database's clock to the earliest tick, and whether some
/// enabled row still waits for its first next_run_at.
const NEXT_WAKE: &str = "
SELECT extract(epoch FROM min(next_run_at) FILTER (WHERE isfinite(next_run_at))
                     - clock_timestamp())::float8,
       bool_or(next_run_at IS NULL AND last_error IS NULL)
FROM herald.schedules
WHERE enabled";

impl Scheduler {
    pub fn new(config: &Config, pool: Pool) -> Scheduler {
        Scheduler {
            config: config.clone(),
            pool,
            declared: Vec::new(),
            stats: Arc::new(SchedulerStats::default()),
        }
    }

    /// Declare a schedule in code; it is saved (source `api`: created or
    /// updated, never removed automatically) when the scheduler starts.
    pub fn schedule(mut self, schedule: Schedule) -> Scheduler {
        self.declared.push(schedule);
        self
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// Sync `[[schedules]]` and the schedules declared in code, then fire
    /// due ticks until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        for s in &self.declared {
            s.validate()?;
        }
        {
            let mut client = crate::db::connect(&self.config, "herald-scheduler").await?;
            crate::migrate::check_schema(&client).await?;
            check_schedules_table(&client).await?;
            let report = sync_config(&mut client, &self.config.schedules).await?;
            if report != SyncReport::default() {
                tracing::info!(
                    created = ?report.created,
                    updated = ?report.updated,
                    removed = ?report.removed,
                    "schedules synced from the configuration"
                );
            }
            for s in &self.declared {
                upsert(&client, s).await?;
            }
        }
        let (wake_tx, mut wake) = watch::channel(0u64);
        let wake_tx = Arc::new(wake_tx);
        let listener = tokio::spawn(listen(
            self.config.clone(),
            wake_tx.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));
        let rules = MisfireRules::from_config(&self.config.scheduler);
        let poll = self.config.scheduler.poll_interval;
        tracing::info!(
            configured = self.config.schedules.len(),
            "scheduler started"
        );
        let mut backoff =
            crate::relay::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut busy = Duration::from_millis(20);
        while !shutdown.is_cancelled() {
            wake.borrow_and_update();
            let pause = match self.cycle(rules).await {
                Ok(Some(secs)) if secs > 0.0 => {
                    backoff.reset();
                    busy = Duration::from_millis(20);
                    Duration::from_secs_f64(secs).min(poll)
                }
                Ok(Some(_)) => {
                    // Due rows we could not lock: another scheduler is firing
                    // them. Its commit notifies; poll gently meanwhile.
                    backoff.reset();
                    let p = busy;
                    busy = (busy * 2).min(poll);
                    p
                }
                Ok(None) => {
                    backoff.reset();
                    poll
                }
                Err(error) => {
                    tracing::warn!(%error, "scheduler cycle failed; backing off");
                    backoff.next()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = wake.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
        listener.abort();
        let _ = listener.await;
        tracing::info!(
            fired = self.stats.fired.load(Ordering::Relaxed),
            "scheduler stopped"
        );
        Ok(())
    }

    /// Fire everything due; return the seconds until the next tick by the
    /// database's clock (`<= 0`: due rows are held by another scheduler), or
    /// `None` when no enabled schedule has one.
    async fn cycle(&self, rules: MisfireRules) -> Result<Option<f64>> {
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        loop {
            let claimed = self.claim_and_fire(rules).await?;
            if claimed < CLAIM_BATCH as usize {
                break;
            }
        }
        let client = self.pool.get().await?;
        let row = client
            .query_one(NEXT_WAKE, &[])
            .await
            .context("reading the next tick of herald.schedules")?;
        let secs: Option<f64> = row.get(0);
        let pending: Option<bool> = row.get(1);
        if pending == Some(true) {
            return Ok(Some(0.0));
        }
        Ok(secs)
    }

    /// One transaction: lock due rows (skipping those another scheduler
    /// holds), insert their ticks' tasks, advance next_run_at, commit.
    async fn claim_and_fire(&self, rules: MisfireRules) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let claim = client
            .prepare_cached(CLAIM)
            .await
            .context("preparing the schedule claim")?;
        let tx = client
            .transaction()
            .await
            .context("beginning a schedule claim")?;
        let rows = tx
            .query(&claim, &[&CLAIM_BATCH])
            .await
            .context("claiming due schedules")?;
        if rows.is_empty() {
            tx.commit()
                .await
                .context("ending an empty schedule claim")?;
            return Ok(0);
        }
        let span = tracing::info_span!(
            "herald.schedule.fire",
            otel.kind = "producer",
            herald.schedule.count = rows.len() as i64,
            herald.schedule.fired = tracing::field::Empty,
        );
        // The fired tasks continue this span's trace.
        let traceparent = crate::telemetry::traceparent_of(&span);
        // (schedule, tick, lateness in seconds), recorded once committed.
        let mut fired: Vec<(String, DateTime<Utc>, f64)> = Vec::new();
        let mut misfired: Vec<(String, u64)> = Vec::new();
        let mut t_queue: Vec<String> = Vec::new();
        let mut t_kind: Vec<String> = Vec::new();
        let mut t_payload: Vec<String> = Vec::new();
        let mut t_headers: Vec<String> = Vec::new();
        let mut t_priority: Vec<i32> = Vec::new();
        let mut t_max: Vec<i32> = Vec::new();
        let mut t_key: Vec<String> = Vec::new();
        let mut u_id: Vec<i64> = Vec::with_capacity(rows.len());
        let mut u_next: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(rows.len());
        let mut u_last: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(rows.len());
        let mut u_error: Vec<Option<String>> = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            let name: String = row.get(1);
            let cron: String = row.get(2);
            let tz: String = row.get(3);
            let misfire_text: String = row.get(9);
            let next_run_at: Option<DateTime<Utc>> = row.get(10);
            let now: DateTime<Utc> = row.get(11);
            let plan = match misfire_text.parse::<Misfire>() {
                Ok(misfire) => plan(&cron, &tz, misfire, next_run_at, now, rules),
                Err(e) => Plan {
                    fires: Vec::new(),
                    dropped: 0,
                    next_run_at: None,
                    last_error: Some(inner(e)),
                },
            };
            if let Some(error) = &plan.last_error {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                tracing::error!(schedule = %name, %error, "schedule cannot fire; marked with last_error and skipped until it changes");
            }
            if plan.dropped > 0 || plan.fires.iter().any(|f| f.backfilled || f.misfire_once) {
                misfired.push((name.clone(), plan.dropped as u64));
                tracing::warn!(
                    parent: &span,
                    event = crate::telemetry::names::event::SCHEDULE_MISFIRED,
                    dropped = plan.dropped as u64,
                    schedule = %name,
                    policy = %misfire_text,
                    fired = plan.fires.len(),
                    missed_since = ?next_run_at,
                    "ticks were missed while no scheduler ran"
                );
            }
            let tz_parsed = parse_tz(&tz).ok();
            for fire in &plan.fires {
                let mut headers = Map::new();
                fired.push((
                    name.clone(),
                    fire.tick,
                    (now - fire.tick).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6,
                ));
                if let Some(tp) = &traceparent {
                    headers.insert(
                        crate::outbox::headers::TRACEPARENT.into(),
                        Value::from(tp.as_str()),
                    );
                }
                headers.insert("herald_schedule".into(), Value::from(name.as_str()));
                headers.insert("herald_tick".into(), Value::from(rfc3339(fire.tick)));
                if let Some(zone) = tz_parsed {
                    headers.insert(
                        "herald_tick_local".into(),
                        Value::from(
                            fire.tick
                                .with_timezone(&zone)
                                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
                        ),
                    );
                }
                if fire.backfilled {
                    headers.insert("herald_backfilled".into(), Value::Bool(true));
                }
                if fire.misfire_once {
                    headers.insert("herald_misfire".into(), Value::from("once"));
                }
                t_queue.push(row.get(4));
                t_kind.push(row.get(5));
                t_payload.push(row.get(6));
                t_headers.push(Value::Object(headers).to_string());
                t_priority.push(row.get(7));
                t_max.push(row.get(8));
                t_key.push(unique_key(&name, fire.tick));
            }
            u_id.push(id);
            u_next.push(plan.next_run_at);
            u_last.push(plan.fires.last().map(|f| f.tick));
            u_error.push(plan.last_error);
        }
        let mut inserted = 0;
        if !t_key.is_empty() {
            inserted = tx
                .execute(
                    INSERT_TASKS,
                    &[
                        &t_queue,
                        &t_kind,
                        &t_payload,
                        &t_headers,
                        &t_priority,
                        &t_max,
                        &t_key,
                    ],
                )
                .await
                .context("inserting the tasks of due schedules")?;
            if inserted < t_key.len() as u64 {
                tracing::warn!(
                    planned = t_key.len(),
                    inserted,
                    "some ticks already had an unfinished task with their unique key"
                );
            }
        }
        tx.execute(ADVANCE, &[&u_id, &u_next, &u_last, &u_error])
            .await
            .context("advancing next_run_at of fired schedules")?;
        tx.commit().await.context("committing fired schedules")?;
        self.stats.fired.fetch_add(inserted, Ordering::Relaxed);
        self.stats.claims.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(schedules = rows.len(), tasks = inserted, "schedules fired");
        span.record("herald.schedule.fired", inserted as i64);
        {
            use crate::telemetry::names::{event, metric};
            for (schedule, tick, lateness) in fired {
                tracing::debug!(parent: &span, event = event::SCHEDULE_FIRED,
                    schedule = schedule.as_str(), tick = %rfc3339(tick), lateness,
                    "schedule fired");
                metrics::counter!(metric::SCHEDULE_FIRED, "schedule" => schedule.clone())
                    .increment(1);
                metrics::histogram!(metric::SCHEDULE_LATENESS, "schedule" => schedule)
                    .record(lateness.max(0.0));
            }
            for (schedule, dropped) in misfired {
                if dropped > 0 {
                    metrics::counter!(metric::SCHEDULE_MISFIRED, "schedule" => schedule)
                        .increment(dropped);
                }
            }
        }
        Ok(rows.len())
    }
}

/// Fail with a clear message when the database predates `herald.schedules`.
pub async fn check_schedules_table(client: &tokio_postgres::Client) -> Result<()> {
    let row = client
        .query_one("SELECT to_regclass('herald.schedules') IS NOT NULL", &[])
        .await
        .context("checking for herald.schedules")?;
    if !row.get::<_, bool>(0) {
        return Err(Error::Config(
            "herald.schedules is missing: the database predates cron schedules; run \
             `herald migrate` (or enable migrate_on_start)"
                .into(),
        ));
    }
    Ok(())
}

/// Keep a LISTEN herald_schedules session open; every notification and every
/// (re)connect wakes the scheduler loop.
async fn listen(
    config: Config,
    wake: Arc<watch::Sender<u64>>,
    stats: Arc<SchedulerStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = crate::relay::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = listen_once(&config, &wake, &stats) => outcome,
        };
        stats.listening.store(false, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                backoff.reset();
                tracing::warn!(
                    event = crate::telemetry::names::event::POSTGRES_CONNECTION_LOST,
                    component = "scheduler",
                    %reason,
                    "scheduler LISTEN connection lost; reconnecting"
                );
            }
            Err(error) => tracing::warn!(%error, "scheduler LISTEN connection failed"),
        }
        wake.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

async fn listen_once(
    config: &Config,
    wake: &watch::Sender<u64>,
    stats: &SchedulerStats,
) -> Result<String> {
    let pg = crate::db::pg_config(config, LISTEN_APPLICATION_NAME)?;
    let (client, mut connection) = pg
        .connect(NoTls)
        .await
        .context("opening the scheduler's LISTEN connection")?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let wake_driver = wake.clone();
    let driver = tokio::spawn(async move {
        let end = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake_driver.send_modify(|g| *g += 1),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(crate::error::describe_pg(&e)),
                None => break None,
            }
        };
        let _ = closed_tx.send(end);
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .context("LISTEN herald_schedules")?;
    if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
        crate::telemetry::reconnected("postgres", "scheduler");
    }
    stats.listening.store(true, Ordering::Relaxed);
    // Look again now that changes cannot go unnoticed.
    wake.send_modify(|g| *g += 1);
    let end = closed_rx.await.ok().flatten();
    drop(client);
    let _ = driver.await;
    Ok(end.unwrap_or_else(|| "closed by the server".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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

    #[test]
    fn bad_input_quotes_the_text_and_says_what_is_expected() {
        for (expr, needle) in [
            ("61 * * * *", "61 * * * *"),
            ("* * * *", "4 fields"),
            ("* * * * * * *", "7 fields"),
            ("", "empty"),
            ("0 0 31 2 *", "never matches"),
            ("*/0 * * * *", "*/0 * * * *"),
        ] {
            let err = CronSchedule::parse(expr, "UTC").unwrap_err().to_string();
            assert!(err.contains(needle), "{expr:?}: {err}");
            assert!(err.contains("expected 5 fields"), "{expr:?}: {err}");
        }
        let err = CronSchedule::parse("* * * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"Mars/Olympus\"") && err.contains("IANA"),
            "{err}"
        );
        let err = "sometimes".parse::<Misfire>().unwrap_err().to_string();
        assert!(
            err.contains("\"sometimes\"") && err.contains("skip, once or all"),
            "{err}"
        );
        let s = Schedule::new("bad name", "* * * * *", "k", &serde_json::json!({})).unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("bad name"));
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

    #[test]
    fn unique_keys_are_utc_rfc3339() {
        let tick = chrono_tz::Europe::Berlin
            .with_ymd_and_hms(2026, 10, 25, 2, 0, 0)
            .earliest()
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(unique_key("n", tick), "cron:n:2026-10-25T00:00:00Z");
    }
}
