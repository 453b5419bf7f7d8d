//! Publishing a claimed batch to Redis: pipelines (`crate::pubsub`), the
//! per-event outcome, the outage it reveals, and how large the next batch
//! is ([`Pace`]).
//!
//! It must never start a pipeline so late that the claim transaction could
//! outlive [`super::claim_hold`], and never blame an event for an outage
//! (only a lone event that keeps timing out while Redis answers is
//! charged, by `settle`).

use std::sync::atomic::Ordering;

use crate::error::Error;
use crate::pubsub::Publication;
use crate::telemetry::names::event;

use super::claim::Claim;
use super::Drainer;

impl Drainer {
    /// PUBLISH every `(channel, envelope)` in order, within the time the
    /// claim transaction may stay open.
    pub(super) async fn publish(
        &self,
        claim: &Claim,
        messages: &[(String, String)],
    ) -> Publication {
        // No pipeline starts later than this, so the claim transaction
        // stays well inside claim_hold.
        let last_start = claim.started
            + self.config.redis.connect_timeout * 2
            + self.config.redis.response_timeout;
        crate::pubsub::publish_each(
            &self.redis,
            messages,
            self.config.redis.response_timeout,
            self.config.relay.batch_bytes,
            last_start,
        )
        .await
    }

    /// Whether Redis answers a PING within the response timeout.
    pub(super) async fn redis_answers(&self) -> bool {
        let ping = async {
            let mut conn = self.redis.get().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(self.config.redis.response_timeout, ping).await,
            Ok(Some(_))
        )
    }

    /// Redis took a whole batch: if it was down, it is back.
    pub(super) fn redis_up(&self) {
        if self.redis_down.swap(false, Ordering::Relaxed) {
            crate::telemetry::reconnected("redis", "relay");
        }
    }

    /// Log an outage once when Redis goes down (every time when it refuses
    /// the relay as such), and remember that it is down.
    pub(super) fn redis_failed(&self, span: &tracing::Span, error: &Error) {
        if is_auth_outage(error) {
            tracing::error!(parent: span, event = event::REDIS_CONNECTION_LOST,
                component = "relay", %error,
                "Redis refuses the relay's PUBLISH (authentication or ACL): no event can be delivered until this is fixed; events wait in herald.outbox");
            self.redis_down.store(true, Ordering::Relaxed);
        } else if !self.redis_down.swap(true, Ordering::Relaxed) {
            tracing::warn!(parent: span, event = event::REDIS_CONNECTION_LOST,
                component = "relay", %error, "Redis unreachable; the relay holds events back");
        }
    }
}

/// Whether Redis answered but refuses the relay as such (authentication,
/// the PUBLISH command denied): an outage an operator must fix.
fn is_auth_outage(error: &Error) -> bool {
    matches!(error, Error::Redis { error, .. } if error.code().is_some())
}

/// How many events a drain worker claims next. After a publish timed out
/// the next batch is half as large, down to one event, so a batch Redis
/// cannot take in `redis.response_timeout` gets smaller rather than being
/// re-published whole; a batch that needed more than one pipeline
/// (`relay.batch_bytes`) makes the next claim take what fitted in one.
/// Every fully published batch doubles it back, up to `relay.batch_size`.
pub(crate) struct Pace {
    limit: usize,
    max: usize,
    /// The head of the last single-event batch that timed out.
    stuck: Option<i64>,
}

impl Pace {
    pub(crate) fn new(max: usize) -> Pace {
        Pace {
            limit: max,
            max,
            stuck: None,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(super) fn published(&mut self, first_pipeline: usize, events: usize) {
        self.stuck = None;
        self.limit = if first_pipeline < events {
            first_pipeline.max(1)
        } else {
            (self.limit * 2).min(self.max)
        };
    }

    /// After a timeout; whether this is a single-event batch whose head
    /// already timed out alone, which is then charged (if Redis answers).
    pub(super) fn timed_out(&mut self, head: Option<i64>) -> bool {
        if self.limit > 1 {
            self.limit /= 2;
            self.stuck = None;
            return false;
        }
        let again = head.is_some() && self.stuck == head;
        self.stuck = head;
        again
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;

    #[test]
    fn pace_halves_after_timeouts_and_charges_only_a_lone_head_that_times_out_again() {
        let mut pace = Pace::new(8);
        assert_eq!(pace.limit(), 8);
        assert!(!pace.timed_out(Some(1)));
        assert_eq!(pace.limit(), 4);
        assert!(!pace.timed_out(Some(1)));
        assert!(!pace.timed_out(Some(1)));
        assert_eq!(pace.limit(), 1, "down to one event");
        assert!(!pace.timed_out(Some(1)), "first lone timeout of this head");
        assert!(pace.timed_out(Some(1)), "the same head again: charge it");
        assert!(!pace.timed_out(Some(2)), "another head starts over");
        pace.published(1, 1);
        assert_eq!(pace.limit(), 2, "success doubles");
        pace.published(2, 2);
        pace.published(4, 4);
        pace.published(8, 8);
        assert_eq!(pace.limit(), 8, "up to batch_size");
        pace.published(3, 8);
        assert_eq!(pace.limit(), 3, "what fitted in one pipeline");
        assert!(!pace.timed_out(Some(5)));
        pace.published(1, 1);
        assert!(
            !pace.timed_out(Some(5)),
            "a success in between resets the head"
        );
    }
}
