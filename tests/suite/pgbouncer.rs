//! Herald behind PgBouncer (a private one per test, see
//! `common::pgbouncer`): producers through transaction pooling, many
//! clients sharing a few server connections; the relay and the worker
//! through session pooling, notifications included; and a relay or worker
//! pointed at transaction pooling, which must refuse to start.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::pgbouncer::{PgBouncer, POOL_SIZE, SESSION, TRANSACTION};
use crate::common::{self, TestDb, WorkerTask};
use futures_util::FutureExt;
use herald::{Event, Task};
use serde_json::json;

/// Producer tasks; each is its own client of PgBouncer.
const PRODUCERS: usize = 24;
// Clients really share server connections.
const _: () = assert!(POOL_SIZE < PRODUCERS);
/// Rounds per producer; each round writes through every producer API.
const ROUNDS: usize = 6;

/// What one round of one producer writes, by API.
#[derive(Default)]
struct Expected {
    events: usize,
    tasks: usize,
}

/// A session-pooled alias needs a server connection per Herald session
/// (pools, LISTEN, wake locks): the tests give it room.
fn session_room(config: &mut herald::Config) {
    config.postgres.pool_size = 4;
}

/// One round of writes by producer `p` through `client` (a PgBouncer
/// client of the transaction alias), every write marked `{p, r, n}`; the
/// error of each API that failed, by name.
async fn one_round(
    client: &mut tokio_postgres::Client,
    publisher: &herald::events::Publisher,
    p: usize,
    r: usize,
    errors: &Mutex<BTreeMap<&'static str, String>>,
    expected: &Mutex<Expected>,
) {
    let mark = |n: usize| json!({"p": p, "r": r, "n": n});
    let fail = |api: &'static str, e: String| {
        errors.lock().unwrap().entry(api).or_insert(e);
    };
    let event = |n: usize| Event::new("bouncer.test", &mark(n)).unwrap();
    let task = |n: usize| Task::new("bouncer.test", &mark(n)).unwrap();
    let (mut events, mut tasks) = (0, 0);

    match herald::publish(&*client, &event(0)).await {
        Ok(_) => events += 1,
        Err(e) => fail("herald::publish", e.to_string()),
    }
    let in_tx = async {
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        herald::publish(&tx, &event(1))
            .await
            .map_err(|e| e.to_string())?;
        herald::enqueue(&tx, &task(1))
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())
    };
    match in_tx.await {
        Ok(()) => (events, tasks) = (events + 1, tasks + 1),
        Err(e) => fail("publish + enqueue in a transaction", e),
    }
    let batch: Vec<Event> = (2..7).map(event).collect();
    match herald::publish_batch(&*client, &batch).await {
        Ok(_) => events += batch.len(),
        Err(e) => fail("herald::publish_batch", e.to_string()),
    }
    match publisher.publish(&*client, &event(7)).await {
        Ok(_) => events += 1,
        Err(e) => fail("Publisher::publish", e.to_string()),
    }
    match herald::enqueue(&*client, &task(8)).await {
        Ok(_) => tasks += 1,
        Err(e) => fail("herald::enqueue", e.to_string()),
    }
    let small: Vec<Task> = (9..12).map(task).collect();
    match herald::enqueue_batch(&*client, &small).await {
        Ok(_) => tasks += small.len(),
        Err(e) => fail("herald::enqueue_batch (small)", e.to_string()),
    }
    // 64 plain tasks take the COPY path.
    let large: Vec<Task> = (100..164).map(task).collect();
    match herald::enqueue_batch(&*client, &large).await {
        Ok(_) => tasks += large.len(),
        Err(e) => fail("herald::enqueue_batch (COPY)", e.to_string()),
    }
    // A unique key held already: its holder's id is looked up.
    let key = format!("held-{p}-{r}");
    let holder = herald::enqueue(&*client, &task(12).unique_key(key.clone())).await;
    let again = herald::enqueue_batch(&*client, &[task(13).unique_key(key)]).await;
    match (holder, again) {
        (Ok(id), Ok(ids)) if ids == [id] => tasks += 1,
        (Ok(id), Ok(ids)) => fail("unique key held", format!("{id} then {ids:?}")),
        (Err(e), _) | (_, Err(e)) => fail("herald::enqueue_batch (unique key held)", e.to_string()),
    }
    // Cancelling a task that waits (it never runs).
    let later = task(18).delay(Duration::from_secs(3600));
    let cancelled = async {
        let id = herald::enqueue(&*client, &later).await?;
        herald::queue::cancel(&*client, id).await
    };
    match cancelled.await {
        Ok(Some(outcome)) if outcome == "cancelled" => {}
        Ok(outcome) => fail("herald::queue::cancel", format!("{outcome:?}")),
        Err(e) => fail("herald::queue::cancel", e.to_string()),
    }
    // SQL, as any driver sends it: the simple protocol and an unnamed
    // statement of the extended one.
    let sql = format!(
        "SELECT herald.publish('bouncer.test', '{}'::jsonb); \
         SELECT herald.enqueue('bouncer.test', '{}'::jsonb)",
        mark(14),
        mark(15)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => (events, tasks) = (events + 1, tasks + 1),
        Err(e) => fail("SQL (simple protocol)", e.to_string()),
    }
    let typed = async {
        use tokio_postgres::types::Type;
        let e = mark(16).to_string();
        let t = mark(17).to_string();
        client
            .query_typed(
                "SELECT herald.publish('bouncer.test', $1::text::jsonb)",
                &[(&e, Type::TEXT)],
            )
            .await?;
        client
            .query_typed(
                "SELECT herald.enqueue('bouncer.test', $1::text::jsonb)",
                &[(&t, Type::TEXT)],
            )
            .await
    };
    match typed.await {
        Ok(_) => (events, tasks) = (events + 1, tasks + 1),
        Err(e) => fail("SQL (unnamed statements)", e.to_string()),
    }
    let mut expected = expected.lock().unwrap();
    expected.events += events;
    expected.tasks += tasks;
}

