//! The rescuer: returns tasks whose lease expired to the queue (or to
//! `herald.dead_letters`, through `herald.rescue_expired_leases`), and
//! removes finished tasks kept past `worker.retain_completed`.
//!
//! Every worker runs it for now. [`rescue_once`] and
//! [`remove_finished_once`] are one round each, for a maintenance service
//! that runs them elsewhere. It must never touch a task whose lease has
//! not expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use crate::error::{Error, Result};
use crate::store::tasks;
use crate::telemetry::names::{event, metric};

/// How often the finished tasks are cleaned up.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// How long finished tasks are kept when `worker.retain_completed` is unset
/// (cancelled ones are kept too).
const DEFAULT_KEEP: Duration = Duration::from_secs(86400);

/// One rescue round: return up to 1,000 tasks whose lease expired to the
/// queue; counts and logs them. Returns how many.
pub(crate) async fn rescue_once<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
) -> Result<i32> {
    let n = tasks::rescue_expired(client).await?;
    if n > 0 {
        metrics::counter!(metric::TASK_RESCUED).increment(n as u64);
        tracing::warn!(
            event = event::TASK_RESCUED,
            tasks = n,
            "rescued tasks whose lease expired"
        );
    }
    Ok(n)
}

/// One cleanup round: delete up to 1,000 tasks finished more than
/// `retain_completed` (a day when unset) ago. Returns how many.
pub(crate) async fn remove_finished_once<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    retain_completed: Option<Duration>,
) -> Result<u64> {
    let keep = retain_completed.unwrap_or(DEFAULT_KEEP);
    tasks::remove_finished(client, keep.as_secs_f64()).await
}

/// Return expired leases to the queue; remove retained finished tasks.
pub(super) async fn rescue(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config.worker;
    let mut last_cleanup = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.rescue_interval) => {}
        }
        let result = async {
            let client = shared.internal.get().await?;
            let n = rescue_once(&**client).await?;
            if last_cleanup.elapsed() > CLEANUP_EVERY {
                remove_finished_once(&**client, cfg.retain_completed).await?;
                last_cleanup = Instant::now();
            }
            Ok::<i32, Error>(n)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                shared
                    .stats
                    .rescued
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "rescuer failed"),
        }
    }
}
