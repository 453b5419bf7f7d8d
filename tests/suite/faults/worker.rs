//! Fault tests: worker. See main.rs.
//!
//! Handlers under test record every run (task id, attempt, worker, start,
//! end) through a guard whose drop marks the end, so a handler stopped by
//! dropping its future still closes its interval. The runs are written to a
//! table of the test's own (`fault_runs`) and the overlaps counted there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use herald::{Config, Registry, Task, TaskContext};
use serde_json::{json, Value};

use crate::common::proxy::Proxy;
use crate::common::{until, TestDb, WorkerTask};

/// One run of a handler.
#[derive(Debug, Clone)]
struct Run {
    task: i64,
    attempt: i32,
    worker: String,
    start: SystemTime,
    end: Option<SystemTime>,
}

#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<Run>>>);

/// Marks its run's end when dropped: when the handler returns, or when the
/// worker drops the handler's future.
struct RunGuard {
    runs: Runs,
    index: usize,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut runs = self.runs.0.lock().unwrap_or_else(|e| e.into_inner());
        runs[self.index].end = Some(SystemTime::now());
    }
}

impl Runs {
    fn begin(&self, ctx: &TaskContext, worker: &str) -> RunGuard {
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        runs.push(Run {
            task: ctx.id,
            attempt: ctx.attempt,
            worker: worker.to_string(),
            start: SystemTime::now(),
            end: None,
        });
        RunGuard {
            runs: self.clone(),
            index: runs.len() - 1,
        }
    }

    fn snapshot(&self) -> Vec<Run> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn started_by(&self, worker: &str) -> usize {
        self.snapshot()
            .iter()
            .filter(|r| r.worker == worker)
            .count()
    }

    /// Write the runs to `fault_runs` and count pairs of runs of one task
    /// whose intervals overlap (a run still going counts until now).
    async fn overlaps(&self, db: &TestDb) -> i64 {
        let client = db.client().await;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS fault_runs (task bigint, attempt int, worker text, \
                 started timestamptz, ended timestamptz); TRUNCATE fault_runs",
            )
            .await
            .expect("creating fault_runs");
        for r in self.snapshot() {
            let started: chrono::DateTime<chrono::Utc> = r.start.into();
            let ended: Option<chrono::DateTime<chrono::Utc>> = r.end.map(Into::into);
            client
                .execute(
                    "INSERT INTO fault_runs VALUES ($1, $2, $3, $4, $5)",
                    &[&r.task, &r.attempt, &r.worker, &started, &ended],
                )
                .await
                .expect("recording a run");
        }
        client
            .query_one(
                "SELECT count(*) FROM fault_runs a JOIN fault_runs b
                   ON a.task = b.task AND (a.worker, a.attempt) < (b.worker, b.attempt)
                  AND tstzrange(a.started, coalesce(a.ended, now()))
                      && tstzrange(b.started, coalesce(b.ended, now()))",
                &[],
            )
            .await
            .expect("counting overlaps")
            .get(0)
    }
}

