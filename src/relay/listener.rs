//! The relay's LISTEN session and wake lock: a dedicated session driven
//! with `poll_message` (never a pooled one) that turns every notification
//! on [`CHANNEL`], and every (re)connect, into one signal to the drain
//! workers: work may be waiting. A second session holds the wake lock while
//! every drain worker sleeps, so that producers notify only then.
//!
//! The drain workers consume only [`Signals`]; nothing else of this module
//! reaches them, so a process-wide notifier can replace it. It must never
//! take a decision from a notification (the workers read the table), and
//! never leave the workers asleep after a reconnect (it signals them, since
//! events may have committed while no notification could arrive).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Result};
use crate::telemetry::names::event;

use super::backoff::Backoff;
use super::{RelayStats, CHANNEL, LISTEN_APPLICATION_NAME, WAKE_LOCK, WAKE_LOCK_APPLICATION_NAME};

/// What the drain workers get from the listener.
pub(super) struct Signals {
    /// Changes when work may be waiting: a notification, or a (re)connect.
    pub(super) wake: watch::Receiver<u64>,
    /// Where the drain workers say they sleep or work: the wake lock is
    /// taken only while all of them sleep.
    pub(super) idle: Arc<crate::wake::Idle>,
}

/// Start the listener for `config.relay.concurrency` drain workers.
pub(super) fn spawn(
    config: &Config,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) -> (Signals, tokio::task::JoinHandle<()>) {
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let idle = Arc::new(crate::wake::Idle::new(config.relay.concurrency));
    let task = tokio::spawn(listen(
        config.clone(),
        Arc::new(wake_tx),
        idle.clone(),
        stats,
        shutdown,
    ));
    let signals = Signals {
        wake: wake_rx,
        idle,
    };
    (signals, task)
}

/// Keep a LISTEN session open and turn every notification, and every
/// (re)connect, into a wake-up of the drain workers.
async fn listen(
    config: Config,
    wake: Arc<watch::Sender<u64>>,
    idle: Arc<crate::wake::Idle>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let attempt = listen_once(&config, &wake, &idle, &stats);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = attempt => outcome,
        };
        stats.listening.store(false, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                // We had a working session: retry at once-ish.
                backoff.reset();
                tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "relay",
                    %reason, "relay LISTEN connection lost; reconnecting");
            }
            Err(error) => tracing::warn!(%error, "relay LISTEN connection failed"),
        }
        // Whatever happened, sweep: events may have committed while no
        // notification could reach us.
        wake.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// One LISTEN session. `Err` when it could not be set up; `Ok(reason)` when
/// it was up and then ended. The session also holds the wake lock while the
/// relay sleeps: taken when every drain worker is idle, let go of at the
/// first notification.
async fn listen_once(
    config: &Config,
    wake: &watch::Sender<u64>,
    idle: &crate::wake::Idle,
    stats: &RelayStats,
) -> Result<String> {
    let pg = crate::db::pg_config(config, LISTEN_APPLICATION_NAME)?;
    let (client, mut connection) = pg
        .connect(NoTls)
        .await
        .context("opening the LISTEN connection")?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let notified = Arc::new(tokio::sync::Notify::new());
    let (wake_driver, notified_driver) = (wake.clone(), notified.clone());
    // The connection is driven here rather than spawned as a plain future so
    // that notifications come out of poll_message.
    let driver = tokio::spawn(async move {
        let end = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    wake_driver.send_modify(|g| *g += 1);
                    notified_driver.notify_one();
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(notice = %notice.message(), "postgres notice")
                }
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
        .context("LISTEN herald_outbox")?;
    // The wake lock lives on a second session: waiting for it must not hold
    // back the notifications, which the server sends only to an idle session.
    let lock =
        crate::wake::WakeLock::open(config, WAKE_LOCK_APPLICATION_NAME, WAKE_LOCK, true).await?;
    if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
        crate::telemetry::reconnected("postgres", "relay");
    }
    stats.listening.store(true, Ordering::Relaxed);
    // A task that died meanwhile keeps the relay unready (watch_task sets
    // `failed` before clearing `listening`).
    if stats.failed.load(Ordering::SeqCst) {
        stats.listening.store(false, Ordering::SeqCst);
    }
    tracing::debug!("relay listening on {CHANNEL}");
    // Sweep right after LISTEN took effect: anything committed before is
    // found by the sweep, anything after sends a notification or is found
    // by the sweep after the wake lock.
    wake.send_modify(|g| *g += 1);
    let listen_closed = async move { closed_rx.await.ok().flatten() };
    let gauges = crate::wake::Gauges {
        sleeps: &stats.sleeps,
        asleep: &stats.asleep,
    };
    let end = lock
        .serve(Box::pin(listen_closed), &notified, idle, wake, gauges)
        .await;
    drop(client);
    let _ = driver.await;
    Ok(end.unwrap_or_else(|| "closed by the server".into()))
}
