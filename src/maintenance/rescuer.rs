//! The rescuer: running tasks whose lease expired (their worker died, hung
//! or lost Postgres) go back to the queue, or to the dead letters when
//! their attempts are spent, through `herald.rescue_expired_leases`.
//!
//! It owns the rescue call and its pacing; the state changes themselves are
//! the SQL function's. It must never touch a task whose lease still holds
//! (the function looks only at `lease_expires_at < now()`), and it takes at
//! most `LIMIT` rows per statement, so a transaction stays short while a
//! crowd of expired leases is worked off in several.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::telemetry::names::{event, metric};

/// Most leases one statement rescues.
const LIMIT: i32 = 1000;

/// Rescue every expired lease, `LIMIT` at a time; returns how many.
pub async fn rescue<C: GenericClient + Sync>(client: &C) -> Result<u64> {
    let mut total = 0u64;
    loop {
        let n = crate::store::tasks::rescue_expired(client).await?;
        total += n.max(0) as u64;
        if n < LIMIT {
            return Ok(total);
        }
    }
}

/// Rescue now and every `interval` until `stop`.
pub(crate) async fn run(pool: Pool, interval: Duration, stop: CancellationToken) {
    let pool = &pool;
    super::every("rescuer", interval, stop, || async move {
        let client = pool.get().await?;
        let n = rescue(&**client).await?;
        if n > 0 {
            metrics::counter!(metric::TASK_RESCUED).increment(n);
            tracing::warn!(
                event = event::TASK_RESCUED,
                tasks = n,
                "rescued tasks whose lease expired"
            );
        }
        Ok(())
    })
    .await
}
