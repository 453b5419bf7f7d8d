//! Every statement on `herald.schedules`: the SQL API calls that write it
//! (`upsert_schedule`, `pause_schedule`, `resume_schedule`,
//! `remove_schedule`, `trigger_schedule`), the configuration sync's lock,
//! reads and delete, the scheduler's claim (`FOR UPDATE SKIP LOCKED`), its
//! advance of `next_run_at` / `last_run_at` / `last_error` and its next-wake
//! read, and the listing for operators.
//!
//! It runs statements and reads rows, nothing else: it must never decide
//! which ticks fire (`cron::misfire`), validate a definition (`cron` does,
//! before calling here; the SQL functions check again), or insert tasks (the
//! scheduler inserts its ticks' tasks in the claim's transaction).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

use crate::error::{Context, Error, Result};

/// Fail-fast check that the schema has the table (databases before cron).
const TABLE_EXISTS: &str = "SELECT to_regclass('herald.schedules') IS NOT NULL AS present";

pub(crate) async fn table_exists<C: GenericClient + Sync>(client: &C) -> Result<bool> {
    let row = client
        .query_one(TABLE_EXISTS, &[])
        .await
        .context("checking for herald.schedules")?;
    Ok(row.get("present"))
}

// ---------------------------------------------------------------------------
// Definitions: the SQL API

const UPSERT: &str = "SELECT herald.upsert_schedule(name => $1, cron => $2, kind => $3, \
payload => $4::text::jsonb, tz => $5, queue => $6, misfire => $7, priority => $8, \
max_attempts => $9, enabled => $10, source => $11) AS id";

/// The arguments of `herald.upsert_schedule`, already validated.
pub(crate) struct Upsert<'a> {
    pub name: &'a str,
    pub cron: &'a str,
    pub kind: &'a str,
    pub payload: &'a Value,
    pub tz: &'a str,
    pub queue: &'a str,
    pub misfire: &'a str,
    pub priority: i32,
    pub max_attempts: i32,
    pub enabled: Option<bool>,
    /// `config` or `api`.
    pub source: &'a str,
}

/// Create or change a schedule; returns its id.
pub(crate) async fn upsert<C: GenericClient + Sync>(client: &C, s: &Upsert<'_>) -> Result<i64> {
    let payload = s.payload.to_string();
    let row = client
        .query_typed_one(
            UPSERT,
            &[
                (&s.name, Type::TEXT),
                (&s.cron, Type::TEXT),
                (&s.kind, Type::TEXT),
                (&payload, Type::TEXT),
                (&s.tz, Type::TEXT),
                (&s.queue, Type::TEXT),
                (&s.misfire, Type::TEXT),
                (&s.priority, Type::INT4),
                (&s.max_attempts, Type::INT4),
                (&s.enabled, Type::BOOL),
                (&s.source, Type::TEXT),
            ],
        )
        .await
        .context(format!("saving schedule {:?}", s.name))?;
    Ok(row.get("id"))
}

const PAUSE: &str = "SELECT herald.pause_schedule($1)";

pub(crate) async fn pause<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    client
        .execute(PAUSE, &[&name])
        .await
        .context(format!("pausing schedule {name:?}"))?;
    Ok(())
}

const RESUME: &str = "SELECT herald.resume_schedule($1)";

pub(crate) async fn resume<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    client
        .execute(RESUME, &[&name])
        .await
        .context(format!("resuming schedule {name:?}"))?;
    Ok(())
}

const REMOVE: &str = "SELECT herald.remove_schedule($1)";

pub(crate) async fn remove<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    client
        .execute(REMOVE, &[&name])
        .await
        .context(format!("removing schedule {name:?}"))?;
    Ok(())
}

/// The SQL function inserts the task (and its `herald.tasks` row) itself.
const TRIGGER: &str = "SELECT herald.trigger_schedule($1) AS task_id";

pub(crate) async fn trigger<C: GenericClient + Sync>(client: &C, name: &str) -> Result<i64> {
    let row = client
        .query_one(TRIGGER, &[&name])
        .await
        .context(format!("triggering schedule {name:?}"))?;
    Ok(row.get("task_id"))
}

// ---------------------------------------------------------------------------
// The configuration sync