/// Every producer API through transaction pooling, `PRODUCERS` clients
/// over `POOL_SIZE` server connections: every write is stored once, every
/// event is relayed once and every task runs once (relay and worker
/// through session pooling).
#[tokio::test(flavor = "multi_thread")]
async fn producers_through_transaction_pooling_store_every_write_once() {
    let db = TestDb::with(session_room).await;
    let bouncer = PgBouncer::start(&db.name);
    let tx_config = bouncer.config(&db.config, TRANSACTION);
    let session_config = bouncer.config(&db.config, SESSION);
    let mut collector = db.collector().await;
    let relay = common::RelayTask::start(&session_config);
    let ran = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let mut registry = herald::Registry::new();
    let seen = ran.clone();
    registry.register("bouncer.test", move |_ctx, p: serde_json::Value| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(p);
            Ok(())
        }
    });
    let worker = WorkerTask::start(&session_config, registry);

    let errors = Arc::new(Mutex::new(BTreeMap::new()));
    let expected = Arc::new(Mutex::new(Expected::default()));
    let publisher = herald::events::Publisher::new(&tx_config, None).unwrap();
    let pool = herald::db::pool(&tx_config, "herald-test").unwrap();
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (config, publisher) = (tx_config.clone(), publisher.clone());
        let (errors, expected) = (errors.clone(), expected.clone());
        let pool = pool.clone();
        producers.spawn(async move {
            // Half the producers hold a connection of their own, half take
            // one from a shared pool for each round.
            let mut own = match p % 2 {
                0 => Some(herald::db::connect(&config, "herald-test").await.unwrap()),
                _ => None,
            };
            for r in 0..ROUNDS {
                let mut pooled = match own {
                    Some(_) => None,
                    None => Some(pool.get().await.unwrap()),
                };
                let client: &mut tokio_postgres::Client = match (&mut own, &mut pooled) {
                    (Some(own), _) => own,
                    (None, Some(pooled)) => pooled,
                    (None, None) => unreachable!(),
                };
                let round = one_round(client, &publisher, p, r, &errors, &expected);
                // A statement run in place of another one can panic when
                // its rows are read: record it like an error.
                if let Err(panic) = AssertUnwindSafe(round).catch_unwind().await {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    errors.lock().unwrap().entry("panic").or_insert(message);
                    return;
                }
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    let produced_in = started.elapsed();
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "producer APIs failed through transaction pooling:\n{errors:#?}"
    );
    let Expected { events, tasks } = std::mem::take(&mut *expected.lock().unwrap());
    eprintln!(
        "{PRODUCERS} producers x {ROUNDS} rounds: {events} events and {tasks} tasks in {produced_in:?}"
    );

    assert!(
        collector.distinct(events, Duration::from_secs(30)).await,
        "every event is relayed: {} of {events}",
        collector.distinct_ids()
    );
    common::wait_for("every task to run", Duration::from_secs(30), async || {
        ran.lock().unwrap().len() >= tasks
    })
    .await;
    collector.drain_for(Duration::from_millis(300)).await;
    let marks: HashSet<String> = collector
        .events
        .iter()
        .map(|e| e.payload.to_string())
        .collect();
    assert_eq!(collector.events.len(), events, "no event relayed twice");
    assert_eq!(marks.len(), events, "every event stored once");
    let ran = ran.lock().unwrap().clone();
    let ran_marks: HashSet<String> = ran.iter().map(|p| p.to_string()).collect();
    assert_eq!(ran.len(), tasks, "no task ran twice");
    assert_eq!(ran_marks.len(), tasks, "every task stored once");
    relay.stop().await;
    worker.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

const NEVER: Duration = Duration::from_secs(3600);
const PROMPT: Duration = Duration::from_secs(2);

/// The relay and the worker through session pooling, their safety sweeps an
/// hour away: events and tasks written through transaction pooling after
/// they went to sleep are picked up promptly, so the NOTIFY of each commit
/// reached their LISTEN session; nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn relay_and_worker_through_session_pooling_are_woken_by_notifications() {
    let db = TestDb::with(|c| {
        session_room(c);
        c.relay.poll_interval = NEVER;
        c.worker.poll_interval = NEVER;
    })
    .await;
    let bouncer = PgBouncer::start(&db.name);
    let session_config = bouncer.config(&db.config, SESSION);
    let producer = herald::db::connect(&bouncer.config(&db.config, TRANSACTION), "herald-test")
        .await
        .unwrap();
    let mut collector = db.collector().await;
    let relay = common::RelayTask::start(&session_config);
    let ran = Arc::new(Mutex::new(HashSet::new()));
    let mut registry = herald::Registry::new();
    let seen = ran.clone();
    registry.register("bouncer.wake", move |_ctx, p: serde_json::Value| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().insert(p["seq"].as_i64().unwrap_or(-1));
            Ok(())
        }
    });
    let worker = WorkerTask::start(&session_config, registry);
    let asleep = || {
        relay
            .stats
            .asleep
            .load(std::sync::atomic::Ordering::Relaxed)
            && worker
                .stats
                .asleep
                .load(std::sync::atomic::Ordering::Relaxed)
    };
    const ROUNDS: i64 = 20;
    let (mut event_waits, mut task_waits) = (Vec::new(), Vec::new());
    for seq in 0..ROUNDS {
        assert!(
            common::until(PROMPT, asleep).await,
            "round {seq}: the relay and the worker go to sleep"
        );
        let started = Instant::now();
        herald::publish(
            &producer,
            &Event::new("bouncer.wake", &json!({"seq": seq})).unwrap(),
        )
        .await
        .unwrap();
        herald::enqueue(
            &producer,
            &Task::new("bouncer.wake", &json!({"seq": seq})).unwrap(),
        )
        .await
        .unwrap();
        assert!(
            collector.distinct(seq as usize + 1, PROMPT).await,
            "round {seq}: the event arrives within {PROMPT:?}"
        );
        event_waits.push(started.elapsed());
        let ran = ran.clone();
        common::wait_for("the task to run", PROMPT, async || {
            ran.lock().unwrap().contains(&seq)
        })
        .await;
        task_waits.push(started.elapsed());
    }
    event_waits.sort();
    task_waits.sort();
    eprintln!(
        "through session pooling, from the producer's call: event median {:?} max {:?}; task median {:?} max {:?}",
        event_waits[event_waits.len() / 2],
        event_waits.last().unwrap(),
        task_waits[task_waits.len() / 2],
        task_waits.last().unwrap()
    );
    relay.stop().await;
    worker.stop().await;
    assert_eq!(collector.distinct_ids(), ROUNDS as usize);
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
    assert_eq!(ran.lock().unwrap().len(), ROUNDS as usize);
}

