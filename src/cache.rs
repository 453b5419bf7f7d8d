//! Cache-aside over Redis: [`Cache::get_or_load`] reads a key and, on a miss,
//! runs the caller's loader once per key and process (single flight), stores
//! the result with a jittered TTL (a `None` as a shorter-lived miss marker),
//! and hands it to every caller that waited. Keys are dropped by
//! [`Cache::invalidate`], by tag ([`Cache::invalidate_tag`]), wholesale
//! ([`Cache::invalidate_all`]) or by committed outbox events
//! ([`Cache::invalidate_on`]).
//!
//! What this module owns: every Redis key under its namespace (by default
//! `<channel_prefix>cache:`), i.e. values `v:<key>`, per-key versions
//! `ver:<key>`, tag sets `tag:<tag>`, tag versions `tagver:<tag>` and the
//! namespace generation `gen`. Nothing else in Herald reads or writes them.
//!
//! What it must never do:
//! - hold the only copy of anything: a value is always reproducible by its
//!   loader, and losing all of Redis only costs loads;
//! - return a Redis failure to a `get_or_load` caller: an unreachable or slow
//!   Redis (every call is bounded by the response timeout) degrades to
//!   calling the loader, with a rate-limited warning;
//! - write a loaded value after an invalidation that happened while it was
//!   loading: a fill is a Lua script that compares the versions read before
//!   the load with the current ones and writes only when none moved (see
//!   docs/cache.md, "The stale-fill race").

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Error, Result};
use crate::outbox::Envelope;
use crate::pubsub::{Delivery, Subscriber};

/// Boxed error of a loader or codec.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Turns values into bytes for Redis and back. Implement it for your own
/// format (MessagePack, bincode, protobuf…); [`Json`] is the default.
pub trait Codec<V>: Send + Sync + 'static {
    fn encode(&self, value: &V) -> std::result::Result<Vec<u8>, BoxError>;
    fn decode(&self, bytes: &[u8]) -> std::result::Result<V, BoxError>;
}

/// JSON through serde_json: any `Serialize + DeserializeOwned` value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<V: Serialize + DeserializeOwned> Codec<V> for Json {
    fn encode(&self, value: &V) -> std::result::Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(value)?)
    }
    fn decode(&self, bytes: &[u8]) -> std::result::Result<V, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A loader failed. Every caller that waited on the same load receives a
/// clone of the same error; nothing is cached.
#[derive(Debug, Clone, thiserror::Error)]
#[error("loading cache key {key:?}: {source}")]
pub struct LoadError {
    pub key: String,
    #[source]
    pub source: Arc<dyn StdError + Send + Sync + 'static>,
}

/// Counters for metrics, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Calls answered by a value found in Redis.
    pub hits: AtomicU64,
    /// Calls answered by a miss marker found in Redis (a cached `None`).
    pub negative_hits: AtomicU64,
    /// Calls that found nothing usable in Redis (or could not ask it).
    pub misses: AtomicU64,
    /// Calls answered by another caller's load in this process.
    pub coalesced: AtomicU64,
    /// Loader invocations.
    pub loads: AtomicU64,
    /// Loader invocations that returned an error.
    pub load_errors: AtomicU64,
    /// Values (and miss markers) written to Redis.
    pub fills: AtomicU64,
    /// Fills discarded because the key was invalidated while loading.
    pub stale_fills_rejected: AtomicU64,
    /// Keys invalidated (by `invalidate*` calls and by events).
    pub invalidations: AtomicU64,
    /// Tags invalidated.
    pub tag_invalidations: AtomicU64,
    /// Namespace generation bumps (`invalidate_all`, and subscriber gaps).
    pub flushes: AtomicU64,
    /// Events an invalidator received and mapped to keys.
    pub events: AtomicU64,
    /// Failed or timed-out Redis calls.
    pub redis_errors: AtomicU64,
    /// Cached bytes the codec could not decode (treated as misses).
    pub decode_errors: AtomicU64,
}

/// A point-in-time copy of [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStatsSnapshot {
    pub hits: u64,
    pub negative_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub loads: u64,
    pub load_errors: u64,
    pub fills: u64,
    pub stale_fills_rejected: u64,
    pub invalidations: u64,
    pub tag_invalidations: u64,
    pub flushes: u64,
    pub events: u64,
    pub redis_errors: u64,
    pub decode_errors: u64,
}

