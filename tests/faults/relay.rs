//! Fault tests: the relay and Redis publishing. A proxy between the relay
//! and Redis (or Postgres), Redis ACL users on private servers; each test
//! counts events lost, duplicated and reordered.

use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Proxy};
use crate::common::{self, Collector, TestDb};

/// A collector on the real Redis for a database whose relay goes through a
/// proxy.
async fn direct_collector(db: &TestDb, redis_url: &str) -> Collector {
    let mut config = db.config.clone();
    config.redis_url = redis_url.to_string();
    let sub = herald::Subscriber::from_config(&config)
        .unwrap()
        .pattern("*");
    Collector::start(&config, sub).await
}

/// Rows left in the outbox once it is empty or `within` passed.
async fn outbox_after(db: &TestDb, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let n = db.count("SELECT count(*) FROM herald.outbox").await;
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Receipts beyond the first of each event id.
fn duplicates(c: &Collector) -> usize {
    c.events.len() - c.distinct_ids()
}

// Issue 14.1: 700 ms added to every Redis reply, response_timeout 5 s. The
// relay must wait the configured 5 s (not the redis crate's own 500 ms), so
// every batch commits: everything arrives, in key order, few duplicates, and
// the outbox drains.
#[tokio::test(flavor = "multi_thread")]
async fn slow_redis_replies_deliver_everything_without_endless_duplicates() {
    let real = common::redis_url();
    let (proxy, via_proxy) = Proxy::for_url(&real).await;
    let db = TestDb::with(|c| {
        c.redis_url = via_proxy.clone();
        c.redis.response_timeout = Duration::from_secs(5);
        c.relay.backoff_min = Duration::from_millis(50);
        c.relay.backoff_max = Duration::from_millis(200);
        c.relay.batch_size = 50;
    })
    .await;
    let mut collector = direct_collector(&db, &real).await;
    proxy.delay(Dir::Down, Duration::from_millis(700));
    common::insert_events(&db.config, 10, 20).await;
    let started = Instant::now();
    let relay = db.relay();
    let all = collector.distinct(200, Duration::from_secs(40)).await;
    let took = started.elapsed();
    let left = outbox_after(&db, Duration::from_secs(if all { 10 } else { 1 })).await;
    collector.drain_for(Duration::from_millis(1500)).await;
    let failed = relay
        .stats
        .failed_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    relay.stop().await;
    eprintln!(
        "slow redis: {} distinct of 200 in {took:?}, {} receipts, {} duplicates, {failed} failed batches, {left} left in the outbox",
        collector.distinct_ids(),
        collector.events.len(),
        duplicates(&collector)
    );
    assert!(
        all,
        "every event arrives ({} of 200)",
        collector.distinct_ids()
    );
    assert_eq!(left, 0, "the outbox drains");
    assert_eq!(
        duplicates(&collector),
        0,
        "no duplicates when no batch times out"
    );
    assert_eq!(
        failed, 0,
        "no batch fails: 700 ms is within response_timeout"
    );
    common::assert_per_key_order(&collector, 10, 20);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}
