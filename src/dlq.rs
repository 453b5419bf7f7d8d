//! The dead-letter queue, read and repaired: list and show
//! `herald.dead_letters`, replay a dead letter (as a new task or a new outbox
//! event, through `herald.replay_dead_letter`) and purge old ones.
//!
//! Rows get here from the worker (`herald.fail_task`,
//! `herald.rescue_expired_leases`) and the relay; this module never writes a
//! dead letter itself, and never deletes one except by replay or an explicit
//! purge.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};

use crate::error::{Context, Error, Result};

/// One row of `herald.dead_letters`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    /// `task` or `outbox`.
    pub source: String,
    /// The task's or the outbox row's id.
    pub original_id: Option<i64>,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<String>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub key: Option<String>,
    /// A task's unique key, put back on the task when it is replayed.
    pub unique_key: Option<String>,
    pub payload: Value,
    pub headers: Value,
    pub attempts: i32,
    /// Every attempt's error: `[{attempt, at, worker, error}, …]`.
    pub errors: Value,
    pub last_error: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The task kind, or the event topic.
    pub fn name(&self) -> &str {
        self.kind.as_deref().or(self.topic.as_deref()).unwrap_or("")
    }

    fn from_row(row: &Row) -> DeadLetter {
        DeadLetter {
            id: row.get("id"),
            source: row.get("source"),
            original_id: row.get("original_id"),
            event_id: row.get("event_id"),
            topic: row.get("topic"),
            kind: row.get("kind"),
            queue: row.get("queue"),
            key: row.get("key"),
            unique_key: row.get("unique_key"),
            payload: row.get("payload"),
            headers: row.get("headers"),
            attempts: row.get("attempts"),
            errors: row.get("errors"),
            last_error: row.get("last_error"),
            created_at: row.get("created_at"),
            failed_at: row.get("failed_at"),
        }
    }
}

/// Which dead letters to list or replay; unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub queue: Option<String>,
    /// A task kind or an event topic.
    pub kind: Option<String>,
    /// `task` or `outbox`.
    pub source: Option<String>,
    /// Failed no longer ago than this.
    pub since: Option<Duration>,
    /// The last error contains this text (case-insensitive).
    pub error: Option<String>,
}

// One WHERE clause for listing and replaying, so both select the same rows.
const MATCHES: &str = "($1::text IS NULL OR queue = $1)
      AND ($2::text IS NULL OR coalesce(kind, topic) = $2)
      AND ($3::text IS NULL OR source = $3)
      AND ($4::text IS NULL OR failed_at >= now() - $4::text::interval)
      AND ($5::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($5)) > 0)";

const COLUMNS: &str = "id, source, original_id, event_id, topic, kind, queue, key, unique_key, \
     payload, headers, attempts, errors, last_error, created_at, failed_at";

impl Filter {
    fn validate(&self) -> Result<()> {
        if let Some(source) = &self.source {
            if source != "task" && source != "outbox" {
                return Err(Error::Other(format!(
                    "unknown dead-letter source {source:?}: expected \"task\" or \"outbox\""
                )));
            }
        }
        Ok(())
    }

    fn since(&self) -> Option<String> {
        self.since.map(crate::db::interval_literal)
    }
}

