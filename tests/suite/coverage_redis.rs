//! The Redis-facing modules at their edges: the cache (builder settings as
//! Redis holds them, shared loads of another type or of a miss, a value
//! filled while a caller takes the lead, codecs that cannot encode or decode,
//! loads too slow to write, zero TTLs, the invalidator's event source and its
//! flush retried while the cache's Redis is away), pub/sub (bad URLs,
//! timeouts of publishing and connecting, the `last_start` bound, error
//! classification, undecodable messages, a full buffer followed by a closed
//! connection, idle pings that fail or time out) and webhook deliveries that
//! cannot be made (their dead letters' texts, which never show the URL's
//! secret parts). Real Redis throughout: a test that stops, cuts or delays
//! Redis uses a private redis-server or a proxy of its own.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Proxy};
use crate::common::{redis_conn as conn, redis_publish as publish_raw, RedisServer, TestDb};
use herald::cache::{BoxError, Cache, CacheBuilder, Codec};
use herald::pubsub::{publish_all, publish_each, redis_pool, refuses_everything, Sent};
use herald::{Config, Delivery, Error, Subscriber};

type Loaded<T> = Result<Option<T>, std::io::Error>;
type LoadFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Loaded<T>> + Send>>;

fn config_on(redis_url: &str) -> Config {
    common::config_on(redis_url, Duration::from_secs(5))
}

fn envelope(topic: &str, key: &str, n: u64) -> String {
    herald::Event::new(topic, &serde_json::json!({ "n": n }))
        .unwrap()
        .key(key)
        .envelope_json()
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    n == 1
}

async fn get_raw(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// How many times the server has run `command` (INFO commandstats).
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Poll `cond` every 10 ms until it holds; fail after `secs` naming `what`.
async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_delivery(sub: &mut Subscriber) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery")
        .unwrap()
}

/// A loader that returns `value` once the test lets it, after telling the
/// test it has started: the load is then in flight for as long as needed.
fn gated<T: Send + 'static>(
    value: Option<T>,
) -> (
    impl FnOnce() -> LoadFuture<T>,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let loader = move || {
        Box::pin(async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
            Ok(value)
        }) as LoadFuture<T>
    };
    (loader, started_rx, go_tx)
}

/// Decodes UTF-8 text but refuses to encode anything.
struct NoEncode;

impl Codec<String> for NoEncode {
    fn encode(&self, _: &String) -> Result<Vec<u8>, BoxError> {
        Err("this codec refuses to encode".into())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, BoxError> {
        Ok(std::str::from_utf8(bytes)?.to_string())
    }
}

// ---------------------------------------------------------------- cache

#[tokio::test]
async fn builder_settings_show_in_redis_in_debug_and_in_the_live_stats() {
    let config = config_on(&common::redis_url());
    // A jitter that is not a number means no jitter at all.
    let cache = CacheBuilder::from_config(&config)
        .unwrap()
        .jitter(0.9)
        .jitter(f64::NAN)
        .version_ttl(Duration::from_secs(3))
        .build();
    let ns = cache.namespace().to_string();
    let live = cache.stats_handle();
    let mut c = conn(&config.redis_url).await;
    let ttl = Duration::from_secs(60);
    for i in 0..3u32 {
        cache.set(&format!("n{i}"), &i, ttl, &[]).await.unwrap();
        let left = pttl(&mut c, &format!("{ns}v:n{i}")).await;
        assert!(
            left > 59_000 && left <= 60_000,
            "a NaN jitter leaves the TTL whole: {left} ms"
        );
    }
    // Version counters live for version_ttl.
    cache.invalidate("n0").await.unwrap();
    let left = pttl(&mut c, &format!("{ns}ver:n0")).await;
    assert!(left > 0 && left <= 3_000, "ver:n0 expires in {left} ms");
    assert!(!exists(&mut c, &format!("{ns}v:n0")).await);

    let v: Option<u32> = cache
        .get_or_load("n1", ttl, || async { Ok::<_, std::io::Error>(Some(99)) })
        .await
        .unwrap();
    assert_eq!(v, Some(1), "a hit on what set stored");
    assert_eq!(
        live.hits.load(Ordering::Relaxed),
        1,
        "the handle taken before the hit sees it"
    );
    let shown = format!("{cache:?}");
    assert!(
        shown.starts_with("Cache {") && shown.contains(&format!("namespace: {ns:?}")),
        "{shown}"
    );
    assert!(
        shown.contains("hits: 1") && shown.contains("invalidations: 1"),
        "{shown}"
    );
}

#[tokio::test]
async fn waiters_of_another_type_load_on_their_own_and_see_their_own_errors() {
    // One thread: a waiter that has counted its miss has also joined the
    // flight (no await in between), so the test can release the leader.
    let config = config_on(&common::redis_url());
    let cache = Cache::from_config(&config).unwrap();
    let ttl = Duration::from_secs(60);
    let (loader, started, go) = gated(Some("abc".to_string()));
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load::<String, _, _, _>("mixed", ttl, loader)
                .await
        })
    };
    started.await.unwrap();
    let own = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load::<u32, _, _, _>("mixed", ttl, || async {
                    Ok::<_, std::io::Error>(Some(7))
                })
                .await
        })
    };
    let failing = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load::<u32, _, _, _>("mixed", ttl, || async {
                    Err::<Option<u32>, _>(std::io::Error::other("own loader failed"))
                })
                .await
        })
    };
    wait_until(10, "both waiters joined the load", || {
        let misses = cache.stats().misses;
        async move { misses == 3 }
    })
    .await;
    go.send(()).unwrap();

    assert_eq!(leader.await.unwrap().unwrap().as_deref(), Some("abc"));
    assert_eq!(
        own.await.unwrap().unwrap(),
        Some(7),
        "its own loader's value"
    );
    let err = failing.await.unwrap().unwrap_err();
    assert_eq!(err.key, "mixed");
    assert_eq!(
        err.to_string(),
        "loading cache key \"mixed\": own loader failed"
    );
    let stats = cache.stats();
    assert_eq!(stats.decode_errors, 2, "{stats:?}");
    assert_eq!(stats.loads, 3, "{stats:?}");
    assert_eq!(stats.load_errors, 1, "{stats:?}");
    assert_eq!(stats.coalesced, 0, "{stats:?}");
    assert_eq!(
        stats.fills, 1,
        "only the leader's value is cached: {stats:?}"
    );
    let mut c = conn(&config.redis_url).await;
    let raw = get_raw(&mut c, &format!("{}v:mixed", cache.namespace()))
        .await
        .unwrap();
    assert_eq!(raw, b"0:v:\"abc\"");
}

