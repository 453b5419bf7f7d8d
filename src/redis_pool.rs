//! The one way Herald reaches Redis, whatever `redis_url` points at: a single
//! server (`redis://`, a bounded deadpool of multiplexed connections), a
//! primary found through Sentinel (`redis+sentinel://`, one multiplexed
//! connection to the current primary, re-resolved when it stops being the
//! primary) or a Redis Cluster (`redis+cluster://`, one cluster connection
//! that routes by slot and follows failovers and slot moves by itself).
//!
//! What it owns: parsing `redis_url` into connections, connect and response
//! timeouts, and telling a wrong setting (a cluster URL at a server without
//! cluster mode, an unknown Sentinel master name) from an outage.
//! What it must never do: publish, subscribe or decide what a failed call
//! means for an event (that is `pubsub` and the relay's business).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{mask_url, Config, PubSubMode, RedisTarget};
use crate::error::{Error, Result};

const SETTING: &str = "redis_url (REDIS_URL)";

/// How often a Sentinel connection is checked against the primary the
/// sentinels name: after a failover the old primary keeps saying it is the
/// primary until the sentinels reconfigure it, and PUBLISH there reaches
/// only its own subscribers.
pub(crate) const SENTINEL_RECHECK: Duration = Duration::from_millis(500);

/// How long the relay publishes nothing after it followed a Sentinel
/// failover to a new primary: every `Subscriber` checks the sentinels every
/// [`SENTINEL_RECHECK`], so after two of them each has moved there too, and
/// nothing is published where a subscriber has not arrived yet.
pub(crate) const SWITCH_HOLD: Duration = Duration::from_millis(1000);

/// Herald's Redis connections: single server, Sentinel or Cluster.
/// Cloning is cheap and shares the connections.
///
/// Everything that took a `deadpool_redis::Pool` takes `impl Into<RedisPool>`,
/// so such a pool (a single server, classic pub/sub) still works there.
#[derive(Clone)]
pub struct RedisPool {
    kind: Kind,
    mode: PubSubMode,
}

#[derive(Clone)]
enum Kind {
    Single(deadpool_redis::Pool),
    Sentinel(Arc<SentinelPool>),
    Cluster(Arc<ClusterPool>),
}

impl From<deadpool_redis::Pool> for RedisPool {
    fn from(pool: deadpool_redis::Pool) -> RedisPool {
        RedisPool {
            kind: Kind::Single(pool),
            mode: PubSubMode::Classic,
        }
    }
}

impl From<&deadpool_redis::Pool> for RedisPool {
    fn from(pool: &deadpool_redis::Pool) -> RedisPool {
        pool.clone().into()
    }
}

impl From<&RedisPool> for RedisPool {
    fn from(pool: &RedisPool) -> RedisPool {
        pool.clone()
    }
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Single(_) => "single",
            Kind::Sentinel(_) => "sentinel",
            Kind::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisPool")
            .field("kind", &kind)
            .field("pubsub", &self.mode)
            .finish()
    }
}

/// What [`RedisPool::topology`] says `redis_url` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    Sentinel,
    Cluster,
}

