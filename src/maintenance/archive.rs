//! Archive upkeep: while `relay.retain_published` is set, the daily
//! partitions of `herald.outbox_archive` for today and tomorrow are created
//! and the ones that ended before the retention are dropped, by
//! `herald.maintain_archive`.
//!
//! It owns the call and its pacing; the DDL is the SQL function's. It must
//! never drop a partition still inside the retention (the function compares
//! each partition's end with `now() - retain`). A relay still creates
//! today's partition once at its start, before its first claim.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Result};

const MAINTAIN: &str = "SELECT herald.maintain_archive($1::text::interval)";

/// Create the coming partitions and drop expired ones; returns how many
/// were dropped.
pub async fn maintain<C: GenericClient + Sync>(client: &C, retain: Duration) -> Result<i32> {
    let interval = format!("{} seconds", retain.as_secs());
    Ok(client
        .query_one(MAINTAIN, &[&interval])
        .await
        .context("maintaining herald.outbox_archive")?
        .get(0))
}

/// Maintain now and every `interval` until `stop`.
pub(crate) async fn run(pool: Pool, interval: Duration, retain: Duration, stop: CancellationToken) {
    let pool = &pool;
    super::every("archive", interval, stop, || async move {
        let client = pool.get().await?;
        let dropped = maintain(&**client, retain).await?;
        tracing::debug!(dropped, "archive maintained");
        Ok(())
    })
    .await
}
