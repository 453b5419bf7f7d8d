//! Domain events against real Postgres and Redis: the catalog's schemas on
//! the Rust and the SQL path, strict mode, fire-and-forget delivery, durable
//! subscriptions fanned out by the relay (overlapping patterns, a failing
//! subscriber), and exactly-once effects through `herald.processed_events`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{scalar as count, wait_for_count as eventually, TestDb};
use herald::events::{DeliveryMode, EventType, Publisher};
use herald::subscriptions::{Applied, Subscription};
use herald::{Config, Event, Registry, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn catalog(c: &mut Config) {
    c.events = vec![
        EventType {
            name: "payment.captured".into(),
            description: "a payment was captured".into(),
            version: 1,
            schema: Some(json!({
                "type": "object",
                "required": ["amount", "currency"],
                "properties": {
                    "amount": {"type": "integer", "minimum": 0},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}
                }
            })),
            schema_file: None,
            delivery: DeliveryMode::Durable,
        },
        EventType {
            name: "presence.seen".into(),
            description: "a user was seen online".into(),
            version: 1,
            schema: None,
            schema_file: None,
            delivery: DeliveryMode::FireAndForget,
        },
    ];
    c.worker.retry_base = Duration::from_millis(20);
    c.worker.retry_max = Duration::from_millis(50);
    c.worker.concurrency = 4;
    c.postgres.pool_size = 4;
}

