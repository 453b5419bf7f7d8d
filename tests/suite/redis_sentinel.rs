//! Redis Sentinel: Herald reaches the primary through a
//! `redis+sentinel://` URL, follows `SENTINEL FAILOVER` mid-stream with
//! nothing lost from the outbox, and refuses a master name no sentinel
//! knows, naming `redis_url`.

use std::time::{Duration, Instant};

use herald::{RedisPool, Subscriber};

use crate::common::redis_cluster::{
    finish_failover, refusals, Producer, RedisSentinel, TimedStream,
};
use crate::common::TestDb;

const KEYS: usize = 20;
const TOPICS: usize = 4;

#[tokio::test(flavor = "multi_thread")]
async fn delivers_through_sentinel_and_follows_a_failover_with_nothing_lost() {
    let sentinel = RedisSentinel::start().await;
    let db = TestDb::with(|c| {
        c.redis_url = sentinel.url();
        c.redis.connect_timeout = Duration::from_secs(1);
        c.redis.response_timeout = Duration::from_secs(1);
        c.relay.backoff_min = Duration::from_millis(50);
        c.relay.backoff_max = Duration::from_millis(500);
        c.relay.poll_interval = Duration::from_secs(1);
    })
    .await;
    let subscriber = Subscriber::from_config(&db.config)
        .unwrap()
        .pattern("*")
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100));
    let mut stream = TimedStream::start(subscriber).await;
    let relay = db.relay();
    let t0 = Instant::now();
    let producer = Producer::start(&db.config, KEYS, TOPICS, Duration::from_millis(20));
    assert!(
        stream
            .until_distinct(KEYS * 20, Duration::from_secs(30))
            .await,
        "events flow through the sentinel's primary; got {}",
        stream.distinct()
    );
    println!(
        "first {} events after {:?}",
        stream.distinct(),
        t0.elapsed()
    );
    let old = sentinel.current_primary().await;
    assert_eq!(old, sentinel.primary);
    let before = stream.distinct();
    let started = Instant::now();
    let new = sentinel.failover().await;
    let took = started.elapsed();
    assert_eq!(new, sentinel.replica);
    // A subscriber that starts now finds the new primary, and hears the
    // relay there: a relay still publishing on the demoted server would
    // reach only that server's subscribers.
    let late = Subscriber::from_config(&db.config).unwrap().pattern("*");
    let mut late = TimedStream::start(late).await;
    assert!(
        late.until_distinct(KEYS * 10, Duration::from_secs(20))
            .await,
        "the relay publishes on the new primary; a subscriber there got {}",
        late.distinct()
    );
    println!(
        "late subscriber heard {} events after {:?}",
        late.distinct(),
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_key = producer.stop().await;
    let what =
        format!("sentinel failover {old} -> {new}: took {took:?}, {before} events before it");
    let window = (started, started + took + Duration::from_secs(3));
    finish_failover(&what, &mut stream, (KEYS, per_key), window, relay, &db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_master_name_is_refused_naming_the_setting() {
    let sentinel = RedisSentinel::start().await;
    let url = sentinel.url().replace("/mymaster", "/nosuchmaster");
    let config = crate::common::config_on(&url, Duration::from_secs(1));
    for err in refusals(&config).await {
        assert!(
            err.contains("redis_url") && err.contains("master name"),
            "{err}"
        );
    }
    // The right name works.
    let config = crate::common::config_on(&sentinel.url(), Duration::from_secs(1));
    RedisPool::from_config(&config)
        .unwrap()
        .check()
        .await
        .unwrap();
}
