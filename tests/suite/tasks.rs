//! The task queue against real Postgres: in-process workers and `herald
//! worker` processes draining a queue exactly once, priority and run_at
//! order, the retry schedule, dead letters and replay, a worker killed
//! mid-task and its lease rescued, fenced writes after a lost lease, unique
//! keys, cancellation, graceful shutdown, transactional enqueue, bad input,
//! batch enqueue, panics, timeouts, snoozes and progress.

use crate::common;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{scalar as count, TestDb, WorkerTask};
use chrono::{DateTime, Utc};
use herald::worker::{KindOptions, RetryPolicy};
use herald::{Config, Outcome, Queue, Registry, Task, TaskContext};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_postgres::Client;

/// What handlers record, read by the test.
type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Short leases, rescue and retry delays for in-process workers.
fn fast(c: &mut Config) {
    c.worker.lease = Duration::from_secs(2);
    c.worker.rescue_interval = Duration::from_millis(300);
    c.worker.retry_base = Duration::from_millis(50);
    c.worker.retry_max = Duration::from_millis(200);
    c.worker.poll_interval = Duration::from_secs(1);
    c.worker.shutdown_grace = Duration::from_secs(2);
    // The machine's Postgres is shared: keep each test's connections few.
    c.postgres.pool_size = 4;
}

/// A `herald worker` child process.
struct WorkerProcess(common::HeraldProcess);

impl WorkerProcess {
    fn spawn(config: &Config, args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let mut all = vec!["worker"];
        all.extend_from_slice(args);
        WorkerProcess(common::HeraldProcess::command(config, &all, env))
    }

    /// The part of `herald.tasks.leased_by` that names this process.
    fn marker(&self) -> String {
        format!(":{}:", self.0.pid())
    }

    async fn kill9(self) {
        self.0.kill9().await
    }

    async fn terminate(self) -> std::process::ExitStatus {
        self.0.terminate().await
    }
}

/// Poll `check` until it holds; fail the test after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    crate::common::wait_for(what, timeout, async || check().await).await
}

async fn count_id(client: &Client, sql: &str, id: i64) -> i64 {
    client.query_one(sql, &[&id]).await.expect(sql).get(0)
}

/// What Postgres said when `sql` failed.
async fn sql_err(client: &Client, sql: &str) -> String {
    let e = client.query_one(sql, &[]).await.expect_err(sql);
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or(e.to_string())
}

/// Register `kind` with a handler that records the ids it runs.
fn recorder(registry: &mut Registry, kind: &str) -> Shared<i64> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    registry.register(kind, move |ctx: TaskContext, _: Value| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(ctx.id);
            Ok(())
        }
    });
    seen
}

fn task(kind: &str, payload: Value) -> Task {
    Task::new(kind, &payload).expect("valid task")
}