/// Serializes configuration syncs of concurrently starting processes
/// ("hsched" in ASCII).
const SYNC_LOCK: i64 = 0x6873_6368_6564;
const TAKE_SYNC_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// Held until the transaction ends.
pub(crate) async fn take_sync_lock<C: GenericClient + Sync>(tx: &C) -> Result<()> {
    tx.execute(TAKE_SYNC_LOCK, &[&SYNC_LOCK])
        .await
        .context("taking the schedule sync lock")?;
    Ok(())
}

/// A schedule's name and when its definition last changed.
pub(crate) struct Version {
    pub name: String,
    pub updated_at: DateTime<Utc>,
}

impl Version {
    fn from_row(row: &Row) -> Version {
        Version {
            name: row.get("name"),
            updated_at: row.get("updated_at"),
        }
    }
}

const VERSIONS: &str = "SELECT name, updated_at FROM herald.schedules";

pub(crate) async fn versions<C: GenericClient + Sync>(client: &C) -> Result<Vec<Version>> {
    let rows = client
        .query(VERSIONS, &[])
        .await
        .context("reading herald.schedules")?;
    Ok(rows.iter().map(Version::from_row).collect())
}

const VERSIONS_OF: &str = "SELECT name, updated_at FROM herald.schedules WHERE name = ANY($1)";

pub(crate) async fn versions_of<C: GenericClient + Sync>(
    client: &C,
    names: &[&str],
) -> Result<Vec<Version>> {
    let rows = client
        .query(VERSIONS_OF, &[&names])
        .await
        .context("reading herald.schedules")?;
    Ok(rows.iter().map(Version::from_row).collect())
}

/// Schedules of source `api` are never removed by the sync.
const REMOVE_UNDECLARED: &str =
    "DELETE FROM herald.schedules WHERE source = 'config' AND NOT (name = ANY($1)) \
RETURNING name";

/// Delete the `config` schedules not in `declared`; returns their names.
pub(crate) async fn remove_undeclared<C: GenericClient + Sync>(
    client: &C,
    declared: &[&str],
) -> Result<Vec<String>> {
    let rows = client
        .query(REMOVE_UNDECLARED, &[&declared])
        .await
        .context("removing schedules no longer in the configuration")?;
    Ok(rows.iter().map(|r| r.get("name")).collect())
}

// ---------------------------------------------------------------------------
// Listing

const LIST: &str = "SELECT name, cron, tz, queue, kind, payload::text AS payload, priority, \
max_attempts, enabled, misfire, \
CASE WHEN isfinite(next_run_at) THEN next_run_at END AS next_run_at, \
CASE WHEN isfinite(last_run_at) THEN last_run_at END AS last_run_at, last_error, source, \
created_at, updated_at, now() AS read_at \
FROM herald.schedules ORDER BY name";

/// A schedule as stored, for listing (`herald::cron::ScheduleRow`; its
/// `upcoming` is computed in `cron::schedule`).
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
    fn from_row(r: &Row) -> Result<ScheduleRow> {
        let payload: String = r.get("payload");
        Ok(ScheduleRow {
            name: r.get("name"),
            cron: r.get("cron"),
            tz: r.get("tz"),
            queue: r.get("queue"),
            kind: r.get("kind"),
            payload: serde_json::from_str(&payload).map_err(|error| Error::Json {
                what: "a schedule's payload".into(),
                error,
            })?,
            priority: r.get("priority"),
            max_attempts: r.get("max_attempts"),
            enabled: r.get("enabled"),
            misfire: r.get("misfire"),
            next_run_at: r.get("next_run_at"),
            last_run_at: r.get("last_run_at"),
            last_error: r.get("last_error"),
            source: r.get("source"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            read_at: r.get("read_at"),
        })
    }
}

pub(crate) async fn list<C: GenericClient + Sync>(client: &C) -> Result<Vec<ScheduleRow>> {
    let rows = client
        .query(LIST, &[])
        .await
        .context("listing herald.schedules")?;
    rows.iter().map(ScheduleRow::from_row).collect()
}

// ---------------------------------------------------------------------------
// The scheduler: claim, advance, next wake

/// Enabled rows that are due, or new (no `next_run_at` yet and no error);
/// rows another scheduler holds are skipped, not waited for.
const CLAIM_DUE: &str = "
SELECT id, name, cron, tz, queue, kind, payload::text AS payload, priority, max_attempts, misfire,
       CASE WHEN isfinite(next_run_at) THEN next_run_at END AS next_run_at, now() AS now
