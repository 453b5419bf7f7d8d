//! The cleaner: finished tasks (`succeeded`, `cancelled`) kept for
//! `worker.retain_completed` (cancelled ones a day when it is unset) are
//! removed once that time has passed.
//!
//! It owns REMOVE_FINISHED, which belongs with the other writes of
//! `herald.tasks` once that table has its one module. It must never remove
//! an unfinished task (the statement names the finished states), and it
//! removes at most `LIMIT` rows per statement so that no transaction holds
//! many row locks; a backlog goes in several statements.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::error::Result;

/// Most tasks one statement removes.
const LIMIT: u64 = 1000;

/// How long finished tasks are kept: `worker.retain_completed`, or a day.
pub fn retention(worker: &WorkerConfig) -> Duration {
    worker
        .retain_completed
        .unwrap_or(Duration::from_secs(86400))
}

/// Remove the tasks that finished more than `keep` ago; returns how many.
pub async fn remove_finished<C: GenericClient + Sync>(client: &C, keep: Duration) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = crate::store::tasks::remove_finished(client, keep.as_secs_f64()).await?;
        total += n;
        if n < LIMIT {
            return Ok(total);
        }
    }
}

/// Remove now and every `interval` until `stop`.
pub(crate) async fn run(pool: Pool, interval: Duration, keep: Duration, stop: CancellationToken) {
    let pool = &pool;
    super::every("cleaner", interval, stop, || async move {
        let client = pool.get().await?;
        let n = remove_finished(&**client, keep).await?;
        if n > 0 {
            tracing::debug!(tasks = n, "removed finished tasks past their retention");
        }
        Ok(())
    })
    .await
}
