//! Redis pub/sub: the bounded connection pool the relay publishes through,
//! one pipelined PUBLISH round trip per batch, and the `Subscriber` that Rust
//! consumers (and `herald tail`) read envelopes from, reconnecting by itself.
//!
//! Redis here is only a fan-out medium: this module must never be the only
//! holder of an event. Publishing succeeds or fails as a whole and the caller
//! (the relay) keeps the rows until it succeeded.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};

use crate::config::{mask_url, Config};
use crate::error::{Context, Error, Result};
use crate::outbox::Envelope;

/// A bounded pool of multiplexed Redis connections (`redis.pool_size`).
pub fn redis_pool(config: &Config) -> Result<deadpool_redis::Pool> {
    // Parse first so that a bad URL is reported as such, not as a failed
    // connection at the first publish.
    redis::Client::open(config.redis_url.as_str()).map_err(|e| Error::Url {
        setting: "redis_url (REDIS_URL)",
        reason: format!("{e}: {}", mask_url(&config.redis_url)),
    })?;
    let pool_config = deadpool_redis::Config::from_url(config.redis_url.clone());
    pool_config
        .builder()
        .map_err(|e| Error::Url {
            setting: "redis_url (REDIS_URL)",
            reason: format!("{e}: {}", mask_url(&config.redis_url)),
        })?
        .max_size(config.redis.pool_size)
        .wait_timeout(Some(config.redis.connect_timeout))
        .create_timeout(Some(config.redis.connect_timeout))
        .recycle_timeout(Some(config.redis.response_timeout))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Other(format!("building the Redis pool: {e}")))
}

/// PUBLISH every `(channel, message)` in order, in one pipelined round trip.
/// Returns the total number of subscribers that received them.
pub async fn publish_all(
    pool: &deadpool_redis::Pool,
    messages: &[(String, String)],
    timeout: Duration,
) -> Result<i64> {
    if messages.is_empty() {
        return Ok(0);
    }
    let mut conn = pool.get().await?;
    let mut pipe = redis::pipe();
    for (channel, message) in messages {
        pipe.publish(channel, message);
    }
    let receivers: Vec<i64> = tokio::time::timeout(timeout, pipe.query_async(&mut *conn))
        .await
        .map_err(|_| {
            Error::Timeout(
                timeout,
                format!("publishing {} messages to Redis", messages.len()),
            )
        })?
        .context(format!("publishing {} messages", messages.len()))?;
    Ok(receivers.iter().sum())
}

/// What a [`Subscriber`] yields.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event envelope; `channel` is the Redis channel it came on.
    Event { channel: String, envelope: Envelope },
    /// The connection was lost and is back. Pub/sub does not replay, so
    /// events published in between were not seen by this subscriber.
    Gap(Gap),
    /// A message on a subscribed channel that is not a Herald envelope.
    Undecodable { channel: String, error: String },
}

#[derive(Debug, Clone)]
pub struct Gap {
    pub disconnected_at: DateTime<Utc>,
    pub reconnected_at: DateTime<Utc>,
    pub reason: String,
}

/// Subscribes to topics and topic patterns on Redis and yields envelopes;
/// reconnects and re-subscribes after Redis restarts, reporting each gap.
pub struct Subscriber {
    client: redis::Client,
    url: String,
    prefix: String,
    channels: Vec<String>,
    patterns: Vec<String>,
    conn: Option<(PubSubSink, PubSubStream)>,
    connect_timeout: Duration,
    idle_ping: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    lost: Option<(DateTime<Utc>, String)>,
}

impl Subscriber {
    /// A subscriber for `redis_url` with channel prefix `prefix` (usually
    /// `herald:`). Nothing connects until [`Subscriber::connect`] or the
    /// first [`Subscriber::next`].
    pub fn new(redis_url: &str, prefix: &str) -> Result<Subscriber> {
        let client = redis::Client::open(redis_url).map_err(|e| Error::Url {
            setting: "redis_url (REDIS_URL)",
            reason: format!("{e}: {}", mask_url(redis_url)),
        })?;
        Ok(Subscriber {
            client,
            url: mask_url(redis_url),
            prefix: prefix.to_string(),
            channels: Vec::new(),
            patterns: Vec::new(),
            conn: None,
            connect_timeout: Duration::from_secs(5),
            idle_ping: Duration::from_secs(15),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            lost: None,
        })
    }

    pub fn from_config(config: &Config) -> Result<Subscriber> {
        let mut s = Subscriber::new(&config.redis_url, &config.channel_prefix)?;
        s.connect_timeout = config.redis.connect_timeout;
        Ok(s)
    }

