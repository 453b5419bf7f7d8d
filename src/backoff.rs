//! Capped exponential backoff with full jitter, for the relay's drain
//! workers, the scheduler and the notifier's reconnects.
//!
//! It only computes delays: it must never sleep itself.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let low = ceiling / 2;
        let jitter = rand::rng().random_range(0..=(ceiling - low).as_millis() as u64);
        low + Duration::from_millis(jitter)
    }
}
