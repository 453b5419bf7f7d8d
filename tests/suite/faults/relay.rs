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

async fn redis_admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to the private Redis")
}

async fn publish(
    client: &impl tokio_postgres::GenericClient,
    topic: &str,
    seq: i64,
    key: Option<&str>,
) {
    client
        .query_one(
            "SELECT herald.publish($1, jsonb_build_object('seq', $2::bigint), $3)",
            &[&topic, &seq, &key],
        )
        .await
        .expect("herald.publish");
}

// Issue 14.2: a user allowed only the `ok.*` channels; one transaction
// publishes ok.1 (key k), bad.1, ok.2 (key k). Only bad.1 is refused: ok.1
// and ok.2 arrive once each, bad.1 alone is charged and dead-lettered after
// max_attempts, and a later ok.3 of key k still arrives after ok.1 and ok.2.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_publish_charges_only_its_event() {
    let redis = common::RedisServer::start();
    let mut admin = redis_admin(&redis.url()).await;
    let db = TestDb::with(|c| {
        c.relay.max_attempts = 3;
        c.relay.backoff_min = Duration::from_millis(50);
        c.relay.backoff_max = Duration::from_millis(200);
    })
    .await;
    let allowed = format!("&{}ok.*", db.config.channel_prefix);
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "relay",
            "on",
            ">pw",
            "~*",
            "resetchannels",
            &allowed,
            "+@all",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut config = db.config.clone();
    config.redis_url = format!("redis://relay:pw@127.0.0.1:{}", redis.port);
    let mut collector = direct_collector(&db, &redis.url()).await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    publish(&tx, "ok.1", 1, Some("k")).await;
    publish(&tx, "bad.1", 1, None).await;
    publish(&tx, "ok.2", 2, Some("k")).await;
    tx.commit().await.unwrap();
    let relay = common::RelayTask::start(&config);
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.count("SELECT count(*) FROM herald.dead_letters").await < 1 {
        assert!(Instant::now() < deadline, "bad.1 becomes a dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&client, "ok.3", 3, Some("k")).await;
    let arrived = collector.distinct(3, Duration::from_secs(10)).await;
    collector.drain_for(Duration::from_millis(500)).await;
    relay.stop().await;
    let topics: Vec<String> = collector.events.iter().map(|e| e.topic.clone()).collect();
    let dead: Vec<(String, i32)> = client
        .query("SELECT topic, attempts FROM herald.dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("refused publish: received {topics:?}, dead letters {dead:?}");
    assert!(arrived, "ok.1, ok.2 and ok.3 arrive: {topics:?}");
    assert_eq!(topics, ["ok.1", "ok.2", "ok.3"], "each once, in key order");
    assert_eq!(
        dead,
        [("bad.1".to_string(), 3)],
        "only bad.1, after 3 attempts"
    );
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

// Issue 14.2: the default user is given a password mid-run (NOAUTH on
// every PUBLISH of the relay's new connections): an outage, never the
// events' fault. Nothing is charged or dead-lettered; all arrive once the
// password is removed.
#[tokio::test(flavor = "multi_thread")]
async fn noauth_is_an_outage_not_a_refusal() {
    let redis = common::RedisServer::start();
    let mut admin = redis_admin(&redis.url()).await;
    let db = TestDb::with(|c| {
        c.redis_url = redis.url();
        c.relay.max_attempts = 2;
        c.relay.backoff_min = Duration::from_millis(20);
        c.relay.backoff_max = Duration::from_millis(50);
    })
    .await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    let client = db.client().await;
    publish(&client, "before", 0, Some("k")).await;
    assert!(collector.distinct(1, Duration::from_secs(10)).await);
    // The password takes effect for new connections; the relay's are cut
    // (the subscriber's, of type pubsub, stays).
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "pw"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut admin)
        .await
        .unwrap();
    for seq in 1..=10 {
        publish(&client, "during", seq, Some("k")).await;
    }
    let failed_before = relay
        .stats
        .failed_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay
        .stats
        .failed_batches
        .load(std::sync::atomic::Ordering::Relaxed)
        < failed_before + 10
    {
        assert!(Instant::now() < deadline, "the relay keeps trying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let charged = db
        .count("SELECT coalesce(sum(attempts), 0)::bigint FROM herald.outbox")
        .await;
    let dead_during = db.count("SELECT count(*) FROM herald.dead_letters").await;
    let last_error: String = client
        .query_one(
            "SELECT coalesce(max(last_error), '') FROM herald.outbox",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", ""])
        .query_async(&mut admin)
        .await
        .unwrap();
    let arrived = collector.distinct(11, Duration::from_secs(15)).await;
    relay.stop().await;
    eprintln!(
        "noauth: {} of 11 arrived, {charged} attempts charged and {dead_during} dead letters during the outage; last_error {last_error:?}",
        collector.distinct_ids()
    );
    assert_eq!(charged, 0, "an outage charges no attempt");
    assert_eq!(dead_during, 0, "nothing is dead-lettered");
    assert!(last_error.contains("NOAUTH"), "{last_error}");
    assert!(arrived, "every event arrives after the fix");
    common::assert_per_key_order(&collector, 1, 11);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

// Issue 14.7: a relay frozen (SIGSTOP) while its batch waits for Redis
// holds its partitions' locks in an open transaction. The server ends that
// transaction after claim_hold, so a second relay drains those partitions
// within claim_hold + its poll_interval, in key order.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_relay_passes_its_partitions_on_within_the_bound() {
    let real = common::redis_url();
    let (proxy, via_proxy) = Proxy::for_url(&real).await;
    let db = TestDb::with(|c| {
        c.relay.poll_interval = Duration::from_secs(1);
        c.redis.connect_timeout = Duration::from_secs(1);
        c.redis.response_timeout = Duration::from_secs(2);
    })
    .await;
    let hold = herald::relay::claim_hold(&db.config);
    let mut collector = db.collector().await;
    common::insert_events(&db.config, 10, 20).await;
    let mut frozen_config = db.config.clone();
    frozen_config.redis_url = via_proxy.clone();
    // Replies slower than a batch's claim, within response_timeout: the
    // child sits in its claim transaction while it waits for them.
    proxy.delay(Dir::Down, Duration::from_millis(1500));
    let child = common::HeraldProcess::spawn(
        &frozen_config,
        &[
            ("HERALD_REDIS_CONNECT_TIMEOUT", "1s"),
            ("HERALD_REDIS_RESPONSE_TIMEOUT", "2s"),
            ("HERALD_RELAY_BATCH_SIZE", "20"),
        ],
    );
    let client = db.client().await;
    let mid_batch = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'herald-relay' AND state = 'idle in transaction'",
        db.name
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::scalar(&client, &mid_batch).await == 0 {
        assert!(Instant::now() < deadline, "the child relay claims a batch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let held = common::scalar(
        &client,
        &format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = '{}' AND a.application_name = 'herald-relay' \
             AND l.locktype = 'advisory'",
            db.name
        ),
    )
    .await;
    let relay = db.relay();
    let all = collector
        .distinct(200, hold + Duration::from_secs(10))
        .await;
    let took = frozen_at.elapsed();
    relay.stop().await;
    child.signal(libc::SIGCONT);
    child.kill9().await;
    eprintln!(
        "stopped relay: held {held} partition locks; {} of 200 arrived {took:?} after the freeze (bound {:?}), {} receipts",
        collector.distinct_ids(),
        hold + db.config.relay.poll_interval,
        collector.events.len()
    );
    assert!(held > 0, "the frozen relay held partitions");
    assert!(
        all,
        "every event arrives ({} of 200)",
        collector.distinct_ids()
    );
    assert!(
        took <= hold + db.config.relay.poll_interval + Duration::from_secs(2),
        "within the bound: {took:?}"
    );
    common::assert_per_key_order(&collector, 10, 20);
}

// Issue 14.10: a row that is not due yet (a producer whose transaction
// started after the claim's, or an event held back after a refusal) is never
// passed by a later row of its partition: the claim stops at it.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_row_never_passes_an_earlier_one_not_yet_due() {
    let db = TestDb::with(|c| c.relay.poll_interval = Duration::from_millis(200)).await;
    let mut collector = db.collector().await;
    let client = db.client().await;
    publish(&client, "test.order", 0, Some("k")).await;
    // As the claim would see a row whose producer's transaction began
    // after the claim's: available_at later than the claim's now().
    client
        .execute(
            "UPDATE herald.outbox SET available_at = clock_timestamp() + interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    publish(&client, "test.order", 1, Some("k")).await;
    let relay = db.relay();
    let arrived = collector.distinct(2, Duration::from_secs(10)).await;
    relay.stop().await;
    let seqs = collector.seqs_by_key().remove("k").unwrap_or_default();
    eprintln!("not yet due: key k arrived as {seqs:?}");
    assert!(arrived, "both arrive");
    assert_eq!(seqs, [0, 1], "in key order");
}

// Issue 14.10: /readyz reads `listening`; a drain worker that panics must
// turn it off for good, though the LISTEN connection is fine.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicked_drain_worker_makes_the_relay_unready() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new().await;
    let relay = db.relay();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.stats.listening.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the relay listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stats.inject_panic.store(true, Ordering::Relaxed);
    let client = db.client().await;
    publish(&client, "test.wake", 0, None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.stats.listening.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "readiness turns off after a drain worker panicked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.stats.failed.load(Ordering::Relaxed));
    // It stays off: the LISTEN connection coming back does not turn it on.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'herald-relay-listen'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!relay.stats.listening.load(Ordering::Relaxed));
    relay.stop().await;
}

// Issue 14.8: Redis unreachable. A durable subscription's tasks (Postgres
// only) are created all the same, once per event; when Redis is back the
// events are published and no second task appears.
#[tokio::test(flavor = "multi_thread")]
async fn durable_subscriptions_flow_while_redis_is_down_exactly_once() {
    let real = common::redis_url();
    let (proxy, via_proxy) = Proxy::for_url(&real).await;
    let db = TestDb::with(|c| {
        c.redis_url = via_proxy.clone();
        c.redis.connect_timeout = Duration::from_millis(500);
        c.relay.backoff_min = Duration::from_millis(50);
        c.relay.backoff_max = Duration::from_millis(300);
        c.relay.batch_size = 20;
    })
    .await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO herald.subscriptions (name, pattern, kind) \
             VALUES ('durable', 'test.*', 'sub:durable')",
        )
        .await
        .unwrap();
    let mut collector = direct_collector(&db, &real).await;
    proxy.refuse();
    proxy.cut();
    common::insert_events(&db.config, 5, 20).await;
    let relay = db.relay();
    let tasks =
        "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_subscription' = 'durable'";
    let distinct_tasks = "SELECT count(DISTINCT headers->>'herald_event_id') FROM herald.tasks \
                          WHERE headers->>'herald_subscription' = 'durable'";
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut during = 0;
    while Instant::now() < deadline {
        during = common::scalar(&client, tasks).await;
        if during >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = db.count("SELECT count(*) FROM herald.outbox").await;
    let received_during = collector.drain_for(Duration::from_millis(200)).await;
    proxy.heal();
    let all = collector.distinct(100, Duration::from_secs(20)).await;
    let left = outbox_after(&db, Duration::from_secs(10)).await;
    relay.stop().await;
    let after = common::scalar(&client, tasks).await;
    let distinct = common::scalar(&client, distinct_tasks).await;
    eprintln!(
        "redis down: {during} tasks for 100 events during the outage ({waiting} events waiting, {received_during} received); \
         after: {} of 100 published, {after} tasks ({distinct} distinct events), {left} left",
        collector.distinct_ids()
    );
    assert_eq!(
        during, 100,
        "every event's task is created while Redis is down"
    );
    assert_eq!(waiting, 100, "the events wait for Redis");
    assert!(all, "every event is published once Redis is back");
    assert_eq!(left, 0);
    assert_eq!(
        (after, distinct),
        (100, 100),
        "one task per event, no second one"
    );
    common::assert_per_key_order(&collector, 5, 20);
    // The tasks were created in each key's order too.
    let out_of_order = common::scalar(
        &client,
        "SELECT count(*) FROM (SELECT payload->>'key' AS k, (payload->'payload'->>'seq')::int AS seq,
                lag((payload->'payload'->>'seq')::int) OVER (PARTITION BY payload->>'key' ORDER BY id) AS prev
         FROM herald.tasks WHERE headers->>'herald_subscription' = 'durable') t
         WHERE prev IS NOT NULL AND prev > seq",
    )
    .await;
    assert_eq!(out_of_order, 0, "tasks in key order");
}

// Issue 14.1: batches bounded by bytes. With relay.batch_bytes far below a
// batch of events, every event still goes (an event larger than the bound
// alone), once and in key order.
#[tokio::test(flavor = "multi_thread")]
async fn batches_bounded_by_bytes_deliver_everything_in_order() {
    let db = TestDb::with(|c| {
        c.relay.batch_bytes = 300;
        c.relay.batch_size = 100;
    })
    .await;
    let mut collector = db.collector().await;
    let client = db.client().await;
    // One event above the bound on its own.
    client
        .query_one(
            "SELECT herald.publish('test.big', jsonb_build_object('seq', -1, 'pad', repeat('x', 2000)), 'big')",
            &[],
        )
        .await
        .unwrap();
    common::insert_events(&db.config, 5, 20).await;
    let relay = db.relay();
    let all = collector.distinct(101, Duration::from_secs(20)).await;
    collector.drain_for(Duration::from_millis(300)).await;
    let batches = relay
        .stats
        .batches
        .load(std::sync::atomic::Ordering::Relaxed);
    relay.stop().await;
    eprintln!(
        "bytes-bounded: {} of 101 arrived, {} receipts, {batches} batches",
        collector.distinct_ids(),
        collector.events.len()
    );
    assert!(all);
    assert_eq!(duplicates(&collector), 0);
    collector.events.retain(|e| e.topic != "test.big");
    common::assert_per_key_order(&collector, 5, 20);
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}
