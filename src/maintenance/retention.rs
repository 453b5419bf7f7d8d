//! Retention of `herald.processed_events`: the idempotency records of
//! durable subscribers older than `maintenance.processed_events_retention`
//! are deleted through `herald.purge_processed_events`.
//!
//! It owns the call and its pacing. It must never delete a record an event
//! could still be redelivered against: the retention must stay longer than
//! the longest retry horizon of a subscription's task, which is why its
//! default is a month and it cannot be 0.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Result};

const PURGE: &str = "SELECT herald.purge_processed_events($1::text::interval)";

/// Delete the records older than `keep`; returns how many.
pub async fn purge_processed_events<C: GenericClient + Sync>(
    client: &C,
    keep: Duration,
) -> Result<i64> {
    Ok(client
        .query_one(PURGE, &[&crate::db::interval_literal(keep)])
        .await
        .context("purging herald.processed_events")?
        .get(0))
}

/// Purge now and every `interval` until `stop`.
pub(crate) async fn run(pool: Pool, interval: Duration, keep: Duration, stop: CancellationToken) {
    let pool = &pool;
    super::every("retention", interval, stop, || async move {
        let client = pool.get().await?;
        let n = purge_processed_events(&**client, keep).await?;
        if n > 0 {
            tracing::info!(
                records = n,
                "removed processed-event records past their retention"
            );
        }
        Ok(())
    })
    .await
}