async fn until_sql(db: &TestDb, within: Duration, sql: &str, want: i64) -> bool {
    let client = db.client().await;
    let deadline = Instant::now() + within;
    loop {
        let n: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        if n == want {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("{sql}: {n}, wanted {want}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn enqueue(db: &TestDb, kind: &str, payload: Value, n: usize) -> Vec<i64> {
    let client = db.client().await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let task = Task::new(kind, &payload).expect("task").max_attempts(10);
        ids.push(
            herald::queue::enqueue(&client, &task)
                .await
                .expect("enqueue"),
        );
    }
    ids
}

/// A handler that records its run and then works for `ms` milliseconds
/// without ever looking at its cancellation token: only dropping its
/// future stops it.
fn stubborn(registry: &mut Registry, runs: &Runs, worker: &'static str) {
    let runs = runs.clone();
    registry.register("fault.stubborn", move |ctx: TaskContext, p: Value| {
        let guard = runs.begin(&ctx, worker);
        async move {
            let _guard = guard;
            let ms = p["ms"].as_u64().unwrap_or(20_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
    });
}

fn short_leases(c: &mut Config) {
    c.worker.lease = Duration::from_secs(3);
    c.worker.rescue_interval = Duration::from_millis(200);
    c.worker.poll_interval = Duration::from_millis(500);
    c.worker.retry_base = Duration::from_millis(50);
    c.worker.retry_max = Duration::from_millis(200);
}

/// Issue 14, item 3: worker A loses Postgres (a 15 s partition) while it
/// runs three 20 s tasks; worker B rescues them once their leases expire.
/// A must have stopped each handler before B can start it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_worker_stops_its_handlers_before_rescue() {
    let db = TestDb::with(short_leases).await;
    let (proxy, url) = Proxy::for_url(&db.config.database_url).await;
    let mut config_a = db.config.clone();
    config_a.database_url = url;
    let runs = Runs::default();
    let mut reg_a = Registry::new();
    stubborn(&mut reg_a, &runs, "A");
    let a = WorkerTask::start(&config_a, reg_a);
    let ids = enqueue(&db, "fault.stubborn", json!({"ms": 20_000}), 3).await;
    assert!(
        until(Duration::from_secs(10), || runs.started_by("A") == 3).await,
        "A starts the three tasks"
    );
    // Let one heartbeat renew the leases first.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let partitioned = SystemTime::now();
    proxy.partition();
    let mut reg_b = Registry::new();
    stubborn(&mut reg_b, &runs, "B");
    // B's process also campaigns for maintenance leader (A's test process
    // runs none), so its rescuer returns A's expired leases to the queue.
    let maintenance = tokio_util::sync::CancellationToken::new();
    tokio::spawn(herald::maintenance::Maintenance::new(&db.config).run(maintenance.clone()));
    let b = WorkerTask::start(&db.config, reg_b);
    assert!(
        until(Duration::from_secs(12), || runs.started_by("B") == 3).await,
        "B rescues and starts the three tasks"
    );
    let rest = Duration::from_secs(15).saturating_sub(partitioned.elapsed().unwrap_or_default());
    tokio::time::sleep(rest).await;
    proxy.heal();
    tokio::time::sleep(Duration::from_secs(1)).await;
    maintenance.cancel();

    let all = runs.snapshot();
    for id in &ids {
        let a_run = all.iter().find(|r| r.task == *id && r.worker == "A");
        let b_run = all.iter().find(|r| r.task == *id && r.worker == "B");
        if let (Some(a_run), Some(b_run)) = (a_run, b_run) {
            let a_end = a_run.end.unwrap_or_else(SystemTime::now);
            let after_partition = a_end.duration_since(partitioned).unwrap_or_default();
            let gap = match b_run.start.duration_since(a_end) {
                Ok(d) => format!("stopped {d:?} before B started it"),
                Err(e) => format!("ran {:?} past B's start", e.duration()),
            };
            eprintln!(
                "task {id}: A's handler ran {after_partition:?} into the partition and {gap}"
            );
        }
    }
    let overlaps = runs.overlaps(&db).await;
    assert_eq!(overlaps, 0, "overlapping runs of one task: {all:#?}");
    assert_eq!(
        a.stats.succeeded.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    a.abort();
    b.abort();
}

/// Issue 14, item 3: the handlers' pool starved (defaults: pool 8,
/// concurrency 10) by handlers that hold `ctx.pool()` connections for
/// several leases: twenty tasks, so that each of the two workers runs ten
/// handlers on eight connections. No task may run on both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starved_pool_does_not_run_a_task_twice_at_once() {
    let db = TestDb::with(|c| {
        c.worker.lease = Duration::from_secs(2);
        c.worker.rescue_interval = Duration::from_millis(200);
        c.worker.poll_interval = Duration::from_millis(500);
    })
    .await;
    assert_eq!(db.config.postgres.pool_size, 8);
    assert_eq!(db.config.worker.concurrency, 10);
    let runs = Runs::default();
    let mut workers = Vec::new();
    for name in ["A", "B"] {
        let runs = runs.clone();
        let mut reg = Registry::new();
        reg.register("fault.hog", move |ctx: TaskContext, _p: Value| {
            let guard = runs.begin(&ctx, name);
            async move {
                let _guard = guard;
                let client = ctx.pool().get().await?;
                tokio::time::sleep(Duration::from_secs(6)).await;
                drop(client);
                Ok(())
            }
        });
        workers.push(WorkerTask::start(&db.config, reg));
    }
    enqueue(&db, "fault.hog", json!({}), 20).await;
    let done = until_sql(
        &db,
        Duration::from_secs(45),
        "SELECT count(*) FROM herald.tasks",
        0,
    )
    .await;
    let overlaps = runs.overlaps(&db).await;
    let all = runs.snapshot();
    let mut per_task = std::collections::HashMap::<i64, usize>::new();
    for r in &all {
        *per_task.entry(r.task).or_default() += 1;
    }
    eprintln!(
        "starved pool: {} runs of {} tasks, {overlaps} overlapping pairs",
        all.len(),
        per_task.len()
    );
    assert_eq!(overlaps, 0, "overlapping runs: {all:#?}");
    assert!(done, "all twenty tasks finish");
    for w in workers {
        w.abort();
    }
}

/// A handler that records its run and waits for `gate` to open.
fn gated(registry: &mut Registry, kind: &str, runs: &Runs, gate: &Arc<tokio::sync::Notify>) {
    let (runs, gate) = (runs.clone(), gate.clone());
    registry.register(kind, move |ctx: TaskContext, _p: Value| {
        let guard = runs.begin(&ctx, "A");
        let gate = gate.clone();
        async move {
            let _guard = guard;
            gate.notified().await;
            Ok(())
        }
    });
}

/// Issue 14, item 4: the completer's connections are cut and refused for
/// 2 s (more than its old 1 s of retries, less than the lease) just as the
/// handlers finish: every outcome is written once the network is back, and
/// no task runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_survive_a_short_outage() {
    let db = TestDb::with(|c| {
        c.worker.lease = Duration::from_secs(6);
        c.worker.rescue_interval = Duration::from_millis(200);
        c.worker.poll_interval = Duration::from_millis(500);
        c.worker.retain_completed = Some(Duration::from_secs(3600));
    })
    .await;
    let (proxy, url) = Proxy::for_url(&db.config.database_url).await;
    let mut config = db.config.clone();
    config.database_url = url;
    let runs = Runs::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let mut reg = Registry::new();
    gated(&mut reg, "fault.gated", &runs, &gate);
    let w = WorkerTask::start(&config, reg);
    enqueue(&db, "fault.gated", json!({}), 8).await;
    assert!(until(Duration::from_secs(10), || runs.started_by("A") == 8).await);
    proxy.refuse();
    proxy.cut();
    gate.notify_waiters();
    assert!(
        until(Duration::from_secs(2), || runs
            .snapshot()
            .iter()
            .all(|r| r.end.is_some()))
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.heal();
    let completed = until_sql(
        &db,
        Duration::from_secs(8),
        "SELECT count(*) FROM herald.tasks WHERE state = 'succeeded'",
        8,
    )
    .await;
    // Longer than a lease: a dropped completion's task would be rescued and
    // run again meanwhile.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let all = runs.snapshot();
    eprintln!("completer outage: {} runs of 8 tasks", all.len());
    assert!(completed, "all eight completed within 8 s of the heal");
    assert_eq!(all.len(), 8, "each task ran once: {all:#?}");
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE state = 'succeeded' AND attempts = 1")
            .await,
        8
    );
    w.abort();
}

/// Issue 14, items 4 and 10: one batch of outcomes holding an error text
/// with a NUL byte, a huge error text, a snooze longer than an interval
/// holds, plain failures and successes: every outcome is written, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_outcomes_do_not_hold_back_their_batch() {
    let db = TestDb::with(|c| {
        c.worker.lease = Duration::from_secs(30);
        c.worker.retry_base = Duration::from_secs(600);
        c.worker.retry_max = Duration::from_secs(600);
        c.worker.poll_interval = Duration::from_millis(500);
    })
    .await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut reg = Registry::new();
    {
        let (gate, started) = (gate.clone(), started.clone());
        reg.register("fault.mixed", move |_ctx: TaskContext, p: Value| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                gate.notified().await;
                match p["do"].as_str() {
                    Some("nul") => Err(anyhow::anyhow!("bad\0byte")),
                    Some("huge") => Err(anyhow::anyhow!("{}", "x".repeat(1 << 20))),
                    Some("fail") => Err(anyhow::anyhow!("plain failure")),
                    Some("snooze") => Ok(herald::Outcome::Snooze(Duration::MAX)),
                    _ => Ok(herald::Outcome::Done),
                }
            }
        });
    }
    let w = WorkerTask::start(&db.config, reg);
    let mut ids = Vec::new();
    for what in [
        "nul", "fail", "huge", "snooze", "ok", "nul", "fail", "ok", "snooze", "fail",
    ] {
        ids.extend(enqueue(&db, "fault.mixed", json!({ "do": what }), 1).await);
    }
    assert!(
        until(Duration::from_secs(10), || {
            started.load(std::sync::atomic::Ordering::SeqCst) == 10
        })
        .await
    );
    gate.notify_waiters();
    let client = db.client().await;
    let written = until_sql(
        &db,
        Duration::from_secs(5),
        "SELECT count(*) FROM herald.tasks WHERE state = 'ready'",
        8,
    )
    .await;
    let rows = client
        .query(
            "SELECT payload->>'do', state, coalesce(left(last_error, 40), ''), \
                    coalesce(length(last_error), 0), run_at > now() + interval '50 years' \
             FROM herald.tasks ORDER BY id",
            &[],
        )
        .await
        .expect("tasks");
    for r in &rows {
        eprintln!(
            "{:?} {:?} {:?} len {} far {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i32>(3),
            r.get::<_, bool>(4)
        );
    }
    assert!(written, "eight failures and snoozes written within 5 s");
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE payload->>'do' = 'ok'")
            .await,
        0,
        "successes written"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE last_error = 'badbyte'")
            .await,
        2,
        "NUL stripped"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM herald.tasks WHERE payload->>'do' = 'huge' \
             AND length(last_error) < 10000 AND jsonb_array_length(errors) = 1"
        )
        .await,
        1,
        "huge error text bounded"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM herald.tasks WHERE payload->>'do' = 'snooze' \
             AND run_at > now() + interval '50 years' AND attempts = 0"
        )
        .await,
        2,
        "snooze clamped"
    );
    w.abort();
}

