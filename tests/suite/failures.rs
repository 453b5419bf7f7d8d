//! The relay under failure, against real processes: several relays at once,
//! a relay killed with SIGKILL mid-stream, Redis stopped and restarted, the
//! LISTEN connection terminated, Redis unreachable until events become dead
//! letters, and a clean SIGTERM.

use crate::common;

use std::time::{Duration, Instant};

use crate::common::{Collector, RedisServer, RelayProcess, TestDb};
use herald::Subscriber;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn three_relays_keep_per_key_order_and_deliver_everything() {
    const KEYS: usize = 10;
    const PER_KEY: usize = 1000;
    let db = TestDb::new().await;
    let mut collector = db.collector().await;
    // Small batches and one partition per batch make the relays interleave
    // as much as possible.
    let env = [
        ("HERALD_RELAY_BATCH_SIZE", "50"),
        ("HERALD_RELAY_PARTITIONS_PER_BATCH", "1"),
    ];
    let relays: Vec<RelayProcess> = (0..3)
        .map(|_| RelayProcess::spawn(&db.config, &env))
        .collect();
    // Insert while the relays run, from two producers at once.
    let (a, b) = tokio::join!(
        common::insert_events(&db.config, KEYS / 2, PER_KEY),
        async {
            let mut config = db.config.clone();
            config.channel_prefix = db.config.channel_prefix.clone();
            let client = herald::db::connect(&config, "herald-test").await.unwrap();
            let mut batch = Vec::new();
            for seq in 0..PER_KEY {
                for k in KEYS / 2..KEYS {
                    batch.push(
                        herald::Event::new("test.order", &json!({"seq": seq}))
                            .unwrap()
                            .key(format!("key-{k}")),
                    );
                }
                if batch.len() >= 250 {
                    herald::publish_batch(&client, &batch).await.unwrap();
                    batch.clear();
                }
            }
            herald::publish_batch(&client, &batch).await.unwrap();
        }
    );
    let _ = (a, b);
    assert!(
        collector
            .distinct(KEYS * PER_KEY, Duration::from_secs(60))
            .await,
        "all {} events arrive, got {}",
        KEYS * PER_KEY,
        collector.distinct_ids()
    );
    assert_eq!(
        collector.events.len(),
        KEYS * PER_KEY,
        "no duplicates without a crash"
    );
    common::assert_per_key_order(&collector, KEYS, PER_KEY);
    for relay in relays {
        assert!(relay.terminate().await.success());
    }
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_stream_loses_nothing() {
    const KEYS: usize = 20;
    const PER_KEY: usize = 1000;
    let db = TestDb::new().await;
    let mut collector = db.collector().await;
    common::insert_events(&db.config, KEYS, PER_KEY).await;
    let env = [("HERALD_RELAY_BATCH_SIZE", "100")];
    let relay = RelayProcess::spawn(&db.config, &env);
    // Kill it once it is well into the backlog.
    assert!(
        collector
            .until(Duration::from_secs(30), |c| c.events.len() >= 2000)
            .await
    );
    relay.kill9().await;
    let before_restart = collector.events.len();
    let left = db.count("SELECT count(*) FROM herald.outbox").await;
    assert!(left > 0, "the kill came before the backlog was drained");
    let relay = RelayProcess::spawn(&db.config, &env);
    assert!(
        collector
            .distinct(KEYS * PER_KEY, Duration::from_secs(60))
            .await,
        "every event arrives after the restart; got {} distinct",
        collector.distinct_ids()
    );
    collector.drain_for(Duration::from_millis(300)).await;
    let duplicates = collector.events.len() - collector.distinct_ids();
    println!(
        "killed after {before_restart} deliveries with {left} rows left; {duplicates} duplicates"
    );
    // At most the batches in flight at the kill can repeat.
    assert!(duplicates <= 2 * 100 * 2, "{duplicates} duplicates");
    common::assert_per_key_order(&collector, KEYS, PER_KEY);
    assert!(relay.terminate().await.success());
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_loses_nothing_and_the_subscriber_resumes() {
    // The relay logs in as its own ACL user. After the restart that user
    // starts disabled, so the test can let the subscriber reconnect before
    // the relay may publish: pub/sub keeps nothing for a subscriber that is
    // not there, and the test checks the relay, not that race.
    let mut redis = RedisServer::start();
    redis.restart_with(&["--user", "relay", "on", ">pw", "~*", "&*", "+@all"]);
    let db = TestDb::with(|c| {
        c.redis_url = format!("redis://relay:pw@127.0.0.1:{}", redis.port);
        c.relay.backoff_min = Duration::from_millis(200);
        c.relay.backoff_max = Duration::from_millis(500);
        c.redis.response_timeout = Duration::from_secs(1);
        c.redis.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let subscriber = Subscriber::new(&redis.url(), &db.config.channel_prefix)
        .unwrap()
        .pattern("*")
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(100));
    let mut collector = Collector::start(&db.config, subscriber).await;
    let relay = db.relay();
    let client = db.client().await;
    let publish = |seq: i64| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT herald.publish('test.redis', jsonb_build_object('seq', $1::bigint), 'k')",
                    &[&seq],
                )
                .await
                .unwrap();
        }
    };
    for seq in 0..10 {
        publish(seq).await;
    }
    assert!(collector.distinct(10, Duration::from_secs(10)).await);

    redis.stop();
    let stopped = Instant::now();
    for seq in 10..30 {
        publish(seq).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // While Redis is down the events wait in the outbox, the reason noted on
    // them and no attempt spent (an outage is not the events' fault).
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed())).await;
    let waiting = db.count("SELECT count(*) FROM herald.outbox").await;
    assert_eq!(waiting, 20, "nothing is dropped while Redis is down");
    assert!(
        db.count(
            "SELECT count(*) FROM herald.outbox WHERE attempts = 0 AND last_error IS NOT NULL"
        )
        .await
            > 0,
        "the outage is recorded on the waiting events"
    );
    redis.restart_with(&["--user", "relay", "off", ">pw", "~*", "&*", "+@all"]);
    assert!(
        collector
            .until(Duration::from_secs(10), |c| c.gaps >= 1)
            .await,
        "the subscriber reconnects by itself and reports its gap"
    );
    assert_eq!(
        collector.distinct_ids(),
        10,
        "nothing was published meanwhile"
    );
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "relay", "on"])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        collector.distinct(30, Duration::from_secs(20)).await,
        "every event arrives after Redis is back; got {}",
        collector.distinct_ids()
    );
    assert!(collector.gaps >= 1, "the subscriber reported its gap");
    common::assert_per_key_order(&collector, 1, 30);
    // And it keeps working.
    publish(30).await;
    assert!(collector.distinct(31, Duration::from_secs(10)).await);
    relay.stop().await;
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn terminated_listen_connection_recovers_with_low_latency() {
    // A safety poll of a minute: only NOTIFY can deliver within seconds.
    let db = TestDb::with(|c| c.relay.poll_interval = Duration::from_secs(60)).await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    let client = db.client().await;
    // The session that LISTENs also takes the wake lock, so its last query
    // is not always the LISTEN.
    let listen_backends = "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'herald-relay-listen'";
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.count(listen_backends).await == 0 {
        assert!(Instant::now() < deadline, "relay LISTEN connection appears");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .query_one("SELECT herald.publish('test.listen', '{\"seq\": 0}')", &[])
        .await
        .unwrap();
    assert!(collector.distinct(1, Duration::from_secs(5)).await);

    let killed: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'herald-relay-listen') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    // Published while the connection is down: found by the sweep on reconnect.
    client
        .query_one("SELECT herald.publish('test.listen', '{\"seq\": 1}')", &[])
        .await
        .unwrap();
    assert!(
        collector.distinct(2, Duration::from_secs(5)).await,
        "the event committed during the outage arrives through the reconnect sweep"
    );
    // Back on LISTEN within a second.
    let reconnected = Instant::now();
    while db.count(listen_backends).await == 0 {
        assert!(
            reconnected.elapsed() < Duration::from_secs(2),
            "LISTEN is back within a second or so"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now NOTIFY drives delivery again: each arrives far sooner than the
    // 60 s safety poll.
    for seq in 2..7 {
        let sent = Instant::now();
        client
            .query_one(
                "SELECT herald.publish('test.listen', jsonb_build_object('seq', $1::int))",
                &[&seq],
            )
            .await
            .unwrap();
        assert!(
            collector
                .distinct(seq as usize + 1, Duration::from_secs(5))
                .await
        );
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "delivered by NOTIFY, not the safety poll ({:?})",
            sent.elapsed()
        );
    }
    assert!(
        relay
            .stats
            .listen_connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_redis_keeps_events_without_spending_attempts() {
    let port = common::free_port(); // nothing listens there
    let db = TestDb::with(|c| {
        c.redis_url = format!("redis://127.0.0.1:{port}");
        c.relay.max_attempts = 3;
        c.relay.backoff_min = Duration::from_millis(20);
        c.relay.backoff_max = Duration::from_millis(50);
        c.redis.connect_timeout = Duration::from_millis(500);
    })
    .await;

    // A subscriber pointed at it says so instead of hanging.
    let mut sub = Subscriber::from_config(&db.config).unwrap().pattern("*");
    let err = sub.connect().await.unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // A URL that is not a Redis URL is rejected by name.
    let err = Subscriber::new("http://example", "herald:")
        .err()
        .map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("REDIS_URL"));

    let client = db.client().await;
    client
        .query_one("SELECT herald.publish('test.wait', '{\"n\": 1}')", &[])
        .await
        .unwrap();
    let relay = db.relay();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay
        .stats
        .failed_batches
        .load(std::sync::atomic::Ordering::Relaxed)
        < 10
    {
        assert!(Instant::now() < deadline, "the relay keeps retrying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await;
    // An outage is not the event's fault: it waits, attempts unspent, with
    // the reason on the row for operators.
    let row = client
        .query_one("SELECT attempts, last_error FROM herald.outbox", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
    let last_error: String = row.get(1);
    assert!(last_error.contains("redis"), "{last_error}");
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_redis_refuses_become_dead_letters_after_max_attempts() {
    // A Redis that answers but refuses this user PUBLISH to Herald's
    // channels (ACL). Denying the PUBLISH command itself is an outage, not
    // a refusal (tests/faults/relay.rs).
    let redis = RedisServer::start();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "relay",
            "on",
            ">pw",
            "~*",
            "resetchannels",
            "&nothing.*",
            "+@all",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let db = TestDb::with(|c| {
        c.redis_url = format!("redis://relay:pw@127.0.0.1:{}", redis.port);
        c.relay.max_attempts = 3;
        c.relay.backoff_min = Duration::from_millis(20);
        c.relay.backoff_max = Duration::from_millis(50);
    })
    .await;
    let client = db.client().await;
    client
        .query_one(
            "SELECT herald.publish('test.dead', '{\"n\": 1}', 'k', '{\"correlation_id\": \"c\"}')",
            &[],
        )
        .await
        .unwrap();
    client
        .query_one("SELECT herald.publish('test.dead', '{\"n\": 2}', 'k')", &[])
        .await
        .unwrap();
    let relay = db.relay();
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.count("SELECT count(*) FROM herald.dead_letters").await < 2 {
        assert!(Instant::now() < deadline, "the events become dead letters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
    let row = client
        .query_one(
            "SELECT source, topic, key, payload, headers, attempts, last_error, jsonb_array_length(errors) \
             FROM herald.dead_letters ORDER BY original_id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "outbox");
    assert_eq!(row.get::<_, String>(1), "test.dead");
    assert_eq!(row.get::<_, String>(2), "k");
    assert_eq!(row.get::<_, serde_json::Value>(3), json!({"n": 1}));
    assert_eq!(
        row.get::<_, serde_json::Value>(4),
        json!({"correlation_id": "c"})
    );
    assert_eq!(row.get::<_, i32>(5), 3);
    let last_error: String = row.get(6);
    assert!(
        last_error.to_lowercase().contains("publish"),
        "{last_error}"
    );
    assert_eq!(row.get::<_, i32>(7), 1);
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_and_exits_zero_and_cli_reports_bad_urls() {
    let db = TestDb::new().await;
    let mut collector = db.collector().await;
    let relay = RelayProcess::spawn(&db.config, &[]);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "publish",
            "cli.topic",
            "{\"via\": \"cli\"}",
            "--key",
            "k1",
            "--header",
            "correlation_id=abc",
        ])
        .env("DATABASE_URL", &db.config.database_url)
        .env("HERALD_CHANNEL_PREFIX", &db.config.channel_prefix)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(collector.distinct(1, Duration::from_secs(10)).await);
    assert_eq!(collector.events[0].id.to_string(), id);
    assert_eq!(collector.events[0].header("correlation_id"), Some("abc"));
    assert!(relay.terminate().await.success(), "SIGTERM exits 0");

    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(args).env_remove("HERALD_CONFIG");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(
        &["publish", "t", "{"],
        &[("DATABASE_URL", &db.config.database_url)],
    );
    assert!(!ok && err.contains("invalid JSON in payload"), "{err}");
    let (ok, err) = run(&["publish", "t", "{}", "--header", "novalue"], &[]);
    assert!(!ok && err.contains("expected NAME=VALUE"), "{err}");
    let (ok, err) = run(&["tail", "x.*"], &[("REDIS_URL", "redis://127.0.0.1:1")]);
    assert!(!ok && err.contains("127.0.0.1:1"), "{err}");
    let (ok, err) = run(&["config"], &[("REDIS_URL", "http://nope")]);
    assert!(!ok && err.contains("redis_url"), "{err}");
    let (ok, err) = run(
        &["migrate"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")],
    );
    assert!(!ok && err.contains("127.0.0.1:1"), "{err}");
}
