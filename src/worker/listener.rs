//! The listener: one dedicated session that LISTENs for new tasks and
//! cancellation requests, reconnects with backoff, and holds the worker's
//! wake lock (on a session of its own) while its producers sleep.
//!
//! Its interface is narrow on purpose: it only signals "the queues may have
//! work" (also after every (re)connect) and "cancel task N" through
//! [`Signals`], and reports whether it is listening. It must never claim,
//! write or hold a task.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{WorkerStats, LISTEN_APPLICATION_NAME, WAKE_LOCK, WAKE_LOCK_APPLICATION_NAME};
use crate::config::Config;
use crate::error::{describe_pg, Context, Error};
use crate::store::tasks;
use crate::telemetry::names::event;

/// All the listener tells the rest of the worker.
#[derive(Clone)]
pub(super) struct Signals {
    /// Bumped when the queues may have work: a NOTIFY on the tasks channel
    /// (which names no queue, so every producer looks), or a (re)connect,
    /// after which notifications may have been missed.
    pub(super) wake: Arc<watch::Sender<u64>>,
    /// Stops the running attempts of the task with this id.
    pub(super) cancel: Arc<dyn Fn(i64) + Send + Sync>,
}

impl Signals {
    fn work(&self) {
        self.wake.send_modify(|g| *g += 1);
    }
}

/// LISTEN on the tasks channel (wake producers) and the cancel channel
/// (stop a task's attempts), reconnecting with backoff, and hold the wake
/// lock while the producers sleep.
pub(super) async fn listen(
    config: Config,
    stats: Arc<WorkerStats>,
    signals: Signals,
    idle: Arc<crate::wake::Idle>,
    stop: CancellationToken,
) {
    let wake = &signals.wake;
    let mut backoff = Duration::from_millis(50);
    let mut sessions = 0u64;
    loop {
        let sessions = &mut sessions;
        let session = async {
            let pg = crate::db::pg_config(&config, LISTEN_APPLICATION_NAME)?;
            let (client, mut connection) = pg
                .connect(NoTls)
                .await
                .context("opening the worker's LISTEN connection")?;
            let (end_tx, end_rx) = tokio::sync::oneshot::channel::<String>();
            let signals2 = signals.clone();
            let notified = Arc::new(tokio::sync::Notify::new());
            let notified2 = notified.clone();
            tokio::spawn(async move {
                let end = loop {
                    match poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if n.channel() == tasks::CANCEL_CHANNEL {
                                if let Ok(id) = n.payload().parse::<i64>() {
                                    (signals2.cancel)(id);
                                }
                            } else {
                                signals2.work();
                                notified2.notify_one();
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break describe_pg(&e),
                        None => break "closed by the server".to_string(),
                    }
                };
                let _ = end_tx.send(end);
            });
            let channels = format!("{}, {}", tasks::NOTIFY_CHANNEL, tasks::CANCEL_CHANNEL);
            client
                .batch_execute(&format!(
                    "LISTEN {}; LISTEN {}",
                    tasks::NOTIFY_CHANNEL,
                    tasks::CANCEL_CHANNEL
                ))
                .await
                .context(format!("LISTEN {channels}"))?;
            *sessions += 1;
            if *sessions > 1 {
                crate::telemetry::reconnected("postgres", "worker");
            }
            stats
                .listening
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // The wake lock, on a session of its own (the LISTEN session
            // must stay idle to receive notifications while it waits).
            let lock =
                crate::wake::WakeLock::open(&config, WAKE_LOCK_APPLICATION_NAME, WAKE_LOCK, false)
                    .await?;
            // Anything enqueued before LISTEN took effect is found now.
            signals.work();
            let listen_closed =
                async move { Some(end_rx.await.unwrap_or_else(|_| "driver ended".into())) };
            let gauges = crate::wake::Gauges {
                sleeps: &stats.sleeps,
                asleep: &stats.asleep,
            };
            let reason = lock
                .serve(Box::pin(listen_closed), &notified, &idle, wake, gauges)
                .await
                .unwrap_or_else(|| "closed by the server".into());
            drop(client);
            Ok::<String, Error>(reason)
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            o = session => o,
        };
        stats
            .listening
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                backoff = Duration::from_millis(50);
                tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "worker",
                    %reason, "worker LISTEN connection lost; reconnecting");
            }
            Err(error) => {
                tracing::warn!(%error, "worker LISTEN connection failed");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        signals.work();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}