/// Dead letters matching `filter`, newest first, at most `limit`.
pub async fn list<C: GenericClient + Sync>(
    client: &C,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<DeadLetter>> {
    filter.validate()?;
    let sql = format!(
        "SELECT {COLUMNS} FROM herald.dead_letters WHERE {MATCHES} ORDER BY failed_at DESC, id DESC LIMIT $6"
    );
    let rows = client
        .query(
            &sql,
            &[
                &filter.queue,
                &filter.kind,
                &filter.source,
                &filter.since(),
                &filter.error,
                &limit,
            ],
        )
        .await
        .context("listing herald.dead_letters")?;
    Ok(rows.iter().map(DeadLetter::from_row).collect())
}

/// How many dead letters match `filter`.
pub async fn count<C: GenericClient + Sync>(client: &C, filter: &Filter) -> Result<i64> {
    filter.validate()?;
    let sql = format!("SELECT count(*) FROM herald.dead_letters WHERE {MATCHES}");
    let row = client
        .query_one(
            &sql,
            &[
                &filter.queue,
                &filter.kind,
                &filter.source,
                &filter.since(),
                &filter.error,
            ],
        )
        .await
        .context("counting herald.dead_letters")?;
    Ok(row.get(0))
}

/// One dead letter, or `None`.
pub async fn get<C: GenericClient + Sync>(client: &C, id: i64) -> Result<Option<DeadLetter>> {
    let sql = format!("SELECT {COLUMNS} FROM herald.dead_letters WHERE id = $1");
    let row = client
        .query_opt(&sql, &[&id])
        .await
        .context(format!("reading dead letter {id}"))?;
    Ok(row.as_ref().map(DeadLetter::from_row))
}

/// Put one dead letter back to work: a task becomes a new ready task (fresh
/// attempts, error history kept), an event a new outbox row. Returns the new
/// task or outbox id. The dead letter is removed in the same transaction.
pub async fn replay<C: GenericClient + Sync>(client: &C, id: i64) -> Result<i64> {
    let row = client
        .query_one("SELECT herald.replay_dead_letter($1)", &[&id])
        .await
        .map_err(|error| match error.as_db_error() {
            Some(db) if db.code().code() == "P0002" => {
                Error::Other(format!("no dead letter with id {id}"))
            }
            // A live task holds its unique key; the dead letter stays.
            Some(db) if db.code().code() == "23505" => Error::Other(format!(
                "{}{}",
                db.message().trim_start_matches("herald: "),
                db.hint().map(|h| format!(" ({h})")).unwrap_or_default()
            )),
            _ => Error::Postgres {
                context: format!("replaying dead letter {id}"),
                error,
            },
        })?;
    Ok(row.get(0))
}

/// A replayed dead letter: its id and the new task or outbox id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Replayed {
    pub dead_letter: i64,
    pub new_id: i64,
}

/// Replay up to `limit` dead letters matching `filter`, oldest first, in one
/// statement (so in the caller's transaction, if any). Rows another replay
/// holds are skipped rather than waited for, and so are tasks whose unique
/// key a live task holds now (they stay dead letters; [`replay`] says why).
pub async fn replay_matching<C: GenericClient + Sync>(
    client: &C,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<Replayed>> {
    filter.validate()?;
    let sql = format!(
        "WITH picked AS (
             SELECT id FROM herald.dead_letters d WHERE {MATCHES}
               AND (d.unique_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM herald.tasks t
                   WHERE t.unique_key = d.unique_key AND t.state IN ('ready', 'running'))
                 -- One per key per statement: the second would find the
                 -- first's new task holding it.
                 AND NOT EXISTS (
                   SELECT 1 FROM herald.dead_letters o
                   WHERE o.unique_key = d.unique_key AND o.id < d.id))
             ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED
         )
         SELECT id, herald.replay_dead_letter(id) FROM picked ORDER BY id"
    );
    let rows = client
        .query(
            &sql,
            &[
                &filter.queue,
                &filter.kind,
                &filter.source,
                &filter.since(),
                &filter.error,
                &limit,
            ],
        )
        .await
        .context("replaying dead letters")?;
    Ok(rows
        .iter()
        .map(|r| Replayed {
            dead_letter: r.get(0),
            new_id: r.get(1),
        })
        .collect())
}

/// Delete dead letters that failed more than `older_than` ago; returns how
/// many.
pub async fn purge<C: GenericClient + Sync>(client: &C, older_than: Duration) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT herald.purge_dead_letters($1::text::interval)",
            &[&crate::db::interval_literal(older_than)],
        )
        .await
        .context("purging herald.dead_letters")?;
    Ok(row.get(0))
}