/// The one dead letter of `kind`: (id, attempts, last_error, errors).
async fn dead_letter(client: &Client, kind: &str) -> (i64, i32, String, Vec<Value>) {
    let row = client
        .query_one(
            "SELECT id, attempts, last_error, errors FROM herald.dead_letters \
             WHERE source = 'task' AND kind = $1",
            &[&kind],
        )
        .await
        .expect("one dead letter of the kind");
    let errors: Value = row.get(3);
    (
        row.get(0),
        row.get(1),
        row.get(2),
        errors.as_array().expect("errors is an array").clone(),
    )
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread")]
async fn four_workers_run_ten_thousand_tasks_exactly_once_and_processes_drain_the_queue() {
    const TASKS: usize = 10_000;
    let db = TestDb::with(|c| {
        fast(c);
        // A lapsed lease would legitimately run a task twice; a loaded
        // machine must not cause one here.
        c.worker.lease = Duration::from_secs(30);
        c.worker.concurrency = 8;
        c.worker.batch_size = 100;
    })
    .await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE runs (task_id bigint NOT NULL, worker int NOT NULL)")
        .await
        .unwrap();

    // Four workers, each with its own pool and registry; the handler
    // records (task id, worker) through a pool of its own.
    let workers: Vec<WorkerTask> = (0..4i32)
        .map(|w| {
            let mut config = db.config.clone();
            config.postgres.pool_size = 2;
            let pool = herald::db::pool(&config, "herald-test-handler").unwrap();
            let mut registry = Registry::new();
            registry.register("test.record", move |ctx: TaskContext, _: Value| {
                let pool = pool.clone();
                async move {
                    pool.get()
                        .await?
                        .execute("INSERT INTO runs VALUES ($1, $2)", &[&ctx.id, &w])
                        .await?;
                    Ok(())
                }
            });
            WorkerTask::start(&db.config, registry)
        })
        .collect();

    // Enqueue while they run, in batches.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(TASKS);
    for chunk in 0..TASKS / 500 {
        let batch: Vec<Task> = (0..500)
            .map(|i| task("test.record", json!({"n": chunk * 500 + i})))
            .collect();
        ids.extend(herald::enqueue_batch(&client, &batch).await.unwrap());
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), TASKS);
    let c = &client;
    eventually(
        Duration::from_secs(120),
        "the queue drains",
        || async move { count(c, "SELECT count(*) FROM herald.tasks").await == 0 },
    )
    .await;
    println!(
        "4 in-process workers ran {TASKS} tasks in {:?}",
        started.elapsed()
    );

    assert_eq!(
        count(&client, "SELECT count(*) FROM runs").await,
        TASKS as i64
    );
    assert_eq!(
        count(&client, "SELECT count(DISTINCT task_id) FROM runs").await,
        TASKS as i64,
        "every task ran exactly once"
    );
    assert_eq!(
        client
            .query_one(
                "SELECT count(*) FROM runs WHERE NOT (task_id = ANY($1))",
                &[&ids]
            )
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "only the enqueued tasks ran"
    );
    let per_worker = client
        .query(
            "SELECT worker, count(*) FROM runs GROUP BY worker ORDER BY worker",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>();
    println!("tasks per worker: {per_worker:?}");
    assert_eq!(per_worker.len(), 4, "all four workers took part");
    let claimed: u64 = workers
        .iter()
        .map(|w| w.stats.claimed.load(Ordering::Relaxed))
        .sum();
    let succeeded: u64 = workers
        .iter()
        .map(|w| w.stats.succeeded.load(Ordering::Relaxed))
        .sum();
    assert_eq!(claimed, TASKS as u64, "no task was claimed twice");
    assert_eq!(succeeded, TASKS as u64);
    for w in workers {
        w.stop().await;
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );

    // Two `herald worker` processes drain built-in tasks side by side.
    let procs: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::spawn(&db.config, &["--concurrency", "10"], &[]))
        .collect();
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = '{}'",
        db.name,
        herald::worker::LISTEN_APPLICATION_NAME
    );
    let l = listening.as_str();
    eventually(
        Duration::from_secs(20),
        "both processes listen",
        || async move { count(c, l).await == 2 },
    )
    .await;
    let mut batch = Vec::new();
    for i in 0..2000 {
        batch.push(task("herald.noop", json!({"n": i})));
        if i % 10 == 0 {
            batch.push(task("herald.sleep", json!({"ms": 100})));
        }
    }
    herald::enqueue_batch(&client, &batch).await.unwrap();
    let mut holders: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for row in client
            .query(
                "SELECT DISTINCT leased_by FROM herald.tasks WHERE state = 'running'",
                &[],
            )
            .await
            .unwrap()
        {
            holders.insert(row.get(0));
        }
        if count(&client, "SELECT count(*) FROM herald.tasks").await == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the processes drain the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &procs {
        assert!(
            holders.iter().any(|h| h.contains(&p.marker())),
            "process {} ran tasks; lease holders seen: {holders:?}",
            p.0.pid()
        );
    }
    for p in procs {
        assert!(p.terminate().await.success(), "SIGTERM exits 0");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM herald.tasks").await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_then_run_at_decide_the_order_and_delayed_tasks_wait() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.concurrency = 1;
    })
    .await;
    let client = db.client().await;
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    // (name, priority, seconds in the past), enqueued while no worker runs.
    let specs = [
        ("a", 0, 10),
        ("b", 5, 1),
        ("c", 5, 5),
        ("d", -1, 20),
        ("e", 0, 30),
        ("f", 5, 5), // same priority and run_at as c: insertion order
    ];
    for (name, priority, ago) in specs {
        herald::enqueue(
            &client,
            &task("test.order", json!({ "name": name }))
                .priority(priority)
                .run_at(now - chrono::Duration::seconds(ago)),
        )
        .await
        .unwrap();
    }
    // Highest priority of all, but not due for 1.5 s.
    let late = herald::enqueue(
        &client,
        &task("test.order", json!({"name": "late"}))
            .priority(100)
            .delay(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let late_run_at: DateTime<Utc> = client
        .query_one("SELECT run_at FROM herald.tasks WHERE id = $1", &[&late])
        .await
        .unwrap()
        .get(0);
    let created_at: DateTime<Utc> = client
        .query_one(
            "SELECT created_at FROM herald.tasks WHERE id = $1",
            &[&late],
        )
        .await
        .unwrap()
        .get(0);
    assert!(late_run_at - created_at >= chrono::Duration::milliseconds(1500));

    let order: Shared<(String, DateTime<Utc>)> = Arc::default();
    let mut registry = Registry::new();
    let o = order.clone();
    registry.register("test.order", move |_ctx: TaskContext, p: Value| {
        let o = o.clone();
        async move {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            o.lock().unwrap().push((name, Utc::now()));
            Ok(())
        }
    });
    let worker = WorkerTask::start(&db.config, registry);
    let o = &order;
    eventually(
        Duration::from_secs(15),
        "all seven tasks ran",
        || async move { o.lock().unwrap().len() == 7 },
    )
    .await;
    worker.stop().await;
    let order = order.lock().unwrap().clone();
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["c", "f", "b", "e", "a", "d", "late"]);
    let late_started = order[6].1;
    assert!(
        late_started >= late_run_at,
        "the delayed task started at {late_started}, before its run_at {late_run_at}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM herald.tasks").await, 0);
}