    /// Delay between reconnect attempts: doubles from `min` up to `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Subscriber {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Receive events of exactly this topic.
    pub fn topic(mut self, topic: &str) -> Subscriber {
        self.channels.push(format!("{}{topic}", self.prefix));
        self
    }

    /// Receive events whose topic matches a Redis glob such as `payment.*`
    /// (`*` for every topic).
    pub fn pattern(mut self, pattern: &str) -> Subscriber {
        self.patterns.push(format!("{}{pattern}", self.prefix));
        self
    }

    /// Subscribe to `spec`: a pattern when it holds `*`, `?` or `[`, else a topic.
    pub fn subscribe(self, spec: &str) -> Subscriber {
        if spec.contains(['*', '?', '[']) {
            self.pattern(spec)
        } else {
            self.topic(spec)
        }
    }

    /// Connect and subscribe now; an unreachable Redis is an error here
    /// (later losses are retried by [`Subscriber::next`]).
    pub async fn connect(&mut self) -> Result<()> {
        if self.channels.is_empty() && self.patterns.is_empty() {
            return Err(Error::Other(
                "subscriber has no topic or pattern to subscribe to".into(),
            ));
        }
        let fut = async {
            let pubsub = self
                .client
                .get_async_pubsub()
                .await
                .context(format!("connecting to {}", self.url))?;
            let (mut sink, stream) = pubsub.split();
            for channel in &self.channels {
                sink.subscribe(channel)
                    .await
                    .context(format!("subscribing to {channel}"))?;
            }
            for pattern in &self.patterns {
                sink.psubscribe(pattern)
                    .await
                    .context(format!("subscribing to pattern {pattern}"))?;
            }
            Ok::<_, Error>((sink, stream))
        };
        let conn = tokio::time::timeout(self.connect_timeout, fut)
            .await
            .map_err(|_| {
                Error::Timeout(self.connect_timeout, format!("connecting to {}", self.url))
            })??;
        self.conn = Some(conn);
        Ok(())
    }

    /// The next delivery. Never returns an error for a lost connection: it
    /// reconnects with capped backoff and yields a [`Delivery::Gap`].
    pub async fn next(&mut self) -> Result<Delivery> {
        let mut backoff = self.backoff_min;
        loop {
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(()) => {
                        if let Some((since, reason)) = self.lost.take() {
                            crate::telemetry::reconnected("redis", "subscriber");
                            return Ok(Delivery::Gap(Gap {
                                disconnected_at: since,
                                reconnected_at: Utc::now(),
                                reason,
                            }));
                        }
                    }
                    Err(error) => {
                        if self.lost.is_none() {
                            // Never connected: report it, so a wrong URL is
                            // not retried silently forever.
                            return Err(error);
                        }
                        tracing::debug!(%error, ?backoff, "redis subscriber reconnect failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.backoff_max);
                        continue;
                    }
                }
            }
            let Some((sink, stream)) = self.conn.as_mut() else {
                continue;
            };
            match tokio::time::timeout(self.idle_ping, stream.next()).await {
                Ok(Some(msg)) => {
                    let channel = msg.get_channel_name().to_string();
                    let bytes = msg.get_payload_bytes();
                    return Ok(match serde_json::from_slice::<Envelope>(bytes) {
                        Ok(envelope) => Delivery::Event { channel, envelope },
                        Err(e) => Delivery::Undecodable {
                            channel,
                            error: e.to_string(),
                        },
                    });
                }
                Ok(None) => self.mark_lost("connection closed".into()),
                Err(_) => {
                    // Idle: make sure the connection is still alive.
                    let ping =
                        tokio::time::timeout(self.connect_timeout, sink.ping::<redis::Value>())
                            .await;
                    match ping {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => self.mark_lost(format!("ping failed: {e}")),
                        Err(_) => self.mark_lost("ping timed out".into()),
                    }
                }
            }
        }
    }

    /// Like [`Subscriber::next`], skipping everything but events.
    pub async fn next_event(&mut self) -> Result<Envelope> {
        loop {
            if let Delivery::Event { envelope, .. } = self.next().await? {
                return Ok(envelope);
            }
        }
    }

    fn mark_lost(&mut self, reason: String) {
        tracing::warn!(
            event = crate::telemetry::names::event::REDIS_CONNECTION_LOST,
            component = "subscriber",
            url = %self.url,
            %reason,
            "redis subscriber lost its connection; reconnecting"
        );
        self.conn = None;
        self.lost = Some((Utc::now(), reason));
    }
}