/// The message a relay or worker pointed at transaction pooling fails with.
fn assert_names_the_fix(message: &str) {
    for part in [
        "database_url (DATABASE_URL)",
        "notifications do not reach this session",
        "transaction",
        "session pooling",
    ] {
        assert!(message.contains(part), "{part:?} in: {message}");
    }
}

/// A relay (in-process and `herald relay`), `herald worker`, `herald
/// scheduler`, `herald admin` and `herald run` pointed at transaction
/// pooling refuse to start, naming
/// `database_url` and what to do; the events already written stay in the
/// outbox.
#[tokio::test(flavor = "multi_thread")]
async fn relay_and_worker_refuse_transaction_pooling() {
    let db = TestDb::with(|c| c.postgres.connect_timeout = Duration::from_secs(1)).await;
    let bouncer = PgBouncer::start(&db.name);
    let tx_config = bouncer.config(&db.config, TRANSACTION);
    common::insert_events(&db.config, 4, 5).await;

    let started = Instant::now();
    let relay = herald::Relay::new(
        &tx_config,
        herald::db::pool(&tx_config, "herald-relay").unwrap(),
        herald::pubsub::redis_pool(&tx_config).unwrap(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let outcome = tokio::time::timeout(Duration::from_secs(20), relay.run(stop.clone()))
        .await
        .expect("the relay stops by itself");
    let error = outcome.expect_err("the relay refuses to start").to_string();
    eprintln!("in-process relay failed after {:?}", started.elapsed());
    assert_names_the_fix(&error);

    let bind = format!("127.0.0.1:{}", common::free_port());
    for args in [
        &["relay"][..],
        &["worker"],
        &["scheduler"],
        &["admin"],
        &["run"],
    ] {
        let mut cmd = common::herald_command(
            &tx_config,
            args,
            &[
                ("HERALD_POSTGRES_CONNECT_TIMEOUT", "1s"),
                ("HERALD_ADMIN_BIND", &bind),
            ],
        );
        let started = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .output(),
        )
        .await
        .expect("herald exits by itself")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "herald {args:?} fails: {stderr}");
        eprintln!("herald {args:?} failed after {:?}", started.elapsed());
        assert_names_the_fix(&stderr);
    }
    assert_eq!(
        db.count("SELECT count(*) FROM herald.outbox").await,
        20,
        "every event is still in the outbox"
    );

    // postgres.listen_check = "warn": the notifier goes on (its subscribers
    // hear `Up`) and does not give up.
    let mut warn = tx_config.clone();
    warn.postgres.listen_check = herald::config::ListenCheck::Warn;
    let notifier = herald::notifier::Notifier::new(&warn, "herald-test-listen");
    let mut subscription = notifier.subscribe(&["bouncer_test"]);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(notifier.clone().run(stop.clone()));
    let up = tokio::time::timeout(Duration::from_secs(10), subscription.recv()).await;
    assert_eq!(
        up.expect("a signal within 10 s"),
        Some(herald::notifier::Signal::Up)
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), notifier.failed())
            .await
            .is_err(),
        "with listen_check = warn the notifier does not give up"
    );
    assert!(herald::notifier::check(&warn).await.is_ok());
    stop.cancel();
    running.await.unwrap().unwrap();
}