/// Issue 14, item 10: the errors array of a task stays bounded however
/// many attempts fail.
#[tokio::test]
async fn errors_array_is_bounded() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let id: i64 = client
        .query_one(
            "SELECT herald.enqueue('fault.any', '{}', max_attempts => 1000)",
            &[],
        )
        .await
        .expect("enqueue")
        .get(0);
    for attempt in 1..=60 {
        client
            .execute(
                "UPDATE herald.tasks SET state = 'running', attempts = $2, leased_by = 'w', \
                 lease_expires_at = now() + interval '1 minute' WHERE id = $1",
                &[&id, &attempt],
            )
            .await
            .expect("lease");
        let what: String = client
            .query_one(
                "SELECT herald.fail_task($1, $2, 'w', repeat('e', 100000), now())",
                &[&id, &attempt],
            )
            .await
            .expect("fail_task")
            .get(0);
        assert_eq!(what, "retry");
    }
    let row = client
        .query_one(
            "SELECT jsonb_array_length(errors), length(last_error), \
                    (errors->-1->>'attempt')::int FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .expect("task");
    let (n, len, last): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
    eprintln!("after 60 failed attempts: {n} errors kept, last_error {len} chars");
    assert!(n <= 25, "errors array bounded: {n}");
    assert_eq!(last, 60, "the newest error is kept");
    assert!(len <= 10_000, "error text bounded: {len}");
}

