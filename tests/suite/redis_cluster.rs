//! Redis Cluster: relay → Subscriber in classic and sharded pub/sub with
//! events on channels spread over every primary, a primary failover
//! (`CLUSTER FAILOVER` on its replica) mid-stream with nothing lost from
//! the outbox, the cache's commands and invalidation on a cluster, and the
//! settings that cannot work refused at start naming the setting.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use herald::config::PubSubMode;
use herald::{Cache, Config, RedisPool, Subscriber};

use crate::common::redis_cluster::{
    finish_failover, refusals, topic_of, Producer, RedisCluster, TimedStream,
};
use crate::common::{RedisServer, TestDb};

const KEYS: usize = 30;
const TOPICS: usize = 12;

fn cluster_config(c: &mut Config, url: &str, mode: PubSubMode) {
    c.redis_url = url.to_string();
    c.redis.pubsub = mode;
    c.redis.connect_timeout = Duration::from_secs(1);
    c.redis.response_timeout = Duration::from_secs(1);
    c.relay.backoff_min = Duration::from_millis(50);
    c.relay.backoff_max = Duration::from_millis(500);
    c.relay.poll_interval = Duration::from_secs(1);
}

/// Relay a steady stream through the cluster, fail over `victim` (a
/// primary) mid-stream, and check every committed event arrived, in
/// per-key order. Prints the figures.
async fn stream_through_a_failover(mode: PubSubMode) {
    let cluster = RedisCluster::start(3, 1).await;
    let db = TestDb::with(|c| cluster_config(c, &cluster.url(), mode)).await;
    let channels: Vec<String> = (0..TOPICS)
        .map(|t| format!("{}{}", db.config.channel_prefix, topic_of(t, TOPICS)))
        .collect();
    // The channels land on every primary.
    let mut owners = HashSet::new();
    for channel in &channels {
        owners.insert(cluster.owner_of(channel).await);
    }
    assert_eq!(
        owners.len(),
        3,
        "the test's channels spread over all three primaries"
    );
    let mut subscriber = Subscriber::from_config(&db.config)
        .unwrap()
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200));
    subscriber = match mode {
        PubSubMode::Classic => subscriber.pattern("*"),
        PubSubMode::Sharded => (0..TOPICS).fold(subscriber, |s, t| s.topic(&topic_of(t, TOPICS))),
    };
    let mut stream = TimedStream::start(subscriber).await;
    let relay = db.relay();
    let producer = Producer::start(&db.config, KEYS, TOPICS, Duration::from_millis(20));
    assert!(
        stream
            .until_distinct(KEYS * 20, Duration::from_secs(30))
            .await,
        "events flow before the failover; got {}",
        stream.distinct()
    );
    // Classic pub/sub publishes through the primary of slot 0; sharded
    // through each channel's primary: fail over the busiest one.
    let victim = match mode {
        PubSubMode::Classic => cluster.owner_of_slot(0).await,
        PubSubMode::Sharded => {
            let mut best = (0, 0);
            for master in cluster.masters().await {
                let mut n = 0;
                for channel in &channels {
                    n += usize::from(cluster.owner_of(channel).await == master);
                }
                if n > best.1 {
                    best = (master, n);
                }
            }
            best.0
        }
    };
    let before = stream.distinct();
    let failover_started = Instant::now();
    let new_primary = cluster.failover(victim).await;
    let failover_took = failover_started.elapsed();
    // Keep producing for a while after the switch, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_key = producer.stop().await;
    let what = format!(
        "{mode} failover of {victim} -> {new_primary}: failover took {failover_took:?}, \
         {before} events before it"
    );
    let window = (
        failover_started,
        failover_started + failover_took + Duration::from_secs(3),
    );
    finish_failover(&what, &mut stream, (KEYS, per_key), window, relay, &db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn classic_pubsub_survives_a_primary_failover_with_nothing_lost() {
    stream_through_a_failover(PubSubMode::Classic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_pubsub_survives_a_primary_failover_with_nothing_lost() {
    stream_through_a_failover(PubSubMode::Sharded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_works_on_a_cluster_and_its_invalidations_reach_every_process() {
    let cluster = RedisCluster::start(3, 0).await;
    let db = TestDb::with(|c| cluster_config(c, &cluster.url(), PubSubMode::Classic)).await;
    let relay = db.relay();
    // Two "processes": two caches on their own pools.
    let a = Cache::from_config(&db.config).unwrap();
    let b = Cache::from_config(&db.config).unwrap();
    assert!(
        a.namespace().starts_with('{') && a.namespace().ends_with('}'),
        "a cluster cache's namespace is a hash tag: {}",
        a.namespace()
    );
    let inv_a = a
        .invalidate_on("user.*", |e| {
            e.key.iter().map(|k| format!("user:{k}")).collect()
        })
        .await
        .unwrap();
    let inv_b = b
        .invalidate_on("user.*", |e| {
            e.key.iter().map(|k| format!("user:{k}")).collect()
        })
        .await
        .unwrap();
    let ttl = Duration::from_secs(300);
    let load = |cache: &Cache, key: &'static str, value: &'static str| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_load::<String, std::io::Error, _, _>(key, ttl, || async move {
                    Ok(Some(value.to_string()))
                })
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(load(&a, "user:1", "Ada").await, "Ada");
    assert_eq!(load(&b, "user:1", "other").await, "Ada", "b reads a's fill");
    a.set("user:2", &"Bob".to_string(), ttl, &["people"])
        .await
        .unwrap();
    assert_eq!(load(&b, "user:2", "other").await, "Bob");
    // Direct invalidation by one process is seen by the other.
    a.invalidate("user:2").await.unwrap();
    assert_eq!(load(&b, "user:2", "Bob2").await, "Bob2");
    a.invalidate_tag("people").await.unwrap();
    // An event invalidates in both.
    let client = db.client().await;
    client
        .query_one(
            "SELECT herald.publish('user.renamed', '{}'::jsonb, '1')",
            &[],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.stats().events == 0 || b.stats().events == 0 {
        assert!(Instant::now() < deadline, "both processes got the event");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(load(&b, "user:1", "Ada2").await, "Ada2");
    assert_eq!(load(&a, "user:1", "unused").await, "Ada2");
    a.invalidate_all().await.unwrap();
    assert_eq!(load(&b, "user:1", "Ada3").await, "Ada3");
    assert_eq!(
        a.stats().redis_errors,
        0,
        "no cross-slot or other Redis error"
    );
    assert_eq!(
        b.stats().redis_errors,
        0,
        "no cross-slot or other Redis error"
    );
    inv_a.stop().await;
    inv_b.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_pointed_at_a_server_without_cluster_mode_stops_at_start() {
    let plain = RedisServer::start();
    let db = TestDb::new().await;
    let url = format!("redis+cluster://127.0.0.1:{}", plain.port);
    let started = Instant::now();
    let out = crate::common::herald_command(&db.config, &["relay"], &[("REDIS_URL", &url)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "herald relay must not start: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stderr.contains("redis_url (REDIS_URL)") && stderr.contains("cluster mode disabled"),
        "{stderr}"
    );
    // Sharded pub/sub without a cluster is refused before anything connects.
    let out = crate::common::herald_command(
        &db.config,
        &["relay"],
        &[
            ("REDIS_URL", &plain.url()),
            ("HERALD_REDIS_PUBSUB", "sharded"),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("redis.pubsub (HERALD_REDIS_PUBSUB)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_that_cannot_work_are_refused_naming_the_setting() {
    // A cluster URL at a server without cluster mode.
    let plain = RedisServer::start();
    let mut config = crate::common::config_on(
        &format!("redis+cluster://127.0.0.1:{}", plain.port),
        Duration::from_secs(1),
    );
    for err in refusals(&config).await {
        assert!(
            err.contains("redis_url") && err.contains("cluster mode disabled"),
            "{err}"
        );
    }

    // Sharded pub/sub on a single server.
    config.redis_url = plain.url();
    config.redis.pubsub = PubSubMode::Sharded;
    let err = config.check_settings().unwrap_err().to_string();
    assert!(
        err.contains("redis.pubsub") && err.contains("Cluster"),
        "{err}"
    );
    let err = RedisPool::from_config(&config).unwrap_err().to_string();
    assert!(err.contains("redis.pubsub"), "{err}");

    // Sharded pub/sub with a pattern.
    let cluster = RedisCluster::start(3, 0).await;
    config.redis_url = cluster.url();
    config.check_settings().unwrap();
    let err = Subscriber::from_config(&config)
        .unwrap()
        .pattern("orders.*")
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.pubsub") && err.contains("sharded") && err.contains("orders.*"),
        "{err}"
    );
    // herald tail says the same.
    let out = crate::common::herald_command(
        &config,
        &["tail", "orders.*"],
        &[("HERALD_REDIS_PUBSUB", "sharded")],
    )
    .env("REDIS_URL", cluster.url())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "herald tail with a pattern in sharded mode fails"
    );
    assert!(
        stderr.contains("redis.pubsub") && stderr.contains("orders.*"),
        "{stderr}"
    );

    // Unreachable nodes: an error naming them, not a hang.
    let dead = crate::common::free_port();
    config.redis_url = format!("redis+cluster://127.0.0.1:{dead}");
    config.redis.pubsub = PubSubMode::Classic;
    let started = Instant::now();
    let err = Subscriber::from_config(&config)
        .unwrap()
        .topic("a")
        .connect()
        .await
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(err.contains(&dead.to_string()), "{err}");

    // Malformed URLs.
    for (url, says) in [
        ("redis+cluster://", "node address"),
        ("redis+cluster://h1:7000,h2:notaport", "port"),
        ("redis+cluster://h1:7000/3", "database 0"),
        ("redis+sentinel://s1:26379", "master name"),
        ("redis+clustr://h1", "scheme"),
    ] {
        config.redis_url = url.into();
        let err = config.check_settings().unwrap_err().to_string();
        assert!(
            err.contains("redis_url") && err.contains(says),
            "{url}: {err}"
        );
    }
}

/// `herald tail` on a cluster: a pattern in classic mode and exact topics
/// (on three slots) in sharded mode, each printing what a relay publishes
/// there, every event once.
#[tokio::test(flavor = "multi_thread")]
async fn herald_tail_prints_what_the_relay_publishes_on_a_cluster() {
    use tokio::io::AsyncBufReadExt;

    let cluster = RedisCluster::start(3, 0).await;
    let topics = ["tail.a", "tail.b", "tail.c"];
    for (mode, name, follow) in [
        (PubSubMode::Classic, "classic", vec!["tail.*"]),
        (PubSubMode::Sharded, "sharded", topics.to_vec()),
    ] {
        let db = TestDb::with(|c| {
            c.redis_url = cluster.url();
            c.redis.pubsub = mode;
        })
        .await;
        let mut args = vec!["tail"];
        args.extend(&follow);
        let mut tail =
            crate::common::herald_command(&db.config, &args, &[("HERALD_REDIS_PUBSUB", name)])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
        let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
        let relay = db.relay();
        // tail subscribes on its own time: publish a round on every topic
        // until one is printed, then a known set, and read them all.
        let outbox = herald::Outbox::from_config(&db.config);
        let client = db.client().await;
        let mut warm_up = 0;
        let first = loop {
            for topic in topics {
                let event =
                    herald::Event::new(topic, &serde_json::json!({ "warm_up": warm_up })).unwrap();
                outbox.publish(&client, &event).await.unwrap();
            }
            warm_up += 1;
            if let Ok(line) =
                tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
            {
                break line.unwrap().expect("tail prints while running");
            }
            assert!(warm_up < 100, "{name}: herald tail printed nothing in 20 s");
        };
        assert!(first.contains("warm_up"), "{name}: {first}");
        let mut want = HashSet::new();
        for (n, topic) in topics.iter().cycle().take(30).enumerate() {
            let event = herald::Event::new(*topic, &serde_json::json!({ "n": n })).unwrap();
            want.insert(outbox.publish(&client, &event).await.unwrap().to_string());
        }
        let mut seen = Vec::new();
        while want.iter().any(|id| !seen.contains(id)) {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{name}: {} of 30 printed in 20 s", seen.len()))
                .unwrap()
                .expect("tail prints while running");
            let printed: serde_json::Value = serde_json::from_str(&line).unwrap();
            if printed["payload"].get("n").is_some() {
                seen.push(printed["id"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(seen.len(), 30, "{name}: every event once: {seen:?}");
        relay.stop().await;
        tail.kill().await.unwrap();
    }
}
