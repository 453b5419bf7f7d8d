//! Cache-aside against the real Redis (and Postgres + relay for event-driven
//! invalidation). Each test uses its own namespace; the tests that stop Redis
//! or kill its connections run a private redis-server.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::cache::{Cache, CacheBuilder};
use herald::Config;

use crate::common::{RedisServer, TestDb};

type Loaded<T> = Result<Option<T>, std::io::Error>;
type LoadFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Loaded<T>> + Send>>;

/// A configuration on `redis_url` with short Redis timeouts.
fn config_on(redis_url: &str) -> Config {
    common::config_on(redis_url, Duration::from_millis(500))
}

fn builder() -> CacheBuilder {
    CacheBuilder::from_config(&config_on(&common::redis_url())).unwrap()
}

/// A loader that counts its calls and returns `value` after `delay`.
fn counting<T>(
    calls: &Arc<AtomicUsize>,
    delay: Duration,
    value: Option<T>,
) -> impl FnOnce() -> LoadFuture<T>
where
    T: Send + 'static,
{
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_one_load_for_100_concurrent_readers() {
    let cache = builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..100 {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::from_millis(200), Some("cold".to_string()));
        readers.push(tokio::spawn(async move {
            cache
                .get_or_load("item:1", Duration::from_secs(30), loader)
                .await
        }));
    }
    for r in readers {
        let value: Option<String> = r.await.unwrap().unwrap();
        assert_eq!(value.as_deref(), Some("cold"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "exactly one load");
    let stats = cache.stats();
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.fills, 1);
    assert_eq!(stats.redis_errors, 0);
    assert_eq!(
        stats.hits + stats.coalesced + stats.loads,
        100,
        "every reader got the value from Redis, the shared load or its own: {stats:?}"
    );

    // Now warm: a hit, no load.
    let again: Option<String> = cache
        .get_or_load(
            "item:1",
            Duration::from_secs(30),
            counting(&calls, Duration::ZERO, Some("x".to_string())),
        )
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some("cold"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_take_over_when_the_loading_caller_is_cancelled() {
    let cache = builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(30);
    let leader = {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::from_secs(30), Some("never".to_string()));
        tokio::spawn(async move { cache.get_or_load("abandoned", ttl, loader).await })
    };
    assert!(
        common::until(Duration::from_secs(5), || calls.load(Ordering::SeqCst) == 1).await,
        "the leader starts loading"
    );
    let waiter = {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::ZERO, Some("waiter".to_string()));
        tokio::spawn(async move { cache.get_or_load("abandoned", ttl, loader).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    leader.abort();
    let v: Option<String> = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter does not hang on a cancelled load")
        .unwrap()
        .unwrap();
    assert_eq!(v.as_deref(), Some("waiter"), "the waiter loaded it itself");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_value_expires_with_its_ttl() {
    let cache = builder().jitter(0.0).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_millis(600);
    for expected_calls in [1, 1] {
        let v: Option<u32> = cache
            .get_or_load("ttl", ttl, counting(&calls, Duration::ZERO, Some(7)))
            .await
            .unwrap();
        assert_eq!(v, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), expected_calls);
    }
    // Past the TTL: expiry is the clock's business.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let v: Option<u32> = cache
        .get_or_load("ttl", ttl, counting(&calls, Duration::ZERO, Some(8)))
        .await
        .unwrap();
    assert_eq!(v, Some(8), "reloaded after the TTL");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn jittered_ttl_is_never_longer_than_asked() {
    let cache = builder().jitter(0.5).build();
    let calls = Arc::new(AtomicUsize::new(0));
    for i in 0..20 {
        let _: Option<u32> = cache
            .get_or_load(
                &format!("j{i}"),
                Duration::from_millis(400),
                counting(&calls, Duration::ZERO, Some(i)),
            )
            .await
            .unwrap();
    }
    // Past every jittered TTL: expiry is the clock's business.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for i in 0..20 {
        let _: Option<u32> = cache
            .get_or_load(
                &format!("j{i}"),
                Duration::from_millis(400),
                counting(&calls, Duration::ZERO, Some(i)),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        40,
        "every key expired within its TTL"
    );
}

#[tokio::test]
async fn a_missing_value_is_cached_for_the_negative_ttl() {
    let cache = builder()
        .jitter(0.0)
        .negative_ttl(Duration::from_millis(600))
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let long = Duration::from_secs(60);
    for _ in 0..3 {
        let v: Option<String> = cache
            .get_or_load("user:404", long, counting(&calls, Duration::ZERO, None))
            .await
            .unwrap();
        assert_eq!(v, None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "None was cached");
    assert_eq!(cache.stats().negative_hits, 2);

    // Past the negative entry's TTL.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let v: Option<String> = cache
        .get_or_load(
            "user:404",
            long,
            counting(&calls, Duration::ZERO, Some("now exists".to_string())),
        )
        .await
        .unwrap();
    assert_eq!(
        v.as_deref(),
        Some("now exists"),
        "the marker expired with the negative TTL, not the TTL"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A marker goes with an invalidation like any value.
    let _: Option<String> = cache
        .get_or_load("user:405", long, counting(&calls, Duration::ZERO, None))
        .await
        .unwrap();
    cache.invalidate("user:405").await.unwrap();
    let v: Option<String> = cache
        .get_or_load(
            "user:405",
            long,
            counting(&calls, Duration::ZERO, Some("created".to_string())),
        )
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("created"));
}

#[tokio::test]
async fn a_loader_error_reaches_every_waiter_and_is_not_cached() {
    let cache = builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for _ in 0..10 {
        let cache = cache.clone();
        let calls = calls.clone();
        waiters.push(tokio::spawn(async move {
            cache
                .get_or_load::<u32, _, _, _>("flaky", Duration::from_secs(30), move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err::<Option<u32>, _>(std::io::Error::other("database down"))
                })
                .await
        }));
    }
    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("database down"), "{err}");
        assert_eq!(err.key, "flaky");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let v: Option<u32> = cache
        .get_or_load(
            "flaky",
            Duration::from_secs(30),
            counting(&calls, Duration::ZERO, Some(1)),
        )
        .await
        .unwrap();
    assert_eq!(v, Some(1), "the error was not cached");
    assert_eq!(cache.stats().load_errors, 1);
}

#[tokio::test]
async fn invalidate_a_key_and_a_tag() {
    let cache = builder().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(60);
    let load = |key: &'static str, tags: &'static [&'static str], value: u32| {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::ZERO, Some(value));
        async move {
            cache
                .get_or_load_tagged::<u32, _, _, _>(key, ttl, tags, loader)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(load("a", &["team:1"], 1).await, 1);
    assert_eq!(load("b", &["team:1", "org:9"], 2).await, 2);
    assert_eq!(load("c", &["team:2"], 3).await, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Warm.
    assert_eq!(load("a", &["team:1"], 100).await, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    cache.invalidate("a").await.unwrap();
    assert_eq!(load("a", &["team:1"], 10).await, 10, "a reloaded");
    assert_eq!(load("b", &["team:1", "org:9"], 20).await, 2, "b untouched");
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    cache.invalidate_tag("team:1").await.unwrap();
    assert_eq!(load("a", &["team:1"], 11).await, 11);
    assert_eq!(load("b", &["team:1", "org:9"], 21).await, 21);
    assert_eq!(load("c", &["team:2"], 31).await, 3, "other tag untouched");
    assert_eq!(calls.load(Ordering::SeqCst), 6);

    // A key set directly is registered under its tags too.
    cache.set("d", &4u32, ttl, &["org:9"]).await.unwrap();
    assert_eq!(load("d", &[], 40).await, 4);
    cache.invalidate_tag("org:9").await.unwrap();
    assert_eq!(load("d", &[], 41).await, 41);
    assert_eq!(load("b", &["team:1", "org:9"], 22).await, 22);
    assert_eq!(load("a", &["team:1"], 12).await, 11, "a is not in org:9");

    cache.invalidate_all().await.unwrap();
    assert_eq!(
        load("c", &["team:2"], 32).await,
        32,
        "everything goes with the generation"
    );
    let stats = cache.stats();
    assert_eq!(stats.tag_invalidations, 2);
    assert_eq!(stats.flushes, 1);
    assert!(stats.invalidations >= 4, "{stats:?}");
}

/// A loader that returns "old" after the test lets it: it signals on
/// `loading` once it has "read the old data", then waits for `proceed`.
fn gated(
    calls: &Arc<AtomicUsize>,
) -> (
    impl FnOnce() -> LoadFuture<String>,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (loading_tx, loading_rx) = tokio::sync::oneshot::channel();
    let (proceed_tx, proceed_rx) = tokio::sync::oneshot::channel::<()>();
    let calls = calls.clone();
    let loader = move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let _ = loading_tx.send(());
            let _ = proceed_rx.await;
            Ok(Some("old".to_string()))
        }) as LoadFuture<String>
    };
    (loader, loading_rx, proceed_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_started_before_invalidate_does_not_cache_its_stale_value() {
    let config = config_on(&common::redis_url());
    let cache = Cache::from_config(&config).unwrap();
    // Another process's cache on the same namespace: nothing shared in memory,
    // only what is in Redis.
    let other = Cache::from_config(&config).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(60);

    // The load reads "old" data; then the data changes and the writer
    // invalidates (here, or in the other process, by key, by tag, or by
    // writing the new value) while the load is still running.
    let writers: Vec<(&str, &[&str])> = vec![
        ("invalidate here", &[]),
        ("invalidate there", &[]),
        ("invalidate tag", &["profiles"]),
        ("set there", &[]),
        ("invalidate_all there", &[]),
    ];
    for (i, (how, tags)) in writers.into_iter().enumerate() {
        let key = format!("profile:{i}");
        let (loader, loading, proceed) = gated(&calls);
        let slow = {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move { cache.get_or_load_tagged(&key, ttl, tags, loader).await })
        };
        loading.await.unwrap();
        match how {
            "invalidate here" => cache.invalidate(&key).await.unwrap(),
            "invalidate there" => other.invalidate(&key).await.unwrap(),
            "invalidate tag" => other.invalidate_tag("profiles").await.unwrap(),
            "set there" => other.set(&key, &"new".to_string(), ttl, &[]).await.unwrap(),
            "invalidate_all there" => other.invalidate_all().await.unwrap(),
            _ => unreachable!(),
        }
        proceed.send(()).unwrap();
        let slow_value: Option<String> = slow.await.unwrap().unwrap();
        assert_eq!(
            slow_value.as_deref(),
            Some("old"),
            "{how}: its own caller still gets what it loaded"
        );
        assert_eq!(cache.stats().stale_fills_rejected, i as u64 + 1, "{how}");

        let v: Option<String> = cache
            .get_or_load(
                &key,
                ttl,
                counting(&calls, Duration::ZERO, Some("new".to_string())),
            )
            .await
            .unwrap();
        assert_eq!(
            v.as_deref(),
            Some("new"),
            "{how}: the stale value was not cached"
        );
    }
    assert_eq!(
        cache.stats().fills,
        4,
        "the four reloads (set wrote the fifth)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_event_invalidates_the_keys_it_maps_to() {
    let db = TestDb::new().await;
    let relay = db.relay();
    let cache = Cache::from_config(&db.config).unwrap();
    let invalidator = cache
        .invalidate_on("user.*", |event| {
            event.key.iter().map(|id| format!("user:{id}")).collect()
        })
        .await
        .unwrap();
    let ttl = Duration::from_secs(300);
    let calls = Arc::new(AtomicUsize::new(0));
    let name = |key: &'static str, value: &'static str| {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::ZERO, Some(value.to_string()));
        async move {
            cache
                .get_or_load::<String, _, _, _>(key, ttl, loader)
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(name("user:42", "Ada").await, "Ada");
    assert_eq!(name("user:7", "Bob").await, "Bob");

    // A rolled-back change publishes nothing; a committed one invalidates.
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    herald::publish(
        &tx,
        &herald::Event::new("user.renamed", &serde_json::json!({"name": "Ignored"}))
            .unwrap()
            .key("7"),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    herald::publish(
        &tx,
        &herald::Event::new("user.renamed", &serde_json::json!({"name": "Ada L."}))
            .unwrap()
            .key("42"),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if name("user:42", "Ada L.").await == "Ada L." {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "user:42 was not invalidated by the event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        name("user:7", "changed?").await,
        "Bob",
        "an unrelated key stays cached"
    );
    let stats = cache.stats();
    assert!(stats.events >= 1 && stats.invalidations >= 1, "{stats:?}");
    invalidator.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gap_invalidates_the_whole_namespace() {
    let redis = RedisServer::start();
    let cache = CacheBuilder::from_config(&config_on(&redis.url()))
        .unwrap()
        .build();
    let invalidator = cache
        .invalidate_on("order.*", |_| Vec::new())
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(300);
    let v: Option<u32> = cache
        .get_or_load("order:1", ttl, counting(&calls, Duration::ZERO, Some(1)))
        .await
        .unwrap();
    assert_eq!(v, Some(1));

    // Drop the subscriber's connection (Redis keeps its data): events may
    // have been missed, so nothing cached may be trusted any more.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);

    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.stats().flushes == 0 {
        assert!(
            Instant::now() < deadline,
            "the gap did not flush the namespace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: Option<u32> = cache
        .get_or_load("order:1", ttl, counting(&calls, Duration::ZERO, Some(2)))
        .await
        .unwrap();
    assert_eq!(v, Some(2), "reloaded after the gap");
    invalidator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_degrades_to_the_loader() {
    let mut redis = RedisServer::start();
    let cache = CacheBuilder::from_config(&config_on(&redis.url()))
        .unwrap()
        .retry_after(Duration::from_millis(200))
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(300);
    let get = |value: u32| {
        let cache = cache.clone();
        let loader = counting(&calls, Duration::ZERO, Some(value));
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                cache.get_or_load::<u32, _, _, _>("k", ttl, loader),
            )
            .await
            .expect("get_or_load does not hang while Redis is down")
            .expect("no error while Redis is down")
        }
    };
    assert_eq!(get(1).await, Some(1));
    assert_eq!(get(2).await, Some(1), "cached");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    redis.stop();
    assert_eq!(get(3).await, Some(3), "the loader answers");
    assert_eq!(get(4).await, Some(4), "and keeps answering");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(cache.stats().redis_errors >= 1);
    assert!(
        cache.invalidate("k").await.is_err(),
        "invalidate says it failed"
    );

    redis.restart();
    // Back to caching once Redis answers again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = calls.load(Ordering::SeqCst);
        get(5).await;
        get(6).await;
        if calls.load(Ordering::SeqCst) == before + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache did not recover after Redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(7).await, Some(5), "served from Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_redis_does_not_stall_callers() {
    let redis = RedisServer::start();
    let mut config = config_on(&redis.url());
    config.redis.response_timeout = Duration::from_millis(300);
    let cache = CacheBuilder::from_config(&config).unwrap().build();
    let calls = Arc::new(AtomicUsize::new(0));
    let ttl = Duration::from_secs(300);
    let v: Option<u32> = cache
        .get_or_load("slow", ttl, counting(&calls, Duration::ZERO, Some(1)))
        .await
        .unwrap();
    assert_eq!(v, Some(1));

    // Redis accepts connections but answers nothing for 6 s.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(6000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let v: Option<u32> = cache
        .get_or_load("slow", ttl, counting(&calls, Duration::ZERO, Some(2)))
        .await
        .unwrap();
    assert_eq!(v, Some(2), "answered by the loader");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded by the response timeout, not by Redis ({:?})",
        started.elapsed()
    );
    assert!(cache.stats().redis_errors >= 1);
}

#[tokio::test]
async fn a_custom_codec_is_used_for_storage() {
    /// Stores strings reversed, to prove the bytes in Redis are the codec's.
    struct Reversed;
    impl herald::cache::Codec<String> for Reversed {
        fn encode(&self, v: &String) -> Result<Vec<u8>, herald::cache::BoxError> {
            Ok(v.chars().rev().collect::<String>().into_bytes())
        }
        fn decode(&self, b: &[u8]) -> Result<String, herald::cache::BoxError> {
            Ok(std::str::from_utf8(b)?.chars().rev().collect())
        }
    }
    let config = config_on(&common::redis_url());
    let cache = CacheBuilder::from_config(&config)
        .unwrap()
        .codec(Reversed)
        .build();
    let calls = Arc::new(AtomicUsize::new(0));
    let v = cache
        .get_or_load(
            "s",
            Duration::from_secs(30),
            counting(&calls, Duration::ZERO, Some("abc".to_string())),
        )
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("abc"));
    let v = cache
        .get_or_load(
            "s",
            Duration::from_secs(30),
            counting(&calls, Duration::ZERO, Some("zzz".to_string())),
        )
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("abc"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("{}v:s", cache.namespace()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        raw.ends_with(b":v:cba"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
}
