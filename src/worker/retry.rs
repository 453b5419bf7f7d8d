//! When a failed attempt runs again: the [`RetryPolicy`] (exponential
//! backoff with jitter), which policy applies to a kind, and which failed
//! writes are worth trying again.
//!
//! It only computes: it must never write a task or sleep.

use std::time::Duration;

use rand::Rng;

use super::registry::Entry;
use super::shared::Shared;
use crate::error::Error;

/// Exponential backoff with jitter: attempt n waits about
/// `base * 2^(n-1)`, at most `max`, spread by ±`jitter` (a fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl RetryPolicy {
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 40) - 1;
        let nominal = self
            .base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let spread = nominal.as_secs_f64() * self.jitter.clamp(0.0, 1.0);
        let offset = if spread > 0.0 {
            rand::rng().random_range(-spread..=spread)
        } else {
            0.0
        };
        Duration::from_secs_f64((nominal.as_secs_f64() + offset).max(0.0))
    }
}

/// The kind's retry policy, else the worker's default.
pub(super) fn retry_policy(shared: &Shared, entry: Option<&Entry>) -> RetryPolicy {
    entry
        .and_then(|e| e.options.retry)
        .unwrap_or(shared.default_retry)
}

/// Whether a failed write may succeed when tried again: the connection
/// broke or timed out, or the server asked for a retry. Anything else
/// (the server refused this statement) would fail the same way again.
pub(super) fn retryable(error: &Error) -> bool {
    match error {
        Error::Postgres { error, .. } => match error.code() {
            None => true,
            Some(code) => {
                let c = code.code();
                c.starts_with("08")
                    || c.starts_with("40")
                    || c.starts_with("53")
                    || c.starts_with("57")
            }
        },
        Error::Json { .. } | Error::InvalidTask(_) => false,
        _ => true,
    }
}
