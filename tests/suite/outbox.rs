//! The producer side and the relay's normal path, against real Postgres and
//! Redis: commit/rollback, the envelope, the SQL function, bad input,
//! archive retention and concurrent migrations.

use crate::common;

use std::time::Duration;

use crate::common::TestDb;
use herald::{Event, Outbox};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn rollback_publishes_nothing_and_commit_publishes_the_envelope() {
    let db = TestDb::new().await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    let mut client = db.client().await;

    let tx = client.transaction().await.unwrap();
    let rolled_back = Event::new("payment.captured", &json!({"amount": 1})).unwrap();
    herald::publish(&tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    let event = Event::new(
        "payment.captured",
        &json!({"amount": 42, "currency": "EUR"}),
    )
    .unwrap()
    .key("customer-17")
    .correlation_id("req-1")
    .causation_id("cmd-9")
    .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    .header("tenant", "acme");
    let id = herald::publish(&tx, &event).await.unwrap();
    assert_eq!(id, event.id());
    tx.commit().await.unwrap();

    assert!(
        collector.distinct(1, WAIT).await,
        "the committed event arrives"
    );
    // Give a wrongly published rolled-back event time to show up too.
    collector.drain_for(Duration::from_millis(500)).await;
    assert_eq!(
        collector.events.len(),
        1,
        "only the committed event arrives"
    );
    let got = &collector.events[0];
    assert_eq!(got.id, id);
    assert_eq!(got.topic, "payment.captured");
    assert_eq!(got.key.as_deref(), Some("customer-17"));
    assert_eq!(got.payload, json!({"amount": 42, "currency": "EUR"}));
    assert_eq!(got.header("correlation_id"), Some("req-1"));
    assert_eq!(got.header("causation_id"), Some("cmd-9"));
    assert_eq!(
        got.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(got.header("tenant"), Some("acme"));
    #[derive(serde::Deserialize)]
    struct Captured {
        amount: u32,
        currency: String,
    }
    let typed: Captured = got.payload_as().unwrap();
    assert_eq!((typed.amount, typed.currency.as_str()), (42, "EUR"));
    assert!(got.payload_as::<Vec<u8>>().is_err());

    relay.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_publish_is_delivered_on_the_topic_channel() {
    let db = TestDb::new().await;
    // A subscriber on one exact topic sees only that topic.
    let mut exact = common::Collector::start(
        &db.config,
        herald::Subscriber::from_config(&db.config)
            .unwrap()
            .topic("order.placed"),
    )
    .await;
    let mut all = db.collector().await;
    let relay = db.relay();
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT herald.publish('order.placed', '{\"order\": 7}', 'o-7', '{\"correlation_id\": \"c-7\"}')",
            &[],
        )
        .await
        .unwrap();
    let id: uuid::Uuid = row.get(0);
    assert_eq!(id.get_version_num(), 7, "event ids are UUID v7");
    client
        .query_one("SELECT herald.publish('order.shipped', '[1, 2]')", &[])
        .await
        .unwrap();

    assert!(all.distinct(2, WAIT).await);
    assert!(exact.distinct(1, WAIT).await);
    exact.drain_for(Duration::from_millis(300)).await;
    assert_eq!(exact.events.len(), 1);
    assert_eq!(exact.events[0].id, id);
    assert_eq!(exact.events[0].header("correlation_id"), Some("c-7"));
    let shipped = all
        .events
        .iter()
        .find(|e| e.topic == "order.shipped")
        .unwrap();
    assert_eq!(shipped.key, None);
    assert_eq!(shipped.payload, json!([1, 2]));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_with_a_clear_error_and_nothing_stored_is_lost() {
    let db = TestDb::with(|c| c.max_payload_bytes = 1000).await;
    let client = db.client().await;
    // Something already stored.
    client
        .query_one("SELECT herald.publish('kept.event', '{\"n\": 1}')", &[])
        .await
        .unwrap();

    // Rust API: checked before any SQL.
    let err = Event::new("bad topic", &json!({})).unwrap_err().to_string();
    assert!(
        err.contains("invalid topic \"bad topic\"") && err.contains("' '"),
        "{err}"
    );
    let err = Event::new("", &json!({})).unwrap_err().to_string();
    assert!(err.contains("topic is empty"), "{err}");
    let err = Event::new("x".repeat(256), &json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("256 characters, at most 255"), "{err}");
    let err = Event::from_json_str("ok.topic", "{\"a\": ")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid JSON in payload of topic \"ok.topic\""),
        "{err}"
    );
    let big = Event::new("ok.topic", &"x".repeat(2000)).unwrap();
    let err = Outbox::from_config(&db.config)
        .publish(&client, &big)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("2002 bytes, the limit is 1000 bytes"), "{err}");

    // SQL function: same rules, limit read from herald.settings.
    let sql_err = |sql: &'static str| {
        let client = &client;
        async move {
            let e = client.query_one(sql, &[]).await.unwrap_err();
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or(e.to_string())
        }
    };
    let msg = sql_err("SELECT herald.publish('bad topic', '{}')").await;
    assert!(msg.contains("invalid topic \"bad topic\""), "{msg}");
    let msg = sql_err("SELECT herald.publish('', '{}')").await;
    assert!(msg.contains("topic is empty"), "{msg}");
    let msg = sql_err("SELECT herald.publish(repeat('a', 256), '{}')").await;
    assert!(msg.contains("256 characters, at most 255"), "{msg}");
    let msg = sql_err("SELECT herald.publish('ok.topic', to_jsonb(repeat('x', 2000)))").await;
    assert!(
        msg.contains("payload too large") && msg.contains("limit is 1000 bytes"),
        "{msg}"
    );
    let msg = sql_err("SELECT herald.publish('ok.topic', NULL)").await;
    assert!(msg.contains("payload is NULL"), "{msg}");
    let msg = sql_err("SELECT herald.publish('ok.topic', '{}', NULL, '[1]')").await;
    assert!(msg.contains("headers must be a JSON object"), "{msg}");
    let msg = sql_err("SELECT herald.publish('ok.topic', '{not json')").await;
    assert!(msg.contains("invalid input syntax for type json"), "{msg}");
    // A direct INSERT that bypasses the function still meets the CHECK.
    let msg = sql_err(
        "INSERT INTO herald.outbox (event_id, topic, partition, payload) \
         VALUES (gen_random_uuid(), 'no spaces allowed', 0, '{}') RETURNING id",
    )
    .await;
    assert!(msg.contains("outbox_topic_valid"), "{msg}");

    // Nothing stored was lost, and it is still delivered.
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 1);
    let mut collector = db.collector().await;
    let relay = db.relay();
    assert!(collector.distinct(1, WAIT).await);
    assert_eq!(collector.events[0].topic, "kept.event");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_inserted_while_no_relay_runs_are_delivered_when_one_starts() {
    let db = TestDb::new().await;
    common::insert_events(&db.config, 5, 200).await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    assert!(collector.distinct(1000, WAIT).await, "all 1000 arrive");
    common::assert_per_key_order(&collector, 5, 200);
    relay.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

/// VACUUMs of herald.outbox other than autovacuum's.
async fn outbox_vacuums(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT vacuum_count FROM pg_stat_user_tables
             WHERE schemaname = 'herald' AND relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The maintenance leader vacuums the outbox a relay empties once it has
/// gained `relay.vacuum_after` dead rows, and leaves it to autovacuum when
/// that is 0.
#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_is_vacuumed_after_the_relay_removed_enough_events() {
    for (after, expect_vacuum) in [(0u64, false), (300, true)] {
        let db = TestDb::with(|c| c.relay.vacuum_after = after).await;
        common::insert_events(&db.config, 5, 200).await;
        let mut collector = db.collector().await;
        let maintenance = tokio_util::sync::CancellationToken::new();
        tokio::spawn(herald::maintenance::Maintenance::new(&db.config).run(maintenance.clone()));
        let relay = db.relay();
        assert!(collector.distinct(1000, WAIT).await, "all 1000 arrive");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = outbox_vacuums(&db).await;
        while expect_vacuum && seen == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = outbox_vacuums(&db).await;
        }
        relay.stop().await;
        if expect_vacuum {
            assert!(
                seen >= 1,
                "vacuum_after = {after}: no VACUUM of herald.outbox"
            );
        } else {
            // Give a VACUUM that should not happen the time to show (the
            // leader checks about once a second).
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(outbox_vacuums(&db).await, 0, "vacuum_after = 0 vacuumed");
        }
        maintenance.cancel();
        assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_events_are_archived_and_batches_keep_their_order() {
    let db = TestDb::with(|c| c.relay.retain_published = Some(Duration::from_secs(3600))).await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    let client = db.client().await;
    let events: Vec<Event> = (0..50)
        .map(|seq| {
            Event::new("archived.event", &json!({"seq": seq}))
                .unwrap()
                .key("one-key")
        })
        .collect();
    let ids = herald::publish_batch(&client, &events).await.unwrap();
    assert_eq!(ids.len(), 50);
    assert!(collector.distinct(50, WAIT).await);
    common::assert_per_key_order(&collector, 1, 50);
    relay.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.outbox_archive WHERE topic = 'archived.event'")
            .await,
        50
    );
    // Today's daily partition exists and holds them.
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'herald.outbox_archive'::regclass \
               AND c.relname = 'outbox_archive_' || to_char(current_date, 'YYYYMMDD')"
        )
        .await,
        1
    );
    // Expiry drops whole days: a partition that ended long ago goes.
    client
        .batch_execute(
            "CREATE TABLE herald.outbox_archive_20000101 PARTITION OF herald.outbox_archive \
             FOR VALUES FROM ('2000-01-01') TO ('2000-01-02')",
        )
        .await
        .unwrap();
    let dropped: i32 = client
        .query_one("SELECT herald.maintain_archive('1 day')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dropped, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.outbox_archive WHERE topic = 'archived.event'")
            .await,
        50,
        "today's events stay"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrations_do_not_collide() {
    let db = TestDb::new().await;
    // The database is migrated; four more processes at once are no-ops that
    // must all succeed (they queue on the advisory lock).
    let runs = (0..4).map(|_| herald::migrate::migrate(&db.config));
    for result in futures_util::future::join_all(runs).await {
        let report = result.expect("concurrent migrate succeeds");
        assert!(report.applied.is_empty());
        assert_eq!(report.current_version, Some(latest_migration()));
    }
    // Changing the partition count with a backlog is refused, naming why.
    let client = db.client().await;
    client
        .query_one("SELECT herald.publish('t', '{}')", &[])
        .await
        .unwrap();
    let mut changed = db.config.clone();
    changed.partitions = 8;
    let err = herald::migrate::migrate(&changed)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("partitions") && err.contains("still holds events"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_database_migrates_in_parallel() {
    // Several processes starting together against an empty database.
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("DROP SCHEMA herald CASCADE")
        .await
        .unwrap();
    let runs = (0..3).map(|_| herald::migrate::migrate(&db.config));
    let reports: Vec<_> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("parallel migrate succeeds"))
        .collect();
    assert_eq!(
        reports.iter().filter(|r| !r.applied.is_empty()).count(),
        1,
        "exactly one process applied the migrations"
    );
    assert_eq!(
        db.count("SELECT partitions::bigint FROM herald.settings")
            .await,
        16
    );
}

/// The highest V<n> among the migration files in sql/.
fn latest_migration() -> i32 {
    std::fs::read_dir(crate::common::repo_root().join("sql"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix('V')?.split("__").next()?.parse().ok()
        })
        .max()
        .unwrap()
}
