//! Redis pub/sub: the bounded connection pool of one server, and its two
//! sides, each in its own module: `publish` (the relay's batches: one
//! pipelined round trip per batch, per slot in a sharded cluster, with what
//! Redis did with each message) and `subscriber` (the `Subscriber` that
//! Rust consumers and `herald tail` read envelopes from). On a Redis
//! Cluster (see [`crate::redis_pool`]) classic pub/sub publishes every batch
//! through one node (the cluster bus carries it to every node), and sharded
//! pub/sub (`redis.pubsub = "sharded"`) sends each channel's SPUBLISH to the
//! primary owning its slot.
//!
//! Redis here is only a fan-out medium: this module must never be the only
//! holder of an event. Publishing reports what Redis did with each message
//! (accepted, refused on its own, or not known to have run) and the caller
//! (the relay) keeps every row Redis did not accept.

mod publish;
mod subscriber;

pub use publish::{publish_all, publish_each, refuses_everything, Publication, Sent};
pub use subscriber::{Delivery, Gap, Subscriber};

use crate::config::{mask_url, Config, RedisTarget};
use crate::error::{Error, Result};

/// A bounded pool of multiplexed Redis connections (`redis.pool_size`).
///
/// Every connection carries Herald's `redis.connect_timeout` and
/// `redis.response_timeout`: left to the redis crate, a connection gives up
/// on a reply after its own 500 ms, so a slow Redis failed every batch after
/// running it, and the relay published the batch again and again.
///
/// For a single server only: a `redis+cluster://` or `redis+sentinel://`
/// URL needs [`RedisPool::from_config`].
pub fn redis_pool(config: &Config) -> Result<deadpool_redis::Pool> {
    if !matches!(
        RedisTarget::parse(&config.redis_url)?,
        RedisTarget::Single(_)
    ) {
        return Err(Error::Url {
            setting: "redis_url (REDIS_URL)",
            reason: format!(
                "{} is a Cluster or Sentinel URL, and pubsub::redis_pool makes a single-server pool: use herald::RedisPool::from_config",
                mask_url(&config.redis_url)
            ),
        });
    }
    let bad_url = |e: &dyn std::fmt::Display| Error::Url {
        setting: "redis_url (REDIS_URL)",
        reason: format!("{e}: {}", mask_url(&config.redis_url)),
    };
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.redis.connect_timeout))
        .set_response_timeout(Some(config.redis.response_timeout));
    // Parsing here reports a bad URL as such, not as a failed connection at
    // the first publish.
    let manager = deadpool_redis::Manager::new_with_config(config.redis_url.as_str(), connection)
        .map_err(|e| bad_url(&e))?;
    deadpool_redis::Pool::builder(manager)
        .max_size(config.redis.pool_size)
        .wait_timeout(Some(config.redis.connect_timeout))
        .create_timeout(Some(config.redis.connect_timeout))
        .recycle_timeout(Some(config.redis.response_timeout))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Other(format!("building the Redis pool: {e}")))
}
