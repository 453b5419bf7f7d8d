//! The `Subscriber` that Rust consumers (and `herald tail`) read envelopes
//! from: SUBSCRIBE/PSUBSCRIBE on one server or a Sentinel primary (moving
//! with a failover), SSUBSCRIBE per slot on a cluster; it reconnects by
//! itself and says with a `Gap` when it may have missed messages. It never
//! publishes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use redis::aio::PubSubSink;

use crate::config::{mask_url, Config, PubSubMode, RedisTarget};
use crate::error::{Context, Error, Result};
use crate::outbox::Envelope;

/// What a [`Subscriber`] yields.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event envelope; `channel` is the Redis channel it came on.
    Event { channel: String, envelope: Envelope },
    /// Events were missed: the connection was lost and is back (pub/sub does
    /// not replay), or the consumer fell behind and its buffer overflowed.
    Gap(Gap),
    /// A message on a subscribed channel that is not a Herald envelope.
    Undecodable { channel: String, error: String },
}

#[derive(Debug, Clone)]
pub struct Gap {
    pub disconnected_at: DateTime<Utc>,
    pub reconnected_at: DateTime<Utc>,
    pub reason: String,
    /// How many messages were dropped, when known: set when the consumer
    /// fell behind (counted as they were dropped), `None` after a lost
    /// connection (Redis does not say what it could not send).
    pub dropped: Option<u64>,
}

pub use crate::config::{DEFAULT_SUBSCRIBER_BUFFER, MAX_SUBSCRIBER_BUFFER};

/// What the reader task hands to [`Subscriber::next`] through the bounded
/// buffer.
enum Item {
    Message(redis::Msg),
    /// Messages possibly missed between the two times (a cluster node's
    /// connection lost, or a channel's slot moved and was subscribed again).
    Gap {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        reason: String,
    },
    /// Messages dropped because the buffer was full, between the two times.
    Dropped {
        count: u64,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
}

/// One live subscription: the sink for pings and the reader task that moves
/// messages from the connection into the bounded buffer.
struct Live {
    pinger: Pinger,
    rx: tokio::sync::mpsc::Receiver<Item>,
    reader: tokio::task::JoinHandle<()>,
}

/// What checks an idle subscription is alive.
enum Pinger {
    Sink(PubSubSink),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Pinger {
    async fn unsubscribe(
        &mut self,
        channels: &[String],
        patterns: &[String],
    ) -> redis::RedisResult<()> {
        match self {
            Pinger::Sink(sink) => {
                if !channels.is_empty() {
                    sink.unsubscribe(channels).await?;
                }
                if !patterns.is_empty() {
                    sink.punsubscribe(patterns).await?;
                }
                Ok(())
            }
            Pinger::Cluster(_) => Ok(()),
        }
    }

    async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Pinger::Sink(sink) => sink.ping::<redis::Value>().await.map(|_| ()),
            Pinger::Cluster(conn) => redis::cmd("PING")
                .query_async::<redis::Value>(conn)
                .await
                .map(|_| ()),
        }
    }
}

/// How long a subscription being left is read after its last message.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

fn decode(msg: &redis::Msg) -> Delivery {
    let channel = msg.get_channel_name().to_string();
    match serde_json::from_slice::<Envelope>(msg.get_payload_bytes()) {
        Ok(envelope) => Delivery::Event { channel, envelope },
        Err(e) => Delivery::Undecodable {
            channel,
            error: e.to_string(),
        },
    }
}

/// What a message arriving on the connection is, for [`read_into`].
enum Incoming {
    Msg(redis::Msg),
    Gap {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        reason: String,
    },
}