impl RedisPool {
    /// Connections for `redis_url` and `[redis]`. Nothing connects yet: a
    /// malformed URL fails here, a wrong target at the first use or at
    /// [`RedisPool::check`].
    pub fn from_config(config: &Config) -> Result<RedisPool> {
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.redis.connect_timeout))
            .set_response_timeout(Some(config.redis.response_timeout));
        let kind = match RedisTarget::parse(&config.redis_url)? {
            RedisTarget::Single(_) => Kind::Single(crate::pubsub::redis_pool(config)?),
            RedisTarget::Cluster { nodes } => {
                let client = cluster_client(&nodes, config, None)?;
                Kind::Cluster(Arc::new(ClusterPool {
                    client,
                    conn: tokio::sync::Mutex::new(None),
                    audience: Audience::new(config.redis.connect_timeout),
                    url: mask_url(&config.redis_url),
                    connect_timeout: config.redis.connect_timeout,
                }))
            }
            RedisTarget::Sentinel { .. } => Kind::Sentinel(Arc::new(SentinelPool {
                client: tokio::sync::Mutex::new(sentinel_client(config)?),
                watch: tokio::sync::Mutex::new(SentinelWatch::new(config)?),
                audience: Audience::new(config.redis.connect_timeout),
                conn: tokio::sync::Mutex::new(None),
                switched: std::sync::Mutex::new(None),
                url: mask_url(&config.redis_url),
                connection,
                connect_timeout: config.redis.connect_timeout,
                response_timeout: config.redis.response_timeout,
            })),
        };
        if config.redis.pubsub == PubSubMode::Sharded && !matches!(kind, Kind::Cluster(_)) {
            return Err(Error::Config(format!(
                "redis.pubsub (HERALD_REDIS_PUBSUB) is \"sharded\", which needs a Redis Cluster, but redis_url is {}: use a redis+cluster:// URL or redis.pubsub = \"classic\"",
                mask_url(&config.redis_url)
            )));
        }
        Ok(RedisPool {
            kind,
            mode: config.redis.pubsub,
        })
    }

    pub fn topology(&self) -> Topology {
        match self.kind {
            Kind::Single(_) => Topology::Single,
            Kind::Sentinel(_) => Topology::Sentinel,
            Kind::Cluster(_) => Topology::Cluster,
        }
    }

    /// `redis.pubsub`: how the relay publishes through this pool.
    pub fn pubsub(&self) -> PubSubMode {
        self.mode
    }

    /// A connection: from the pool (single server), to the current primary
    /// (Sentinel) or to the cluster (routing by slot).
    pub async fn get(&self) -> Result<RedisConnection> {
        match &self.kind {
            Kind::Single(pool) => Ok(RedisConnection::Pooled(pool.get().await?)),
            Kind::Sentinel(pool) => pool.get().await.map(RedisConnection::Direct),
            Kind::Cluster(pool) => pool.get().await.map(RedisConnection::Cluster),
        }
    }

    /// Why publishing must wait, if it must: for [`SWITCH_HOLD`] after this
    /// pool followed a Sentinel failover to a new primary.
    pub(crate) fn held_back(&self) -> Option<Error> {
        let Kind::Sentinel(pool) = &self.kind else {
            return None;
        };
        let since = (*pool.switched.lock().unwrap_or_else(|e| e.into_inner()))?;
        (since.elapsed() < SWITCH_HOLD).then(|| {
            Error::Other(format!(
                "the primary of {} changed {:?} ago; publishing waits {:?} for subscribers to follow it",
                pool.url,
                since.elapsed(),
                SWITCH_HOLD
            ))
        })
    }

    /// The cluster connection, for routing commands to chosen nodes.
    pub(crate) async fn cluster(&self) -> Option<Result<ClusterConnection>> {
        match &self.kind {
            Kind::Cluster(pool) => Some(pool.get().await),
            _ => None,
        }
    }

    /// What this process last saw of each sharded channel's subscribers.
    /// Where a message that reached nobody may be a subscriber moving
    /// with a failover: a Sentinel primary, or a cluster in sharded mode
    /// (classic messages reach every node of a cluster).
    pub(crate) fn audience(&self) -> Option<&Audience> {
        match &self.kind {
            Kind::Cluster(pool) if self.mode == PubSubMode::Sharded => Some(&pool.audience),
            Kind::Sentinel(pool) => Some(&pool.audience),
            _ => None,
        }
    }

    /// Connect once now. A wrong target (a cluster URL at a server without
    /// cluster mode, a master name no sentinel knows) is an [`Error::Url`]
    /// naming `redis_url`; an unreachable Redis is another error.
    pub async fn check(&self) -> Result<()> {
        let mut conn = self.get().await?;
        redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| Error::Redis {
                context: "PING".into(),
                error: e,
            })?;
        Ok(())
    }

    /// Pool occupancy for metrics. Sentinel and Cluster keep one
    /// multiplexed connection, shown as a pool of one.
    pub fn status(&self) -> deadpool_redis::Status {
        let one = |open: bool| deadpool_redis::Status {
            max_size: 1,
            size: usize::from(open),
            available: usize::from(open),
            waiting: 0,
        };
        match &self.kind {
            Kind::Single(pool) => pool.status(),
            Kind::Sentinel(pool) => one(pool.conn.try_lock().map(|c| c.is_some()).unwrap_or(true)),
            Kind::Cluster(pool) => one(pool.conn.try_lock().map(|c| c.is_some()).unwrap_or(true)),
        }
    }
}

/// A cluster client for `nodes` with Herald's timeouts; RESP3 with
/// `push` when given (subscribers).
pub(crate) fn cluster_client(
    nodes: &[String],
    config: &Config,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(config.redis.connect_timeout)
        .response_timeout(config.redis.response_timeout)
        // Few, short retries: the relay retries a failed batch itself and
        // must not wait past its claim's hold for the library's backoff.
        .retries(2)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let Some(push) = push {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push);
    }
    builder.build().map_err(|e| Error::Url {
        setting: SETTING,
        reason: format!("{e}: {}", mask_url(&config.redis_url)),
    })
}

