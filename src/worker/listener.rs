//! The listener: the worker's subscription to the process's notifier on the
//! tasks and cancel channels, and the worker's wake lock (on a session of
//! its own) held while its producers sleep and LISTEN is up.
//!
//! Its interface is narrow on purpose: it only signals "the queues may have
//! work" (also after every (re)connect) and "cancel task N" through
//! [`Signals`], and reports whether it is listening. It must never claim,
//! write or hold a task.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{WorkerStats, WAKE_LOCK, WAKE_LOCK_APPLICATION_NAME};
use crate::config::Config;
use crate::notifier::{Signal, Subscription};
use crate::store::tasks;
use crate::telemetry::names::event;

/// All the listener tells the rest of the worker.
#[derive(Clone)]
pub(super) struct Signals {
    /// Bumped when the queues may have work: a NOTIFY on the tasks channel
    /// (which names no queue, so every producer looks), or a (re)connect,
    /// after which notifications may have been missed.
    pub(super) wake: Arc<watch::Sender<u64>>,
    /// Bumped when the LISTEN session (re)connects: Postgres answers again,
    /// so a producer backing off from a failed claim retries now.
    pub(super) up: Arc<watch::Sender<u64>>,
    /// Stops the running attempts of the task with this id.
    pub(super) cancel: Arc<dyn Fn(i64) + Send + Sync>,
}

impl Signals {
    fn work(&self) {
        self.wake.send_modify(|g| *g += 1);
    }

    /// Act on one notification; `true` when it says the queues may have work.
    fn notified(&self, channel: &str, payload: &str) -> bool {
        if channel == tasks::CANCEL_CHANNEL {
            if let Ok(id) = payload.parse::<i64>() {
                (self.cancel)(id);
            }
            false
        } else {
            self.work();
            true
        }
    }
}

/// Follow the subscription (tasks channel: wake producers; cancel channel:
/// stop a task's attempts), and hold the wake lock while the producers
/// sleep and LISTEN is up.
pub(super) async fn listen(
    config: Config,
    mut subscription: Subscription,
    stats: Arc<WorkerStats>,
    signals: Signals,
    idle: Arc<crate::wake::Idle>,
    stop: CancellationToken,
) {
    let mut sessions = 0u64;
    let follow = async {
        loop {
            match subscription.recv().await {
                Some(Signal::Up) => {}
                Some(Signal::Notification { channel, payload }) => {
                    signals.notified(&channel, &payload);
                    continue;
                }
                Some(Signal::Down(reason)) => {
                    lost(&stats, &signals, &reason);
                    continue;
                }
                None => return,
            }
            sessions += 1;
            if sessions > 1 {
                crate::telemetry::reconnected("postgres", "worker");
            }
            stats.listening.store(true, Ordering::Relaxed);
            // Anything enqueued before LISTEN took effect is found now.
            signals.work();
            signals.up.send_modify(|g| *g += 1);
            let consumer = crate::wake::Consumer {
                config: &config,
                application_name: WAKE_LOCK_APPLICATION_NAME,
                key: WAKE_LOCK,
                share: false,
                idle: &idle,
                wake: &signals.wake,
                gauges: crate::wake::Gauges {
                    sleeps: &stats.sleeps,
                    asleep: &stats.asleep,
                },
            };
            let on_notification = |channel: &str, payload: &str| {
                // The wake-up itself is the wake lock's to send.
                if channel == tasks::CANCEL_CHANNEL {
                    signals.notified(channel, payload)
                } else {
                    true
                }
            };
            match crate::wake::serve_while_up(&mut subscription, consumer, &on_notification).await {
                Some(reason) => lost(&stats, &signals, &reason),
                None => return,
            }
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = follow => {}
    }
    stats.listening.store(false, Ordering::Relaxed);
}

/// LISTEN is down: not listening, and look again, since notifications may
/// have been missed.
fn lost(stats: &WorkerStats, signals: &Signals, reason: &str) {
    stats.listening.store(false, Ordering::Relaxed);
    tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "worker",
        %reason, "worker LISTEN connection lost; reconnecting");
    signals.work();
}