/// Where a [`Subscriber`] connects.
enum Target {
    Single(Box<redis::Client>),
    Sentinel,
    Cluster(Vec<String>),
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Subscribes to topics and topic patterns on Redis and yields envelopes;
/// reconnects and re-subscribes after Redis restarts, reporting each gap.
///
/// Messages wait in a buffer of at most [`Subscriber::buffer`] messages
/// until `next` takes them. The redis crate reads a pub/sub connection into
/// an unbounded channel, so a task of ours drains it at once into that
/// bounded buffer; when the buffer is full it drops and counts, and the
/// consumer gets a [`Delivery::Gap`] where the dropped messages were.
pub struct Subscriber {
    target: Target,
    /// `redis_url` and the `[redis]` timeouts the Sentinel and Cluster
    /// clients are built with.
    settings: Box<Config>,
    mode: PubSubMode,
    url: String,
    prefix: String,
    channels: Vec<String>,
    patterns: Vec<String>,
    conn: Option<Live>,
    connect_timeout: Duration,
    idle_ping: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    buffer: usize,
    /// Why a topic or pattern given can never match, reported by `connect`.
    invalid: Option<String>,
    lost: Option<(DateTime<Utc>, String)>,
    /// Sentinel only: who names the primary, the primary subscribed on,
    /// and when that was last compared.
    watch: Option<crate::redis_pool::SentinelWatch>,
    /// The subscription on the old primary, unsubscribed, still handing
    /// over what it received.
    draining: Option<Live>,
    primary: Option<(String, u16)>,
    checked: std::time::Instant,
}

impl Subscriber {
    /// A subscriber for `redis_url` with channel prefix `prefix` (usually
    /// `herald:`). Nothing connects until [`Subscriber::connect`] or the
    /// first [`Subscriber::next`].
    ///
    /// `redis_url` may be a `redis+cluster://` or `redis+sentinel://` URL
    /// (see [`crate::redis_pool`]); classic pub/sub unless
    /// [`Subscriber::pubsub`] says otherwise.
    pub fn new(redis_url: &str, prefix: &str) -> Result<Subscriber> {
        let target = match RedisTarget::parse(redis_url)? {
            RedisTarget::Single(_) => {
                Target::Single(Box::new(redis::Client::open(redis_url).map_err(|e| {
                    Error::Url {
                        setting: "redis_url (REDIS_URL)",
                        reason: format!("{e}: {}", mask_url(redis_url)),
                    }
                })?))
            }
            RedisTarget::Sentinel { .. } => Target::Sentinel,
            RedisTarget::Cluster { nodes } => Target::Cluster(nodes),
        };
        Ok(Subscriber {
            target,
            settings: Box::new(Config {
                redis_url: redis_url.to_string(),
                ..Config::default()
            }),
            mode: PubSubMode::Classic,
            url: mask_url(redis_url),
            prefix: prefix.to_string(),
            channels: Vec::new(),
            patterns: Vec::new(),
            conn: None,
            connect_timeout: Duration::from_secs(5),
            idle_ping: Duration::from_secs(15),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            buffer: DEFAULT_SUBSCRIBER_BUFFER,
            invalid: None,
            lost: None,
            watch: None,
            draining: None,
            primary: None,
            checked: std::time::Instant::now(),
        })
    }

    pub fn from_config(config: &Config) -> Result<Subscriber> {
        let mut s = Subscriber::new(&config.redis_url, &config.channel_prefix)?;
        s.settings = Box::new(config.clone());
        s.mode = config.redis.pubsub;
        s.connect_timeout = config.redis.connect_timeout;
        s.buffer = config
            .redis
            .subscriber_buffer
            .clamp(1, MAX_SUBSCRIBER_BUFFER);
        Ok(s)
    }

    /// Read with classic (SUBSCRIBE/PSUBSCRIBE) or sharded (SSUBSCRIBE,
    /// Redis Cluster only, exact topics only) pub/sub: what the relay
    /// publishes with (`redis.pubsub`; set by [`Subscriber::from_config`]).
    pub fn pubsub(mut self, mode: PubSubMode) -> Subscriber {
        self.mode = mode;
        self
    }

    /// Delay between reconnect attempts: doubles from `min` up to `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Subscriber {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Most messages held for a consumer that has not taken them yet
    /// (default 10,000; 1 to [`MAX_SUBSCRIBER_BUFFER`]). Past it, messages
    /// are dropped and counted, and the consumer gets a [`Delivery::Gap`].
    /// Takes effect at the next connect.
    pub fn buffer(mut self, messages: usize) -> Subscriber {
        self.buffer = messages.clamp(1, MAX_SUBSCRIBER_BUFFER);
        self
    }