/// A Sentinel client for `redis_url` (a `redis+sentinel://` URL).
pub(crate) fn sentinel_client(config: &Config) -> Result<redis::sentinel::SentinelClient> {
    let RedisTarget::Sentinel {
        sentinels,
        master,
        username,
        password,
        db,
        tls,
    } = RedisTarget::parse(&config.redis_url)?
    else {
        return Err(Error::Other("not a redis+sentinel:// URL".into()));
    };
    let mut info = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(user) = username {
        info = info.set_username(user);
    }
    if let Some(pass) = password {
        info = info.set_password(pass);
    }
    let mut node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
    if tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    redis::sentinel::SentinelClient::build(
        sentinels,
        master,
        Some(node),
        redis::sentinel::SentinelServerType::Master,
    )
    .map_err(|e| Error::Url {
        setting: SETTING,
        reason: format!("{e}: {}", mask_url(&config.redis_url)),
    })
}

/// Turn a failed first contact into an error that names `redis_url` when
/// the setting is what is wrong.
pub(crate) fn describe_connect_error(url: &str, error: redis::RedisError) -> Error {
    let text = error.to_string();
    if text.contains("cluster support disabled") {
        return Error::Url {
            setting: SETTING,
            reason: format!(
                "{url} is a redis+cluster:// URL but the server has cluster mode disabled: use redis:// for a single server"
            ),
        };
    }
    if error.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel {
        return Error::Url {
            setting: SETTING,
            reason: format!("no sentinel of {url} knows that master name: {error}"),
        };
    }
    Error::Redis {
        context: format!("connecting to {url}"),
        error,
    }
}

struct ClusterPool {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    audience: Audience,
    url: String,
    connect_timeout: Duration,
}

