//! Herald through a Postgres restart: a relay and a worker (one in-process
//! `Herald`, with its maintenance) on a private server while producers
//! write events and tasks without pause; the server is restarted twice
//! mid-stream, `-m fast`, then `-m immediate` (a crash: no shutdown
//! checkpoint, crash recovery on start), then `-m fast` held down for a few
//! seconds, as a failover would be. Every event and task whose commit
//! the producer saw must come out (events on Redis in per-key order, tasks
//! run and marked succeeded); duplicates are counted, and the time from the
//! server answering again to the first delivery and the first task run is
//! measured.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::{Config, Delivery, Registry};
use tokio_util::sync::CancellationToken;

use crate::common::pg_server::{PgServer, StopMode};
use crate::common::{self, wait_for};

const KEYS: usize = 4;
/// How long the last restart keeps the server down, as a failover would.
const HELD_DOWN: Duration = Duration::from_secs(5);
const DB: &str = "herald";

type Shared<T> = Arc<Mutex<Vec<T>>>;

/// What a producer saw: the writes it saw commit, and the ones whose
/// outcome it cannot know (the connection failed during the statement).
#[derive(Default)]
struct Produced<T> {
    committed: Vec<(Instant, T)>,
    uncertain: Vec<T>,
    errors: usize,
}