impl CacheStats {
    pub fn snapshot(&self) -> CacheStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStatsSnapshot {
            hits: g(&self.hits),
            negative_hits: g(&self.negative_hits),
            misses: g(&self.misses),
            coalesced: g(&self.coalesced),
            loads: g(&self.loads),
            load_errors: g(&self.load_errors),
            fills: g(&self.fills),
            stale_fills_rejected: g(&self.stale_fills_rejected),
            invalidations: g(&self.invalidations),
            tag_invalidations: g(&self.tag_invalidations),
            flushes: g(&self.flushes),
            events: g(&self.events),
            redis_errors: g(&self.redis_errors),
            decode_errors: g(&self.decode_errors),
        }
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Writes a value (or a miss marker) and registers it in its tag sets, only
/// if the namespace generation, the key's version and every tag's version
/// are still those read before the load (`check` = 1). `set` (`check` = 0)
/// writes unconditionally and bumps the key's version, so that loads in
/// flight cannot overwrite it with older data.
///
/// KEYS: value, gen, ver, tagver × n, tagset × n.
/// ARGV: check, kind, payload, ttl_ms, member, n, version_ttl_ms,
///       expected gen, expected ver, expected tagver × n.
const FILL_LUA: &str = r"
local n = tonumber(ARGV[6])
local gen = redis.call('GET', KEYS[2]) or '0'
if ARGV[1] == '1' then
  if gen ~= ARGV[8] then return 0 end
  if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[9] then return 0 end
  for i = 1, n do
    if (redis.call('GET', KEYS[3 + i]) or '0') ~= ARGV[9 + i] then return 0 end
  end
else
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
local ttl = tonumber(ARGV[4])
redis.call('SET', KEYS[1], gen .. ':' .. ARGV[2] .. ':' .. ARGV[3], 'PX', ttl)
for i = 1, n do
  local set = KEYS[3 + n + i]
  redis.call('SADD', set, ARGV[5])
  if redis.call('PTTL', set) < ttl then redis.call('PEXPIRE', set, ttl) end
end
return 1
";

const KIND_VALUE: &str = "v";
const KIND_MISSING: &str = "n";

/// Builds a [`Cache`]; every setting has a default.
pub struct CacheBuilder<C = Json> {
    pool: crate::RedisPool,
    namespace: String,
    codec: C,
    jitter: f64,
    negative_ttl: Duration,
    response_timeout: Duration,
    version_ttl: Duration,
    retry_after: Duration,
    warn_every: Duration,
    events: Option<EventSource>,
}

/// The Redis URL, channel prefix and connect timeout a [`Subscriber`] for
/// [`Cache::invalidate_on`] is built from.
#[derive(Clone)]
struct EventSource(Box<Config>);

impl CacheBuilder<Json> {
    /// A cache on `pool` (a [`crate::RedisPool`] or a
    /// `deadpool_redis::Pool`) with keys under `herald:cache:`.
    pub fn new(pool: impl Into<crate::RedisPool>) -> CacheBuilder<Json> {
        CacheBuilder {
            pool: pool.into(),
            namespace: "herald:cache:".into(),
            codec: Json,
            jitter: 0.1,
            negative_ttl: Duration::from_secs(30),
            response_timeout: Duration::from_secs(5),
            version_ttl: Duration::from_secs(3600),
            retry_after: Duration::from_secs(1),
            warn_every: Duration::from_secs(10),
            events: None,
        }
    }

    /// From the configuration: the Redis pool of `redis_url` and `[redis]`,
    /// namespace `<channel_prefix>cache:`, Redis calls bounded by
    /// `redis.response_timeout`, and events (for [`Cache::invalidate_on`])
    /// from the same Redis and channel prefix the relay publishes to.
    pub fn from_config(config: &Config) -> Result<CacheBuilder<Json>> {
        let pool = crate::RedisPool::from_config(config)?;
        let mut b = CacheBuilder::new(pool)
            .namespace(format!("{}cache:", config.channel_prefix))
            .response_timeout(config.redis.response_timeout);
        b.events = Some(EventSource(Box::new(config.clone())));
        Ok(b)
    }
}

impl<C> CacheBuilder<C> {
    /// Prefix of every Redis key the cache owns.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Serialize values with `codec` instead of JSON.
    pub fn codec<D>(self, codec: D) -> CacheBuilder<D> {
        CacheBuilder {
            pool: self.pool,
            namespace: self.namespace,
            codec,
            jitter: self.jitter,
            negative_ttl: self.negative_ttl,
            response_timeout: self.response_timeout,
            version_ttl: self.version_ttl,
            retry_after: self.retry_after,
            warn_every: self.warn_every,
            events: self.events,
        }
    }

