//! The outbox trigger notifies only while a relay sleeps (it holds the wake
//! lock); a draining relay sweeps before it sleeps. These tests run relays
//! whose safety sweep (`poll_interval`) is an hour away, so an event whose
//! producer neither notified nor was swept would never arrive in time.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::TestDb;
use futures_util::future::poll_fn;
use herald::relay::{CHANNEL, WAKE_LOCK};
use herald::Event;
use serde_json::json;
use tokio_postgres::AsyncMessage;

const NEVER: Duration = Duration::from_secs(3600);
const PROMPT: Duration = Duration::from_secs(2);

async fn db_without_safety_sweep() -> TestDb {
    TestDb::with(|c| c.relay.poll_interval = NEVER).await
}

/// A LISTEN session on `channel` whose notifications are counted.
async fn listener(
    db: &TestDb,
    channel: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let pg: tokio_postgres::Config = db.config.database_url.parse().unwrap();
    let (client, mut connection) = pg.connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(_) = message {
                let _ = tx.send(());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    (client, rx)
}

async fn publish(client: &(impl tokio_postgres::GenericClient + Sync), seq: i64) {
    herald::publish(
        client,
        &Event::new("test.wake", &json!({"seq": seq})).unwrap(),
    )
    .await
    .unwrap();
}

/// How many notifications arrive within `within`.
async fn notifications(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    let mut n = 0;
    while let Ok(Some(())) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        rx.recv(),
    )
    .await
    {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn producers_notify_only_while_a_relay_holds_the_wake_lock() {
    let db = TestDb::new().await;
    let (_listen, mut rx) = listener(&db, CHANNEL).await;
    let producer = db.client().await;

    // Nobody sleeps: the commit holds the lock shared and sends nothing.
    publish(&producer, 1).await;
    assert_eq!(notifications(&mut rx, Duration::from_millis(300)).await, 0);

    // Inside the transaction the lock is held shared until the end.
    producer.batch_execute("BEGIN").await.unwrap();
    publish(&producer, 2).await;
    let shared: i64 = producer
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
               AND mode = 'ShareLock' AND classid::bigint = $1 AND objid::bigint = $2",
            &[&i64::from(WAKE_LOCK.0), &i64::from(WAKE_LOCK.1)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shared, 1, "the producer holds the wake lock shared");
    producer.batch_execute("COMMIT").await.unwrap();
    assert_eq!(notifications(&mut rx, Duration::from_millis(300)).await, 0);

    // A session holding the lock as a sleeping relay does: every commit
    // notifies, and a rolled-back one does not.
    let sleeper = db.client().await;
    sleeper
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&WAKE_LOCK.0, &WAKE_LOCK.1],
        )
        .await
        .unwrap();
    publish(&producer, 3).await;
    publish(&producer, 4).await;
    producer.batch_execute("BEGIN").await.unwrap();
    publish(&producer, 5).await;
    producer.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(notifications(&mut rx, Duration::from_millis(500)).await, 2);

    // The relay's exclusive request waits for a producer holding it shared.
    sleeper
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&WAKE_LOCK.0, &WAKE_LOCK.1],
        )
        .await
        .unwrap();
    producer.batch_execute("BEGIN").await.unwrap();
    publish(&producer, 6).await;
    let got: bool = sleeper
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&WAKE_LOCK.0, &WAKE_LOCK.1],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !got,
        "an open producer transaction keeps the relay from sleeping"
    );
    producer.batch_execute("COMMIT").await.unwrap();
    let got: bool = sleeper
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&WAKE_LOCK.0, &WAKE_LOCK.1],
        )
        .await
        .unwrap()
        .get(0);
    assert!(got, "its commit lets the relay sleep");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_arrives_promptly_as_the_relay_goes_to_sleep_and_wakes() {
    const PRODUCERS: i64 = 4;
    const PER_PRODUCER: i64 = 300;
    let db = db_without_safety_sweep().await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    // Irregular gaps (0 to 3 ms) put commits at every point of the relay's
    // drain → sleep → wake cycle.
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let config = db.config.clone();
        producers.spawn(async move {
            let client = herald::db::connect(&config, "herald-test").await.unwrap();
            for i in 0..PER_PRODUCER {
                publish(&client, p * PER_PRODUCER + i).await;
                let gap = (i * 7 + p * 13) % 4;
                tokio::time::sleep(Duration::from_millis(gap as u64)).await;
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    let total = (PRODUCERS * PER_PRODUCER) as usize;
    assert!(
        collector.distinct(total, PROMPT).await,
        "all {total} events arrive within {PROMPT:?} of the last commit, got {}",
        collector.distinct_ids()
    );
    let sleeps = relay.stats.sleeps.load(Ordering::Relaxed);
    assert!(sleeps > 0, "the relay slept between bursts");

    // One more event once the relay has gone to sleep: it is woken.
    let asleep = || relay.stats.asleep.load(Ordering::Relaxed);
    assert!(
        common::until(PROMPT, asleep).await,
        "the relay goes to sleep after the bursts"
    );
    publish(&db.client().await, -1).await;
    assert!(
        collector.distinct(total + 1, PROMPT).await,
        "the event after the quiet spell arrives"
    );
    relay.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM herald.outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_producer_transaction_holds_back_only_its_own_event() {
    let db = db_without_safety_sweep().await;
    let mut collector = db.collector().await;
    // The open transaction holds the wake lock shared from before the relay
    // starts, so the relay cannot take it to sleep.
    let mut open = db.client().await;
    let tx = open.transaction().await.unwrap();
    publish(&tx, 0).await;
    let relay = db.relay();
    let other = db.client().await;
    for seq in 1..=3 {
        // Spaced commits: time in which the relay would go to sleep if it could.
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish(&other, seq).await;
        assert!(
            collector.distinct(seq as usize, PROMPT).await,
            "event {seq} arrives while another producer's transaction is open"
        );
    }
    // Quiet: no notification is pending when the transaction commits, so
    // only the relay's sweep after it took the lock can find the event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    assert!(
        collector.distinct(4, PROMPT).await,
        "the long transaction's event arrives once it commits"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_relay_takes_over_the_wake_lock_when_the_sleeper_stops() {
    let db = db_without_safety_sweep().await;
    let mut collector = db.collector().await;
    let relays = [db.relay(), db.relay()];
    let producer = db.client().await;
    for seq in 0..20 {
        publish(&producer, seq).await;
        // Paced, so that the relays drain, sleep and are woken in between.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        collector.distinct(20, PROMPT).await,
        "both relays running: all arrive"
    );
    // Whichever relay sleeps with the lock, stop it; the other must take the
    // lock over (it checks every second) and be woken from then on.
    let asleep = |r: &common::RelayTask| r.stats.asleep.load(Ordering::Relaxed);
    assert!(
        common::until(PROMPT, || relays.iter().any(asleep)).await,
        "a relay goes to sleep"
    );
    let holder: i32 = producer
        .query_one(
            "SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND mode = 'ExclusiveLock' AND classid::bigint = $1 AND objid::bigint = $2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&i64::from(WAKE_LOCK.0), &i64::from(WAKE_LOCK.1)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder, 1, "one relay sleeps with the wake lock");
    let [a, b] = relays;
    let (sleeper, other) = if asleep(&a) { (a, b) } else { (b, a) };
    assert!(
        asleep(&sleeper) && !asleep(&other),
        "exactly one relay holds it"
    );
    sleeper.stop().await;
    assert!(
        common::until(Duration::from_secs(5), || asleep(&other)).await,
        "the remaining relay takes the wake lock over"
    );
    for seq in 20..30 {
        publish(&producer, seq).await;
        // Paced, as above.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        collector.distinct(30, PROMPT).await,
        "with one relay left, events still arrive promptly, got {}",
        collector.distinct_ids()
    );
    assert!(
        asleep(&other),
        "the remaining relay took the wake lock over"
    );
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_wake_lock_session_is_replaced_and_nothing_waits() {
    let db = db_without_safety_sweep().await;
    let mut collector = db.collector().await;
    let relay = db.relay();
    let producer = db.client().await;
    publish(&producer, 0).await;
    assert!(collector.distinct(1, PROMPT).await);
    let asleep = || relay.stats.asleep.load(Ordering::Relaxed);
    assert!(
        common::until(PROMPT, asleep).await,
        "the relay goes to sleep"
    );
    // The lock goes with its session: producers stop notifying at once.
    let killed: i64 = producer
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = current_database() AND application_name = $1) t",
            &[&herald::relay::WAKE_LOCK_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    publish(&producer, 1).await;
    assert!(
        collector.distinct(2, PROMPT).await,
        "the event committed as the lock was lost arrives (the relay reconnects and sweeps)"
    );
    let slept_again = || asleep() || relay.stats.sleeps.load(Ordering::Relaxed) >= 2;
    assert!(
        common::until(PROMPT, slept_again).await,
        "the relay sleeps again on its new session"
    );
    for seq in 2..5 {
        publish(&producer, seq).await;
        assert!(
            collector.distinct(seq as usize + 1, PROMPT).await,
            "event {seq} after the reconnect arrives"
        );
    }
    assert!(asleep() || relay.stats.sleeps.load(Ordering::Relaxed) >= 2);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_batches_wake_workers_only_when_they_fan_tasks_out() {
    let db = TestDb::new().await;
    let mut collector = db.collector().await;
    let (_listen, mut rx) = listener(&db, "herald_tasks").await;
    let relay = db.relay();
    let producer = db.client().await;
    for seq in 0..20 {
        publish(&producer, seq).await;
    }
    assert!(collector.distinct(20, PROMPT).await);
    assert_eq!(
        notifications(&mut rx, Duration::from_millis(300)).await,
        0,
        "batches and sweeps without subscriptions notify no worker"
    );
    herald::subscriptions::upsert(
        &producer,
        &herald::subscriptions::Subscription::new("audit", "test.*"),
        "api",
    )
    .await
    .unwrap();
    publish(&producer, 20).await;
    assert!(collector.distinct(21, PROMPT).await);
    assert!(
        notifications(&mut rx, Duration::from_millis(500)).await >= 1,
        "a batch that fanned a task out wakes the workers"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks").await,
        1,
        "one task for the one subscription"
    );
    // Task producers notify while a worker sleeps (holds the tasks' wake
    // lock), and only then.
    herald::enqueue(&producer, &herald::Task::new("test.k", &json!({})).unwrap())
        .await
        .unwrap();
    assert_eq!(notifications(&mut rx, Duration::from_millis(300)).await, 0);
    let sleeper = db.client().await;
    let key = herald::worker::WAKE_LOCK;
    sleeper
        .execute("SELECT pg_advisory_lock($1, $2)", &[&key.0, &key.1])
        .await
        .unwrap();
    herald::enqueue(&producer, &herald::Task::new("test.k", &json!({})).unwrap())
        .await
        .unwrap();
    assert_eq!(notifications(&mut rx, Duration::from_millis(300)).await, 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_task_starts_promptly_as_the_worker_goes_to_sleep_and_wakes() {
    const PRODUCERS: i64 = 4;
    const PER_PRODUCER: i64 = 200;
    let db = TestDb::with(|c| c.worker.poll_interval = NEVER).await;
    let ran = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let mut registry = herald::worker::Registry::new();
    let seen = ran.clone();
    registry.register("test.wake", move |_ctx, p: serde_json::Value| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().insert(p["seq"].as_i64().unwrap_or(-1));
            Ok(())
        }
    });
    let worker = herald::worker::Worker::new(&db.config, db.pool(), registry);
    let stats = worker.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    // One producer transaction stays open from before the worker is idle:
    // it holds the lock shared, so only the sweep after its commit finds it.
    let mut open = db.client().await;
    let tx = open.transaction().await.unwrap();
    herald::enqueue(
        &tx,
        &herald::Task::new("test.wake", &json!({"seq": -1})).unwrap(),
    )
    .await
    .unwrap();
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let config = db.config.clone();
        producers.spawn(async move {
            let client = herald::db::connect(&config, "herald-test").await.unwrap();
            for i in 0..PER_PRODUCER {
                let seq = p * PER_PRODUCER + i;
                herald::enqueue(
                    &client,
                    &herald::Task::new("test.wake", &json!({"seq": seq})).unwrap(),
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(((i * 7 + p * 13) % 4) as u64)).await;
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    let total = (PRODUCERS * PER_PRODUCER) as usize;
    let deadline = Instant::now() + PROMPT;
    while ran.lock().unwrap().len() < total {
        assert!(
            Instant::now() < deadline,
            "all {total} tasks start within {PROMPT:?} of the last commit, got {}",
            ran.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Quiet, as in the relay's test: no notification is pending when the
    // transaction commits, so only the worker's sweep can find its task.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    let deadline = Instant::now() + PROMPT;
    while !ran.lock().unwrap().contains(&-1) {
        assert!(
            Instant::now() < deadline,
            "the long transaction's task runs once it commits"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stats.sleeps.load(Ordering::Relaxed) > 0);
    stop.cancel();
    handle.await.unwrap().unwrap();
}

/// `herald run` opens one LISTEN session for its relay, workers and
/// scheduler (the notifier); killed, it is reopened and both events and
/// tasks still get through promptly (safety sweeps an hour away).
#[tokio::test(flavor = "multi_thread")]
async fn herald_run_listens_on_one_session_that_survives_termination() {
    let db = db_without_safety_sweep().await;
    let mut collector = db.collector().await;
    let client = db.client().await;
    let child = common::HeraldProcess::command(
        &db.config,
        &["run"],
        &[
            ("HERALD_ADMIN_ENABLED", "false"),
            ("HERALD_RELAY_POLL_INTERVAL", "1h"),
            ("HERALD_WORKER_POLL_INTERVAL", "1h"),
        ],
    );
    let notifier_sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = '{}'",
        herald::notifier::APPLICATION_NAME
    );
    let listen_sessions = "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'";
    let (c, n, l) = (&client, notifier_sessions.as_str(), listen_sessions);
    // The notifier's last statement is the LISTEN on its last channel.
    common::wait_for(
        "the notifier's session",
        Duration::from_secs(20),
        || async move { common::scalar(c, n).await == 1 && common::scalar(c, l).await == 1 },
    )
    .await;
    let per_service = "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name IN \
         ('herald-relay-listen', 'herald-worker-listen', 'herald-scheduler-listen')";
    assert_eq!(common::scalar(&client, per_service).await, 0);

    let mut seq = 0;
    for round in 0..2 {
        // Both paths go through the one session: an event is relayed and a
        // task runs, each well before any safety sweep.
        publish(&client, seq).await;
        seq += 1;
        assert!(
            collector
                .distinct(seq as usize, Duration::from_secs(5))
                .await,
            "round {round}: the event arrives promptly"
        );
        herald::enqueue(
            &client,
            &herald::Task::new("herald.noop", &json!({"round": round})).unwrap(),
        )
        .await
        .unwrap();
        // A succeeded task is deleted (no `retain_completed`).
        let pending =
            format!("SELECT count(*) FROM herald.tasks WHERE payload->>'round' = '{round}'");
        let (c, p) = (&client, pending.as_str());
        common::wait_for("the task to run", Duration::from_secs(5), || async move {
            common::scalar(c, p).await == 0
        })
        .await;
        if round == 0 {
            let killed = common::scalar(
                &client,
                &format!(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = '{}') t",
                    herald::notifier::APPLICATION_NAME
                ),
            )
            .await;
            assert_eq!(killed, 1);
            let (c, n) = (&client, notifier_sessions.as_str());
            common::wait_for("the notifier to reconnect", Duration::from_secs(10), || async move {
                common::scalar(c, n).await == 1 && common::scalar(c, l).await == 1
            })
            .await;
        }
    }
    let dead = common::scalar(&client, "SELECT count(*) FROM herald.dead_letters").await;
    assert_eq!(dead, 0, "both tasks succeeded");
    child.terminate().await;
}

/// The next signal of a notifier subscription, within 10 s.
async fn next(s: &mut herald::notifier::Subscription) -> herald::notifier::Signal {
    tokio::time::timeout(Duration::from_secs(10), s.recv())
        .await
        .expect("a signal within 10 s")
        .expect("the notifier runs")
}

/// The notifier: `Up` once LISTEN is in effect (also for a channel added
/// while connected), each notification on the subscriber's channels only,
/// `Down` when its session is lost, then `Up` again.
#[tokio::test(flavor = "multi_thread")]
async fn the_notifier_says_up_notifications_and_down_in_order() {
    use herald::notifier::{Notifier, Signal};
    let db = TestDb::new().await;
    let client = db.client().await;
    let notifier = Notifier::new(&db.config, "herald-notifier-test");
    let mut first = notifier.subscribe(&["herald_test_a"]);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(notifier.clone().run(stop.clone()));
    assert_eq!(next(&mut first).await, Signal::Up);
    assert!(notifier.connected());
    let mut second = notifier.subscribe(&["herald_test_b"]);
    assert_eq!(next(&mut second).await, Signal::Up);
    client
        .batch_execute("NOTIFY herald_test_b, 'x'; NOTIFY herald_test_a, 'y'")
        .await
        .unwrap();
    let a = Signal::Notification {
        channel: "herald_test_a".into(),
        payload: "y".into(),
    };
    let b = Signal::Notification {
        channel: "herald_test_b".into(),
        payload: "x".into(),
    };
    assert_eq!(next(&mut first).await, a);
    assert_eq!(next(&mut second).await, b);
    let killed = common::scalar(
        &client,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'herald-notifier-test') t",
    )
    .await;
    assert_eq!(killed, 1);
    for s in [&mut first, &mut second] {
        assert!(matches!(next(s).await, Signal::Down(_)));
        assert_eq!(next(s).await, Signal::Up);
    }
    client
        .batch_execute("NOTIFY herald_test_a, 'z'")
        .await
        .unwrap();
    assert_eq!(
        next(&mut first).await,
        Signal::Notification {
            channel: "herald_test_a".into(),
            payload: "z".into(),
        }
    );
    stop.cancel();
    running.await.unwrap().unwrap();
}