FROM herald.schedules
WHERE enabled
  AND ((next_run_at IS NULL AND last_error IS NULL) OR next_run_at <= now())
ORDER BY next_run_at NULLS FIRST, id
LIMIT $1
FOR UPDATE SKIP LOCKED";

/// A due schedule, locked by the claiming transaction.
pub(crate) struct DueSchedule {
    pub id: i64,
    pub name: String,
    pub cron: String,
    pub tz: String,
    pub queue: String,
    pub kind: String,
    /// The payload as JSON text, passed through to the task unparsed.
    pub payload: String,
    pub priority: i32,
    pub max_attempts: i32,
    pub misfire: String,
    /// `None`: not computed yet (a new or changed schedule).
    pub next_run_at: Option<DateTime<Utc>>,
    /// The database's now(): the clock every decision is made by.
    pub now: DateTime<Utc>,
}

impl DueSchedule {
    fn from_row(r: &Row) -> DueSchedule {
        DueSchedule {
            id: r.get("id"),
            name: r.get("name"),
            cron: r.get("cron"),
            tz: r.get("tz"),
            queue: r.get("queue"),
            kind: r.get("kind"),
            payload: r.get("payload"),
            priority: r.get("priority"),
            max_attempts: r.get("max_attempts"),
            misfire: r.get("misfire"),
            next_run_at: r.get("next_run_at"),
            now: r.get("now"),
        }
    }
}

/// Lock at most `limit` due schedules until `tx` ends.
pub(crate) async fn claim_due(
    tx: &deadpool_postgres::Transaction<'_>,
    limit: i64,
) -> Result<Vec<DueSchedule>> {
    let claim = tx
        .prepare_cached(CLAIM_DUE)
        .await
        .context("preparing the schedule claim")?;
    let rows = tx
        .query(&claim, &[&limit])
        .await
        .context("claiming due schedules")?;
    Ok(rows.iter().map(DueSchedule::from_row).collect())
}

const ADVANCE: &str = "
UPDATE herald.schedules s
SET next_run_at = u.next_run_at,
    last_run_at = coalesce(u.last_run_at, s.last_run_at),
    last_error = u.last_error
FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::text[])
     AS u(id, next_run_at, last_run_at, last_error)
WHERE s.id = u.id";

/// The new state of claimed schedules, one entry per schedule in each
/// column.
#[derive(Default)]
pub(crate) struct Advance {
    pub id: Vec<i64>,
    pub next_run_at: Vec<Option<DateTime<Utc>>>,
    /// `None` keeps the stored `last_run_at` (nothing fired).
    pub last_run_at: Vec<Option<DateTime<Utc>>>,
    pub last_error: Vec<Option<String>>,
}

pub(crate) async fn advance<C: GenericClient + Sync>(tx: &C, a: &Advance) -> Result<()> {
    tx.execute(
        ADVANCE,
        &[&a.id, &a.next_run_at, &a.last_run_at, &a.last_error],
    )
    .await
    .context("advancing next_run_at of fired schedules")?;
    Ok(())
}

/// Seconds from the database's clock to the earliest tick, and whether some
/// enabled row still waits for its first next_run_at.
const NEXT_WAKE: &str = "
SELECT extract(epoch FROM min(next_run_at) FILTER (WHERE isfinite(next_run_at))
                     - clock_timestamp())::float8 AS secs,
       bool_or(next_run_at IS NULL AND last_error IS NULL) AS pending
FROM herald.schedules
WHERE enabled";

pub(crate) struct NextWake {
    /// `None` when no enabled schedule has a next tick.
    pub secs: Option<f64>,
    /// Some enabled schedule has no `next_run_at` yet.
    pub pending: bool,
}

pub(crate) async fn next_wake<C: GenericClient + Sync>(client: &C) -> Result<NextWake> {
    let row = client
        .query_one(NEXT_WAKE, &[])
        .await
        .context("reading the next tick of herald.schedules")?;
    Ok(NextWake {
        secs: row.get("secs"),
        pending: row.get::<_, Option<bool>>("pending") == Some(true),
    })
}