    /// Fraction (0 ≤ j < 1, default 0.1) by which each TTL is shortened at
    /// random, so keys filled together do not expire together.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 0.99)
        } else {
            0.0
        };
        self
    }

    /// TTL of a miss marker (a loader that returned `None`); default 30 s.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// Upper bound of every Redis call (pool checkout included); default 5 s,
    /// `redis.response_timeout` with [`CacheBuilder::from_config`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Lifetime of per-key and per-tag version counters, refreshed by every
    /// invalidation (default 1 h). A load that takes longer than half of it
    /// is not written to Redis, since the counters it compares against may
    /// have expired meanwhile.
    pub fn version_ttl(mut self, ttl: Duration) -> Self {
        self.version_ttl = ttl.max(Duration::from_millis(2));
        self
    }

    /// After a failed Redis call, reads go straight to the loader for this
    /// long before Redis is tried again (default 1 s), so an outage costs
    /// one timeout, not one per call.
    pub fn retry_after(mut self, pause: Duration) -> Self {
        self.retry_after = pause;
        self
    }

    /// At most one warning about Redis errors per this interval (default
    /// 10 s); the others are logged at debug level.
    pub fn warn_every(mut self, interval: Duration) -> Self {
        self.warn_every = interval;
        self
    }

    /// Where [`Cache::invalidate_on`] subscribes: the Redis URL and channel
    /// prefix the relay publishes to (set by `from_config`).
    pub fn events(
        mut self,
        redis_url: impl Into<String>,
        channel_prefix: impl Into<String>,
    ) -> Self {
        self.events = Some(EventSource(Box::new(Config {
            redis_url: redis_url.into(),
            channel_prefix: channel_prefix.into(),
            ..Config::default()
        })));
        self
    }

    /// On a Redis Cluster, a namespace without a `{hash tag}` is made one
    /// (`{<namespace>}`): the cache's reads and its fill script touch
    /// several of its keys at once, which a cluster allows only within one
    /// slot.
    pub fn build(self) -> Cache<C> {
        let namespace = if self.pool.topology() == crate::redis_pool::Topology::Cluster
            && !has_hash_tag(&self.namespace)
        {
            format!("{{{}}}", self.namespace)
        } else {
            self.namespace
        };
        Cache {
            inner: Arc::new(Inner {
                pool: self.pool,
                gen_key: format!("{namespace}gen"),
                namespace,
                codec: self.codec,
                jitter: self.jitter,
                negative_ttl: self.negative_ttl,
                response_timeout: self.response_timeout,
                version_ttl: self.version_ttl,
                retry_after: self.retry_after,
                warn_every: self.warn_every,
                events: self.events,
                stats: Arc::new(CacheStats::default()),
                flights: Mutex::new(HashMap::new()),
                base: Instant::now(),
                redis_down_until: AtomicU64::new(0),
                last_warn: AtomicU64::new(0),
            }),
        }
    }
}

/// The cache handle; cheap to clone, share it across tasks.
pub struct Cache<C = Json> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Cache<C> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<C> std::fmt::Debug for Cache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.inner.namespace)
            .field("stats", &self.inner.stats.snapshot())
            .finish_non_exhaustive()
    }
}

struct Inner<C> {
    pool: crate::RedisPool,
    namespace: String,
    gen_key: String,
    codec: C,
    jitter: f64,
    negative_ttl: Duration,
    response_timeout: Duration,
    version_ttl: Duration,
    retry_after: Duration,
    warn_every: Duration,
    events: Option<EventSource>,
    stats: Arc<CacheStats>,
    /// Loads in flight in this process, by key.
    flights: Mutex<HashMap<String, Flight>>,
    base: Instant,
    /// Milliseconds since `base` before which reads skip Redis.
    redis_down_until: AtomicU64,
    /// Milliseconds since `base` (+1) of the last warning.
    last_warn: AtomicU64,
}

/// What a load in flight ends with, shared with the callers that waited.
#[derive(Clone)]
enum Outcome {
    Value(Arc<[u8]>),
    Missing,
    Failed(LoadError),
    /// Nothing usable for the waiters (the value could not be encoded, or it
    /// was already outdated): they start over.
    Retry,
}

struct Flight {
    rx: watch::Receiver<Option<Outcome>>,
    tags: Vec<String>,
}

/// Removes its flight from the map when the leader finishes or is dropped
/// (a cancelled leader: the waiters see the channel close and start over).
struct FlightGuard<'a, C> {
    inner: &'a Inner<C>,
    key: String,
    tx: watch::Sender<Option<Outcome>>,
}

impl<C> Drop for FlightGuard<'_, C> {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flights.get(&self.key) {
            if f.rx.same_channel(&self.tx.subscribe()) {
                flights.remove(&self.key);
            }
        }
    }
}

/// Versions read before a load, and the value found, if any.
struct Snapshot {
    gen: String,
    ver: String,
    tag_vers: Vec<String>,
    value: Option<Stored>,
}

enum Stored {
    Value(Vec<u8>),
    Missing,
}

enum Found<V> {
    Value(V),
    Missing,
}

impl Cache<Json> {
    /// A JSON cache from the configuration; see [`CacheBuilder::from_config`].
    pub fn from_config(config: &Config) -> Result<Cache<Json>> {
        Ok(CacheBuilder::from_config(config)?.build())
    }

