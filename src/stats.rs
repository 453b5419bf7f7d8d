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
    let row = client
        .query_one(
            "SELECT unpublished, extract(epoch FROM oldest_age)::float8 AS oldest_age_secs, failing
             FROM herald.outbox_backlog",
            &[],
        )
        .await
        .context("reading herald.outbox_backlog")?;
    let outbox = OutboxBacklog {
        unpublished: row.get("unpublished"),
        oldest_age_secs: row.get("oldest_age_secs"),
        failing: row.get("failing"),
    };
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