#[tokio::test]
async fn a_shared_miss_reaches_the_waiters_without_running_their_loaders() {
    let config = config_on(&common::redis_url());
    let cache = Cache::from_config(&config).unwrap();
    let ttl = Duration::from_secs(60);
    let (loader, started, go) = gated::<String>(None);
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load::<String, _, _, _>("absent", ttl, loader)
                .await
        })
    };
    started.await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let waiter = {
        let cache = cache.clone();
        let calls = calls.clone();
        tokio::spawn(async move {
            cache
                .get_or_load::<String, _, _, _>("absent", ttl, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Some("should not load".to_string()))
                })
                .await
        })
    };
    wait_until(10, "the waiter joined the load", || {
        let misses = cache.stats().misses;
        async move { misses == 2 }
    })
    .await;
    go.send(()).unwrap();
    assert_eq!(leader.await.unwrap().unwrap(), None);
    assert_eq!(waiter.await.unwrap().unwrap(), None, "the leader's None");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the waiter did not load");
    let stats = cache.stats();
    assert_eq!(
        (stats.coalesced, stats.loads, stats.fills),
        (1, 1, 1),
        "{stats:?}"
    );
    let mut c = conn(&config.redis_url).await;
    let raw = get_raw(&mut c, &format!("{}v:absent", cache.namespace())).await;
    assert_eq!(raw.as_deref(), Some(&b"0:n:"[..]), "a miss marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_filled_while_a_caller_takes_the_lead_is_served_not_reloaded() {
    // Replies to the cache are delayed, so its first read runs on Redis
    // before the fill and answers after it: the caller leads, reads again,
    // and finds the value.
    let redis = RedisServer::start();
    let (proxy, proxied) = Proxy::for_url(&redis.url()).await;
    let config = config_on(&proxied);
    let cache = Cache::from_config(&config).unwrap();
    let strict = CacheBuilder::from_config(&config)
        .unwrap()
        .codec(NoEncode)
        .build();
    let ns = cache.namespace().to_string();
    let mut direct = conn(&redis.url()).await;
    let ttl = Duration::from_secs(60);
    proxy.delay(Dir::Down, Duration::from_millis(300));

    let cases: [(&str, &[u8]); 3] = [
        ("raced-value", b"0:v:\"filled elsewhere\""),
        ("raced-miss", b"0:n:"),
        ("raced-strict", b"0:v:plain text"),
    ];
    for (key, stored) in cases {
        let calls = Arc::new(AtomicUsize::new(0));
        let before = command_calls(&mut direct, "mget").await;
        let task = {
            let (cache, strict, calls) = (cache.clone(), strict.clone(), calls.clone());
            let key = key.to_string();
            tokio::spawn(async move {
                let loader = move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Some("loaded".to_string()))
                };
                if key == "raced-strict" {
                    strict
                        .get_or_load::<String, _, _, _>(&key, ttl, loader)
                        .await
                } else {
                    cache
                        .get_or_load::<String, _, _, _>(&key, ttl, loader)
                        .await
                }
            })
        };
        let mut probe = conn(&redis.url()).await;
        wait_until(10, "the first read ran on Redis", || {
            let mut probe = probe.clone();
            async move { command_calls(&mut probe, "mget").await > before }
        })
        .await;
        let _: () = redis::cmd("SET")
            .arg(format!("{ns}v:{key}"))
            .arg(stored)
            .query_async(&mut direct)
            .await
            .unwrap();
        let got = task.await.unwrap().unwrap();
        let want = match key {
            "raced-value" => Some("filled elsewhere".to_string()),
            "raced-miss" => None,
            _ => Some("plain text".to_string()),
        };
        assert_eq!(got, want, "{key}");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "{key}: no load");
        assert_eq!(
            command_calls(&mut probe, "mget").await,
            before + 2,
            "{key}: read, then read again as the leader"
        );
    }
    let (a, b) = (cache.stats(), strict.stats());
    assert_eq!(
        (a.misses, a.hits, a.negative_hits, a.loads),
        (2, 1, 1, 0),
        "{a:?}"
    );
    assert_eq!((b.misses, b.hits, b.loads), (1, 1, 0), "{b:?}");
}