fn redis(config: &Config) -> deadpool_redis::Pool {
    herald::pubsub::redis_pool(config).expect("redis pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_enforced_on_the_rust_path_and_by_the_relay_for_sql() {
    let db = TestDb::with(catalog).await;
    let client = db.client().await;
    let publisher = Publisher::new(&db.config, Some(redis(&db.config))).unwrap();

    // Rust path: refused before any SQL, naming the path and the rule.
    let bad = Event::new(
        "payment.captured",
        &json!({"amount": -5, "currency": "eur"}),
    )
    .unwrap();
    let err = publisher
        .publish(&client, &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("payment.captured"), "{err}");
    assert!(err.contains("/amount") && err.contains("minimum"), "{err}");
    assert!(err.contains("/currency"), "{err}");
    let missing = Event::new("payment.captured", &json!({"amount": 5})).unwrap();
    let err = publisher
        .publish(&client, &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("currency"), "{err}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.outbox").await,
        0
    );

    let mut collector = db.collector().await;
    let good = Event::new("payment.captured", &json!({"amount": 5, "currency": "EUR"})).unwrap();
    let good_id = publisher.publish(&client, &good).await.unwrap();
    // Undeclared topics pass when the catalog is not strict.
    publisher
        .publish(&client, &Event::new("misc.note", &json!({"x": 1})).unwrap())
        .await
        .unwrap();

    // SQL path: written, then refused by the relay into the dead letters.
    client
        .batch_execute(
            "SELECT herald.publish('payment.captured', '{\"amount\": \"lots\", \"currency\": \"EUR\"}');
             SELECT herald.publish('payment.captured', '{\"amount\": 7, \"currency\": \"USD\"}');",
        )
        .await
        .unwrap();
    let relay = db.relay();
    assert!(collector.distinct(3, Duration::from_secs(15)).await);
    assert_eq!(collector.drain_for(Duration::from_millis(500)).await, 0);
    let topics: Vec<_> = collector.events.iter().map(|e| e.topic.clone()).collect();
    assert!(collector.events.iter().any(|e| e.id == good_id));
    assert_eq!(topics.iter().filter(|t| *t == "misc.note").count(), 1);
    assert!(collector
        .events
        .iter()
        .all(|e| e.payload["amount"] != json!("lots")));
    let row = client
        .query_one(
            "SELECT topic, payload, last_error, jsonb_array_length(errors) FROM herald.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "payment.captured");
    assert_eq!(row.get::<_, serde_json::Value>(1)["amount"], json!("lots"));
    let reason: String = row.get(2);
    assert!(
        reason.contains("/amount") && reason.contains("integer"),
        "{reason}"
    );
    assert_eq!(row.get::<_, i32>(3), 1);
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.outbox").await,
        0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_catalogs_refuse_undeclared_topics_and_fire_and_forget_skips_postgres() {
    let db = TestDb::with(|c| {
        catalog(c);
        c.catalog.strict = true;
    })
    .await;
    let mut client = db.client().await;
    let publisher = Publisher::new(&db.config, Some(redis(&db.config))).unwrap();
    let err = publisher
        .publish(&client, &Event::new("misc.note", &json!({})).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("misc.note") && err.contains("not declared"),
        "{err}"
    );

    // Fire-and-forget: sent at once, even from a transaction rolled back,
    // and never written to the outbox.
    let mut collector = db.collector().await;
    let tx = client.transaction().await.unwrap();
    let seen = Event::new("presence.seen", &json!({"user": 17})).unwrap();
    let id = publisher.publish(&tx, &seen).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(collector.distinct(1, Duration::from_secs(5)).await);
    assert_eq!(collector.events[0].id, id);
    assert_eq!(collector.events[0].payload, json!({"user": 17}));
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.outbox").await,
        0
    );

    // SQL may write anything; the relay refuses the undeclared topic.
    client
        .execute("SELECT herald.publish('misc.note', '{}')", &[])
        .await
        .unwrap();
    let relay = db.relay();
    eventually(
        &client,
        "SELECT count(*) FROM herald.dead_letters WHERE topic = 'misc.note' AND last_error LIKE '%not declared%'",
        1,
        "the undeclared event is a dead letter",
    )
    .await;
    assert_eq!(collector.drain_for(Duration::from_millis(300)).await, 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_subscriptions_each_get_every_matching_event_and_a_failing_one_is_isolated() {
    let db = TestDb::with(catalog).await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE received (subscription text, event_id uuid, topic text,
                                    PRIMARY KEY (subscription, event_id))",
        )
        .await
        .unwrap();
    let mut registry = Registry::new();
    for (name, pattern) in [("payments", "payment.*"), ("everything", "*")] {
        registry
            .subscribe_durable(name, pattern, |ctx, env| async move {
                let sub = ctx.subscription.clone();
                let topic = env.topic.clone();
                ctx.apply_once(&env, move |tx| {
                    Box::pin(async move {
                        tx.execute(
                            "INSERT INTO received VALUES ($1, $2, $3)",
                            &[&sub, &env.id, &topic],
                        )
                        .await?;
                        Ok(())
                    })
                })
                .await?;
                Ok(())
            })
            .unwrap();
    }
    registry
        .subscribe_durable_with(
            Subscription::new("broken", "payment.*").max_attempts(2),
            |_ctx, env| async move { anyhow::bail!("cannot handle {}", env.id) },
        )
        .unwrap();
    let pool = herald::db::pool(&db.config, "herald-worker").unwrap();
    let token = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(&db.config, pool, registry).run(token.clone()));
    eventually(
        &client,
        "SELECT count(*) FROM herald.subscriptions WHERE source = 'api'",
        3,
        "the worker registers its subscriptions",
    )
    .await;

    let publisher = Publisher::new(&db.config, None).unwrap();
    for i in 0..20 {
        let e = Event::new("payment.captured", &json!({"amount": i, "currency": "EUR"})).unwrap();
        publisher.publish(&client, &e).await.unwrap();
    }
    for i in 0..5 {
        client
            .execute(
                "SELECT herald.publish('user.created', jsonb_build_object('n', $1::int))",
                &[&i],
            )
            .await
            .unwrap();
    }
    let relay = db.relay();
    eventually(
        &client,
        "SELECT count(*) FROM received WHERE subscription = 'payments'",
        20,
        "payments sees every payment",
    )
    .await;
    eventually(
        &client,
        "SELECT count(*) FROM received WHERE subscription = 'everything'",
        25,
        "everything sees every event",
    )
    .await;
    eventually(
        &client,
        "SELECT count(*) FROM herald.dead_letters WHERE kind = 'sub:broken'",
        20,
        "the failing subscriber ends in the dead letters",
    )
    .await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM received WHERE subscription = 'payments' AND topic <> 'payment.captured'"
        )
        .await,
        0
    );
    let errors: i64 = count(
        &client,
        "SELECT min(jsonb_array_length(errors))::bigint FROM herald.dead_letters WHERE kind = 'sub:broken'",
    )
    .await;
    assert_eq!(errors, 2, "both attempts' errors are kept");
    // Every task of the healthy subscribers completed.
    eventually(
        &client,
        "SELECT count(*) FROM herald.tasks WHERE kind IN ('sub:payments', 'sub:everything')",
        0,
        "healthy subscribers' tasks are done",
    )
    .await;

    // A paused subscription gets no tasks.
    assert!(
        herald::subscriptions::set_enabled(&client, "everything", false)
            .await
            .unwrap()
    );
    client
        .execute("SELECT herald.publish('user.created', '{}')", &[])
        .await
        .unwrap();
    eventually(&client, "SELECT count(*) FROM herald.outbox", 0, "relayed").await;
    // Nothing more may arrive for the disabled subscription: give it the time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM received WHERE subscription = 'everything'"
        )
        .await,
        25
    );

    relay.stop().await;
    token.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_or_retried_event_is_applied_once() {
    let db = TestDb::with(catalog).await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE account (id int PRIMARY KEY, balance int NOT NULL); INSERT INTO account VALUES (1, 0);")
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let runs = runs.clone();
        let skipped = skipped.clone();
        registry
            .subscribe_durable("ledger", "payment.*", move |ctx, env| {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                let skipped = skipped.clone();
                async move {
                    let amount = env.payload["amount"].as_i64().unwrap_or(0) as i32;
                    let applied = ctx
                        .apply_once(&env, move |tx| {
                            Box::pin(async move {
                                tx.execute(
                                    "UPDATE account SET balance = balance + $1 WHERE id = 1",
                                    &[&amount],
                                )
                                .await?;
                                // The first run dies after its write, before
                                // its commit: the write must not survive.
                                if run == 0 {
                                    anyhow::bail!("crashed mid-way");
                                }
                                Ok(())
                            })
                        })
                        .await?;
                    if applied == Applied::Before {
                        skipped.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                }
            })
            .unwrap();
    }
    let pool = herald::db::pool(&db.config, "herald-worker").unwrap();
    let token = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(&db.config, pool, registry).run(token.clone()));
    eventually(
        &client,
        "SELECT count(*) FROM herald.subscriptions",
        1,
        "subscription registered",
    )
    .await;
    let relay = db.relay();
    let publisher = Publisher::new(&db.config, None).unwrap();
    publisher
        .publish(
            &client,
            &Event::new(
                "payment.captured",
                &json!({"amount": 10, "currency": "EUR"}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    eventually(
        &client,
        "SELECT count(*) FROM herald.processed_events",
        1,
        "applied after the retry",
    )
    .await;
    assert_eq!(
        count(&client, "SELECT balance::bigint FROM account WHERE id = 1").await,
        10
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 2,
        "the first run failed and was retried"
    );

    // The same event delivered again (the relay re-sends a batch whose
    // commit was lost): the duplicate task is skipped.
    client
        .execute(
            "INSERT INTO herald.tasks (kind, payload, headers)
             SELECT 'sub:ledger', jsonb_build_object('id', event_id, 'topic', 'payment.captured',
                    'key', NULL, 'payload', '{\"amount\": 10, \"currency\": \"EUR\"}'::jsonb,
                    'headers', '{}'::jsonb, 'created_at', now()), '{}'
             FROM herald.processed_events",
            &[],
        )
        .await
        .unwrap();
    eventually(
        &client,
        "SELECT count(*) FROM herald.tasks",
        0,
        "the duplicate ran",
    )
    .await;
    assert_eq!(skipped.load(Ordering::SeqCst), 1);
    assert_eq!(
        count(&client, "SELECT balance::bigint FROM account WHERE id = 1").await,
        10
    );
    relay.stop().await;
    token.cancel();
    worker.await.unwrap().unwrap();
}