/// A PgBouncer that was not told to ignore `options` refuses Herald's
/// connections: the error says what to add to pgbouncer.ini.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_options_parameter_names_the_pgbouncer_setting() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start_with(&db.name, |ini| {
        ini.replace("ignore_startup_parameters = options\n", "")
    });
    for alias in [SESSION, TRANSACTION] {
        let config = bouncer.config(&db.config, alias);
        for args in [&["migrate"][..], &["relay"]] {
            let stderr = common::herald_fails(&config, args).await;
            assert!(
                stderr.contains("ignore_startup_parameters = options"),
                "herald {args:?} through {alias}: {stderr}"
            );
        }
    }
}

/// PgBouncer ignores Herald's startup `options` (`-c TimeZone=UTC`): on a
/// database whose sessions start in another time zone, Herald's connections
/// still run in UTC through both pool modes, however server connections are
/// shared, and the relay renders `created_at` in UTC.
#[tokio::test(flavor = "multi_thread")]
async fn connections_run_in_utc_through_pgbouncer() {
    use futures_util::StreamExt;
    let db = TestDb::with(session_room).await;
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET TimeZone = 'America/New_York'",
            db.name
        ))
        .await
        .unwrap();
    let bouncer = PgBouncer::start(&db.name);
    let tx_config = bouncer.config(&db.config, TRANSACTION);
    let session_config = bouncer.config(&db.config, SESSION);
    let zone = async |client: &tokio_postgres::Client| -> String {
        let rows = client.simple_query("SHOW TimeZone").await.unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    // Without Herald's SET, a session starts in the database's zone.
    let (plain, connection) =
        tokio_postgres::connect(&bouncer.url(TRANSACTION), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    assert_eq!(zone(&plain).await, "America/New_York");

    for config in [&tx_config, &session_config] {
        let pool = herald::db::pool(config, "herald-test").unwrap();
        let mut clients = tokio::task::JoinSet::new();
        for n in 0..12 {
            let (pool, config) = (pool.clone(), config.clone());
            clients.spawn(async move {
                let mut zones = Vec::new();
                let own = herald::db::connect(&config, "herald-test").await.unwrap();
                for _ in 0..10 {
                    let client = pool.get().await.unwrap();
                    zones.push(zone(&client).await);
                    zones.push(zone(&own).await);
                    // Other clients' sessions start in New York.
                    if n % 3 == 0 {
                        let (plain, connection) =
                            tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls)
                                .await
                                .unwrap();
                        tokio::spawn(connection);
                        let _ = zone(&plain).await;
                    }
                }
                zones
            });
        }
        while let Some(zones) = clients.join_next().await {
            for z in zones.unwrap() {
                assert_eq!(z, "UTC", "through {}", config.database_url);
            }
        }
    }

    // The envelope as the relay (through session pooling) publishes it.
    let client = redis::Client::open(db.config.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .psubscribe(format!("{}*", db.config.channel_prefix))
        .await
        .unwrap();
    let relay = common::RelayTask::start(&session_config);
    let producer = herald::db::connect(&tx_config, "herald-test")
        .await
        .unwrap();
    herald::publish(&producer, &Event::new("bouncer.zone", &json!({})).unwrap())
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), pubsub.on_message().next())
        .await
        .expect("the event arrives")
        .unwrap();
    let envelope: serde_json::Value =
        serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
    let created_at = envelope["created_at"].as_str().unwrap().to_string();
    assert!(
        created_at.ends_with("+00:00") || created_at.ends_with('Z'),
        "created_at in UTC: {created_at}"
    );
    relay.stop().await;
}

