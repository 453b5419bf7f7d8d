//! A point-in-time picture of the system for operators: the queues
//! (`herald.queue_stats`), the outbox backlog (`herald.outbox_backlog`) and the
//! dead letters (`herald.dead_letter_summary`). `herald stats` prints it.
//!
//! It only reads the operator views; it must never lock or change a row.

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::error::{Context, Result};

/// One queue in one state.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStat {
    pub queue: String,
    pub state: String,
    pub count: i64,
    /// Age in seconds of the oldest due ready task.
    pub oldest_ready_secs: Option<f64>,
    /// Ready tasks whose run_at is still in the future.
    pub scheduled: i64,
    pub running: i64,
    pub expired_leases: i64,
    pub failed_attempts_last_hour: i64,
}

/// Events written but not yet relayed.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxBacklog {
    pub unpublished: i64,
    pub oldest_age_secs: f64,
    /// Rows whose delivery has failed at least once.
    pub failing: i64,
}

/// Dead letters grouped by source, queue, kind or topic and error.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterGroup {
    pub source: String,
    pub queue: String,
    pub kind: String,
    pub error: String,
    pub count: i64,
    pub first_failed_at: chrono::DateTime<chrono::Utc>,
    pub last_failed_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub taken_at: chrono::DateTime<chrono::Utc>,
    pub queues: Vec<QueueStat>,
    pub outbox: OutboxBacklog,
    pub dead_letters: Vec<DeadLetterGroup>,
}

/// Read the three operator views in one snapshot (REPEATABLE READ is not
/// needed: each view is one statement, and the figures are advisory).
pub async fn snapshot<C: GenericClient + Sync>(client: &C) -> Result<Snapshot> {
    let taken_at = client
        .query_one("SELECT now()", &[])
        .await
        .context("reading the clock")?
        .get(0);
    let queues = client
        .query(
            "SELECT queue, state, count,
                    extract(epoch FROM oldest_ready_age)::float8 AS oldest_ready_secs,
                    scheduled, running, expired_leases, failed_attempts_last_hour
             FROM herald.queue_stats
             ORDER BY queue, array_position(ARRAY['ready', 'running', 'succeeded', 'cancelled'], state)",
            &[],
        )
        .await
        .context("reading herald.queue_stats")?
        .iter()
        .map(|r| QueueStat {
            queue: r.get("queue"),
            state: r.get("state"),
            count: r.get("count"),
            oldest_ready_secs: r.get("oldest_ready_secs"),
            scheduled: r.get("scheduled"),
            running: r.get("running"),
            expired_leases: r.get("expired_leases"),
            failed_attempts_last_hour: r.get("failed_attempts_last_hour"),
        })
        .collect();
    let outbox = outbox_backlog(client).await?;
    let dead_letters = client
        .query(
            "SELECT source, queue, kind, error, count, first_failed_at, last_failed_at
             FROM herald.dead_letter_summary
             ORDER BY count DESC, last_failed_at DESC
             LIMIT 50",
            &[],
        )
        .await
        .context("reading herald.dead_letter_summary")?
        .iter()
        .map(|r| DeadLetterGroup {
            source: r.get("source"),
            queue: r.get("queue"),
            kind: r.get("kind"),
            error: r.get("error"),
            count: r.get("count"),
            first_failed_at: r.get("first_failed_at"),
            last_failed_at: r.get("last_failed_at"),
        })
        .collect();
    Ok(Snapshot {
        taken_at,
        queues,
        outbox,
        dead_letters,
    })
}

/// Tasks of one queue in one state, for `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct TaskGauge {
    pub queue: String,
    pub state: String,
    pub count: i64,
    /// Ready tasks whose run_at is still in the future (state `ready` only).
    pub scheduled: i64,
    /// Age in seconds of the oldest due ready task (0 when none).
    pub oldest_ready_secs: f64,
    /// Running tasks whose lease has expired: waiting for the rescuer.
    pub expired_leases: i64,
}

/// Dead letters of one source, queue and kind (or topic), for `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterGauge {
    pub source: String,
    pub queue: String,
    pub kind: String,
    pub count: i64,
}

/// One cron schedule's timing, for `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleGauge {
    pub name: String,
    pub enabled: bool,
    /// Seconds until `next_run_at` (negative when overdue); None when not
    /// computed or unusable.
    pub next_run_in_secs: Option<f64>,
    /// Whether the scheduler marked the schedule unusable (`last_error`).
    pub has_error: bool,
}

/// Vacuum health of one table of the `herald` schema (`pg_stat_user_tables`).
#[derive(Debug, Clone, Serialize)]
pub struct TableGauge {
    pub table: String,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    /// Seconds since the last (auto)vacuum; None when never vacuumed.
    pub since_vacuum_secs: Option<f64>,
}

