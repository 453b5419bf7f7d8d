//! The scheduler's subscription to the process's notifier on
//! `herald_schedules`. Its only output is a signal: a counter in a `watch`
//! channel, bumped on every notification ("schedules changed") and on every
//! `Up` and `Down` of the notifier's session ("look again: changes may have
//! gone unnoticed"). The scheduler consumes nothing else from it.
//!
//! It must never carry data: a notification is only a wake-up, every
//! decision is read from the table. It must never give up: the notifier
//! reopens a lost session with backoff until shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::SchedulerStats;
use crate::notifier::{Signal, Subscription};

/// Follow the subscription; every notification and every (re)connect bumps
/// `wake`.
pub(super) async fn listen(
    mut subscription: Subscription,
    wake: Arc<watch::Sender<u64>>,
    stats: Arc<SchedulerStats>,
    shutdown: CancellationToken,
) {
    let follow = async {
        while let Some(signal) = subscription.recv().await {
            match signal {
                Signal::Up => {
                    if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
                        crate::telemetry::reconnected("postgres", "scheduler");
                    }
                    stats.listening.store(true, Ordering::Relaxed);
                }
                Signal::Notification { .. } => {}
                Signal::Down(reason) => {
                    stats.listening.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        event = crate::telemetry::names::event::POSTGRES_CONNECTION_LOST,
                        component = "scheduler",
                        %reason,
                        "scheduler LISTEN connection lost; reconnecting"
                    );
                }
            }
            // Look again: now that changes cannot go unnoticed (Up), or
            // since they may have (Down), or because they happened.
            wake.send_modify(|g| *g += 1);
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = follow => {}
    }
    stats.listening.store(false, Ordering::Relaxed);
}