/// Issue 14, item 5: a handler that ignores its token and never returns is
/// stopped at the worker's default task timeout and its slot is freed; the
/// oldest-running gauge shows it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_handler_is_stopped_at_the_default_timeout() {
    let db = TestDb::with(|c| {
        c.worker.queues = vec!["hung=1".into()];
        c.worker.lease = Duration::from_secs(3);
        c.worker.task_timeout = Duration::from_secs(3);
        c.worker.poll_interval = Duration::from_millis(500);
    })
    .await;
    herald::telemetry::init_metrics();
    let mut reg = Registry::new();
    reg.register("fault.hang", |_ctx: TaskContext, _p: Value| async {
        std::future::pending::<()>().await;
        Ok(())
    });
    let w = WorkerTask::start(&db.config, reg);
    let client = db.client().await;
    for kind in ["fault.hang", "herald.noop"] {
        let task = Task::new(kind, &json!({}))
            .expect("task")
            .queue("hung")
            .max_attempts(1);
        herald::queue::enqueue(&client, &task)
            .await
            .expect("enqueue");
    }
    let gauge = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("herald_task_oldest_running_seconds{queue=\"hung\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let seen = until(Duration::from_secs(4), || {
        gauge(&herald::telemetry::render_metrics()) >= 1.0
    })
    .await;
    let freed = until_sql(
        &db,
        Duration::from_secs(8),
        "SELECT count(*) FROM herald.tasks",
        0,
    )
    .await;
    assert!(freed, "the hung task timed out and the next one ran");
    assert_eq!(
        db.count(
            "SELECT count(*) FROM herald.dead_letters WHERE kind = 'fault.hang' \
             AND last_error LIKE 'timed out after%'"
        )
        .await,
        1
    );
    assert!(
        seen,
        "herald_task_oldest_running_seconds showed the hung task"
    );
    w.abort();
}

