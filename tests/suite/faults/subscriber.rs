//! Fault tests: subscriber. See main.rs.
//!
//! A consumer that stops reading must cost a bounded amount of memory and
//! learn, through a `Gap`, exactly how much it missed.

use std::time::{Duration, Instant};

use herald::{Delivery, Subscriber};

/// Resident memory of this test process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn publish_envelopes(prefix: &str, topic: &str, from: usize, to: usize) {
    let client = redis::Client::open(crate::common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let padding = "x".repeat(600);
    let mut n = from;
    while n < to {
        let mut pipe = redis::pipe();
        for i in n..(n + 1000).min(to) {
            let event =
                herald::Event::new(topic, &serde_json::json!({ "n": i, "padding": padding }))
                    .unwrap()
                    .key("k");
            pipe.publish(format!("{prefix}{topic}"), event.envelope_json())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        n = (n + 1000).min(to);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_does_not_read_stays_bounded_and_gets_a_gap() {
    const PUBLISHED: usize = 50_000;
    const BUFFER: usize = 10_000;
    let prefix = format!("herald:slow-sub-{}:", uuid::Uuid::now_v7().simple());
    let mut sub = Subscriber::new(&crate::common::redis_url(), &prefix)
        .unwrap()
        .buffer(BUFFER)
        .topic("slow.t");
    sub.connect().await.unwrap();

    // Publish while the consumer does not read; sample what it buffers.
    let rss_before = rss_kib();
    let mut most_buffered = 0;
    for chunk in 0..(PUBLISHED / 5_000) {
        publish_envelopes(&prefix, "slow.t", chunk * 5_000, (chunk + 1) * 5_000).await;
        most_buffered = most_buffered.max(sub.buffered());
    }
    // Let the reader take in what Redis already sent.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = usize::MAX;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sub.buffered();
        most_buffered = most_buffered.max(now);
        if now == last && now >= BUFFER {
            break;
        }
        last = now;
    }
    let rss_growth_mib = rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!("most buffered: {most_buffered}; RSS growth while not reading: {rss_growth_mib} MiB");
    assert!(
        most_buffered <= BUFFER + 1,
        "the subscriber buffered {most_buffered} messages, more than its buffer of {BUFFER}"
    );

    // Now read: the buffered events, then a gap that counts the rest.
    let mut events = Vec::new();
    let mut gaps = Vec::new();
    while let Ok(d) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        match d.unwrap() {
            Delivery::Event { envelope, .. } => {
                events.push(envelope.payload["n"].as_u64().unwrap() as usize)
            }
            Delivery::Gap(gap) => gaps.push(gap),
            Delivery::Undecodable { error, .. } => panic!("undecodable: {error}"),
        }
    }
    let dropped: u64 = gaps.iter().map(|g| g.dropped.unwrap_or(0)).sum();
    eprintln!(
        "received {} events, {} gap(s), {dropped} dropped",
        events.len(),
        gaps.len()
    );
    assert!(!gaps.is_empty(), "an overflowing subscriber must get a Gap");
    assert!(
        gaps[0].reason.contains("fell behind") && gaps[0].reason.contains("dropped"),
        "{}",
        gaps[0].reason
    );
    assert_eq!(
        events.len() as u64 + dropped,
        PUBLISHED as u64,
        "every published event was either delivered or counted in a gap"
    );
    assert!(
        events.windows(2).all(|w| w[0] < w[1]),
        "what was delivered is in publish order"
    );
    assert!(
        events.len() >= BUFFER && dropped > 0,
        "the buffer was full when reading began"
    );

    // And events published after it keep coming.
    publish_envelopes(&prefix, "slow.t", PUBLISHED, PUBLISHED + 100).await;
    let mut later = Vec::new();
    while later.len() < 100 {
        match tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("later events arrive")
            .unwrap()
        {
            Delivery::Event { envelope, .. } => {
                later.push(envelope.payload["n"].as_u64().unwrap() as usize)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(later, (PUBLISHED..PUBLISHED + 100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cache_invalidator_that_falls_behind_flushes_the_namespace() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    crate::common::init_tracing();
    let config = herald::Config {
        redis_url: crate::common::redis_url(),
        channel_prefix: format!("herald:slow-inv-{}:", uuid::Uuid::now_v7().simple()),
        ..herald::Config::default()
    };
    let cache = herald::cache::CacheBuilder::from_config(&config)
        .unwrap()
        .build();
    let ttl = Duration::from_secs(300);
    let v: Option<u32> = cache
        .get_or_load("order:1", ttl, || async {
            Ok::<_, std::io::Error>(Some(1))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(1));

    // An invalidator whose map stalls on the first event (a slow consumer)
    // and maps no event to a key: only a flush can drop order:1.
    let gate = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let (g, s) = (gate.clone(), seen.clone());
    let subscriber = Subscriber::new(&config.redis_url, &config.channel_prefix)
        .unwrap()
        .buffer(10)
        .topic("inv.t");
    let invalidator = cache
        .invalidate_with(subscriber, move |_| {
            s.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !g.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            Vec::new()
        })
        .await
        .unwrap();
    publish_envelopes(&config.channel_prefix, "inv.t", 0, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the invalidator saw no event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    publish_envelopes(&config.channel_prefix, "inv.t", 1, 200).await;
    // Nothing was flushed while no gap was reported yet.
    assert_eq!(cache.stats().flushes, 0);
    gate.store(true, Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.stats().flushes == 0 {
        assert!(
            Instant::now() < deadline,
            "falling behind did not flush the namespace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let processed = seen.load(Ordering::SeqCst);
    assert!(
        processed < 200,
        "the invalidator was handed {processed} events; a buffer of 10 should have dropped most"
    );
    let v: Option<u32> = cache
        .get_or_load("order:1", ttl, || async {
            Ok::<_, std::io::Error>(Some(2))
        })
        .await
        .unwrap();
    assert_eq!(v, Some(2), "reloaded after the gap");
    invalidator.stop().await;
}
