//! Fault tests: worker. See main.rs.
//!
//! Handlers under test record every run (task id, attempt, worker, start,
//! end) through a guard whose drop marks the end, so a handler stopped by
//! dropping its future still closes its interval. The runs are written to a
//! table of the test's own (`fault_runs`) and the overlaps counted there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use herald::worker::WorkerStats;
use herald::{Config, Registry, Task, TaskContext, Worker};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::common::proxy::Proxy;
use super::common::TestDb;

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

/// An in-process worker on its own handlers' pool.
struct WorkerTask {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<herald::Result<()>>,
    stats: Arc<WorkerStats>,
}

impl WorkerTask {
    fn start(config: &Config, registry: Registry) -> WorkerTask {
        let pool = herald::db::pool(config, "herald-worker").expect("worker pool");
        let worker = Worker::new(config, pool, registry);
        let stats = worker.stats();
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run(token.clone()));
        WorkerTask {
            token,
            handle,
            stats,
        }
    }

    /// Stop without waiting for handlers that may never end.
    fn abort(self) {
        self.token.cancel();
        self.handle.abort();
    }
}

/// Poll `cond` every 50 ms until it holds or `within` passes.
async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
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
    let b = WorkerTask::start(&db.config, reg_b);
    assert!(
        until(Duration::from_secs(12), || runs.started_by("B") == 3).await,
        "B rescues and starts the three tasks"
    );
    let rest = Duration::from_secs(15).saturating_sub(partitioned.elapsed().unwrap_or_default());
    tokio::time::sleep(rest).await;
    proxy.heal();
    tokio::time::sleep(Duration::from_secs(1)).await;

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
/// several leases. Two workers; no task may run on both at once.
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
    enqueue(&db, "fault.hog", json!({}), 10).await;
    let done = until_sql(
        &db,
        Duration::from_secs(40),
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
    assert!(done, "all ten tasks finish");
    for w in workers {
        w.abort();
    }
}