/// A bulk enqueue (the COPY path) joins the caller's transaction when there
/// is one, and commits on its own on a bare client: directly and through
/// transaction pooling.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_enqueue_joins_the_callers_transaction_or_commits_alone() {
    let db = TestDb::new().await;
    let bouncer = PgBouncer::start(&db.name);
    let tasks: Vec<Task> = (0..64)
        .map(|n| Task::new("bouncer.copy", &json!({"n": n})).unwrap())
        .collect();
    let count = "SELECT count(*) FROM herald.tasks WHERE kind = 'bouncer.copy'";
    let mut want = 0;
    for config in [db.config.clone(), bouncer.config(&db.config, TRANSACTION)] {
        let mut client = herald::db::connect(&config, "herald-test").await.unwrap();
        let tx = client.transaction().await.unwrap();
        herald::enqueue_batch(&tx, &tasks).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            db.count(count).await,
            want,
            "rolled back with the caller's transaction"
        );

        let tx = client.transaction().await.unwrap();
        herald::enqueue_batch(&tx, &tasks).await.unwrap();
        assert_eq!(
            db.count(count).await,
            want,
            "not visible before the caller commits"
        );
        tx.commit().await.unwrap();
        want += 64;
        assert_eq!(db.count(count).await, want);

        herald::enqueue_batch(&client, &tasks).await.unwrap();
        want += 64;
        assert_eq!(db.count(count).await, want, "a bare client's batch commits");
    }
}