/// The figures `/metrics` reads at every scrape. Each is one aggregate
/// statement over a table that stays small in normal operation (finished
/// tasks are deleted unless retained, published events leave the outbox).
#[derive(Debug, Clone, Serialize)]
pub struct Gauges {
    pub tasks: Vec<TaskGauge>,
    pub outbox: OutboxBacklog,
    pub dead_letters: Vec<DeadLetterGauge>,
    pub schedules: Vec<ScheduleGauge>,
    /// Dead and live tuples of the herald tables: queue tables churn, and
    /// a vacuum held back shows here first.
    pub tables: Vec<TableGauge>,
    /// Age in seconds of the oldest open transaction of a client backend
    /// in the cluster (it holds back vacuum everywhere); None when none is
    /// open or the role may not see other sessions (grant `pg_monitor`).
    pub oldest_transaction_secs: Option<f64>,
}

/// Read [`Gauges`]. Run it in a READ ONLY transaction with a
/// `statement_timeout` so a scrape never holds locks or runs long.
pub async fn gauges<C: GenericClient + Sync>(client: &C) -> Result<Gauges> {
    let tasks = client
        .query(
            "SELECT queue, state, count(*) AS count,
                    count(*) FILTER (WHERE state = 'ready' AND run_at > now()) AS scheduled,
                    coalesce(extract(epoch FROM now() - min(run_at)
                             FILTER (WHERE state = 'ready' AND run_at <= now())), 0)::float8
                        AS oldest_ready_secs,
                    count(*) FILTER (WHERE state = 'running' AND lease_expires_at < now())
                        AS expired_leases
             FROM herald.tasks
             GROUP BY queue, state
             ORDER BY queue, state",
            &[],
        )
        .await
        .context("counting herald.tasks")?
        .iter()
        .map(|r| TaskGauge {
            queue: r.get("queue"),
            state: r.get("state"),
            count: r.get("count"),
            scheduled: r.get("scheduled"),
            oldest_ready_secs: r.get("oldest_ready_secs"),
            expired_leases: r.get("expired_leases"),
        })
        .collect();
    let outbox = outbox_backlog(client).await?;
    let dead_letters = client
        .query(
            "SELECT source, coalesce(queue, '') AS queue, coalesce(kind, topic, '') AS kind,
                    count(*) AS count
             FROM herald.dead_letters
             GROUP BY 1, 2, 3
             ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .context("counting herald.dead_letters")?
        .iter()
        .map(|r| DeadLetterGauge {
            source: r.get("source"),
            queue: r.get("queue"),
            kind: r.get("kind"),
            count: r.get("count"),
        })
        .collect();
    let schedules = client
        .query(
            "SELECT name, enabled,
                    extract(epoch FROM next_run_at - now())::float8 AS next_run_in_secs,
                    last_error IS NOT NULL AS has_error
             FROM herald.schedules
             ORDER BY name",
            &[],
        )
        .await
        .context("reading herald.schedules")?
        .iter()
        .map(|r| ScheduleGauge {
            name: r.get("name"),
            enabled: r.get("enabled"),
            next_run_in_secs: r.get("next_run_in_secs"),
            has_error: r.get("has_error"),
        })
        .collect();
    let tables = client
        .query(
            "SELECT relname AS table, n_live_tup AS live, n_dead_tup AS dead,
                    extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8
                        AS since_vacuum_secs
             FROM pg_stat_user_tables
             WHERE schemaname = 'herald'
             ORDER BY relname",
            &[],
        )
        .await
        .context("reading pg_stat_user_tables")?
        .iter()
        .map(|r| TableGauge {
            table: r.get("table"),
            live_tuples: r.get("live"),
            dead_tuples: r.get("dead"),
            since_vacuum_secs: r.get("since_vacuum_secs"),
        })
        .collect();
    let oldest_transaction_secs = client
        .query_one(
            "SELECT extract(epoch FROM max(now() - xact_start))::float8
             FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND xact_start IS NOT NULL
               AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .context("reading pg_stat_activity")?
        .get(0);
    Ok(Gauges {
        tasks,
        outbox,
        dead_letters,
        schedules,
        tables,
        oldest_transaction_secs,
    })
}

/// `herald.outbox_backlog`: events written and not yet relayed.
pub async fn outbox_backlog<C: GenericClient + Sync>(client: &C) -> Result<OutboxBacklog> {
    let row = client
        .query_one(
            "SELECT unpublished, extract(epoch FROM oldest_age)::float8 AS oldest_age_secs, failing
             FROM herald.outbox_backlog",
            &[],
        )
        .await
        .context("reading herald.outbox_backlog")?;
    Ok(OutboxBacklog {
        unpublished: row.get("unpublished"),
        oldest_age_secs: row.get("oldest_age_secs"),
        failing: row.get("failing"),
    })
}