    /// Messages received and not yet taken by [`Subscriber::next`] (at most
    /// [`Subscriber::buffer`], plus a dropped-count marker).
    pub fn buffered(&self) -> usize {
        self.conn.as_ref().map(|live| live.rx.len()).unwrap_or(0)
    }

    /// Receive events of exactly this topic. A topic that is not valid
    /// (see [`crate::outbox::validate_topic`]) makes `connect` fail.
    pub fn topic(mut self, topic: &str) -> Subscriber {
        if let Err(e) = crate::outbox::validate_topic(topic) {
            self.invalid
                .get_or_insert(format!("{e}: no event can have it"));
        }
        self.note_prefix(topic);
        self.channels.push(format!("{}{topic}", self.prefix));
        self
    }

    /// Receive events whose topic matches a Redis glob such as `payment.*`
    /// (`*` for every topic). A pattern that no topic can match (a character
    /// topics never hold, such as `#`, `/` or a space) makes `connect` fail.
    pub fn pattern(mut self, pattern: &str) -> Subscriber {
        if let Err(e) = check_pattern(pattern) {
            self.invalid.get_or_insert(e);
        }
        self.note_prefix(pattern);
        self.patterns.push(format!("{}{pattern}", self.prefix));
        self
    }

    /// Topics are given without the channel prefix, which is added here: one
    /// that starts with it would be looked for under the prefix twice.
    fn note_prefix(&mut self, spec: &str) {
        if !self.prefix.is_empty() && spec.starts_with(&self.prefix) {
            self.invalid.get_or_insert(format!(
                "{spec:?} starts with the channel prefix {:?}, which is added to every topic: give {:?}",
                self.prefix,
                &spec[self.prefix.len()..]
            ));
        }
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
        if let Some(reason) = &self.invalid {
            return Err(Error::Other(format!(
                "cannot subscribe: {reason}; topics are 1 to 255 letters, digits, '.', '_', '-' or ':', and patterns add the Redis glob characters '*', '?', '[...]'"
            )));
        }
        if self.mode == PubSubMode::Sharded {
            if let Some(pattern) = self.patterns.first() {
                return Err(Error::Config(format!(
                    "redis.pubsub (HERALD_REDIS_PUBSUB) is \"sharded\", which has exact channels only, so pattern {:?} cannot be subscribed: subscribe to exact topics, or publish and subscribe with redis.pubsub = \"classic\"",
                    pattern.strip_prefix(&self.prefix).unwrap_or(pattern)
                )));
            }
            if !matches!(self.target, Target::Cluster(_)) {
                return Err(Error::Config(format!(
                    "redis.pubsub (HERALD_REDIS_PUBSUB) is \"sharded\", which needs a Redis Cluster, but redis_url is {}: use a redis+cluster:// URL or redis.pubsub = \"classic\"",
                    self.url
                )));
            }
        }
        // Drop any previous connection (and its reader) before opening one.
        self.conn = None;
        // One slot more than the buffer so that a dropped-count marker
        // always fits behind a full buffer.
        let (tx, rx) = tokio::sync::mpsc::channel(self.buffer + 1);
        let live = match &self.target {
            Target::Single(client) => {
                let client = (**client).clone();
                self.connect_pubsub(client, tx, rx).await?
            }
            Target::Sentinel => {
                let mut sentinel = crate::redis_pool::sentinel_client(&self.settings)?;
                let watch = match &mut self.watch {
                    Some(watch) => watch,
                    None => self
                        .watch
                        .insert(crate::redis_pool::SentinelWatch::new(&self.settings)?),
                };
                let find = tokio::time::timeout(
                    self.connect_timeout * 2,
                    crate::redis_pool::agreed_primary(&mut sentinel, watch, self.connect_timeout),
                );
                let client = find
                    .await
                    .map_err(|_| {
                        Error::Timeout(
                            self.connect_timeout * 2,
                            format!("asking the sentinels of {} for the primary", self.url),
                        )
                    })?
                    .map_err(|e| crate::redis_pool::describe_connect_error(&self.url, e))?;
                let primary = crate::redis_pool::client_addr(&client);
                let live = self.connect_pubsub(client, tx, rx).await?;
                self.primary = primary;
                self.checked = std::time::Instant::now();
                live
            }
            Target::Cluster(nodes) => {
                let nodes = nodes.clone();
                self.connect_cluster(&nodes, tx, rx).await?
            }
        };
        self.conn = Some(live);
        Ok(())
    }