impl ClusterPool {
    /// The shared cluster connection, made on first use. It reconnects to
    /// nodes and refreshes the slot map by itself.
    async fn get(&self) -> Result<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let conn =
            tokio::time::timeout(self.connect_timeout * 2, self.client.get_async_connection())
                .await
                .map_err(|_| {
                    Error::Timeout(
                        self.connect_timeout * 2,
                        format!("connecting to the cluster {}", self.url),
                    )
                })?
                .map_err(|e| describe_connect_error(&self.url, e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// How many subscribers each sharded channel had at its last SPUBLISH, so
/// the relay can tell a channel whose subscribers all vanished at once (its
/// slot moved: they are subscribing again at the new primary) from one
/// nobody listens to.
pub(crate) struct Audience {
    channels: std::sync::Mutex<std::collections::HashMap<String, Heard>>,
    /// How long a channel that lost every subscriber is held back.
    grace: Duration,
}

#[derive(Default)]
struct Heard {
    receivers: i64,
    /// When its SPUBLISH first reached nobody after reaching someone.
    silent_since: Option<Instant>,
}

impl Audience {
    fn new(grace: Duration) -> Audience {
        Audience {
            channels: std::sync::Mutex::new(std::collections::HashMap::new()),
            grace,
        }
    }

    /// Record that an SPUBLISH on `channel` reached `receivers`; whether
    /// the message must be held back (published again later): it reached
    /// nobody, the channel had subscribers before, and they have been gone
    /// for less than the grace.
    pub(crate) fn hold(&self, channel: &str, receivers: i64) -> bool {
        let Ok(mut channels) = self.channels.lock() else {
            return false;
        };
        let heard = channels.entry(channel.to_string()).or_default();
        if receivers > 0 {
            heard.receivers = receivers;
            heard.silent_since = None;
            return false;
        }
        if heard.receivers == 0 {
            return false;
        }
        let since = *heard.silent_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.grace {
            return true;
        }
        // They are gone for good: stop holding the channel.
        heard.receivers = 0;
        heard.silent_since = None;
        false
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }
}

/// Asks the sentinels which server is the primary now.
pub(crate) struct SentinelWatch {
    sentinels: Vec<redis::Client>,
    master: String,
    conn: Option<MultiplexedConnection>,
    timeout: Duration,
}

impl SentinelWatch {
    pub(crate) fn new(config: &Config) -> Result<SentinelWatch> {
        let RedisTarget::Sentinel {
            sentinels, master, ..
        } = RedisTarget::parse(&config.redis_url)?
        else {
            return Err(Error::Other("not a redis+sentinel:// URL".into()));
        };
        let sentinels = sentinels
            .iter()
            .map(|url| redis::Client::open(url.as_str()))
            .collect::<redis::RedisResult<Vec<_>>>()
            .map_err(|e| Error::Url {
                setting: SETTING,
                reason: format!("{e}: {}", mask_url(&config.redis_url)),
            })?;
        Ok(SentinelWatch {
            sentinels,
            master,
            conn: None,
            timeout: config.redis.connect_timeout,
        })
    }

    /// `(host, port)` of the primary as the first sentinel that answers
    /// names it; `None` when none answers or none knows the master.
    pub(crate) async fn primary(&mut self) -> Option<(String, u16)> {
        for _ in 0..=self.sentinels.len() {
            if self.conn.is_none() {
                for client in &self.sentinels {
                    let connect = client.get_multiplexed_async_connection();
                    if let Ok(Ok(conn)) = tokio::time::timeout(self.timeout, connect).await {
                        self.conn = Some(conn);
                        break;
                    }
                }
            }
            let conn = self.conn.as_mut()?;
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(&self.master);
            let ask = cmd.query_async::<Option<(String, u16)>>(conn);
            match tokio::time::timeout(self.timeout, ask).await {
                Ok(Ok(addr)) => return addr,
                _ => {
                    // Try another sentinel.
                    self.conn = None;
                    self.sentinels.rotate_left(1);
                }
            }
        }
        None
    }
}

/// A client for the primary, as the sentinels name it and `watch` agrees.
/// Right after a failover the sentinels disagree for a moment: the redis
/// crate's client may still pick one naming the old primary (which keeps
/// answering as one), and a connection made there hears nothing published
/// on the new one. Asked again until both agree, for at most `within`.
pub(crate) async fn agreed_primary(
    sentinel: &mut redis::sentinel::SentinelClient,
    watch: &mut SentinelWatch,
    within: Duration,
) -> redis::RedisResult<redis::Client> {
    let deadline = Instant::now() + within;
    loop {
        let client = sentinel.async_get_client().await?;
        let named = watch.primary().await;
        if named.is_none() || named == client_addr(&client) || Instant::now() >= deadline {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(host, port)` of a server.
type Addr = (String, u16);

/// `(host, port)` a client connects to.
pub(crate) fn client_addr(client: &redis::Client) -> Option<(String, u16)> {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
        redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
}

struct SentinelPool {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    watch: tokio::sync::Mutex<SentinelWatch>,
    audience: Audience,
    /// The connection, the primary it goes to, and when that was checked.
    conn: tokio::sync::Mutex<Option<(MultiplexedConnection, Addr, Instant)>>,
    /// When this pool last followed a failover to another primary.
    switched: std::sync::Mutex<Option<Instant>>,
    url: String,
    connection: redis::AsyncConnectionConfig,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl SentinelPool {
    /// A connection to the current primary: the last one while it still
    /// says it is the primary, else a new one to the primary the sentinels
    /// name now.
    async fn get(&self) -> Result<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some((conn, addr, checked)) = slot.as_mut() {
            if checked.elapsed() < SENTINEL_RECHECK {
                return Ok(conn.clone());
            }
            let named = self.watch.lock().await.primary().await;
            // No sentinel answering is no reason to drop a working
            // connection: check the server itself then.
            let still = match &named {
                Some(named) => named == addr,
                None => matches!(
                    tokio::time::timeout(self.response_timeout, is_primary(conn)).await,
                    Ok(Ok(true))
                ),
            };
            if still {
                *checked = Instant::now();
                return Ok(conn.clone());
            }
            tracing::info!(url = %self.url, ?named, "redis: the sentinels name another primary; reconnecting");
            *slot = None;
            *self.switched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        let connect = async {
            let client = agreed_primary(
                &mut *self.client.lock().await,
                &mut *self.watch.lock().await,
                self.connect_timeout,
            )
            .await?;
            let addr = client_addr(&client).unwrap_or_default();
            let conn = client
                .get_multiplexed_async_connection_with_config(&self.connection)
                .await?;
            Ok::<_, redis::RedisError>((conn, addr))
        };
        let conn = tokio::time::timeout(self.connect_timeout * 2, connect)
            .await
            .map_err(|_| {
                Error::Timeout(
                    self.connect_timeout * 2,
                    format!("connecting to the primary of {}", self.url),
                )
            })?
            .map_err(|e| describe_connect_error(&self.url, e))?;
        let (conn, addr) = conn;
        *slot = Some((conn.clone(), addr, Instant::now()));
        Ok(conn)
    }
}

/// Whether the server behind `conn` answers `ROLE` with `master`.
pub(crate) async fn is_primary<C: ConnectionLike>(conn: &mut C) -> redis::RedisResult<bool> {
    let role: Value = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match role {
        Value::Array(items) => {
            matches!(items.first(), Some(Value::BulkString(b)) if b == b"master")
        }
        _ => false,
    })
}

/// One connection of a [`RedisPool`]; use it like any redis-rs async
/// connection (`query_async(&mut conn)`).
pub enum RedisConnection {
    Pooled(deadpool_redis::Connection),
    Direct(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Pooled(c) => c.req_packed_command(cmd),
            RedisConnection::Direct(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Pooled(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Pooled(c) => c.get_db(),
            RedisConnection::Direct(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// The cluster hash slot of `key` (CRC16/XMODEM of the key, or of its
/// `{hash tag}` when it has a non-empty one, modulo 16384).
pub fn slot(key: &[u8]) -> u16 {
    let key = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &byte in key {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"123456789"), 0x31C3);
    }
}
