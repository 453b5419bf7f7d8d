//! The local view of an attempt's lease: the deadline by which this worker
//! stops the handler unless the heartbeat renews it first.
//!
//! It must never let a handler run past the point where another worker may
//! rescue its task: deadlines count from when a claim or renewal was sent,
//! not from when its reply came.

use std::time::{Duration, Instant};

use super::shared::Shared;

/// The local view of one attempt's lease: the instant by which this worker
/// stops the handler unless a renewal succeeds first.
///
/// The server's lease ends `lease` after *it* ran the claim or heartbeat,
/// which is after this worker sent it; counting from the sending instant
/// (minus `lease_margin`) ends the handler before any other worker may
/// rescue the task, whatever the network or the pool did meanwhile.
pub(super) struct Lease {
    /// Microseconds after `Shared::epoch`.
    pub(super) deadline_us: std::sync::atomic::AtomicU64,
}

impl Lease {
    pub(super) fn new(shared: &Shared, sent: Instant) -> Lease {
        let lease = Lease {
            deadline_us: std::sync::atomic::AtomicU64::new(0),
        };
        lease.renew(shared, sent);
        lease
    }

    /// A renewal sent at `sent` succeeded.
    pub(super) fn renew(&self, shared: &Shared, sent: Instant) {
        let until = sent.saturating_duration_since(shared.epoch) + shared.hold;
        self.deadline_us.fetch_max(
            until.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(super) fn deadline(&self, shared: &Shared) -> Instant {
        shared.epoch
            + Duration::from_micros(self.deadline_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Resolves once the deadline passed without a renewal pushing it on,
    /// or at `timeout_at`, whichever comes first.
    pub(super) async fn expired_or(&self, shared: &Shared, timeout_at: Instant) -> Limit {
        loop {
            let deadline = self.deadline(shared);
            let now = Instant::now();
            if now >= deadline {
                return Limit::Lease;
            }
            if now >= timeout_at {
                return Limit::Timeout;
            }
            tokio::time::sleep_until(deadline.min(timeout_at).into()).await;
        }
    }
}

/// Which limit ended a handler.
pub(super) enum Limit {
    Lease,
    Timeout,
}