    /// Start building a cache on `pool`.
    pub fn builder(pool: impl Into<crate::RedisPool>) -> CacheBuilder<Json> {
        CacheBuilder::new(pool)
    }
}

impl<C: Send + Sync + 'static> Cache<C> {
    /// Current counters.
    pub fn stats(&self) -> CacheStatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The live counters, e.g. for a metrics exporter.
    pub fn stats_handle(&self) -> Arc<CacheStats> {
        self.inner.stats.clone()
    }

    /// The Redis key prefix this cache owns.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The value of `key`, from Redis or else from `loader` (run once per
    /// key in this process at a time; concurrent callers wait for it). A
    /// loaded `Some` is cached for `ttl` minus jitter, a `None` for the
    /// negative TTL. Errors only when the loader fails; Redis trouble means
    /// a load.
    pub async fn get_or_load<V, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        loader: F,
    ) -> std::result::Result<Option<V>, LoadError>
    where
        C: Codec<V>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        self.get_or_load_tagged(key, ttl, &[], loader).await
    }

    /// [`Cache::get_or_load`] that also registers a filled key under `tags`,
    /// for [`Cache::invalidate_tag`].
    pub async fn get_or_load_tagged<V, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        loader: F,
    ) -> std::result::Result<Option<V>, LoadError>
    where
        C: Codec<V>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let inner = &*self.inner;
        let mut loader = Some(loader);
        let mut counted = false;
        loop {
            let snapshot = inner.read(key, tags).await;
            if let Some(found) = inner.found(key, snapshot.as_ref()) {
                return Ok(inner.answer(found));
            }
            if !counted {
                bump(&inner.stats.misses, 1);
                counted = true;
            }

            // Join the load in flight, or lead one.
            let joined = {
                let mut flights = inner.flights.lock().unwrap_or_else(|e| e.into_inner());
                match flights.get(key) {
                    Some(f) => Err(f.rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        flights.insert(
                            key.to_string(),
                            Flight {
                                rx,
                                tags: tags.iter().map(|t| t.to_string()).collect(),
                            },
                        );
                        Ok(FlightGuard {
                            inner,
                            key: key.to_string(),
                            tx,
                        })
                    }
                }
            };
            let guard = match joined {
                Err(mut rx) => {
                    let outcome = rx
                        .wait_for(|o| o.is_some())
                        .await
                        .ok()
                        .and_then(|o| o.clone());
                    match outcome {
                        Some(Outcome::Value(bytes)) => match inner.codec.decode(&bytes) {
                            Ok(v) => {
                                bump(&inner.stats.coalesced, 1);
                                return Ok(Some(v));
                            }
                            Err(error) => {
                                // Another caller's type for the same key.
                                bump(&inner.stats.decode_errors, 1);
                                tracing::debug!(key, %error, "cache: a shared load does not decode as this type");
                                return self.load_alone(key, loader.take()).await;
                            }
                        },
                        Some(Outcome::Missing) => {
                            bump(&inner.stats.coalesced, 1);
                            return Ok(None);
                        }
                        Some(Outcome::Failed(e)) => return Err(e),
                        Some(Outcome::Retry) | None => continue,
                    }
                }
                Ok(guard) => guard,
            };

            // Leader. Look again: a load that finished between our read and
            // taking the lead has filled the key.
            let snapshot = match snapshot {
                Some(_) => inner.read(key, tags).await,
                None => None,
            };
            if let Some(found) = inner.found(key, snapshot.as_ref()) {
                let outcome = match &found {
                    Found::Value(v) => match inner.codec.encode(v) {
                        Ok(bytes) => Outcome::Value(bytes.into()),
                        Err(_) => Outcome::Retry,
                    },
                    Found::Missing => Outcome::Missing,
                };
                guard.tx.send_replace(Some(outcome));
                return Ok(inner.answer(found));
            }

            let started = Instant::now();
            bump(&inner.stats.loads, 1);
            let Some(loader) = loader.take() else {
                unreachable!("a caller leads at most one load")
            };
            let loaded = loader().await.map_err(|e| LoadError {
                key: key.to_string(),
                source: Arc::from(e.into()),
            });
            let value = match loaded {
                Ok(v) => v,
                Err(e) => {
                    bump(&inner.stats.load_errors, 1);
                    guard.tx.send_replace(Some(Outcome::Failed(e.clone())));
                    return Err(e);
                }
            };
            let encoded = match &value {
                Some(v) => match inner.codec.encode(v) {
                    Ok(bytes) => Some(Ok(bytes)),
                    Err(error) => {
                        tracing::warn!(key, %error, "cache: the loaded value does not encode; not cached");
                        None
                    }
                },
                None => Some(Err(())),
            };
            let mut outcome = match &encoded {
                Some(Ok(bytes)) => Outcome::Value(bytes.as_slice().into()),
                Some(Err(())) => Outcome::Missing,
                None => Outcome::Retry,
            };
            if let (Some(snapshot), Some(encoded)) = (snapshot, &encoded) {
                let (kind, payload, ttl) = match encoded {
                    Ok(bytes) => (KIND_VALUE, bytes.as_slice(), ttl),
                    Err(()) => (KIND_MISSING, &b""[..], inner.negative_ttl),
                };
                if started.elapsed() >= inner.version_ttl / 2 {
                    // The version counters may have expired meanwhile, so
                    // the comparison could pass wrongly: do not write.
                    bump(&inner.stats.stale_fills_rejected, 1);
                    outcome = Outcome::Retry;
                } else if let Some(false) = inner
                    .fill(key, tags, kind, payload, ttl, Some(&snapshot))
                    .await
                {
                    outcome = Outcome::Retry;
                }
            }
            guard.tx.send_replace(Some(outcome));
            return Ok(value);
        }
    }

    /// A load for this caller only (its type differs from the shared one).
    async fn load_alone<V, E, F, Fut>(
        &self,
        key: &str,
        loader: Option<F>,
    ) -> std::result::Result<Option<V>, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<Option<V>, E>>,
        E: Into<BoxError>,
    {
        let Some(loader) = loader else {
            unreachable!("the loader is only taken by a leader")
        };
        bump(&self.inner.stats.loads, 1);
        loader().await.map_err(|e| {
            bump(&self.inner.stats.load_errors, 1);
            LoadError {
                key: key.to_string(),
                source: Arc::from(e.into()),
            }
        })
    }

    /// Store `value` under `key` for `ttl` (minus jitter), registered under
    /// `tags`, replacing what is there; loads of `key` in flight will not
    /// overwrite it. Errors when Redis cannot be reached.
    pub async fn set<V>(&self, key: &str, value: &V, ttl: Duration, tags: &[&str]) -> Result<()>
    where
        C: Codec<V>,
    {
        let bytes =
            self.inner.codec.encode(value).map_err(|e| {
                Error::Other(format!("encoding the value of cache key {key:?}: {e}"))
            })?;
        self.inner
            .fill_checked(key, tags, KIND_VALUE, &bytes, ttl, None)
            .await
            .map(|_| ())
    }

    /// Delete `key`, and make loads of it in flight (here or in any other
    /// process) discard their result. Errors when Redis cannot be reached.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        self.invalidate_many([key]).await
    }

    /// [`Cache::invalidate`] for several keys, in one atomic round trip.
    pub async fn invalidate_many<I, K>(&self, keys: I) -> Result<()>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        let keys: Vec<String> = keys.into_iter().map(|k| k.as_ref().to_string()).collect();
        if keys.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        {
            let mut flights = inner.flights.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                flights.remove(k);
            }
        }
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for k in chunk {
                let ver = inner.ver_key(k);
                pipe.del(inner.value_key(k))
                    .ignore()
                    .incr(&ver, 1)
                    .ignore()
                    .pexpire(&ver, inner.version_ttl_ms())
                    .ignore();
            }
            inner
                .query::<()>("invalidating cache keys", Req::Pipe(&pipe))
                .await?;
            bump(&inner.stats.invalidations, chunk.len() as u64);
        }
        Ok(())
    }

    /// Delete every key registered under `tag`, and make loads in flight
    /// that carry the tag discard their result.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        let inner = &*self.inner;
        {
            let mut flights = inner.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.retain(|_, f| !f.tags.iter().any(|t| t == tag));
        }
        // Bump the tag's version first: a fill that read the old version is
        // refused from now on, and every key filled before is in the set.
        let tag_ver = inner.tag_ver_key(tag);
        let tag_set = inner.tag_set_key(tag);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .incr(&tag_ver, 1)
            .ignore()
            .pexpire(&tag_ver, inner.version_ttl_ms())
            .ignore()
            .smembers(&tag_set);
        let (members,): (Vec<String>,) = inner
            .query("invalidating a cache tag", Req::Pipe(&pipe))
            .await?;
        bump(&inner.stats.tag_invalidations, 1);
        for chunk in members.chunks(500) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for k in chunk {
                let ver = inner.ver_key(k);
                pipe.del(inner.value_key(k))
                    .ignore()
                    .incr(&ver, 1)
                    .ignore()
                    .pexpire(&ver, inner.version_ttl_ms())
                    .ignore();
            }
            pipe.srem(&tag_set, chunk).ignore();
            inner
                .query::<()>("invalidating the keys of a cache tag", Req::Pipe(&pipe))
                .await?;
            bump(&inner.stats.invalidations, chunk.len() as u64);
        }
        Ok(())
    }

    /// Invalidate every key of this namespace at once by bumping its
    /// generation: values written under an older generation read as misses
    /// (and expire with their TTL), and fills in flight are refused.
    pub async fn invalidate_all(&self) -> Result<()> {
        let inner = &*self.inner;
        inner
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let cmd = redis::cmd("INCR").arg(&inner.gen_key).clone();
        inner
            .query::<i64>("bumping the cache generation", Req::Cmd(&cmd))
            .await?;
        bump(&inner.stats.flushes, 1);
        Ok(())
    }

    /// Subscribe to committed outbox events whose topic matches `pattern`
    /// (a topic, or a glob such as `user.*`) and invalidate the keys `map`
    /// returns for each. After a gap in the subscription (Redis connection
    /// lost, or the invalidator fell behind and its buffer of
    /// `redis.subscriber_buffer` events overflowed: events possibly missed)
    /// the whole namespace is invalidated
    /// with [`Cache::invalidate_all`]. Needs the event source of
    /// [`CacheBuilder::from_config`] or [`CacheBuilder::events`]. Returns
    /// once subscribed; the task runs until the handle is stopped or dropped.
    pub async fn invalidate_on<F>(&self, pattern: &str, map: F) -> Result<Invalidator>
    where
        F: Fn(&Envelope) -> Vec<String> + Send + Sync + 'static,
    {
        let Some(source) = self.inner.events.clone() else {
            return Err(Error::Other(
                "Cache::invalidate_on needs an event source: build the cache with CacheBuilder::from_config or .events(redis_url, channel_prefix)".into(),
            ));
        };
        let subscriber = Subscriber::from_config(&source.0)?.subscribe(pattern);
        self.invalidate_with(subscriber, map).await
    }

    /// [`Cache::invalidate_on`] with a subscriber set up by the caller
    /// (several patterns, another Redis).
    pub async fn invalidate_with<F>(
        &self,
        mut subscriber: Subscriber,
        map: F,
    ) -> Result<Invalidator>
    where
        F: Fn(&Envelope) -> Vec<String> + Send + Sync + 'static,
    {
        subscriber.connect().await?;
        let token = CancellationToken::new();
        let cache = self.clone();
        let stop = token.clone();
        let handle = tokio::spawn(async move {
            let mut must_flush = false;
            loop {
                if must_flush {
                    must_flush = !cache
                        .retry(&stop, "flushing the cache after a gap", || {
                            cache.invalidate_all()
                        })
                        .await;
                    if stop.is_cancelled() {
                        return;
                    }
                }
                let delivery = tokio::select! {
                    _ = stop.cancelled() => return,
                    // A flush still owed is retried every few seconds even
                    // when no event comes.
                    _ = tokio::time::sleep(Duration::from_secs(5)), if must_flush => continue,
                    d = subscriber.next() => d,
                };
                match delivery {
                    Ok(Delivery::Event { envelope, .. }) => {
                        let keys = map(&envelope);
                        bump(&cache.inner.stats.events, 1);
                        if keys.is_empty() {
                            continue;
                        }
                        tracing::debug!(topic = %envelope.topic, id = %envelope.id, ?keys, "cache: invalidating on event");
                        let ok = cache
                            .retry(&stop, "invalidating on an event", || {
                                cache.invalidate_many(&keys)
                            })
                            .await;
                        if !ok && !stop.is_cancelled() {
                            must_flush = true;
                        }
                    }
                    Ok(Delivery::Gap(gap)) => {
                        // A lost connection and a full buffer alike: events
                        // were missed, so nothing cached can be trusted.
                        tracing::warn!(
                            disconnected_at = %gap.disconnected_at,
                            reason = %gap.reason,
                            dropped = ?gap.dropped,
                            namespace = %cache.inner.namespace,
                            "cache: events may have been missed (subscriber disconnected or fell behind); invalidating the whole namespace"
                        );
                        must_flush = true;
                    }
                    Ok(Delivery::Undecodable { channel, error }) => {
                        tracing::warn!(%channel, %error, "cache: ignoring a message that is not a Herald envelope");
                    }
                    Err(error) => {
                        // Only a subscriber that never connected errors; be
                        // safe anyway and flush once it is back.
                        tracing::warn!(%error, "cache: event subscriber error");
                        must_flush = true;
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        Ok(Invalidator {
            token,
            handle: Some(handle),
        })
    }

    /// Retry `op` with capped backoff for up to ~30 s; false if it never
    /// succeeded (or the task was stopped).
    async fn retry<'a, Fut>(
        &'a self,
        stop: &CancellationToken,
        what: &str,
        op: impl Fn() -> Fut,
    ) -> bool
    where
        Fut: Future<Output = Result<()>> + 'a,
    {
        let mut backoff = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match op().await {
                Ok(()) => return true,
                Err(error) => {
                    // `query` has counted and logged it.
                    tracing::debug!(%error, "cache: {what} failed; retrying");
                    if Instant::now() >= deadline {
                        return false;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// The background task of [`Cache::invalidate_on`]; dropping it stops the task.
pub struct Invalidator {
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Invalidator {
    /// Stop the task and wait for it.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for Invalidator {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Whether `key` has a non-empty `{hash tag}` (what a cluster hashes).
fn has_hash_tag(key: &str) -> bool {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .is_some_and(|(tag, _)| !tag.is_empty())
}

enum Req<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl<C> Inner<C> {
    fn value_key(&self, key: &str) -> String {
        format!("{}v:{key}", self.namespace)
    }
    fn ver_key(&self, key: &str) -> String {
        format!("{}ver:{key}", self.namespace)
    }
    fn tag_set_key(&self, tag: &str) -> String {
        format!("{}tag:{tag}", self.namespace)
    }
    fn tag_ver_key(&self, tag: &str) -> String {
        format!("{}tagver:{tag}", self.namespace)
    }
    fn version_ttl_ms(&self) -> i64 {
        self.version_ttl.as_millis().min(i64::MAX as u128) as i64
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// One Redis call, pool checkout included, bounded by the response timeout.
    async fn query<T: redis::FromRedisValue>(&self, what: &str, req: Req<'_>) -> Result<T> {
        let fut = async {
            let mut conn = self.pool.get().await?;
            match req {
                Req::Cmd(cmd) => cmd.query_async(&mut conn).await,
                Req::Pipe(pipe) => pipe.query_async(&mut conn).await,
            }
            .context(what)
        };
        let result = tokio::time::timeout(self.response_timeout, fut)
            .await
            .unwrap_or_else(|_| Err(Error::Timeout(self.response_timeout, what.to_string())));
        if let Err(error) = &result {
            self.redis_error(what, error);
        }
        result
    }

    fn redis_error(&self, what: &str, error: &Error) {
        bump(&self.stats.redis_errors, 1);
        let now = self.now_ms();
        self.redis_down_until
            .store(now + self.retry_after.as_millis() as u64, Ordering::Relaxed);
        let last = self.last_warn.load(Ordering::Relaxed);
        let due = last == 0 || now + 1 >= last + self.warn_every.as_millis() as u64;
        if due
            && self
                .last_warn
                .compare_exchange(last, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                namespace = %self.namespace,
                %error,
                "cache: Redis failed ({what}); calling loaders directly until it answers again"
            );
        } else {
            tracing::debug!(namespace = %self.namespace, %error, "cache: Redis failed ({what})");
        }
    }

    fn redis_paused(&self) -> bool {
        self.now_ms() < self.redis_down_until.load(Ordering::Relaxed)
    }

    /// The generation, the key's value and version and the tags' versions,
    /// in one round trip; `None` when Redis is unavailable.
    async fn read(&self, key: &str, tags: &[&str]) -> Option<Snapshot> {
        if self.redis_paused() {
            return None;
        }
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&self.gen_key)
            .arg(self.value_key(key))
            .arg(self.ver_key(key));
        for t in tags {
            cmd.arg(self.tag_ver_key(t));
        }
        let mut values: Vec<Option<Vec<u8>>> = self
            .query("reading a cache key", Req::Cmd(&cmd))
            .await
            .ok()?;
        if values.len() != 3 + tags.len() {
            return None;
        }
        let text = |v: Option<Vec<u8>>| {
            v.map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|| "0".into())
        };
        let tag_vers: Vec<String> = values.drain(3..).map(text).collect();
        let ver = text(values.pop().flatten());
        let raw = values.pop().flatten();
        let gen = text(values.pop().flatten());
        let value = raw.and_then(|raw| parse_stored(&raw, &gen));
        Some(Snapshot {
            gen,
            ver,
            tag_vers,
            value,
        })
    }

    /// A usable value in `snapshot`, decoded.
    fn found<V>(&self, key: &str, snapshot: Option<&Snapshot>) -> Option<Found<V>>
    where
        C: Codec<V>,
    {
        match snapshot?.value.as_ref()? {
            Stored::Missing => Some(Found::Missing),
            Stored::Value(bytes) => match self.codec.decode(bytes) {
                Ok(v) => Some(Found::Value(v)),
                Err(error) => {
                    bump(&self.stats.decode_errors, 1);
                    tracing::warn!(key, %error, "cache: a cached value does not decode; reloading it");
                    None
                }
            },
        }
    }

    fn answer<V>(&self, found: Found<V>) -> Option<V> {
        match found {
            Found::Value(v) => {
                bump(&self.stats.hits, 1);
                Some(v)
            }
            Found::Missing => {
                bump(&self.stats.negative_hits, 1);
                None
            }
        }
    }

    fn jittered(&self, ttl: Duration) -> u64 {
        // Redis rejects expiry times past ~2^63 ms; a century is plenty.
        const MAX_MS: u128 = 100 * 365 * 24 * 3600 * 1000;
        let ms = ttl.as_millis().min(MAX_MS) as u64;
        if self.jitter <= 0.0 || ms == 0 {
            return ms;
        }
        let cut = rand::rng().random_range(0.0..self.jitter);
        ((ms as f64) * (1.0 - cut)).max(1.0) as u64
    }

    /// A checked fill: `Some(true)` written, `Some(false)` refused as stale,
    /// `None` Redis failed or nothing to do.
    async fn fill(
        &self,
        key: &str,
        tags: &[&str],
        kind: &str,
        payload: &[u8],
        ttl: Duration,
        snapshot: Option<&Snapshot>,
    ) -> Option<bool> {
        self.fill_checked(key, tags, kind, payload, ttl, snapshot)
            .await
            .ok()
            .flatten()
    }

    async fn fill_checked(
        &self,
        key: &str,
        tags: &[&str],
        kind: &str,
        payload: &[u8],
        ttl: Duration,
        snapshot: Option<&Snapshot>,
    ) -> Result<Option<bool>> {
        let ttl_ms = self.jittered(ttl);
        if ttl_ms == 0 {
            return Ok(None);
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(FILL_LUA)
            .arg(3 + 2 * tags.len())
            .arg(self.value_key(key))
            .arg(&self.gen_key)
            .arg(self.ver_key(key));
        for t in tags {
            cmd.arg(self.tag_ver_key(t));
        }
        for t in tags {
            cmd.arg(self.tag_set_key(t));
        }
        cmd.arg(if snapshot.is_some() { "1" } else { "0" })
            .arg(kind)
            .arg(payload)
            .arg(ttl_ms)
            .arg(key)
            .arg(tags.len())
            .arg(self.version_ttl_ms());
        match snapshot {
            Some(s) => {
                cmd.arg(&s.gen).arg(&s.ver);
                for v in &s.tag_vers {
                    cmd.arg(v);
                }
            }
            None => {
                cmd.arg("").arg("");
            }
        }
        let written: i64 = self.query("filling a cache key", Req::Cmd(&cmd)).await?;
        if written == 1 {
            bump(&self.stats.fills, 1);
            Ok(Some(true))
        } else {
            bump(&self.stats.stale_fills_rejected, 1);
            tracing::debug!(
                key,
                "cache: the key was invalidated while loading; not caching the loaded value"
            );
            Ok(Some(false))
        }
    }
}

/// Parse `<gen>:<kind>:<payload>`; a value of another generation is a miss.
fn parse_stored(raw: &[u8], current_gen: &str) -> Option<Stored> {
    let colon = raw.iter().position(|&b| b == b':')?;
    if &raw[..colon] != current_gen.as_bytes() {
        return None;
    }
    let rest = &raw[colon + 1..];
    match rest {
        [b'v', b':', payload @ ..] => Some(Stored::Value(payload.to_vec())),
        [b'n', b':', ..] => Some(Stored::Missing),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_parse_by_generation() {
        assert!(
            matches!(parse_stored(b"3:v:{\"a\":1}", "3"), Some(Stored::Value(p)) if p == b"{\"a\":1}")
        );
        assert!(matches!(parse_stored(b"3:n:", "3"), Some(Stored::Missing)));
        assert!(parse_stored(b"2:v:1", "3").is_none(), "older generation");
        assert!(parse_stored(b"3:x:1", "3").is_none(), "unknown kind");
        assert!(parse_stored(b"garbage", "3").is_none());
        // Payloads may contain the separator.
        assert!(matches!(parse_stored(b"0:v:a:b", "0"), Some(Stored::Value(p)) if p == b"a:b"));
    }

    #[test]
    fn json_codec_round_trips() {
        let v = serde_json::json!({"id": 7, "name": "Ada"});
        let bytes = Codec::<serde_json::Value>::encode(&Json, &v).unwrap();
        let back: serde_json::Value = Json.decode(&bytes).unwrap();
        assert_eq!(back, v);
        assert!(Codec::<u32>::decode(&Json, b"not json").is_err());
    }

    #[tokio::test]
    async fn jitter_only_shortens() {
        let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:1")
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        let cache = Cache::builder(pool).jitter(0.2).build();
        for _ in 0..1000 {
            let ms = cache.inner.jittered(Duration::from_millis(1000));
            assert!((800..=1000).contains(&ms), "{ms}");
        }
        let none = Cache::builder(cache.inner.pool.clone()).jitter(0.0).build();
        assert_eq!(none.inner.jittered(Duration::from_millis(1000)), 1000);
    }
}