/// Issue 14, item 9: a claim commits but its reply never arrives (replies
/// held back, then the connection cut before they pass). The worker hands the tasks back
/// once reconnected: they run at once, on their first attempt, instead of
/// waiting out a 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_claim_reply_hands_the_tasks_back() {
    let db = TestDb::with(|c| {
        c.worker.poll_interval = Duration::from_millis(300);
        c.worker.retain_completed = Some(Duration::from_secs(3600));
    })
    .await;
    assert_eq!(db.config.worker.lease, Duration::from_secs(30));
    let (proxy, url) = Proxy::for_url(&db.config.database_url).await;
    let mut config = db.config.clone();
    config.database_url = url;
    let runs = Runs::default();
    let mut reg = Registry::new();
    {
        let runs = runs.clone();
        reg.register("fault.quick", move |ctx: TaskContext, _p: Value| {
            let guard = runs.begin(&ctx, "A");
            async move {
                drop(guard);
                Ok(())
            }
        });
    }
    let w = WorkerTask::start(&config, reg);
    let worker_id = {
        // The worker is up once it sleeps on its wake lock.
        assert!(
            until(Duration::from_secs(10), || w
                .stats
                .sleeps
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0)
            .await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Replies held 2 s rather than blackholed: a claim on a connection
        // that must first be opened or prepare its statement still reaches
        // the server, and the test cuts before its reply passes.
        proxy.delay(crate::common::proxy::Dir::Down, Duration::from_secs(2));
        // All five in one statement, so that one claim takes them all.
        let tasks: Vec<Task> = (0..5)
            .map(|_| Task::new("fault.quick", &json!({})).expect("task"))
            .collect();
        herald::queue::enqueue_batch(&db.client().await, &tasks)
            .await
            .expect("enqueue");
        assert!(
            until_sql(
                &db,
                Duration::from_secs(15),
                "SELECT count(*) FROM herald.tasks WHERE state = 'running'",
                5
            )
            .await,
            "the claim committed"
        );
        proxy.cut();
        let client = db.client().await;
        let id: String = client
            .query_one("SELECT min(leased_by) FROM herald.tasks", &[])
            .await
            .expect("leased_by")
            .get(0);
        id
    };
    assert_eq!(runs.snapshot().len(), 0, "the reply was held");
    proxy.heal();
    let healed = Instant::now();
    let done = until_sql(
        &db,
        Duration::from_secs(10),
        "SELECT count(*) FROM herald.tasks WHERE state = 'succeeded'",
        5,
    )
    .await;
    eprintln!(
        "lost claim reply: {} of 5 tasks ran within {:?} of the heal (worker {worker_id})",
        runs.snapshot().len(),
        healed.elapsed()
    );
    assert!(
        done,
        "the five tasks ran well before their 30 s lease ended"
    );
    assert!(
        runs.snapshot().iter().all(|r| r.attempt == 1),
        "no attempt charged"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE attempts = 1")
            .await,
        5
    );
    w.abort();
}