    /// Subscribe on one server with a pub/sub connection of its own.
    async fn connect_pubsub(
        &self,
        client: redis::Client,
        tx: tokio::sync::mpsc::Sender<Item>,
        rx: tokio::sync::mpsc::Receiver<Item>,
    ) -> Result<Live> {
        let fut = async {
            let pubsub = client
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
        let (sink, stream) = tokio::time::timeout(self.connect_timeout, fut)
            .await
            .map_err(|_| {
                Error::Timeout(self.connect_timeout, format!("connecting to {}", self.url))
            })??;
        let reader = tokio::spawn(read_into(
            stream.map(Incoming::Msg),
            tx,
            self.buffer,
            self.url.clone(),
        ));
        Ok(Live {
            pinger: Pinger::Sink(sink),
            rx,
            reader,
        })
    }

    /// Subscribe through a RESP3 cluster connection: classic channels and
    /// patterns on any node, sharded channels on the primary owning each
    /// channel's slot. The cluster client reconnects and re-subscribes by
    /// itself; a channel whose slot moved is subscribed again here.
    async fn connect_cluster(
        &self,
        nodes: &[String],
        tx: tokio::sync::mpsc::Sender<Item>,
        rx: tokio::sync::mpsc::Receiver<Item>,
    ) -> Result<Live> {
        let (push_tx, push_rx) = tokio::sync::mpsc::unbounded_channel();
        let client = crate::redis_pool::cluster_client(nodes, &self.settings, Some(push_tx))?;
        let fut = async {
            let mut conn = client
                .get_async_connection()
                .await
                .map_err(|e| crate::redis_pool::describe_connect_error(&self.url, e))?;
            // One command per channel: a subscription command is routed by
            // its first channel, and sharded channels of several slots in
            // one command would be refused (CROSSSLOT).
            for channel in &self.channels {
                match self.mode {
                    PubSubMode::Classic => conn.subscribe(channel).await,
                    PubSubMode::Sharded => conn.ssubscribe(channel).await,
                }
                .context(format!("subscribing to {channel}"))?;
            }
            for pattern in &self.patterns {
                conn.psubscribe(pattern)
                    .await
                    .context(format!("subscribing to pattern {pattern}"))?;
            }
            Ok::<_, Error>(conn)
        };
        let conn = tokio::time::timeout(self.connect_timeout * 2, fut)
            .await
            .map_err(|_| {
                Error::Timeout(
                    self.connect_timeout * 2,
                    format!("connecting to the cluster {}", self.url),
                )
            })??;
        let stream = cluster_pushes(push_rx, conn.clone(), self.mode);
        let reader = tokio::spawn(read_into(
            Box::pin(stream),
            tx,
            self.buffer,
            self.url.clone(),
        ));
        Ok(Live {
            pinger: Pinger::Cluster(conn),
            rx,
            reader,
        })
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
                                dropped: None,
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
            if let Some(old) = self.draining.as_mut() {
                // What the old primary sent before it confirmed the
                // unsubscribe comes first.
                match tokio::time::timeout(DRAIN_QUIET, old.rx.recv()).await {
                    Ok(Some(Item::Message(msg))) => return Ok(decode(&msg)),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => self.draining = None,
                }
            }
            if let Some(reason) = self.primary_moved().await {
                // Unsubscribe there first: from then on the old primary
                // counts nobody for these channels, so the relay holds back
                // what it still publishes there instead of losing it.
                if let Some(live) = self.conn.as_mut() {
                    let channels = self.channels.clone();
                    let patterns = self.patterns.clone();
                    let _ = tokio::time::timeout(
                        self.connect_timeout,
                        live.pinger.unsubscribe(&channels, &patterns),
                    )
                    .await;
                }
                self.draining = self.conn.take();
                self.mark_lost(reason);
                continue;
            }
            let wait = if self.watch.is_some() {
                self.idle_ping.min(crate::redis_pool::SENTINEL_RECHECK)
            } else {
                self.idle_ping
            };
            let Some(live) = self.conn.as_mut() else {
                continue;
            };
            match tokio::time::timeout(wait, live.rx.recv()).await {
                Ok(Some(Item::Message(msg))) => return Ok(decode(&msg)),
                Ok(Some(Item::Gap {
                    since,
                    until,
                    reason,
                })) => {
                    return Ok(Delivery::Gap(Gap {
                        disconnected_at: since,
                        reconnected_at: until,
                        reason,
                        dropped: None,
                    }));
                }
                Ok(Some(Item::Dropped {
                    count,
                    since,
                    until,
                })) => {
                    return Ok(Delivery::Gap(Gap {
                        disconnected_at: since,
                        reconnected_at: until,
                        reason: format!(
                            "the subscriber fell behind: its buffer of {} messages was full and {count} messages were dropped",
                            self.buffer
                        ),
                        dropped: Some(count),
                    }));
                }
                Ok(None) => self.mark_lost("connection closed".into()),
                Err(_) => {
                    // Idle: make sure the connection is still alive.
                    let ping = tokio::time::timeout(self.connect_timeout, live.pinger.ping()).await;
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

    /// Sentinel only, at most every [`crate::redis_pool::SENTINEL_RECHECK`]:
    /// why to subscribe again, when the sentinels name another primary than
    /// the one subscribed on (a demoted primary keeps its subscribers until
    /// the sentinels reconfigure it, and hears nothing published on the new
    /// one meanwhile).
    async fn primary_moved(&mut self) -> Option<String> {
        if self.conn.is_none() || self.checked.elapsed() < crate::redis_pool::SENTINEL_RECHECK {
            return None;
        }
        self.checked = std::time::Instant::now();
        let named = self.watch.as_mut()?.primary().await?;
        let on = self.primary.as_ref()?;
        (named != *on).then(|| {
            format!(
                "the sentinels name {}:{} as the primary now, not {}:{}",
                named.0, named.1, on.0, on.1
            )
        })
    }

    fn mark_lost(&mut self, reason: String) {
        if self.draining.is_some() {
            tracing::info!(component = "subscriber", url = %self.url, %reason, "redis subscriber: moving to the new primary");
            self.conn = None;
            self.lost = Some((Utc::now(), reason));
            return;
        }
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

/// `Err(reason)` when no topic can match the Redis glob `pattern`: it is
/// empty, or holds a character that is neither a topic character nor a glob
/// one (`*`, `?`, `[`, `]`, `^`, `-`, `\`).
fn check_pattern(pattern: &str) -> std::result::Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".into());
    }
    if let Some(bad) = pattern.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(
                c,
                '.' | '_' | '-' | ':' | '*' | '?' | '[' | ']' | '^' | '\\'
            ))
    }) {
        return Err(format!(
            "pattern {pattern:?} holds {bad:?}, which no topic contains, so it can never match"
        ));
    }
    Ok(())
}

/// Move messages from the connection into the bounded buffer as fast as they
/// come, so the redis crate's own unbounded channel never grows. When the
/// buffer is full, drop and count until it is half empty again (so that a
/// consumer just keeping up gets one gap, not one per message), then queue
/// one `Dropped` marker where the messages were, even if nothing more comes. Ends when the connection
/// closes (after handing over any count still owed) or the subscriber is
/// dropped.
async fn read_into(
    mut stream: impl Stream<Item = Incoming> + Unpin,
    tx: tokio::sync::mpsc::Sender<Item>,
    buffer: usize,
    url: String,
) {
    let mut dropped: Option<(u64, DateTime<Utc>)> = None;
    loop {
        if let Some((count, since)) = dropped {
            // Dropping: count what comes until half the buffer is free,
            // then queue the marker where the dropped messages were.
            tokio::select! {
                permits = tx.reserve_many(buffer / 2 + 1) => {
                    let Ok(mut permits) = permits else { return };
                    if let Some(permit) = permits.next() {
                        permit.send(Item::Dropped { count, since, until: Utc::now() });
                    }
                    dropped = None;
                }
                msg = stream.next() => match msg {
                    Some(_) => dropped = Some((count + 1, since)),
                    None => break,
                },
            }
            continue;
        }
        let msg = tokio::select! {
            _ = tx.closed() => return,
            msg = stream.next() => msg,
        };
        let msg = match msg {
            None => break,
            Some(Incoming::Msg(msg)) => Item::Message(msg),
            Some(Incoming::Gap {
                since,
                until,
                reason,
            }) => Item::Gap {
                since,
                until,
                reason,
            },
        };
        // The last slot is kept for the marker: a message may take a slot
        // only while the buffer holds fewer than `buffer` items.
        if tx.capacity() <= 1 {
            tracing::warn!(
                component = "subscriber",
                url = %url,
                buffer,
                "redis subscriber: the consumer fell behind and its buffer is full; dropping messages until it catches up"
            );
            dropped = Some((1, Utc::now()));
            continue;
        }
        if tx.try_send(msg).is_err() {
            return;
        }
    }
    if let Some((count, since)) = dropped {
        let _ = tx
            .send(Item::Dropped {
                count,
                since,
                until: Utc::now(),
            })
            .await;
    }
}

/// The messages of a RESP3 cluster connection's pushes, with a gap where
/// a node's connection was lost (reported once the cluster client has
/// subscribed again) and where Redis unsubscribed a sharded channel because
/// its slot moved to another primary (failover, resharding): such a channel
/// is subscribed again, which the cluster client routes to the new owner.
fn cluster_pushes(
    rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    conn: redis::cluster_async::ClusterConnection,
    mode: PubSubMode,
) -> impl Stream<Item = Incoming> {
    struct State {
        rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        conn: redis::cluster_async::ClusterConnection,
        lost: Option<DateTime<Utc>>,
    }
    let state = State {
        rx,
        conn,
        lost: None,
    };
    futures_util::stream::unfold(state, move |mut state| async move {
        loop {
            let push = state.rx.recv().await?;
            match push.kind {
                redis::PushKind::Message
                | redis::PushKind::PMessage
                | redis::PushKind::SMessage => {
                    if let Some(msg) = redis::Msg::from_push_info(push) {
                        return Some((Incoming::Msg(msg), state));
                    }
                }
                redis::PushKind::Disconnection => {
                    state.lost.get_or_insert_with(Utc::now);
                }
                redis::PushKind::SUnsubscribe if mode == PubSubMode::Sharded => {
                    // Herald never unsubscribes: Redis did, because the
                    // channel's slot is no longer served by that node.
                    let Some(channel) = push.data.first().and_then(|v| match v {
                        redis::Value::BulkString(b) => {
                            Some(String::from_utf8_lossy(b).into_owned())
                        }
                        _ => None,
                    }) else {
                        continue;
                    };
                    let since = state.lost.take().unwrap_or_else(Utc::now);
                    let mut backoff = Duration::from_millis(20);
                    while let Err(error) = state.conn.ssubscribe(&channel).await {
                        tracing::debug!(%error, %channel, "redis subscriber: subscribing again to a moved sharded channel failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    tracing::info!(%channel, "redis subscriber: the sharded channel's slot moved; subscribed again at its new primary");
                    return Some((
                        Incoming::Gap {
                            since,
                            until: Utc::now(),
                            reason: format!(
                                "Redis moved the slot of {channel} (failover or resharding); subscribed again at its new primary"
                            ),
                        },
                        state,
                    ));
                }
                redis::PushKind::Subscribe
                | redis::PushKind::PSubscribe
                | redis::PushKind::SSubscribe => {
                    if let Some(since) = state.lost.take() {
                        return Some((
                            Incoming::Gap {
                                since,
                                until: Utc::now(),
                                reason: "a Redis Cluster node's connection was lost; the cluster client reconnected and subscribed again".into(),
                            },
                            state,
                        ));
                    }
                }
                _ => {}
            }
        }
    })
}
