//! The scheduler's LISTEN session on `herald_schedules`. Its only output is
//! a signal: a counter in a `watch` channel, bumped on every notification
//! ("schedules changed") and on every (re)connect ("look again: changes may
//! have gone unnoticed"). The scheduler consumes nothing else from it, so a
//! process-wide notifier can replace this module by bumping the same kind
//! of counter.
//!
//! It must never carry data: a notification is only a wake-up, every
//! decision is read from the table. It must never give up: a lost session is
//! reopened with backoff until shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{SchedulerStats, CHANNEL};
use crate::config::Config;
use crate::error::{Context, Result};

const LISTEN_APPLICATION_NAME: &str = "herald-scheduler-listen";

/// Keep a LISTEN herald_schedules session open; every notification and every
/// (re)connect bumps `wake`.
pub(super) async fn listen(
    config: Config,
    wake: Arc<watch::Sender<u64>>,
    stats: Arc<SchedulerStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = crate::relay::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = listen_once(&config, &wake, &stats) => outcome,
        };
        stats.listening.store(false, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                backoff.reset();
                tracing::warn!(
                    event = crate::telemetry::names::event::POSTGRES_CONNECTION_LOST,
                    component = "scheduler",
                    %reason,
                    "scheduler LISTEN connection lost; reconnecting"
                );
            }
            Err(error) => tracing::warn!(%error, "scheduler LISTEN connection failed"),
        }
        wake.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

async fn listen_once(
    config: &Config,
    wake: &watch::Sender<u64>,
    stats: &SchedulerStats,
) -> Result<String> {
    let pg = crate::db::pg_config(config, LISTEN_APPLICATION_NAME)?;
    let (client, mut connection) = pg
        .connect(NoTls)
        .await
        .context("opening the scheduler's LISTEN connection")?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let wake_driver = wake.clone();
    let driver = tokio::spawn(async move {
        let end = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wake_driver.send_modify(|g| *g += 1),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(crate::error::describe_pg(&e)),
                None => break None,
            }
        };
        let _ = closed_tx.send(end);
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .context("LISTEN herald_schedules")?;
    if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
        crate::telemetry::reconnected("postgres", "scheduler");
    }
    stats.listening.store(true, Ordering::Relaxed);
    // Look again now that changes cannot go unnoticed.
    wake.send_modify(|g| *g += 1);
    let end = closed_rx.await.ok().flatten();
    drop(client);
    let _ = driver.await;
    Ok(end.unwrap_or_else(|| "closed by the server".into()))
}