/// Batches of one event per key, `seq` counting up per key, on one session
/// (a new one after any error), until `stop`.
async fn produce_events(config: Config, stop: CancellationToken) -> Produced<(usize, i64)> {
    let mut out = Produced::default();
    let mut client = None;
    let mut seq = 0i64;
    while !stop.is_cancelled() {
        let Some(c) = &client else {
            match herald::db::connect(&config, "failover-events").await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    out.errors += 1;
                    // Retry pace while the server is down.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            continue;
        };
        let batch: Vec<_> = (0..KEYS)
            .map(|k| {
                herald::Event::new("test.order", &serde_json::json!({ "seq": seq }))
                    .unwrap()
                    .key(format!("key-{k}"))
            })
            .collect();
        let written = (0..KEYS).map(|k| (k, seq));
        match herald::publish_batch(c, &batch).await {
            Ok(_) => {
                let now = Instant::now();
                out.committed.extend(written.map(|w| (now, w)));
            }
            Err(_) => {
                out.errors += 1;
                out.uncertain.extend(written);
                client = None;
            }
        }
        // A number is never reused, so a write of unknown outcome cannot
        // blur the order of the next.
        seq += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// One task at a time until `stop`.
async fn produce_tasks(config: Config, stop: CancellationToken) -> Produced<i64> {
    let mut out = Produced::default();
    let mut client = None;
    let mut n = 0;
    while !stop.is_cancelled() {
        let Some(c) = &client else {
            match herald::db::connect(&config, "failover-tasks").await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    out.errors += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            continue;
        };
        let task = herald::Task::new("failover.job", &serde_json::json!({ "n": n })).unwrap();
        n += 1;
        match herald::enqueue(c, &task).await {
            Ok(id) => out.committed.push((Instant::now(), id)),
            Err(_) => {
                out.errors += 1;
                client = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

/// What one restart cost.
struct Outage {
    mode: StopMode,
    /// From `pg_ctl stop` until the server accepts connections again.
    down: Duration,
    /// From the server accepting again to the first event on Redis.
    first_delivery: Duration,
    /// From the server accepting again to the first task run.
    first_run: Duration,
    /// From the server accepting again to the producer's first commit.
    first_commit: Duration,
}

fn first_after<T>(items: &[(Instant, T)], after: Instant) -> Option<Duration> {
    items
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t > after)
        .min()
        .map(|t| t - after)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarts_mid_stream_lose_nothing_committed() {
    common::init_tracing();
    let mut server = PgServer::start();
    server.create_database(DB).await;
    let mut config = Config {
        database_url: server.url(DB),
        redis_url: common::redis_url(),
        channel_prefix: format!("herald:failover:{}:", uuid::Uuid::now_v7().simple()),
        ..Config::default()
    };
    config.postgres.pool_size = 4;
    config.postgres.connect_timeout = Duration::from_secs(2);
    // Succeeded rows stay, so that "every committed task succeeded" can be read.
    config.worker.retain_completed = Some(Duration::from_secs(3600));
    herald::migrate::migrate(&config).await.unwrap();

    // Deliveries as they arrive, with their time.
    let arrivals: Shared<(Instant, (usize, i64))> = Arc::default();
    let mut sub = herald::Subscriber::from_config(&config)
        .unwrap()
        .pattern("*");
    sub.connect().await.unwrap();
    let seen = arrivals.clone();
    tokio::spawn(async move {
        while let Ok(d) = sub.next().await {
            if let Delivery::Event { envelope, .. } = d {
                let key: usize = envelope.key.as_deref().unwrap()["key-".len()..]
                    .parse()
                    .unwrap();
                let seq = envelope.payload["seq"].as_i64().unwrap();
                seen.lock().unwrap().push((Instant::now(), (key, seq)));
            }
        }
    });
    let runs: Shared<(Instant, i64)> = Arc::default();
    let mut registry = Registry::new();
    let ran = runs.clone();
    registry.register(
        "failover.job",
        move |ctx: herald::TaskContext, _: serde_json::Value| {
            let ran = ran.clone();
            async move {
                ran.lock().unwrap().push((Instant::now(), ctx.id));
                Ok(())
            }
        },
    );
    let shutdown = CancellationToken::new();
    let herald = herald::Herald::builder(&config)
        .relay(true)
        .workers(registry)
        .start(shutdown.clone())
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let events = tokio::spawn(produce_events(config.clone(), stop.clone()));
    let tasks = tokio::spawn(produce_tasks(config.clone(), stop.clone()));
    let steady = async |since: Instant| {
        wait_for(
            "events and tasks flowing",
            Duration::from_secs(60),
            async || {
                let events = arrivals.lock().unwrap();
                let runs = runs.lock().unwrap();
                events.iter().filter(|(t, _)| *t > since).count() >= 200
                    && runs.iter().filter(|(t, _)| *t > since).count() >= 50
            },
        )
        .await
    };
    steady(Instant::now()).await;

    // Producer commits are only known once the producers return; the time
    // of the first one after each restart is read from them at the end.
    let mut outages = Vec::new();
    for (mode, held) in [
        (StopMode::Fast, Duration::ZERO),
        (StopMode::Immediate, Duration::ZERO),
        (StopMode::Fast, HELD_DOWN),
    ] {
        let down = Instant::now();
        let (back, up) = tokio::task::spawn_blocking(move || {
            server.stop(mode);
            // The outage itself: reconnect backoffs grow meanwhile.
            std::thread::sleep(held);
            server.start_again();
            let up = Instant::now();
            (server, up)
        })
        .await
        .unwrap();
        server = back;
        wait_for(
            "a delivery and a task run after the restart",
            Duration::from_secs(60),
            async || {
                first_after(&arrivals.lock().unwrap(), up).is_some()
                    && first_after(&runs.lock().unwrap(), up).is_some()
            },
        )
        .await;
        outages.push((mode, down, up));
        steady(up).await;
    }
    stop.cancel();
    let events = events.await.unwrap();
    let tasks = tasks.await.unwrap();

    // Everything committed comes out.
    let committed: HashSet<(usize, i64)> = events.committed.iter().map(|(_, w)| *w).collect();
    wait_for(
        "every committed event on Redis",
        Duration::from_secs(60),
        async || {
            let got: HashSet<_> = arrivals.lock().unwrap().iter().map(|(_, w)| *w).collect();
            committed.is_subset(&got)
        },
    )
    .await;
    let task_ids: Vec<i64> = tasks.committed.iter().map(|(_, id)| *id).collect();
    let client = herald::db::connect(&config, "failover-check")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pending: Vec<(i64, String, i32, Option<String>)> = client
            .query(
                "SELECT id, state, attempts, last_error FROM herald.tasks \
                 WHERE id = ANY($1) AND state <> 'succeeded' ORDER BY id",
                &[&task_ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let missing: i64 = client
            .query_one(
                "SELECT $2::bigint - count(*) FROM herald.tasks WHERE id = ANY($1)",
                &[&task_ids, &(task_ids.len() as i64)],
            )
            .await
            .unwrap()
            .get(0);
        if pending.is_empty() && missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed tasks not succeeded after 90 s: {missing} missing, pending {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A quiet moment for late duplicates to show.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let arrivals = arrivals.lock().unwrap().clone();
    let runs = runs.lock().unwrap().clone();
    let delivered: HashSet<(usize, i64)> = arrivals.iter().map(|(_, w)| *w).collect();
    let lost_events = committed.difference(&delivered).count();
    let uncertain_delivered = events
        .uncertain
        .iter()
        .filter(|w| delivered.contains(w))
        .count();
    let event_duplicates = arrivals.len() - delivered.len();
    // Per key, first deliveries come in the order the producer wrote.
    let mut firsts: HashMap<usize, Vec<i64>> = HashMap::new();
    let mut once = HashSet::new();
    for (_, (key, seq)) in &arrivals {
        if once.insert((*key, *seq)) {
            firsts.entry(*key).or_default().push(*seq);
        }
    }
    let out_of_order: usize = firsts
        .values()
        .map(|seqs| seqs.windows(2).filter(|w| w[0] >= w[1]).count())
        .sum();
    let ran: HashSet<i64> = runs.iter().map(|(_, id)| *id).collect();
    let lost_tasks = task_ids.iter().filter(|id| !ran.contains(id)).count();
    let task_duplicates = runs.len() - ran.len();

    let outages: Vec<Outage> = outages
        .into_iter()
        .map(|(mode, down, up)| Outage {
            mode,
            down: up - down,
            first_delivery: first_after(&arrivals, up).unwrap(),
            first_run: first_after(&runs, up).unwrap(),
            first_commit: first_after(&events.committed, up).unwrap_or_default(),
        })
        .collect();
    eprintln!(
        "failover: {} events committed ({} uncertain, {} of them delivered), {} deliveries, \
         {} duplicates, {} lost, {} out of order; {} tasks committed, {} runs, {} duplicate \
         runs, {} lost; producer errors: {} (events), {} (tasks)",
        committed.len(),
        events.uncertain.len(),
        uncertain_delivered,
        arrivals.len(),
        event_duplicates,
        lost_events,
        out_of_order,
        task_ids.len(),
        runs.len(),
        task_duplicates,
        lost_tasks,
        events.errors,
        tasks.errors
    );
    for o in &outages {
        eprintln!(
            "failover: -m {}: down {:?}; after it answered: first commit {:?}, first delivery {:?}, first task run {:?}",
            o.mode.arg(),
            o.down,
            o.first_commit,
            o.first_delivery,
            o.first_run
        );
    }
    assert_eq!(lost_events, 0, "committed events lost");
    assert_eq!(out_of_order, 0, "first deliveries out of per-key order");
    assert_eq!(lost_tasks, 0, "committed tasks never run");

    shutdown.cancel();
    herald.wait().await.expect("Herald stops cleanly");
    drop(server);
}