/// A `Write` into a shared buffer, for a log subscriber of the test's own.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Issue 14, item 10: lines a handler logs carry its task id and attempt; a
/// late completion refused by fencing is logged at info (docs/tasks.md);
/// metric series are made only for kinds the worker handles.
///
/// A current-thread runtime, so that the log subscriber set for this thread
/// (formatted as `telemetry::init` does, herald.* spans left out) sees the
/// worker's tasks.
#[tokio::test]
async fn task_logs_fencing_and_kind_labels() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let fmt = tracing_subscriber::fmt::layer()
        .compact()
        .with_ansi(false)
        .with_target(false)
        .with_writer(move || writer.clone())
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            !(meta.is_span() && meta.name().starts_with("herald."))
        }));
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(fmt);
    let _guard = tracing::subscriber::set_default(subscriber);
    herald::telemetry::init_metrics();

    let db = TestDb::with(|c| {
        c.worker.queues = vec!["logs".into()];
        c.worker.poll_interval = Duration::from_millis(300);
    })
    .await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut reg = Registry::new();
    {
        let (gate, started) = (gate.clone(), started.clone());
        reg.register("fault.chatty", move |_ctx: TaskContext, _p: Value| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                tracing::info!("hello from inside the handler");
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                gate.notified().await;
                Ok(())
            }
        });
    }
    let w = WorkerTask::start(&db.config, reg);
    let client = db.client().await;
    let task = Task::new("fault.chatty", &json!({}))
        .expect("task")
        .queue("logs");
    let id = herald::queue::enqueue(&client, &task)
        .await
        .expect("enqueue");
    assert!(
        until(Duration::from_secs(10), || started
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await
    );
    // Another worker takes the task over (as after a rescue) before this
    // one's handler returns and its heartbeat notices.
    client
        .execute(
            "UPDATE herald.tasks SET leased_by = 'other', attempts = attempts + 1, \
             lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("steal the lease");
    gate.notify_waiters();
    let refused = until(Duration::from_secs(5), || {
        logs.text()
            .lines()
            .any(|l| l.contains("lease had passed on") && l.contains(&format!("task={id}")))
    })
    .await;
    // A kind this worker has no handler for.
    let task = Task::new("fault.nobody.handles.this", &json!({}))
        .expect("task")
        .queue("logs")
        .max_attempts(1);
    herald::queue::enqueue(&client, &task)
        .await
        .expect("enqueue");
    let metrics_seen = until(Duration::from_secs(5), || {
        herald::telemetry::render_metrics().contains(
            "herald_tasks_completed_total{queue=\"logs\",kind=\"unknown\",outcome=\"dead\"}",
        )
    })
    .await;
    let text = logs.text();
    let hello = text
        .lines()
        .find(|l| l.contains("hello from inside the handler"))
        .unwrap_or_default()
        .to_string();
    eprintln!("handler's line: {hello}");
    let rendered = herald::telemetry::render_metrics();
    w.abort();
    assert!(
        hello.contains(&format!("task={id}")) && hello.contains("attempt=1"),
        "the handler's log line names its task and attempt: {hello:?}"
    );
    assert!(
        refused,
        "the refused late completion is logged at info: {text}"
    );
    assert!(metrics_seen, "series under kind=\"unknown\"");
    assert!(
        !rendered.contains("fault.nobody.handles.this"),
        "no series for a kind without a handler"
    );
}
