//! Schema migrations: the refinery migrations embedded from `sql/`, applied
//! under a polled advisory lock so that any number of processes may start at
//! once, followed by writing the cluster-wide settings in `herald.settings`.
//! It never touches rows of the outbox or other data tables.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::Config;
use crate::error::{Context, Error, Result};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Advisory lock key that serializes migrations ("herald" in ASCII).
const MIGRATION_LOCK: i64 = 0x6865_7261_6c64;
/// refinery's bookkeeping lives next to Herald's own tables.
const HISTORY_TABLE: &str = "herald.schema_history";
/// How long a process waits for another one's migration before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub applied: Vec<String>,
    pub current_version: Option<i32>,
}

/// Apply pending migrations and write the settings. Safe to run from several
/// processes at once: they take turns on an advisory lock, polled so that a
/// waiting process can still report progress and time out.
pub async fn migrate(config: &Config) -> Result<Report> {
    let mut client = crate::db::connect(config, "herald-migrate").await?;
    let started = Instant::now();
    let mut logged = false;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .context("taking the migration lock")?;
        if row.get::<_, bool>(0) {
            break;
        }
        if started.elapsed() > LOCK_WAIT {
            return Err(Error::Timeout(
                LOCK_WAIT,
                "waiting for another process to finish migrating (advisory lock 0x68657261 6c64)"
                    .into(),
            ));
        }
        if !logged {
            tracing::info!("another process is migrating; waiting for it");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = apply(&mut client, config).await;
    // The lock is session-level: release it even when migrating failed (the
    // connection closing would release it too).
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply(client: &mut Client, config: &Config) -> Result<Report> {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS herald")
        .await
        .context("creating schema herald")?;
    let report = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect();
    for migration in &applied {
        tracing::info!(%migration, "applied migration");
    }
    write_settings(client, config).await?;
    let current_version = client
        .query_one(&format!("SELECT max(version) FROM {HISTORY_TABLE}"), &[])
        .await
        .context("reading the schema version")?
        .get::<_, Option<i32>>(0);
    Ok(Report {
        applied,
        current_version,
    })
}

/// Copy the settings producers and relays must agree on into the database.
/// Changing the partition count while events wait would strand or reorder
/// them, so that is refused until the outbox is empty.
async fn write_settings(client: &Client, config: &Config) -> Result<()> {
    let row = client
        .query_one(
            "SELECT partitions, EXISTS (SELECT 1 FROM herald.outbox) FROM herald.settings",
            &[],
        )
        .await
        .context("reading herald.settings")?;
    let current: i32 = row.get(0);
    let backlog: bool = row.get(1);
    let wanted = i32::from(config.partitions);
    if current != wanted && backlog {
        return Err(Error::Config(format!(
            "partitions: the database uses {current} and the configuration asks for {wanted}, \
             but herald.outbox still holds events; let the relay drain it, then migrate again"
        )));
    }
    let max_payload = i32::try_from(config.max_payload_bytes).map_err(|_| {
        Error::Config(format!(
            "max_payload_bytes {} does not fit in 32 bits",
            config.max_payload_bytes
        ))
    })?;
    client
        .execute(
            "UPDATE herald.settings SET partitions = $1, max_payload_bytes = $2, updated_at = now() \
             WHERE (partitions, max_payload_bytes) IS DISTINCT FROM ($1, $2)",
            &[&wanted, &max_payload],
        )
        .await
        .context("writing herald.settings")?;
    Ok(())
}

/// Fail with a clear message when the schema has not been migrated yet.
pub async fn check_schema(client: &Client) -> Result<()> {
    let row = client
        .query_one("SELECT to_regclass('herald.settings') IS NOT NULL", &[])
        .await
        .context("checking the herald schema")?;
    if !row.get::<_, bool>(0) {
        return Err(Error::Config(
            "the herald schema is missing: run `herald migrate` (or enable migrate_on_start)"
                .into(),
        ));
    }
    Ok(())
}

/// The newest migration version this binary embeds.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or_default()
}

/// The newest migration version applied to the database (`None` before the
/// first `herald migrate`).
pub async fn schema_version<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one(
            &format!("SELECT to_regclass('{HISTORY_TABLE}') IS NOT NULL"),
            &[],
        )
        .await
        .context("reading the schema version")?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_one(&format!("SELECT max(version) FROM {HISTORY_TABLE}"), &[])
        .await
        .context("reading the schema version")?;
    Ok(row.get(0))
}
