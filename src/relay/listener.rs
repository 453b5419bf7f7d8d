//! The relay's subscription to the notifier on [`CHANNEL`], and its wake
//! lock: every notification, and every `Up` of the notifier's session,
//! becomes one signal to the drain workers: work may be waiting. While
//! LISTEN is up, a second session holds the wake lock while every drain
//! worker sleeps, so that producers notify only then.
//!
//! The drain workers consume only [`Signals`]; nothing else of this module
//! reaches them. It must never take a decision from a notification (the
//! workers read the table), and never leave the workers asleep after a
//! reconnect (it signals them, since events may have committed while no
//! notification could arrive).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::notifier::{Notifier, Signal, Subscription};
use crate::telemetry::names::event;

use super::{RelayStats, CHANNEL, WAKE_LOCK, WAKE_LOCK_APPLICATION_NAME};

/// What the drain workers get from the listener.
pub(super) struct Signals {
    /// Changes when work may be waiting: a notification, or a (re)connect.
    pub(super) wake: watch::Receiver<u64>,
    /// Changes when the LISTEN session (re)connects: Postgres answers
    /// again, so a drain worker backing off from a failed batch retries now
    /// instead of sleeping out its backoff.
    pub(super) up: watch::Receiver<u64>,
    /// Where the drain workers say they sleep or work: the wake lock is
    /// taken only while all of them sleep.
    pub(super) idle: Arc<crate::wake::Idle>,
}

/// Start the listener for `config.relay.concurrency` drain workers, on a
/// subscription to `notifier`.
pub(super) fn spawn(
    config: &Config,
    notifier: &Notifier,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) -> (Signals, tokio::task::JoinHandle<()>) {
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let (up_tx, up_rx) = watch::channel(0u64);
    let idle = Arc::new(crate::wake::Idle::new(config.relay.concurrency));
    let subscription = notifier.subscribe(&[CHANNEL]);
    let task = tokio::spawn(listen(
        config.clone(),
        subscription,
        wake_tx,
        up_tx,
        idle.clone(),
        stats,
        shutdown,
    ));
    let signals = Signals {
        wake: wake_rx,
        up: up_rx,
        idle,
    };
    (signals, task)
}

/// Follow the subscription: on `Up`, sweep and serve the wake lock until
/// `Down`; every notification wakes the drain workers.
async fn listen(
    config: Config,
    mut subscription: Subscription,
    wake: watch::Sender<u64>,
    up: watch::Sender<u64>,
    idle: Arc<crate::wake::Idle>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    let follow = async {
        loop {
            match subscription.recv().await {
                Some(Signal::Up) => {}
                Some(Signal::Notification { .. }) => {
                    wake.send_modify(|g| *g += 1);
                    continue;
                }
                Some(Signal::Down(reason)) => {
                    lost(&stats, &wake, &reason);
                    continue;
                }
                None => return,
            }
            if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
                crate::telemetry::reconnected("postgres", "relay");
            }
            stats.listening.store(true, Ordering::Relaxed);
            // A task that died meanwhile keeps the relay unready (watch_task
            // sets `failed` before clearing `listening`).
            if stats.failed.load(Ordering::SeqCst) {
                stats.listening.store(false, Ordering::SeqCst);
            }
            tracing::debug!("relay listening on {CHANNEL}");
            // Sweep right after LISTEN took effect: anything committed before
            // is found by the sweep, anything after sends a notification or
            // is found by the sweep after the wake lock.
            wake.send_modify(|g| *g += 1);
            up.send_modify(|g| *g += 1);
            let consumer = crate::wake::Consumer {
                config: &config,
                application_name: WAKE_LOCK_APPLICATION_NAME,
                key: WAKE_LOCK,
                share: true,
                idle: &idle,
                wake: &wake,
                gauges: crate::wake::Gauges {
                    sleeps: &stats.sleeps,
                    asleep: &stats.asleep,
                },
            };
            match crate::wake::serve_while_up(&mut subscription, consumer, &|_, _| true).await {
                Some(reason) => lost(&stats, &wake, &reason),
                None => return,
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = follow => {}
    }
    stats.listening.store(false, Ordering::Relaxed);
}

/// LISTEN is down: not ready, and sweep, since events may have committed
/// while no notification could reach us.
fn lost(stats: &RelayStats, wake: &watch::Sender<u64>, reason: &str) {
    stats.listening.store(false, Ordering::Relaxed);
    tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "relay",
        %reason, "relay LISTEN connection lost; reconnecting");
    wake.send_modify(|g| *g += 1);
}