#[tokio::test]
async fn a_codec_that_cannot_encode_leaves_redis_untouched() {
    let config = config_on(&common::redis_url());
    let cache = CacheBuilder::from_config(&config)
        .unwrap()
        .codec(NoEncode)
        .build();
    let mut c = conn(&config.redis_url).await;
    let key = format!("{}v:fresh", cache.namespace());
    for round in 1..=2u64 {
        let v = cache
            .get_or_load("fresh", Duration::from_secs(60), || async {
                Ok::<_, std::io::Error>(Some("loaded".to_string()))
            })
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("loaded"), "the caller still gets it");
        assert!(!exists(&mut c, &key).await, "nothing cached");
        assert_eq!(cache.stats().loads, round, "loaded again each time");
    }
    assert_eq!(cache.stats().fills, 0);
    let err = cache
        .set("fresh", &"x".to_string(), Duration::from_secs(60), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Other(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "encoding the value of cache key \"fresh\": this codec refuses to encode"
    );
    assert!(!exists(&mut c, &key).await);
}

#[tokio::test]
async fn a_cached_value_that_does_not_decode_is_reloaded_and_replaced() {
    let config = config_on(&common::redis_url());
    let cache = Cache::from_config(&config).unwrap();
    let key = format!("{}v:bad", cache.namespace());
    let mut c = conn(&config.redis_url).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("0:v:not json")
        .query_async(&mut c)
        .await
        .unwrap();
    let load = || async { Ok::<_, std::io::Error>(Some(5u32)) };
    let v: Option<u32> = cache
        .get_or_load("bad", Duration::from_secs(60), load)
        .await
        .unwrap();
    assert_eq!(v, Some(5));
    // Read before and again after taking the lead: both fail to decode.
    assert_eq!(cache.stats().decode_errors, 2);
    assert_eq!(get_raw(&mut c, &key).await.as_deref(), Some(&b"0:v:5"[..]));
    let v: Option<u32> = cache
        .get_or_load("bad", Duration::from_secs(60), || async {
            Ok::<_, std::io::Error>(Some(6))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(5), "served from Redis now");
    assert_eq!(cache.stats().loads, 1);
}

#[tokio::test]
async fn a_load_slower_than_half_the_version_ttl_is_not_written() {
    let config = config_on(&common::redis_url());
    let cache = CacheBuilder::from_config(&config)
        .unwrap()
        .version_ttl(Duration::from_millis(200))
        .build();
    let mut c = conn(&config.redis_url).await;
    let ns = cache.namespace().to_string();
    let ttl = Duration::from_secs(60);
    let v: Option<u32> = cache
        .get_or_load("slow", ttl, || async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, std::io::Error>(Some(5))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(5), "the caller gets what it loaded");
    assert!(!exists(&mut c, &format!("{ns}v:slow")).await, "not written");
    let stats = cache.stats();
    assert_eq!(
        (stats.stale_fills_rejected, stats.fills),
        (1, 0),
        "{stats:?}"
    );

    let v: Option<u32> = cache
        .get_or_load("fast", ttl, || async { Ok::<_, std::io::Error>(Some(6)) })
        .await
        .unwrap();
    assert_eq!(v, Some(6));
    assert!(
        exists(&mut c, &format!("{ns}v:fast")).await,
        "a quick load is"
    );
    cache.invalidate("fast").await.unwrap();
    let left = pttl(&mut c, &format!("{ns}ver:fast")).await;
    assert!(left > 0 && left <= 200, "ver:fast expires in {left} ms");
}

#[tokio::test]
async fn zero_ttls_write_nothing() {
    let config = config_on(&common::redis_url());
    let cache = CacheBuilder::from_config(&config)
        .unwrap()
        .negative_ttl(Duration::ZERO)
        .build();
    let mut c = conn(&config.redis_url).await;
    let ns = cache.namespace().to_string();
    for round in 1..=2u64 {
        let v: Option<u32> = cache
            .get_or_load("zero", Duration::ZERO, || async {
                Ok::<_, std::io::Error>(Some(1))
            })
            .await
            .unwrap();
        assert_eq!(v, Some(1));
        assert_eq!(cache.stats().loads, round, "not cached, so loaded again");
    }
    let v: Option<u32> = cache
        .get_or_load("none", Duration::from_secs(60), || async {
            Ok::<_, std::io::Error>(None)
        })
        .await
        .unwrap();
    assert_eq!(v, None);
    cache.set("zero", &3u32, Duration::ZERO, &[]).await.unwrap();
    for key in ["zero", "none"] {
        assert!(!exists(&mut c, &format!("{ns}v:{key}")).await, "{key}");
    }
    assert_eq!(cache.stats().fills, 0);
}

#[tokio::test]
async fn invalidating_no_keys_needs_no_redis() {
    let mut redis = RedisServer::start();
    let cache = CacheBuilder::from_config(&config_on(&redis.url()))
        .unwrap()
        .response_timeout(Duration::from_millis(500))
        .warn_every(Duration::from_secs(60))
        .build();
    redis.stop();
    cache.invalidate_many(Vec::<String>::new()).await.unwrap();
    assert_eq!(cache.stats().redis_errors, 0, "no round trip for nothing");
    let err = cache.invalidate_many(["a", "b"]).await.unwrap_err();
    assert!(err.to_string().contains("redis"), "{err}");
    let stats = cache.stats();
    assert_eq!(
        (stats.redis_errors, stats.invalidations),
        (1, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_on_needs_an_event_source_and_events_sets_one() {
    let config = config_on(&common::redis_url());
    let pool = redis_pool(&config).unwrap();
    let prefix = config.channel_prefix.clone();
    let bare = Cache::builder(pool.clone())
        .namespace(format!("{prefix}bare:"))
        .build();
    let Err(err) = bare.invalidate_on("user.*", |_| Vec::new()).await else {
        panic!("invalidate_on without an event source succeeded");
    };
    let err = err.to_string();
    assert!(
        err.contains("needs an event source") && err.contains(".events(redis_url, channel_prefix)"),
        "{err}"
    );

    let cache = Cache::builder(pool)
        .namespace(format!("{prefix}cache:"))
        .events(config.redis_url.clone(), prefix.clone())
        .build();
    let invalidator = cache
        .invalidate_on("user.*", |e| {
            e.key.iter().map(|k| format!("user:{k}")).collect()
        })
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);
    cache
        .set("user:1", &"Ada".to_string(), ttl, &[])
        .await
        .unwrap();
    cache
        .set("user:2", &"Bob".to_string(), ttl, &[])
        .await
        .unwrap();
    let mut c = conn(&config.redis_url).await;
    let channel = format!("{prefix}user.renamed");
    // Not an envelope: ignored, and the invalidator keeps going.
    assert_eq!(publish_raw(&mut c, &channel, "not an envelope").await, 1);
    assert_eq!(
        publish_raw(&mut c, &channel, &envelope("user.renamed", "1", 1)).await,
        1
    );
    wait_until(10, "the event invalidated user:1", || {
        let n = cache.stats().invalidations;
        async move { n == 1 }
    })
    .await;
    assert_eq!(cache.stats().events, 1, "the garbage is not an event");
    assert!(!exists(&mut c, &format!("{prefix}cache:v:user:1")).await);
    assert!(exists(&mut c, &format!("{prefix}cache:v:user:2")).await);
    invalidator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_flush_is_retried_until_the_caches_redis_answers_and_stop_ends_it() {
    // The cache reaches Redis through a proxy; its event subscriber goes
    // direct, so the proxy can fail the flush a gap calls for.
    let redis = RedisServer::start();
    let (proxy, proxied) = Proxy::for_url(&redis.url()).await;
    let config = config_on(&proxied);
    let prefix = config.channel_prefix.clone();
    let cache = Cache::builder(redis_pool(&config).unwrap())
        .namespace(format!("{prefix}cache:"))
        .events(redis.url(), prefix.clone())
        .response_timeout(Duration::from_millis(500))
        .retry_after(Duration::from_millis(100))
        .build();
    let invalidator = cache
        .invalidate_on("order.*", |_| Vec::new())
        .await
        .unwrap();
    cache
        .set("order:1", &1u32, Duration::from_secs(60), &[])
        .await
        .unwrap();
    let mut direct = conn(&redis.url()).await;
    let gen_key = format!("{prefix}cache:gen");
    let kill_subscriber = |mut c: redis::aio::MultiplexedConnection| async move {
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(killed, 1);
    };

    proxy.refuse();
    proxy.cut();
    kill_subscriber(direct.clone()).await;
    wait_until(20, "the flush failed and was tried again", || {
        let n = cache.stats().redis_errors;
        async move { n >= 2 }
    })
    .await;
    assert_eq!(cache.stats().flushes, 0);
    assert_eq!(get_raw(&mut direct, &gen_key).await, None);
    proxy.heal();
    wait_until(20, "the flush went through once Redis answered", || {
        let n = cache.stats().flushes;
        async move { n == 1 }
    })
    .await;
    assert_eq!(
        get_raw(&mut direct, &gen_key).await.as_deref(),
        Some(&b"1"[..])
    );
    let raw = get_raw(&mut direct, &format!("{prefix}cache:v:order:1"))
        .await
        .unwrap();
    assert!(raw.starts_with(b"0:"), "order:1 is of the old generation");

    // Stopping while a flush is being retried ends the task at once, not
    // after the retry window.
    proxy.refuse();
    proxy.cut();
    let errors = cache.stats().redis_errors;
    kill_subscriber(direct.clone()).await;
    wait_until(20, "the second flush failed", || {
        let n = cache.stats().redis_errors;
        async move { n > errors }
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), invalidator.stop())
        .await
        .expect("stop ends a flush being retried");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cache.stats().flushes, 1);
}

// ---------------------------------------------------------------- pub/sub

#[tokio::test]
async fn bad_redis_urls_are_refused_naming_the_setting_without_the_password() {
    let config = Config {
        redis_url: "http://user:hunter2@127.0.0.1:6379".into(),
        ..Config::default()
    };
    let err = redis_pool(&config).unwrap_err();
    assert!(matches!(err, Error::Url { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("invalid URL in redis_url (REDIS_URL): "),
        "{text}"
    );
    assert!(text.contains("http://user:****@127.0.0.1:6379"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_all_of_nothing_is_free_and_a_slow_reply_times_out() {
    let config = config_on(&common::redis_url());
    let pool = redis_pool(&config).unwrap();
    assert_eq!(
        publish_all(&pool, &[], Duration::from_secs(1))
            .await
            .unwrap(),
        0
    );

    let prefix = config.channel_prefix.clone();
    let mut sub = Subscriber::new(&config.redis_url, &prefix)
        .unwrap()
        .topic("slow.t");
    sub.connect().await.unwrap();
    let (proxy, proxied) = Proxy::for_url(&config.redis_url).await;
    let slow = redis_pool(&Config {
        redis_url: proxied,
        ..config.clone()
    })
    .unwrap();
    let messages: Vec<(String, String)> = (0..3)
        .map(|n| (format!("{prefix}slow.t"), envelope("slow.t", "k", n)))
        .collect();
    // A warm connection first, so that only the replies are slow.
    assert_eq!(
        publish_all(&slow, &messages[..1], Duration::from_secs(5))
            .await
            .unwrap(),
        1
    );
    proxy.delay(Dir::Down, Duration::from_millis(800));
    let err = publish_all(&slow, &messages, Duration::from_millis(200))
        .await
        .unwrap_err();
    match &err {
        Error::Timeout(after, what) => {
            assert_eq!(*after, Duration::from_millis(200));
            assert_eq!(what, "publishing 3 messages to Redis");
        }
        other => panic!("{other:?}"),
    }
    // A timeout says nothing about what ran: Redis did publish all three.
    let mut got = Vec::new();
    while got.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(5), sub.next_event())
            .await
            .expect("published")
            .unwrap();
        got.push(e.payload["n"].as_u64().unwrap());
    }
    assert_eq!(got, vec![0, 0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_each_stops_at_last_start_and_reports_a_pipeline_that_times_out() {
    let config = config_on(&common::redis_url());
    let prefix = config.channel_prefix.clone();
    let mut sub = Subscriber::new(&config.redis_url, &prefix)
        .unwrap()
        .topic("each.t");
    sub.connect().await.unwrap();
    let channel = format!("{prefix}each.t");
    let messages: Vec<(String, String)> = (0..3)
        .map(|n| (channel.clone(), envelope("each.t", "k", n)))
        .collect();
    let pool = redis_pool(&config).unwrap();

    // One message per pipeline, and no time for a second one.
    let out = publish_each(&pool, &messages, Duration::from_secs(5), 1, Instant::now()).await;
    assert_eq!(out.sent, vec![Sent::Accepted, Sent::Unsent, Sent::Unsent]);
    assert!(out.outage.is_none() && !out.timed_out, "{out:?}");
    assert_eq!(out.first_pipeline, 1);
    assert!(!out.all_accepted());
    let mut c = conn(&config.redis_url).await;
    assert_eq!(
        publish_raw(&mut c, &channel, &envelope("each.t", "k", 99)).await,
        1
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(5), sub.next_event())
            .await
            .expect("published")
            .unwrap();
        got.push(e.payload["n"].as_u64().unwrap());
    }
    assert_eq!(got, vec![0, 99], "the two unsent messages never went out");

    // A pipeline whose reply does not come in time: every message unsent.
    let (proxy, proxied) = Proxy::for_url(&config.redis_url).await;
    let slow = redis_pool(&Config {
        redis_url: proxied,
        ..config.clone()
    })
    .unwrap();
    let warm = publish_each(
        &slow,
        &messages[..1],
        Duration::from_secs(5),
        1 << 20,
        Instant::now(),
    )
    .await;
    assert!(warm.all_accepted(), "{warm:?}");
    proxy.delay(Dir::Down, Duration::from_millis(800));
    let far = Instant::now() + Duration::from_secs(60);
    let out = publish_each(&slow, &messages, Duration::from_millis(200), 1 << 20, far).await;
    assert_eq!(out.sent, vec![Sent::Unsent; 3]);
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.first_pipeline, 3);
    match &out.outage {
        Some(Error::Timeout(after, what)) => {
            assert_eq!(*after, Duration::from_millis(200));
            assert_eq!(what, "publishing 3 messages to Redis");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_each_reports_a_pipeline_cut_mid_flight_as_an_outage_not_a_timeout() {
    let redis = RedisServer::start();
    let (proxy, proxied) = Proxy::for_url(&redis.url()).await;
    let config = config_on(&proxied);
    let pool = redis_pool(&config).unwrap();
    let messages: Vec<(String, String)> = (0..3)
        .map(|n| ("cut.t".to_string(), envelope("cut.t", "k", n)))
        .collect();
    let warm = publish_each(
        &pool,
        &messages[..1],
        Duration::from_secs(5),
        1 << 20,
        Instant::now(),
    )
    .await;
    assert!(warm.all_accepted(), "{warm:?}");
    let mut direct = conn(&redis.url()).await;
    let before = command_calls(&mut direct, "publish").await;
    // Slow replies (the pool's check-out ping included) leave time to cut
    // the connection once Redis has run the pipeline.
    proxy.delay(Dir::Down, Duration::from_secs(2));
    let far = Instant::now() + Duration::from_secs(60);
    let task = tokio::spawn(async move {
        publish_each(&pool, &messages, Duration::from_secs(5), 1 << 20, far).await
    });
    wait_until(10, "the pipeline ran on Redis", || {
        let mut probe = direct.clone();
        async move { command_calls(&mut probe, "publish").await >= before + 3 }
    })
    .await;
    proxy.cut();
    let out = tokio::time::timeout(Duration::from_secs(4), task)
        .await
        .expect("a cut connection fails the pipeline at once, not after its timeout")
        .unwrap();
    assert_eq!(out.sent, vec![Sent::Unsent; 3], "not known to have run");
    assert!(!out.timed_out, "{out:?}");
    assert!(
        matches!(&out.outage, Some(Error::Redis { error, .. }) if !error.is_timeout()),
        "{out:?}"
    );
}

#[tokio::test]
async fn refuses_everything_charges_coded_errors_to_the_message_and_io_errors_to_redis() {
    let mut c = conn(&common::redis_url()).await;
    let key = format!("herald:covredis:{}:str", uuid::Uuid::now_v7().simple());
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("1")
        .arg("EX")
        .arg(60)
        .query_async(&mut c)
        .await
        .unwrap();
    let wrong_type = redis::cmd("LPUSH")
        .arg(&key)
        .arg("x")
        .query_async::<i64>(&mut c)
        .await
        .unwrap_err();
    assert_eq!(wrong_type.code(), Some("WRONGTYPE"));
    assert!(!refuses_everything(&wrong_type));

    let port = common::free_port();
    let refused = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), None, "{refused}");
    assert!(refuses_everything(&refused));
}

#[tokio::test]
async fn connect_refuses_nothing_to_subscribe_to_and_an_empty_pattern() {
    let url = common::redis_url();
    let err = Subscriber::new(&url, "p:")
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "subscriber has no topic or pattern to subscribe to"
    );
    let err = Subscriber::new(&url, "p:")
        .unwrap()
        .pattern("")
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot subscribe: the pattern is empty;"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_silent_redis_times_out_and_a_first_failure_is_reported() {
    let (proxy, proxied) = Proxy::for_url(&common::redis_url()).await;
    proxy.blackhole(Dir::Down);
    let mut config = config_on(&proxied);
    config.redis.connect_timeout = Duration::from_millis(300);
    let mut sub = Subscriber::from_config(&config).unwrap().topic("t");
    let started = Instant::now();
    let err = sub.connect().await.unwrap_err();
    match &err {
        Error::Timeout(after, what) => {
            assert_eq!(*after, Duration::from_millis(300));
            assert_eq!(what, &format!("connecting to {proxied}"));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));

    // `next` on a subscriber that never connected reports the failure
    // instead of retrying a wrong address forever.
    let port = common::free_port();
    let mut sub = Subscriber::new(&format!("redis://127.0.0.1:{port}"), "p:")
        .unwrap()
        .topic("t");
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("next returns")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("connecting to redis://127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_connects_by_itself_yields_undecodable_messages_and_next_event_skips_them() {
    let url = common::redis_url();
    let prefix = format!("herald:covredis:{}:", uuid::Uuid::now_v7().simple());
    let channel = format!("{prefix}cov.t");
    let mut sub = Subscriber::new(&url, &prefix).unwrap().topic("cov.t");
    let first = tokio::spawn(async move {
        let d = sub.next().await;
        (sub, d)
    });
    let mut c = conn(&url).await;
    // Until the subscriber is there, nobody receives; the first message it
    // receives is the one published when PUBLISH counts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while publish_raw(&mut c, &channel, "not an envelope").await == 0 {
        assert!(Instant::now() < deadline, "next() never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut sub, delivery) = first.await.unwrap();
    match delivery.unwrap() {
        Delivery::Undecodable { channel: on, error } => {
            assert_eq!(on, channel);
            assert!(error.contains("expected"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        publish_raw(&mut c, &channel, "{\"still\": \"not\"}").await,
        1
    );
    assert_eq!(
        publish_raw(&mut c, &channel, &envelope("cov.t", "k", 1)).await,
        1
    );
    let e = tokio::time::timeout(Duration::from_secs(5), sub.next_event())
        .await
        .expect("the event arrives")
        .unwrap();
    assert_eq!(
        (e.topic.as_str(), e.payload["n"].as_u64()),
        ("cov.t", Some(1))
    );
    assert_eq!(sub.buffered(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_then_a_closed_connection_reports_the_drops_then_the_loss() {
    let redis = RedisServer::start();
    let prefix = format!("herald:covredis:{}:", uuid::Uuid::now_v7().simple());
    let channel = format!("{prefix}full.t");
    let mut sub = Subscriber::new(&redis.url(), &prefix)
        .unwrap()
        .buffer(2)
        .topic("full.t");
    sub.connect().await.unwrap();
    let mut c = conn(&redis.url()).await;
    for n in 0..10 {
        assert_eq!(
            publish_raw(&mut c, &channel, &envelope("full.t", "k", n)).await,
            1
        );
    }
    // Redis has written all ten to the subscriber before it runs the kill,
    // so the reader sees them all, then the end of the connection.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The consumer reads nothing until the reader is done: two messages and
    // the dropped-count marker, queued only once the connection has ended.
    wait_until(10, "the reader queued two messages and the marker", || {
        let n = sub.buffered();
        async move { n == 3 }
    })
    .await;
    for n in 0..2 {
        match next_delivery(&mut sub).await {
            Delivery::Event { envelope, .. } => assert_eq!(envelope.payload["n"], n),
            other => panic!("{other:?}"),
        }
    }
    match next_delivery(&mut sub).await {
        Delivery::Gap(gap) => {
            assert_eq!(gap.dropped, Some(8), "{gap:?}");
            assert!(
                gap.reason
                    .contains("buffer of 2 messages was full and 8 messages were dropped"),
                "{}",
                gap.reason
            );
            assert!(gap.disconnected_at <= gap.reconnected_at);
        }
        other => panic!("{other:?}"),
    }
    match next_delivery(&mut sub).await {
        Delivery::Gap(gap) => {
            assert_eq!(gap.dropped, None, "{gap:?}");
            assert_eq!(gap.reason, "connection closed");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        publish_raw(&mut c, &channel, &envelope("full.t", "k", 10)).await,
        1
    );
    let e = tokio::time::timeout(Duration::from_secs(5), sub.next_event())
        .await
        .expect("resubscribed")
        .unwrap();
    assert_eq!(e.payload["n"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscriber_whose_ping_fails_or_times_out_reconnects_with_a_gap() {
    // Both subscribers sit idle until their 15 s ping. One ping reaches
    // Redis and its connection is cut before the reply: the ping fails.
    // The other's reply never comes: the ping times out.
    let redis = RedisServer::start();
    let (cut_proxy, cut_url) = Proxy::for_url(&redis.url()).await;
    // A long connect timeout (which bounds the ping) leaves time to cut.
    let mut long = config_on(&cut_url);
    long.redis.connect_timeout = Duration::from_secs(5);
    let mut failing = Subscriber::from_config(&long).unwrap().topic("idle.t");
    failing.connect().await.unwrap();
    // A server of its own too: a connection closed by someone else's test
    // on the shared Redis would end this one as "connection closed".
    let quiet = RedisServer::start();
    let (hole_proxy, hole_url) = Proxy::for_url(&quiet.url()).await;
    let mut silent = Subscriber::from_config(&config_on(&hole_url))
        .unwrap()
        .topic("idle.t");
    silent.connect().await.unwrap();

    let mut direct = conn(&redis.url()).await;
    let pings = command_calls(&mut direct, "ping").await;
    cut_proxy.blackhole(Dir::Down);
    hole_proxy.blackhole(Dir::Down);
    let failing = tokio::spawn(async move { failing.next().await });
    let silent = tokio::spawn(async move { silent.next().await });

    wait_until(30, "the idle ping reached Redis", || {
        let mut probe = direct.clone();
        async move { command_calls(&mut probe, "ping").await > pings }
    })
    .await;
    cut_proxy.cut();
    // Healing before the cut has closed the connection could still deliver
    // the held reply: wait for the subscriber to dial again first.
    wait_until(30, "the failing subscriber tries to reconnect", || {
        let n = cut_proxy.accepted();
        async move { n >= 2 }
    })
    .await;
    cut_proxy.heal();
    wait_until(30, "the silent subscriber tries to reconnect", || {
        let n = hole_proxy.accepted();
        async move { n >= 2 }
    })
    .await;
    hole_proxy.heal();

    for (what, task, want) in [
        ("failing", failing, "ping failed: "),
        ("silent", silent, "ping timed out"),
    ] {
        let delivery = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("a gap")
            .unwrap()
            .unwrap();
        match delivery {
            Delivery::Gap(gap) => {
                assert!(gap.reason.starts_with(want), "{what}: {}", gap.reason);
                assert_eq!(gap.dropped, None, "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- webhooks

#[test]
fn display_url_and_verify_at_their_edges() {
    use herald::webhook::{display_url, sign, verify};
    assert_eq!(
        display_url("https://hooks.example.com:8443/"),
        "https://hooks.example.com:8443"
    );
    assert_eq!(display_url("http://receiver/"), "http://receiver");
    assert_eq!(
        display_url("https://receiver/hooks/T0K3N?x=1"),
        "https://receiver/…"
    );
    assert_eq!(display_url("not a url"), "<unparsable URL>");

    let signature = sign("key", 5, b"{}");
    assert!(verify("key", 5, b"{}", &signature));
    let bare = signature.trim_start_matches("v1=");
    assert!(!verify("key", 5, b"{}", bare), "no v1= prefix");
    assert!(!verify("key", 5, b"{}", "v1=not-hex"), "not hex");
    assert!(!verify("key", 6, b"{}", &signature), "another timestamp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_tasks_that_cannot_be_delivered_say_why_without_the_urls_secrets() {
    use herald::subscriptions::{upsert, Subscription, HEADER_SUBSCRIPTION, WEBHOOK_KIND};

    let db = TestDb::with(|c| {
        c.postgres.pool_size = 4;
    })
    .await;
    let client = db.client().await;
    // A receiver that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let closed_port = common::free_port();
    let subscriptions = [
        Subscription::new("plain", "plain.*"),
        Subscription::webhook(
            "silent",
            "silent.*",
            format!("http://{silent_addr}/hooks/T0K3N-silent"),
            "secret",
        )
        .timeout(Duration::from_secs(1)),
        Subscription::webhook(
            "refused",
            "refused.*",
            format!("http://127.0.0.1:{closed_port}/hooks/T0K3N-refused?token=abc"),
            "secret",
        ),
    ];
    for sub in &subscriptions {
        upsert(&client, sub, "api").await.unwrap();
    }
    let gone_event = uuid::Uuid::now_v7();
    let tasks = [
        (None, uuid::Uuid::now_v7()),
        (Some("gone"), gone_event),
        (Some("plain"), uuid::Uuid::now_v7()),
        (Some("silent"), uuid::Uuid::now_v7()),
        (Some("refused"), uuid::Uuid::now_v7()),
    ];
    for (subscription, id) in tasks {
        let envelope = serde_json::json!({"id": id, "topic": "cov.webhook", "payload": {}});
        let mut task = herald::Task::new(WEBHOOK_KIND, &envelope)
            .unwrap()
            .max_attempts(1);
        if let Some(name) = subscription {
            task = task.header(HEADER_SUBSCRIPTION, name);
        }
        herald::enqueue(&client, &task).await.unwrap();
    }

    let token = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        herald::Worker::new(&db.config, db.pool(), herald::Registry::new()).run(token.clone()),
    );
    common::wait_for_count(
        &client,
        "SELECT count(*) FROM herald.dead_letters",
        5,
        "every undeliverable webhook is a dead letter",
    )
    .await;
    token.cancel();
    worker.await.unwrap().unwrap();

    let rows = client
        .query(
            "SELECT headers->>'herald_subscription', last_error, attempts FROM herald.dead_letters",
            &[],
        )
        .await
        .unwrap();
    let error_of = |name: Option<&str>| -> String {
        let row = rows
            .iter()
            .find(|r| r.get::<_, Option<String>>(0).as_deref() == name)
            .unwrap_or_else(|| panic!("a dead letter for {name:?}"));
        assert_eq!(row.get::<_, i32>(2), 1, "{name:?}: one attempt");
        row.get(1)
    };
    let e = error_of(None);
    assert!(
        e.contains(
            "has no herald_subscription header; herald.webhook tasks are created by the relay"
        ),
        "{e}"
    );
    let e = error_of(Some("gone"));
    assert!(
        e.contains(&format!(
            "subscription \"gone\" no longer exists; its event \"{gone_event}\" was not sent"
        )),
        "{e}"
    );
    let e = error_of(Some("plain"));
    assert!(
        e.contains("subscription \"plain\" has no webhook URL or secret"),
        "{e}"
    );
    let e = error_of(Some("silent"));
    assert!(
        e.contains(&format!(
            "POST webhook of subscription \"silent\" (http://{silent_addr}/…): no response within 1s"
        )),
        "{e}"
    );
    let e = error_of(Some("refused"));
    assert!(
        e.contains(&format!(
            "POST webhook of subscription \"refused\" (http://127.0.0.1:{closed_port}/…): "
        )),
        "{e}"
    );
    for name in ["silent", "refused"] {
        let e = error_of(Some(name));
        assert!(!e.contains("T0K3N") && !e.contains("token=abc"), "{e}");
    }
}