/// While claims come back full, a worker claims from where the last one
/// ended (the index entries before it are dead until VACUUM). Tasks that
/// become ready before that point meanwhile must still be found soon: a
/// higher priority, and a run_at in the past.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_backlog_does_not_hide_tasks_that_sort_before_it() {
    const BACKLOG: usize = 3000;
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.concurrency = 4;
        c.worker.batch_size = 4;
    })
    .await;
    let client = db.client().await;
    let backlog: Vec<Task> = (0..BACKLOG)
        .map(|i| task("test.drain", json!({ "name": format!("b{i}") })))
        .collect();
    herald::enqueue_batch(&client, &backlog).await.unwrap();

    let order: Shared<String> = Arc::default();
    let mut registry = Registry::new();
    let o = order.clone();
    registry.register("test.drain", move |_ctx: TaskContext, p: Value| {
        let o = o.clone();
        async move {
            // At most 4 × 1,000 tasks/s: the backlog takes 750 ms at least.
            tokio::time::sleep(Duration::from_millis(1)).await;
            o.lock()
                .unwrap()
                .push(p["name"].as_str().unwrap_or_default().to_string());
            Ok(())
        }
    });
    let worker = WorkerTask::start(&db.config, registry);
    let o = &order;
    eventually(
        Duration::from_secs(15),
        "200 backlog tasks ran",
        || async move { o.lock().unwrap().len() >= 200 },
    )
    .await;
    herald::enqueue(
        &client,
        &task("test.drain", json!({"name": "urgent"})).priority(10),
    )
    .await
    .unwrap();
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    herald::enqueue(
        &client,
        &task("test.drain", json!({"name": "overdue"})).run_at(now - chrono::Duration::hours(1)),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "every task ran", || async move {
        o.lock().unwrap().len() == BACKLOG + 2
    })
    .await;
    worker.stop().await;
    let order = order.lock().unwrap().clone();
    let at = |name: &str| order.iter().position(|n| n == name).expect("ran");
    // Found by the next claim from the start of the index: one at least
    // every 200 ms, 800 tasks at the most at this rate.
    for name in ["urgent", "overdue"] {
        assert!(
            at(name) < 2000,
            "{name} ran as task {} of {}: hidden behind the backlog",
            at(name),
            order.len()
        );
    }
    let distinct: HashSet<&String> = order.iter().collect();
    assert_eq!(distinct.len(), BACKLOG + 2, "each task ran once");
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_follow_the_retry_policy_into_dead_letters_and_replay_succeeds() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let succeed = Arc::new(AtomicBool::new(false));
    // (task id, attempt, replayed_from header)
    let runs: Shared<(i64, i32, Option<Value>)> = Arc::default();
    let policy = RetryPolicy {
        base: Duration::from_millis(100),
        max: Duration::from_millis(400),
        jitter: 0.0,
    };
    let mut registry = Registry::new();
    {
        let succeed = succeed.clone();
        let runs = runs.clone();
        registry.register_with(
            "test.flaky",
            KindOptions {
                retry: Some(policy),
                timeout: None,
            },
            move |ctx: TaskContext, _: Value| {
                let succeed = succeed.clone();
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push((
                        ctx.id,
                        ctx.attempt,
                        ctx.headers.get("replayed_from").cloned(),
                    ));
                    if succeed.load(Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!("flaky handler says no"))
                    }
                }
            },
        );
    }
    let id = herald::enqueue(
        &client,
        &task("test.flaky", json!({"order": 7})).max_attempts(4),
    )
    .await
    .unwrap();
    let worker = WorkerTask::start(&db.config, registry.clone());
    let worker_id = worker.id.clone();
    let c = &client;
    eventually(Duration::from_secs(15), "a dead letter", || async move {
        count(c, "SELECT count(*) FROM herald.dead_letters").await == 1
    })
    .await;
    assert_eq!(worker.stats.failed.load(Ordering::Relaxed), 4);
    worker.stop().await;
    assert_eq!(
        count_id(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE id = $1",
            id
        )
        .await,
        0,
        "the task moved to the dead letters"
    );

    let row = client
        .query_one(
            "SELECT id, original_id, kind, queue, payload, attempts, max_attempts, last_error, \
                    jsonb_array_length(errors) \
             FROM herald.dead_letters",
            &[],
        )
        .await
        .unwrap();
    let dl_id: i64 = row.get(0);
    assert_eq!(row.get::<_, Option<i64>>(1), Some(id));
    assert_eq!(row.get::<_, String>(2), "test.flaky");
    assert_eq!(row.get::<_, String>(3), "default");
    assert_eq!(row.get::<_, Value>(4), json!({"order": 7}));
    assert_eq!(row.get::<_, i32>(5), 4);
    assert_eq!(row.get::<_, Option<i32>>(6), Some(4));
    assert_eq!(row.get::<_, String>(7), "flaky handler says no");
    assert_eq!(row.get::<_, i32>(8), 4);
    let history = client
        .query(
            "SELECT (e->>'attempt')::int, extract(epoch FROM (e->>'at')::timestamptz)::float8, \
                    e->>'error', e->>'worker' \
             FROM herald.dead_letters, jsonb_array_elements(errors) WITH ORDINALITY AS x(e, n) \
             ORDER BY n",
            &[],
        )
        .await
        .unwrap();
    let attempts: Vec<i32> = history.iter().map(|r| r.get(0)).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    for r in &history {
        assert_eq!(r.get::<_, String>(2), "flaky handler says no");
        assert_eq!(r.get::<_, String>(3), worker_id);
    }
    let at: Vec<f64> = history.iter().map(|r| r.get(1)).collect();
    // Each retry waits at least the policy's delay after the failure before
    // it: 100, 200, 400 ms (the worker default would be 50, 100, 200 ms).
    for (i, want) in [0.100, 0.200, 0.400].into_iter().enumerate() {
        let gap = at[i + 1] - at[i];
        assert!(
            gap >= want - 0.005,
            "attempt {} came {gap:.3}s after attempt {}, the policy says {want}s",
            i + 2,
            i + 1
        );
    }

    // Replay: a new task with fresh attempts and the history kept.
    let new_id: i64 = client
        .query_one("SELECT herald.replay_dead_letter($1)", &[&dl_id])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_id, id);
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
    let row = client
        .query_one(
            "SELECT state, attempts, max_attempts, payload, jsonb_array_length(errors), \
                    headers->'replayed_from' \
             FROM herald.tasks WHERE id = $1",
            &[&new_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, i32>(2), 4);
    assert_eq!(row.get::<_, Value>(3), json!({"order": 7}));
    assert_eq!(row.get::<_, i32>(4), 4, "the error history is kept");
    assert_eq!(row.get::<_, Value>(5), json!(dl_id));

    // A second worker whose handler now succeeds.
    succeed.store(true, Ordering::SeqCst);
    let worker = WorkerTask::start(&db.config, registry);
    eventually(
        Duration::from_secs(10),
        "the replayed task completes",
        || async move { count(c, "SELECT count(*) FROM herald.tasks").await == 0 },
    )
    .await;
    worker.stop().await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert_eq!(runs[4], (new_id, 1, Some(json!(dl_id))));
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_task_has_its_lease_rescued_by_another_worker() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let env = [
        ("HERALD_WORKER_LEASE", "1s"),
        ("HERALD_WORKER_RESCUE_INTERVAL", "200ms"),
    ];
    let id = herald::enqueue(&client, &task("herald.sleep", json!({"ms": 60000})))
        .await
        .unwrap();
    let first = WorkerProcess::spawn(&db.config, &[], &env);
    let c = &client;
    eventually(
        Duration::from_secs(20),
        "the first worker runs the task",
        || async move {
            count_id(
                c,
                "SELECT count(*) FROM herald.tasks WHERE id = $1 AND state = 'running'",
                id,
            )
            .await
                == 1
        },
    )
    .await;
    let row = client
        .query_one(
            "SELECT leased_by, attempts FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let first_id: String = row.get(0);
    assert!(first_id.contains(&first.marker()), "{first_id}");
    assert_eq!(row.get::<_, i32>(1), 1);
    // While it lives, its heartbeat keeps the 1 s lease from lapsing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count_id(
            &client,
            "SELECT count(*) FROM herald.tasks \
             WHERE id = $1 AND state = 'running' AND attempts = 1 AND lease_expires_at > now()",
            id
        )
        .await,
        1,
        "the live worker renews its lease"
    );

    first.kill9().await;
    // Make the second run short, but long enough to watch it run.
    client
        .execute(
            "UPDATE herald.tasks SET payload = '{\"ms\": 2000}' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    // With no worker alive, the lease lapses and nobody rescues it.
    eventually(Duration::from_secs(5), "the lease lapses", || async move {
        count_id(
            c,
            "SELECT count(*) FROM herald.tasks WHERE id = $1 AND lease_expires_at < now()",
            id,
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        count_id(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE id = $1 AND state = 'running'",
            id
        )
        .await,
        1
    );

    let second = WorkerProcess::spawn(&db.config, &[], &env);
    eventually(Duration::from_secs(20), "attempt 2 runs", || async move {
        count_id(
            c,
            "SELECT count(*) FROM herald.tasks WHERE id = $1 AND state = 'running' AND attempts = 2",
            id,
        )
        .await
            == 1
    })
    .await;
    let row = client
        .query_one(
            "SELECT leased_by, last_error, errors FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let holder: String = row.get(0);
    assert!(holder.contains(&second.marker()), "{holder}");
    let last_error: String = row.get(1);
    assert!(last_error.contains("lease expired"), "{last_error}");
    let errors: Value = row.get(2);
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["attempt"], json!(1));
    assert_eq!(errors[0]["worker"], json!(first_id));
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("lease expired"),
        "{errors:?}"
    );

    eventually(Duration::from_secs(20), "attempt 2 completes", || async move {
        count_id(c, "SELECT count(*) FROM herald.tasks WHERE id = $1", id).await == 0
    })
    .await;
    assert!(second.terminate().await.success());
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

// src/worker.rs's completion statement, with its lease fence.
const COMPLETE_DELETE: &str = "
DELETE FROM herald.tasks t
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[array_position($1, t.id)]";

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_lease_expired_cannot_complete_the_task_another_holds() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.lease = Duration::from_secs(1);
    })
    .await;
    let client = db.client().await;

    // Directly in SQL.
    let id: i64 = client
        .query_one("SELECT herald.enqueue('test.fenced', '{}')", &[])
        .await
        .unwrap()
        .get(0);
    let n = client
        .execute(
            "UPDATE herald.tasks SET state = 'running', attempts = 1, leased_by = 'A', \
                    started_at = now(), lease_expires_at = now() - interval '1 second' \
             WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let rescued: i32 = client
        .query_one("SELECT herald.rescue_expired_leases()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rescued, 1);
    let row = client
        .query_one(
            "SELECT state, attempts, leased_by, errors FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    assert_eq!(row.get::<_, i32>(1), 1, "the lapsed attempt counts");
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert_eq!(row.get::<_, Value>(3)[0]["worker"], json!("A"));
    let n = client
        .execute(
            "UPDATE herald.tasks SET state = 'running', attempts = attempts + 1, leased_by = 'B', \
                    lease_expires_at = now() + interval '1 minute' \
             WHERE id = $1 AND state = 'ready'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    for (attempt, worker) in [(1, "A"), (2, "A"), (1, "B")] {
        let outcome: String = client
            .query_one(
                "SELECT herald.fail_task($1, $2, $3, 'late', now())",
                &[&id, &attempt, &worker],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(outcome, "lost", "fail_task as {worker} attempt {attempt}");
    }
    let deleted = client
        .execute(COMPLETE_DELETE, &[&vec![id], &vec![1i32], &"A"])
        .await
        .unwrap();
    assert_eq!(deleted, 0, "A's late completion deletes nothing");
    let rescued: i32 = client
        .query_one("SELECT herald.rescue_expired_leases()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rescued, 0, "B's lease holds");
    let row = client
        .query_one(
            "SELECT state, attempts, leased_by, last_error, jsonb_array_length(errors) \
             FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "running");
    assert_eq!(row.get::<_, i32>(1), 2);
    assert_eq!(row.get::<_, String>(2), "B");
    assert!(!row.get::<_, String>(3).contains("late"));
    assert_eq!(row.get::<_, i32>(4), 1, "A's late failure is not recorded");
    // B's own completion still works.
    let deleted = client
        .execute(COMPLETE_DELETE, &[&vec![id], &vec![2i32], &"B"])
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    // Through the runtime: the handler blocks while the task is reassigned.
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    {
        let (started, release, finished) = (started.clone(), release.clone(), finished.clone());
        registry.register("test.blocked", move |_ctx: TaskContext, _: Value| {
            let (started, release, finished) = (started.clone(), release.clone(), finished.clone());
            async move {
                started.notify_one();
                release.notified().await;
                finished.store(true, Ordering::SeqCst);
                Ok(())
            }
        });
    }
    let id = herald::enqueue(&client, &task("test.blocked", json!({})))
        .await
        .unwrap();
    let worker = WorkerTask::start(&db.config, registry);
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the handler starts");
    let row = client
        .query_one(
            "SELECT leased_by, attempts FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), worker.id);
    assert_eq!(row.get::<_, i32>(1), 1);
    // The lease is forced out from under the worker and the task is
    // reassigned, as if the rescuer and another worker had taken it.
    let n = client
        .execute(
            "UPDATE herald.tasks SET leased_by = 'other', attempts = attempts + 1, \
                    lease_expires_at = now() + interval '1 hour' \
             WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    release.notify_one();
    // Longer than the heartbeat (lease / 3) and the completer's round trip.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "handler returned: {} (otherwise the heartbeat abandoned it first)",
        finished.load(Ordering::SeqCst)
    );
    let row = client
        .query_one(
            "SELECT state, leased_by, attempts, lease_expires_at > now() + interval '50 minutes' \
             FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the task row is still there");
    assert_eq!(row.get::<_, String>(0), "running");
    assert_eq!(row.get::<_, String>(1), "other");
    assert_eq!(row.get::<_, i32>(2), 2);
    assert!(
        row.get::<_, bool>(3),
        "the old worker did not touch the lease"
    );
    worker.stop().await;
    assert_eq!(
        count_id(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE id = $1 AND leased_by = 'other'",
            id
        )
        .await,
        1,
        "shutdown did not release a task the worker no longer holds"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unique_keys_deduplicate_until_the_holder_finishes() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.retain_completed = Some(Duration::from_secs(3600));
    })
    .await;
    let client = db.client().await;
    let first = herald::enqueue(
        &client,
        &task("test.unique", json!({"n": 1})).unique_key("report:1"),
    )
    .await
    .unwrap();
    let again = herald::enqueue(
        &client,
        &task("test.unique", json!({"n": 2})).unique_key("report:1"),
    )
    .await
    .unwrap();
    assert_eq!(first, again);
    let via_sql: i64 = client
        .query_one(
            "SELECT herald.enqueue('test.unique', '{\"n\": 3}', unique_key => 'report:1')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, via_sql);
    let other = herald::enqueue(
        &client,
        &task("test.unique", json!({"n": 4})).unique_key("report:2"),
    )
    .await
    .unwrap();
    assert_ne!(other, first);
    assert_eq!(count(&client, "SELECT count(*) FROM herald.tasks").await, 2);
    let payload: Value = client
        .query_one("SELECT payload FROM herald.tasks WHERE id = $1", &[&first])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payload, json!({"n": 1}), "the holder is unchanged");

    // Run both; retained, they stay as 'succeeded' rows with their keys.
    let mut registry = Registry::new();
    let seen = recorder(&mut registry, "test.unique");
    let worker = WorkerTask::start(&db.config, registry);
    let c = &client;
    eventually(
        Duration::from_secs(10),
        "both tasks succeed",
        || async move {
            count(
                c,
                "SELECT count(*) FROM herald.tasks WHERE state = 'succeeded'",
            )
            .await
                == 2
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(seen.lock().unwrap().len(), 2);

    let next = herald::enqueue(
        &client,
        &task("test.unique", json!({"n": 5})).unique_key("report:1"),
    )
    .await
    .unwrap();
    assert_ne!(next, first, "a finished holder frees the key");
    let via_sql: i64 = client
        .query_one(
            "SELECT herald.enqueue('test.unique', '{\"n\": 6}', unique_key => 'report:1')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(via_sql, next);
    // A running holder keeps the key too.
    client
        .execute(
            "UPDATE herald.tasks SET state = 'running', attempts = 1, leased_by = 'x', \
                    lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            &[&next],
        )
        .await
        .unwrap();
    let while_running = herald::enqueue(
        &client,
        &task("test.unique", json!({"n": 7})).unique_key("report:1"),
    )
    .await
    .unwrap();
    assert_eq!(while_running, next);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE unique_key = 'report:1'"
        )
        .await,
        2,
        "the succeeded one and the running one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_queued_task_and_a_running_one() {
    let db = TestDb::with(fast).await;
    let client = db.client().await;
    let queued = herald::enqueue(&client, &task("test.record", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(
        herald::queue::cancel(&client, queued)
            .await
            .unwrap()
            .as_deref(),
        Some("cancelled")
    );
    assert_eq!(
        herald::queue::cancel(&client, queued).await.unwrap(),
        None,
        "nothing left to cancel"
    );
    assert_eq!(herald::queue::cancel(&client, 987_654).await.unwrap(), None);

    let started = Arc::new(Notify::new());
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    let seen = recorder(&mut registry, "test.record");
    {
        let (started, saw_cancel) = (started.clone(), saw_cancel.clone());
        registry.register("test.waits", move |ctx: TaskContext, _: Value| {
            let (started, saw_cancel) = (started.clone(), saw_cancel.clone());
            async move {
                started.notify_one();
                ctx.cancellation().cancelled().await;
                saw_cancel.store(true, Ordering::SeqCst);
                // Stopped as asked, without finishing the work.
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let worker = WorkerTask::start(&db.config, registry);
    // A task behind the cancelled one runs; the cancelled one never does.
    let sentinel = herald::enqueue(&client, &task("test.record", json!({"n": 2})))
        .await
        .unwrap();
    let s = &seen;
    eventually(
        Duration::from_secs(10),
        "the sentinel runs",
        || async move { s.lock().unwrap().contains(&sentinel) },
    )
    .await;
    assert_eq!(*seen.lock().unwrap(), [sentinel]);
    let row = client
        .query_one(
            "SELECT state, finished_at IS NOT NULL, attempts FROM herald.tasks WHERE id = $1",
            &[&queued],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cancelled");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i32>(2), 0, "it never ran");

    // A running task: its handler hears the cancellation.
    let running = herald::enqueue(&client, &task("test.waits", json!({})))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the handler starts");
    let asked = Instant::now();
    assert_eq!(
        herald::queue::cancel(&client, running)
            .await
            .unwrap()
            .as_deref(),
        Some("cancelling")
    );
    let c = &client;
    eventually(
        Duration::from_secs(5),
        "the running task ends cancelled",
        || async move {
            count_id(
                c,
                "SELECT count(*) FROM herald.tasks WHERE id = $1 AND state = 'cancelled'",
                running,
            )
            .await
                == 1
        },
    )
    .await;
    println!(
        "cancelled {:?} after the request; handler saw it: {}",
        asked.elapsed(),
        saw_cancel.load(Ordering::SeqCst)
    );
    let row = client
        .query_one(
            "SELECT cancel_requested_at IS NOT NULL, finished_at IS NOT NULL, leased_by, \
                    last_error \
             FROM herald.tasks WHERE id = $1",
            &[&running],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Option<String>>(2), None);
    let reason: String = row.get(3);
    assert!(reason.contains("cancel"), "{reason}");
    worker.stop().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_hands_running_tasks_back_to_the_queue() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.concurrency = 4;
        c.worker.shutdown_grace = Duration::from_millis(500);
    })
    .await;
    let client = db.client().await;
    // A handler that ignores cancellation: the runtime itself cuts it off
    // after the grace period. (A handler that returns Ok when cancelled,
    // like herald.sleep, is at times recorded as a success instead, because
    // `execute` in src/worker.rs lets the handler's result race the token.)
    let mut registry = Registry::new();
    registry.register("test.long", |_ctx: TaskContext, p: Value| async move {
        tokio::time::sleep(Duration::from_millis(p["ms"].as_u64().unwrap_or(0))).await;
        Ok(())
    });
    let tasks: Vec<Task> = (0..4)
        .map(|_| task("test.long", json!({"ms": 30000})))
        .collect();
    let ids = herald::enqueue_batch(&client, &tasks).await.unwrap();
    let worker = WorkerTask::start(&db.config, registry);
    let c = &client;
    eventually(
        Duration::from_secs(10),
        "four tasks running",
        || async move {
            count(
                c,
                "SELECT count(*) FROM herald.tasks WHERE state = 'running'",
            )
            .await
                == 4
        },
    )
    .await;
    let stopping = Instant::now();
    worker.stop().await;
    let took = stopping.elapsed();
    println!("worker stopped in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the 30 s sleeps were cut short"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE state = 'running'"
        )
        .await,
        0,
        "no task is left running"
    );
    let rows = client
        .query(
            "SELECT id, state, attempts, leased_by, jsonb_array_length(errors) \
             FROM herald.tasks ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let back: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(back, ids, "every task is still there");
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), "ready");
        assert_eq!(r.get::<_, i32>(2), 0, "the attempt is given back");
        assert_eq!(r.get::<_, Option<String>>(3), None);
        assert_eq!(r.get::<_, i32>(4), 0, "a shutdown is no failure");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_enqueues_leave_nothing_and_committed_ones_run() {
    let db = TestDb::with(fast).await;
    let mut client = db.client().await;
    let observer = db.client().await;
    let mut registry = Registry::new();
    let seen = recorder(&mut registry, "test.record");
    let worker = WorkerTask::start(&db.config, registry);

    let tx = client.transaction().await.unwrap();
    let mut rolled_back = vec![
        herald::enqueue(&tx, &task("test.record", json!({"via": "rust"})))
            .await
            .unwrap(),
    ];
    rolled_back.extend(
        herald::enqueue_batch(
            &tx,
            &[
                task("test.record", json!({"via": "batch"})),
                task("test.record", json!({"via": "batch"})),
            ],
        )
        .await
        .unwrap(),
    );
    rolled_back.push(
        tx.query_one(
            "SELECT herald.enqueue('test.record', '{\"via\": \"sql\"}')",
            &[],
        )
        .await
        .unwrap()
        .get(0),
    );
    let own: i64 = tx
        .query_one("SELECT count(*) FROM herald.tasks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, 4, "the transaction sees its own tasks");
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&observer, "SELECT count(*) FROM herald.tasks").await,
        0
    );

    let tx = client.transaction().await.unwrap();
    let kept = herald::enqueue(&tx, &task("test.record", json!({"via": "rust"})))
        .await
        .unwrap();
    let kept_sql: i64 = tx
        .query_one(
            "SELECT herald.enqueue('test.record', '{\"via\": \"sql\"}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count(&observer, "SELECT count(*) FROM herald.tasks").await,
        0,
        "invisible before COMMIT"
    );
    assert!(seen.lock().unwrap().is_empty());
    tx.commit().await.unwrap();
    let o = &observer;
    eventually(
        Duration::from_secs(10),
        "the committed tasks run",
        || async move { count(o, "SELECT count(*) FROM herald.tasks").await == 0 },
    )
    .await;
    worker.stop().await;
    let mut ran = seen.lock().unwrap().clone();
    ran.sort_unstable();
    assert_eq!(ran, [kept, kept_sql]);
    assert!(rolled_back.iter().all(|id| !ran.contains(id)));
}

#[derive(serde::Deserialize)]
struct Typed {
    #[allow(dead_code)]
    n: u64,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_or_dead_lettered_and_nothing_stored_is_lost() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.concurrency = 1;
    })
    .await;
    let client = db.client().await;
    // Stored before the bad input, on a queue no worker here works.
    let kept = herald::enqueue(
        &client,
        &task("kept.task", json!({"keep": true})).queue("kept"),
    )
    .await
    .unwrap();

    // The Rust API checks before any SQL.
    let err = Queue::from_config(&db.config)
        .enqueue(&client, &task("test.ok", json!({})).max_attempts(0))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must be at least 1") && err.contains("test.ok"),
        "{err}"
    );
    let err = Task::new("bad kind", &json!({})).unwrap_err().to_string();
    assert!(err.contains("\"bad kind\""), "{err}");
    let err = Task::new("", &json!({})).unwrap_err().to_string();
    assert!(err.contains("kind is empty"), "{err}");
    let err = herald::enqueue(&client, &task("test.ok", json!({})).queue("bad queue"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"bad queue\""), "{err}");
    let err = herald::enqueue_batch(
        &client,
        &[
            task("test.ok", json!({})),
            task("test.ok", json!({})).max_attempts(0),
        ],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("must be at least 1"), "{err}");
    let err = Task::from_json_str("test.ok", "{\"a\": ")
        .unwrap_err()
        .to_string();
    assert!(err.contains("payload of task kind \"test.ok\""), "{err}");

    // The SQL function: the same rules.
    let msg = sql_err(
        &client,
        "SELECT herald.enqueue('test.ok', '{}', max_attempts => 0)",
    )
    .await;
    assert!(msg.contains("must be at least 1"), "{msg}");
    let msg = sql_err(&client, "SELECT herald.enqueue('bad kind', '{}')").await;
    assert!(msg.contains("\"bad kind\""), "{msg}");
    let msg = sql_err(
        &client,
        "SELECT herald.enqueue('test.ok', '{}', queue => 'bad queue')",
    )
    .await;
    assert!(msg.contains("\"bad queue\""), "{msg}");
    let msg = sql_err(&client, "SELECT herald.enqueue('test.ok', NULL)").await;
    assert!(msg.contains("payload is NULL"), "{msg}");

    // The CLI.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .env("DATABASE_URL", &db.config.database_url)
            .env_remove("HERALD_CONFIG")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&["enqueue", "x", "{}", "--delay", "-5s"]);
    assert!(!ok && err.contains("negative"), "{err}");
    let (ok, err) = run(&["enqueue", "x", "{"]);
    assert!(!ok && err.contains("payload"), "{err}");
    let (ok, err) = run(&["enqueue", "bad kind", "{}"]);
    assert!(!ok && err.contains("bad kind"), "{err}");
    let (ok, err) = run(&["enqueue", "x", "{}", "--max-attempts", "0"]);
    assert!(!ok && err.contains("must be at least 1"), "{err}");
    let (ok, err) = run(&["enqueue", "x", "{}", "--queue", "bad queue"]);
    assert!(!ok && err.contains("bad queue"), "{err}");
    assert_eq!(count(&client, "SELECT count(*) FROM herald.tasks").await, 1);

    // Bad input the worker meets: an unknown kind and a payload that does
    // not decode; the tasks behind them still run.
    let unknown = herald::enqueue(
        &client,
        &task("test.unknown", json!({})).priority(10).max_attempts(1),
    )
    .await
    .unwrap();
    let typed = herald::enqueue(
        &client,
        &task("test.typed", json!({"n": "not a number"})).priority(5),
    )
    .await
    .unwrap();
    let oks = herald::enqueue_batch(
        &client,
        &(0..3)
            .map(|i| task("test.ok", json!({"i": i})))
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let mut registry = Registry::new();
    let seen = recorder(&mut registry, "test.ok");
    registry.register("test.typed", |_ctx: TaskContext, _p: Typed| async {
        Ok(())
    });
    let worker = WorkerTask::start(&db.config, registry);
    let c = &client;
    eventually(
        Duration::from_secs(10),
        "two dead letters and the rest done",
        || async move {
            count(c, "SELECT count(*) FROM herald.dead_letters").await == 2
                && count(
                    c,
                    "SELECT count(*) FROM herald.tasks WHERE queue = 'default'",
                )
                .await
                    == 0
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(*seen.lock().unwrap(), oks);

    let (_, attempts, last_error, errors) = dead_letter(&client, "test.unknown").await;
    assert_eq!(attempts, 1);
    assert!(
        last_error.contains("no handler for task kind \"test.unknown\""),
        "{last_error}"
    );
    assert_eq!(errors.len(), 1);
    let original: Option<i64> = client
        .query_one(
            "SELECT original_id FROM herald.dead_letters WHERE kind = 'test.unknown'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(original, Some(unknown));

    let (_, attempts, last_error, errors) = dead_letter(&client, "test.typed").await;
    assert_eq!(attempts, 1, "a payload that does not decode is not retried");
    assert!(
        last_error.contains("test.typed") && last_error.contains("Typed"),
        "{last_error}"
    );
    assert_eq!(errors.len(), 1);
    let original: Option<i64> = client
        .query_one(
            "SELECT original_id FROM herald.dead_letters WHERE kind = 'test.typed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(original, Some(typed));

    // Nothing stored was lost.
    let row = client
        .query_one(
            "SELECT kind, payload, state FROM herald.tasks WHERE id = $1",
            &[&kept],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "kept.task");
    assert_eq!(row.get::<_, Value>(1), json!({"keep": true}));
    assert_eq!(row.get::<_, String>(2), "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_enqueue_returns_ids_in_order_and_holders_for_held_keys() {
    const N: usize = 1000;
    let db = TestDb::new().await;
    let client = db.client().await;
    let holder = herald::enqueue(
        &client,
        &task("test.batch", json!({"holder": true})).unique_key("held"),
    )
    .await
    .unwrap();
    let tasks: Vec<Task> = (0..N)
        .map(|i| {
            let t = task("test.batch", json!({ "i": i }));
            match i {
                500 => t.unique_key("held"),
                700 => t.unique_key("fresh"),
                800 | 801 => t.unique_key("twice"),
                _ => t,
            }
        })
        .collect();
    let ids = herald::enqueue_batch(&client, &tasks).await.unwrap();
    assert_eq!(ids.len(), N);
    assert_eq!(ids[500], holder, "a held key returns its holder");
    assert_eq!(
        ids[801], ids[800],
        "a key twice in one batch: the first holds it"
    );
    let new: Vec<i64> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 500 && *i != 801)
        .map(|(_, id)| *id)
        .collect();
    assert!(
        new.windows(2).all(|w| w[0] < w[1]),
        "new ids ascend in input order"
    );
    assert!(new[0] > holder);
    // Each id is the task given at its position.
    let rows = client
        .query(
            "SELECT id, (payload->>'i')::int FROM herald.tasks WHERE payload ? 'i'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), N - 2);
    for r in rows {
        let id: i64 = r.get(0);
        let i: i32 = r.get(1);
        assert_eq!(ids[i as usize], id, "task {i}");
    }
    let row = client
        .query_one(
            "SELECT payload, unique_key FROM herald.tasks WHERE id = $1",
            &[&ids[700]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Value>(0), json!({"i": 700}));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("fresh"));
    let payload: Value = client
        .query_one("SELECT payload FROM herald.tasks WHERE id = $1", &[&holder])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payload, json!({"holder": true}));
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.tasks").await,
        N as i64 - 1
    );
    assert!(herald::enqueue_batch(&client, &[])
        .await
        .unwrap()
        .is_empty());
}

/// A bulk batch of plain tasks (no unique key, delay, run_at or timeout)
/// goes in by binary COPY: same rows, same ids in input order, inside the
/// caller's transaction.
#[tokio::test(flavor = "multi_thread")]
async fn plain_batches_go_in_by_copy_inside_the_callers_transaction() {
    const N: usize = 500;
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let tasks: Vec<Task> = (0..N)
        .map(|i| {
            task("test.copy", json!({ "i": i, "text": "quote \" and é" }))
                .queue(if i % 2 == 0 { "even" } else { "odd" })
                .priority(i as i32 % 3)
                .max_attempts(7)
                .header("tenant", "acme")
        })
        .collect();

    let tx = client.transaction().await.unwrap();
    let ids = herald::enqueue_batch(&tx, &tasks).await.unwrap();
    assert_eq!(ids.len(), N);
    assert_eq!(
        count(tx.client(), "SELECT count(*) FROM herald.tasks").await,
        N as i64,
        "the transaction sees its rows"
    );
    tx.rollback().await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM herald.tasks").await, 0);

    let tx = client.transaction().await.unwrap();
    let ids = herald::enqueue_batch(&tx, &tasks).await.unwrap();
    let began: chrono::DateTime<chrono::Utc> =
        tx.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tx.commit().await.unwrap();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids ascend in input order"
    );
    let rows = client
        .query(
            "SELECT id, payload, queue, priority, max_attempts, headers->>'tenant', state, run_at,
                    unique_key IS NULL AND timeout IS NULL AND attempts = 0
             FROM herald.tasks ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), N);
    for r in &rows {
        let payload: Value = r.get(1);
        let i = payload["i"].as_u64().unwrap() as usize;
        assert_eq!(
            r.get::<_, i64>(0),
            ids[i],
            "task {i} has the id returned at its position"
        );
        assert_eq!(payload["text"], "quote \" and é");
        assert_eq!(
            r.get::<_, String>(2),
            if i % 2 == 0 { "even" } else { "odd" }
        );
        assert_eq!(r.get::<_, i32>(3), i as i32 % 3);
        assert_eq!(r.get::<_, i32>(4), 7);
        assert_eq!(r.get::<_, Option<String>>(5).as_deref(), Some("acme"));
        assert_eq!(r.get::<_, String>(6), "ready");
        assert_eq!(
            r.get::<_, chrono::DateTime<chrono::Utc>>(7),
            began,
            "run_at is the database's now()"
        );
        assert!(r.get::<_, bool>(8));
    }
    // A batch with one delayed task takes the INSERT path and still works.
    let mut mixed: Vec<Task> = (0..100)
        .map(|i| task("test.copy", json!({ "j": i })))
        .collect();
    mixed[50] = task("test.copy", json!({ "j": 50 })).delay(Duration::from_secs(60));
    let mixed_ids = herald::enqueue_batch(&client, &mixed).await.unwrap();
    assert!(mixed_ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        count_id(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE id = $1 AND run_at > now() + interval '50 seconds'",
            mixed_ids[50]
        )
        .await,
        1
    );
}

async fn explode(_ctx: TaskContext, _payload: Value) -> anyhow::Result<()> {
    panic!("handler exploded on purpose")
}

#[tokio::test(flavor = "multi_thread")]
async fn panics_timeouts_snoozes_and_progress() {
    let db = TestDb::with(|c| {
        fast(c);
        c.worker.concurrency = 4;
    })
    .await;
    let client = db.client().await;
    let mut registry = Registry::new();
    registry.register("test.panic", explode);
    let slow = |ctx: TaskContext, _: Value| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => Ok(()),
            _ = ctx.cancellation().cancelled() => Err(anyhow::anyhow!("stopped early")),
        }
    };
    registry.register("test.slow", slow);
    registry.register_with(
        "test.slow_kind",
        KindOptions {
            retry: None,
            timeout: Some(Duration::from_millis(200)),
        },
        slow,
    );
    let snoozes: Shared<(i32, Instant)> = Arc::default();
    {
        let snoozes = snoozes.clone();
        registry.register("test.snooze", move |ctx: TaskContext, _: Value| {
            let snoozes = snoozes.clone();
            async move {
                let mut s = snoozes.lock().unwrap();
                s.push((ctx.attempt, Instant::now()));
                Ok(if s.len() == 1 {
                    Outcome::Snooze(Duration::from_millis(300))
                } else {
                    Outcome::Done
                })
            }
        });
    }
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    {
        let (started, release) = (started.clone(), release.clone());
        registry.register("test.progress", move |ctx: TaskContext, _: Value| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                ctx.progress(json!({"done": 3, "of": 10})).await?;
                started.notify_one();
                release.notified().await;
                Ok(())
            }
        });
    }

    let panic_id = herald::enqueue(&client, &task("test.panic", json!({})).max_attempts(1))
        .await
        .unwrap();
    let slow_id = herald::enqueue(
        &client,
        &task("test.slow", json!({}))
            .timeout(Duration::from_millis(200))
            .max_attempts(1),
    )
    .await
    .unwrap();
    let slow_kind_id = herald::enqueue(&client, &task("test.slow_kind", json!({})).max_attempts(1))
        .await
        .unwrap();
    let snooze_id = herald::enqueue(&client, &task("test.snooze", json!({})).max_attempts(1))
        .await
        .unwrap();
    let progress_id = herald::enqueue(&client, &task("test.progress", json!({})))
        .await
        .unwrap();
    let worker = WorkerTask::start(&db.config, registry);

    // Progress is visible while the handler runs.
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the progress handler starts");
    let row = client
        .query_one(
            "SELECT state, progress FROM herald.tasks WHERE id = $1",
            &[&progress_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "running");
    assert_eq!(
        row.get::<_, Option<Value>>(1),
        Some(json!({"done": 3, "of": 10}))
    );
    release.notify_one();

    let c = &client;
    eventually(
        Duration::from_secs(4),
        "the failures become dead letters",
        || async move { count(c, "SELECT count(*) FROM herald.dead_letters").await == 3 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the rest completes",
        || async move { count(c, "SELECT count(*) FROM herald.tasks").await == 0 },
    )
    .await;
    worker.stop().await;

    let (_, _, last_error, errors) = dead_letter(&client, "test.panic").await;
    assert!(
        last_error.contains("panicked") && last_error.contains("exploded on purpose"),
        "{last_error}"
    );
    assert!(
        errors[0]["error"].as_str().unwrap().contains("panicked"),
        "{errors:?}"
    );
    for kind in ["test.slow", "test.slow_kind"] {
        let (_, attempts, last_error, errors) = dead_letter(&client, kind).await;
        assert_eq!(attempts, 1);
        assert!(last_error.contains("timed out"), "{kind}: {last_error}");
        assert!(
            errors[0]["error"].as_str().unwrap().contains("timed out"),
            "{errors:?}"
        );
    }
    let originals: HashSet<i64> = client
        .query("SELECT original_id FROM herald.dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(originals, HashSet::from([panic_id, slow_id, slow_kind_id]));

    let snoozes = snoozes.lock().unwrap().clone();
    assert_eq!(snoozes.len(), 2, "snoozed once, then done");
    assert_eq!(snoozes[0].0, 1);
    assert_eq!(snoozes[1].0, 1, "a snooze spends no attempt");
    let gap = snoozes[1].1 - snoozes[0].1;
    assert!(gap >= Duration::from_millis(290), "ran again after {gap:?}");
    assert!(
        !originals.contains(&snooze_id) && !originals.contains(&progress_id),
        "the snoozed and the progress tasks succeeded"
    );
}
