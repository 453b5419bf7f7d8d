//! The worker runtime: runs handlers for tasks claimed from `herald.tasks`.
//!
//! Small services, each with one job (after River's layout):
//! - the *listener* holds a dedicated LISTEN connection (`herald_tasks`
//!   wakes producers, `herald_cancel` fires a running task's token);
//! - one *producer* per queue claims due tasks in batches with
//!   `FOR UPDATE SKIP LOCKED` into `running` under a lease, bounded by the
//!   queue's concurrency, and sleeps until the next `run_at` when idle;
//! - *executors* run one handler each, with timeout (the task's, its
//!   kind's, or `worker.task_timeout`), panic capture, cancellation, and a
//!   local lease deadline: a handler whose lease was not renewed in time is
//!   stopped before any other worker may rescue its task;
//! - the *completer* writes outcomes, successes in batches, each outcome on
//!   its own, retried while its lease holds;
//! - the *heartbeat* extends the leases of running attempts (fenced by
//!   attempt), pushes their local deadlines on, and notices lost ones and
//!   cancellation requests a NOTIFY missed;
//! - the *rescuer* returns tasks whose lease expired to the queue.
//!
//! Claims, completions, heartbeats and rescues use a small pool of the
//! worker's own, which handlers never see, each statement bounded in time.
//!
//! It must never complete, retry or release a task whose lease it no longer
//! holds: every write names the task's id, attempt and this worker's id. It
//! must never let a handler run past the point where another worker may
//! take its task.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::{poll_fn, BoxFuture};
use futures_util::FutureExt;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{describe_pg, Context, Error, Result};
use crate::telemetry::names::{event, metric};
use tracing::Instrument;

/// `application_name` of the worker's LISTEN connection.
pub const LISTEN_APPLICATION_NAME: &str = "herald-worker-listen";
/// The wake lock ("herw", 2) an idle worker holds while it sleeps; the tasks
/// trigger (sql/V8) notifies only then. See [`crate::wake`].
pub const WAKE_LOCK: (i32, i32) = (crate::wake::WAKE_LOCK_SPACE, 2);
/// `application_name` of the session that holds it.
pub const WAKE_LOCK_APPLICATION_NAME: &str = "herald-worker-wake-lock";

/// What a handler asks for besides plain success (`Ok(())`).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: the task is completed.
    Done,
    /// Run again after this long without spending an attempt.
    Snooze(Duration),
    /// Stop for good: the task ends `cancelled` with this reason.
    Cancel(String),
}

impl From<()> for Outcome {
    fn from(_: ()) -> Outcome {
        Outcome::Done
    }
}

/// Marks a handler error as permanent: the task becomes a dead letter at
/// once instead of being retried. Build one with [`permanent`].
#[derive(Debug)]
pub struct Permanent(pub String);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}

/// An error that no retry can fix (bad input, say).
pub fn permanent(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Permanent(message.into()))
}

/// Exponential backoff with jitter: attempt n waits about
/// `base * 2^(n-1)`, at most `max`, spread by ±`jitter` (a fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl RetryPolicy {
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 40) - 1;
        let nominal = self
            .base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let spread = nominal.as_secs_f64() * self.jitter.clamp(0.0, 1.0);
        let offset = if spread > 0.0 {
            rand::rng().random_range(-spread..=spread)
        } else {
            0.0
        };
        Duration::from_secs_f64((nominal.as_secs_f64() + offset).max(0.0))
    }
}

/// What a handler gets besides its payload.
#[derive(Clone)]
pub struct TaskContext {
    pub id: i64,
    pub kind: String,
    pub queue: String,
    /// 1 on the first run.
    pub attempt: i32,
    pub max_attempts: i32,
    pub headers: Map<String, Value>,
    cancel: CancellationToken,
    pool: Pool,
    worker_id: Arc<str>,
    retain_completed: bool,
}

impl TaskContext {
    /// Fires when the task is cancelled, times out, loses its lease or the
    /// worker shuts down: stop soon after.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }

    /// The worker's Postgres pool, for handlers that write in their own
    /// transaction.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Complete this task through `client` (typically inside the handler's
    /// own transaction, so the task's completion commits with its effects).
    /// Fenced like every worker write: `false` when this attempt no longer
    /// holds the lease, and then nothing was changed. The completer's later
    /// write for the task finds no running row and does nothing.
    pub async fn complete_in<C: tokio_postgres::GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<bool> {
        let sql = if self.retain_completed {
            COMPLETE_RETAIN
        } else {
            COMPLETE_DELETE
        };
        let n = client
            .execute(
                sql,
                &[&vec![self.id], &vec![self.attempt], &&*self.worker_id],
            )
            .await
            .context(format!("completing task {}", self.id))?;
        Ok(n == 1)
    }

    /// Record progress in `herald.tasks.progress` (any JSON).
    pub async fn progress(&self, progress: impl serde::Serialize) -> Result<()> {
        let value = serde_json::to_string(&progress).map_err(|error| Error::Json {
            what: format!("progress of task {}", self.id),
            error,
        })?;
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE herald.tasks SET progress = $1::text::jsonb \
                 WHERE id = $2 AND attempts = $3 AND leased_by = $4 AND state = 'running'",
                &[&value, &self.id, &self.attempt, &&*self.worker_id],
            )
            .await
            .context(format!("recording progress of task {}", self.id))?;
        Ok(())
    }
}

type HandlerFn =
    Arc<dyn Fn(TaskContext, Value) -> BoxFuture<'static, anyhow::Result<Outcome>> + Send + Sync>;

/// Per-kind settings next to the handler.
#[derive(Debug, Clone, Default)]
pub struct KindOptions {
    pub retry: Option<RetryPolicy>,
    pub timeout: Option<Duration>,
}

#[derive(Clone)]
struct Entry {
    handler: HandlerFn,
    options: KindOptions,
}

/// Handlers by task kind.
#[derive(Clone)]
pub struct Registry {
    entries: HashMap<String, Entry>,
    /// Durable subscriptions declared with `subscribe_durable`; written to
    /// `herald.subscriptions` when the worker starts.
    pub(crate) durable: Vec<crate::subscriptions::Subscription>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// A registry with the built-in kinds `herald.noop`, `herald.sleep`
    /// (`{"ms": N}`), `herald.fail` (`{"message": "..."}`) and
    /// `herald.webhook` (a webhook subscription's delivery).
    pub fn new() -> Registry {
        let mut r = Registry {
            entries: HashMap::new(),
            durable: Vec::new(),
        };
        r.register("herald.noop", |_ctx, _payload: Value| async { Ok(()) });
        #[derive(serde::Deserialize)]
        struct Sleep {
            ms: u64,
        }
        r.register("herald.sleep", |ctx: TaskContext, p: Sleep| async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(p.ms)) => {}
                _ = ctx.cancellation().cancelled() => {}
            }
            Ok(())
        });
        #[derive(serde::Deserialize)]
        struct Fail {
            #[serde(default)]
            message: Option<String>,
        }
        r.register("herald.fail", |_ctx, p: Fail| async move {
            Err::<(), _>(anyhow::anyhow!(p
                .message
                .unwrap_or_else(|| "herald.fail always fails".into())))
        });
        crate::webhook::register(&mut r);
        r
    }

    /// Register `handler` for `kind`; its payload is decoded into `P` (a
    /// payload that does not decode is a permanent failure).
    pub fn register<P, F, Fut, O>(&mut self, kind: &str, handler: F) -> &mut Registry
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
        O: Into<Outcome>,
    {
        self.register_with(kind, KindOptions::default(), handler)
    }

    /// [`Registry::register`] with a retry policy and timeout for the kind.
    pub fn register_with<P, F, Fut, O>(
        &mut self,
        kind: &str,
        options: KindOptions,
        handler: F,
    ) -> &mut Registry
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
        O: Into<Outcome>,
    {
        let handler = Arc::new(handler);
        let kind_name = kind.to_string();
        let erased: HandlerFn = Arc::new(move |ctx, value| {
            let handler = handler.clone();
            let kind_name = kind_name.clone();
            async move {
                let payload: P = serde_json::from_value(value).map_err(|e| {
                    permanent(format!(
                        "payload of task kind {kind_name:?} does not decode as {}: {e}",
                        std::any::type_name::<P>()
                    ))
                })?;
                handler(ctx, payload).await.map(Into::into)
            }
            .boxed()
        });
        self.entries.insert(
            kind.to_string(),
            Entry {
                handler: erased,
                options,
            },
        );
        self
    }

    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }
}

// ---------------------------------------------------------------- SQL

// Completions run in a transaction of their own, pipelined with them and
// with its COMMIT (one round trip, as for the statement alone), that plans
// them on indexes (crate::db::plan_on_indexes). Their `id = ANY(...)`
// primary-key lookups were planned as a sequential scan of the table
// whenever the statistics showed few live rows, which is the normal state of
// a queue that keeps up: VACUUM counts the live rows but the table keeps its
// pages, and dead rows fill them (50 to 130 pages in O4; EXPLAIN ANALYZE
// during the run). All three messages are sent at the first poll, so a
// completion dropped midway still ends its transaction on the server before
// the connection is reused.
// The claim has the same lookup but stays a statement of its own: the two
// extra statements cost Q3 0.14 ms at the median (bench Q3 --runs 3: p50
// 0.61 → 0.75 ms), more than the scan they save.
const PLAN_ON_INDEXES: &str = concat!("BEGIN; ", crate::db::plan_on_indexes!());

// `id = ANY(ARRAY(...))` keeps the update on the primary key: a join
// against the CTE lets the planner hash-join over a scan of the whole table.
// `{after}` is empty, or CLAIM_AFTER's bound (see `Resume`).
const CLAIM_TEMPLATE: &str = "
UPDATE herald.tasks t
SET state = 'running', attempts = t.attempts + 1, leased_by = $3,
    lease_expires_at = now() + make_interval(secs => $4), started_at = now()
WHERE t.id = ANY(ARRAY(
    SELECT id FROM herald.tasks
    WHERE state = 'ready' AND queue = $1 AND run_at <= now() {after}
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED))
RETURNING t.id, t.kind, t.payload::text, t.headers::text, t.attempts, t.max_attempts,
          extract(epoch FROM t.timeout)::float8, extract(epoch FROM now() - t.run_at)::float8,
          t.priority, t.run_at";
static CLAIM: LazyLock<String> = LazyLock::new(|| CLAIM_TEMPLATE.replace("{after}", ""));
// The row comparison is a bound of the index scan: it starts at the
// resume point instead of walking the entries of tasks claimed since the
// last VACUUM (see `Resume`).
static CLAIM_AFTER: LazyLock<String> = LazyLock::new(|| {
    CLAIM_TEMPLATE.replace("{after}", "AND priority = $5 AND (run_at, id) > ($6, $7)")
});

// Seconds until the queue's earliest ready task is due (≤ 0: due now).
const NEXT_DUE: &str = "
SELECT extract(epoch FROM (min(run_at) - now()))::float8
FROM herald.tasks WHERE state = 'ready' AND queue = $1";

// Ids go through `= ANY` (primary-key lookups); $1 is sorted and unique, so
// the attempt each id was claimed at is found by binary search
// (width_bucket). array_position scanned the array for every row: 7 of the
// 10 ms that deleting 1,000 tasks took. A join against unnest() gets a
// generic plan that scans the table once per id.
const COMPLETE_DELETE: &str = "
DELETE FROM herald.tasks t
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]";

const COMPLETE_RETAIN: &str = "
UPDATE herald.tasks t
SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL, leased_by = NULL
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]";

// Completions that matched no row: those of tasks still unfinished were
// refused by fencing (the others the handler completed itself).
const STILL_UNFINISHED: &str =
    "SELECT id FROM herald.tasks WHERE id = ANY($1) AND state IN ('ready', 'running')";

const FAIL: &str = "SELECT herald.fail_task($1, $2, $3, $4, now() + make_interval(secs => $5), $6)";

// Snooze and release give the attempt back: the task did not fail.
const REQUEUE: &str = "
WITH u AS (
    UPDATE herald.tasks
    SET state = 'ready', run_at = now() + make_interval(secs => $4), attempts = attempts - 1,
        lease_expires_at = NULL, leased_by = NULL
    WHERE id = $1 AND attempts = $2 AND leased_by = $3 AND state = 'running'
    RETURNING 1
)
SELECT pg_notify('herald_tasks', '') FROM u";

const CANCELLED: &str = "
UPDATE herald.tasks
SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL, leased_by = NULL,
    last_error = $4
WHERE id = $1 AND attempts = $2 AND leased_by = $3 AND state = 'running'";

// Fenced by attempt: an earlier attempt's renewal must not extend a later
// one's lease. $1 sorted and unique, as for COMPLETE_*.
const HEARTBEAT: &str = "
UPDATE herald.tasks t
SET lease_expires_at = now() + make_interval(secs => $4)
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]
RETURNING t.id, t.attempts, t.cancel_requested_at IS NOT NULL";

// After a failed claim: tasks leased to this worker in this queue that no
// executor of it runs ($3) go back to the queue with the attempt the claim
// charged given back; their run_at is kept, so they keep their place.
const HAND_BACK: &str = "
WITH u AS (
    UPDATE herald.tasks
    SET state = 'ready', attempts = attempts - 1, lease_expires_at = NULL, leased_by = NULL
    WHERE state = 'running' AND leased_by = $1 AND queue = $2 AND NOT (id = ANY($3))
    RETURNING 1
)
SELECT count(*) FROM u";

const RESCUE: &str = "SELECT herald.rescue_expired_leases(1000)";

const REMOVE_FINISHED: &str = "
DELETE FROM herald.tasks WHERE id IN (
    SELECT id FROM herald.tasks
    WHERE state IN ('succeeded', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
    LIMIT 1000)";

// ---------------------------------------------------------------- runtime

/// Where a claim that filled its batch ended, to start the next claim
/// there.
///
/// A claim moves tasks out of the claim index's predicate, but their old
/// entries stay in the index, dead, until VACUUM; they sit at its front,
/// where every claim from the start walks them. Autovacuum visits a table
/// at most once per `autovacuum_naptime` (a minute by default), and
/// draining a backlog of 1,000,000 tasks left half a million such entries:
/// 8.8 ms of a claim's 15 ms went to passing them (EXPLAIN ANALYZE), and
/// the drain slowed down as it went. So while claims come back full (a
/// backlog), the next one starts after the last task claimed, within its
/// priority. Tasks that become ready before that point meanwhile (a higher
/// priority, a run_at in the past, a rescued lease) are found by the next
/// claim from the start: one at least every `RESUME_FOR`, and after any
/// claim that comes back short.
#[derive(Debug, Clone)]
struct Resume {
    priority: i32,
    run_at: chrono::DateTime<chrono::Utc>,
    id: i64,
    /// When the last claim from the start ran.
    since: Instant,
}

/// Longest a worker claims from a resume point before it claims from the
/// start of the index again.
const RESUME_FOR: Duration = Duration::from_millis(200);

impl Resume {
    /// The last task of `rows` in claim order (priority descending, then
    /// run_at, then id); claim rows carry priority and run_at in columns 8
    /// and 9.
    fn after(rows: &[tokio_postgres::Row], since: Instant) -> Option<Resume> {
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i32>(8),
                    r.get::<_, chrono::DateTime<chrono::Utc>>(9),
                    r.get::<_, i64>(0),
                )
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)))
            .map(|(priority, run_at, id)| Resume {
                priority,
                run_at,
                id,
                since,
            })
    }
}

/// Why a running task's token fired.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StopReason {
    Cancelled,
    LeaseLost,
    Shutdown,
}

struct Running {
    token: CancellationToken,
    reason: Option<StopReason>,
    lease: Arc<Lease>,
    queue: Arc<str>,
    started: Instant,
}

/// A running attempt's key: a task re-claimed by this worker while its
/// earlier attempt is still finishing is a second entry, renewed on its own.
type AttemptKey = (i64, i32);

/// The local view of one attempt's lease: the instant by which this worker
/// stops the handler unless a renewal succeeds first.
///
/// The server's lease ends `lease` after *it* ran the claim or heartbeat,
/// which is after this worker sent it; counting from the sending instant
/// (minus `lease_margin`) ends the handler before any other worker may
/// rescue the task, whatever the network or the pool did meanwhile.
struct Lease {
    /// Microseconds after `Shared::epoch`.
    deadline_us: std::sync::atomic::AtomicU64,
}

impl Lease {
    fn new(shared: &Shared, sent: Instant) -> Lease {
        let lease = Lease {
            deadline_us: std::sync::atomic::AtomicU64::new(0),
        };
        lease.renew(shared, sent);
        lease
    }

    /// A renewal sent at `sent` succeeded.
    fn renew(&self, shared: &Shared, sent: Instant) {
        let until = sent.saturating_duration_since(shared.epoch) + shared.hold;
        self.deadline_us.fetch_max(
            until.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn deadline(&self, shared: &Shared) -> Instant {
        shared.epoch
            + Duration::from_micros(self.deadline_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Resolves once the deadline passed without a renewal pushing it on,
    /// or at `timeout_at`, whichever comes first.
    async fn expired_or(&self, shared: &Shared, timeout_at: Instant) -> Limit {
        loop {
            let deadline = self.deadline(shared);
            let now = Instant::now();
            if now >= deadline {
                return Limit::Lease;
            }
            if now >= timeout_at {
                return Limit::Timeout;
            }
            tokio::time::sleep_until(deadline.min(timeout_at).into()).await;
        }
    }
}

/// Which limit ended a handler.
enum Limit {
    Lease,
    Timeout,
}

#[derive(Debug)]
enum Result_ {
    Done,
    Failed {
        error: String,
        permanent: bool,
        retry_in: Duration,
    },
    /// Snoozed by the handler.
    Requeue(Duration),
    /// Handed back at shutdown, to run at once elsewhere.
    Released,
    Cancelled(String),
    /// Nothing to write: the lease is gone.
    Abandoned,
}

impl Result_ {
    /// Texts made writable (see `clean_text`).
    fn cleaned(self) -> Result_ {
        match self {
            Result_::Failed {
                error,
                permanent,
                retry_in,
            } => Result_::Failed {
                error: clean_text(error),
                permanent,
                retry_in,
            },
            Result_::Cancelled(reason) => Result_::Cancelled(clean_text(reason)),
            other => other,
        }
    }
}

struct Completion {
    id: i64,
    attempt: i32,
    result: Result_,
    /// Written only while this is not past: after it, fencing would refuse
    /// the write anyway.
    lease: Arc<Lease>,
    queue: Arc<str>,
    kind: String,
    /// How long the handler ran.
    run: Duration,
    /// The task's `herald.task.run` span: it ends once the outcome is written.
    span: tracing::Span,
}

/// Counters for tests, benches and the CLI.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub claimed: std::sync::atomic::AtomicU64,
    pub succeeded: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub rescued: std::sync::atomic::AtomicU64,
    /// Whether the LISTEN connection is up now (`/readyz`).
    pub listening: std::sync::atomic::AtomicBool,
    /// Times this worker took the wake lock to sleep.
    pub sleeps: std::sync::atomic::AtomicU64,
    /// Whether it holds the wake lock now (producers notify).
    pub asleep: std::sync::atomic::AtomicBool,
}

struct Shared {
    config: Config,
    /// The handlers' pool (`TaskContext::pool`).
    pool: Pool,
    /// The worker's own connections (claims, completions, heartbeats,
    /// rescues), which no handler can take: handlers holding every pooled
    /// connection must not stop leases from being renewed.
    internal: Pool,
    registry: Registry,
    id: Arc<str>,
    running: Mutex<HashMap<AttemptKey, Running>>,
    /// Base of every `Lease` deadline.
    epoch: Instant,
    /// How long after a renewal is sent the handler may run on:
    /// `lease - lease_margin`.
    hold: Duration,
    stats: Arc<WorkerStats>,
    default_retry: RetryPolicy,
    /// Tasks finished since this process last vacuumed herald.tasks.
    vacuum: crate::vacuum::Vacuum,
}

pub struct Worker {
    shared: Arc<Shared>,
    queues: Vec<(String, usize)>,
    /// Why the worker's own pool could not be built; `run` returns it.
    setup_error: Option<Error>,
}

impl Worker {
    /// A worker for the queues and concurrency of `config.worker`.
    pub fn new(config: &Config, pool: Pool, registry: Registry) -> Worker {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let id = format!(
            "{host}:{}:{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[24..]
        );
        let queues = config.worker.queue_concurrency();
        // One connection per producer (claims), one each for the completer,
        // the heartbeat and the rescuer; opened on demand.
        let mut own = config.clone();
        own.postgres.pool_size = queues.len() + 3;
        let (internal, setup_error) = match crate::db::pool(&own, "herald-worker") {
            Ok(p) => (p, None),
            Err(e) => (pool.clone(), Some(e)),
        };
        let cfg = &config.worker;
        Worker {
            setup_error,
            shared: Arc::new(Shared {
                default_retry: RetryPolicy {
                    base: config.worker.retry_base,
                    max: config.worker.retry_max,
                    jitter: 0.2,
                },
                vacuum: crate::vacuum::Vacuum::new(
                    "herald.tasks",
                    config.worker.vacuum_after,
                    pool.clone(),
                ),
                config: config.clone(),
                pool,
                internal,
                registry,
                id: id.into(),
                running: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                hold: cfg.lease.saturating_sub(cfg.lease_safety_margin()),
                stats: Arc::new(WorkerStats::default()),
            }),
            queues,
        }
    }

    /// This worker's id, as written to `herald.tasks.leased_by`.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.shared.stats.clone()
    }

    /// Run until `shutdown`: then stop claiming, give tasks in flight
    /// `worker.shutdown_grace` to finish, cancel the rest and hand their
    /// leases back so another worker takes them at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if let Some(e) = self.setup_error {
            return Err(e);
        }
        self.shared.config.worker.validate()?;
        {
            let client = self.shared.pool.get().await?;
            crate::migrate::check_schema(&client).await?;
            for sub in &self.shared.registry.durable {
                crate::subscriptions::upsert(&**client, sub, "api").await?;
            }
        }
        let shared = self.shared;
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let wake_tx = Arc::new(wake_tx);
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let services = CancellationToken::new();

        let idle = Arc::new(crate::wake::Idle::new(self.queues.len()));
        let listener = tokio::spawn(listen(
            shared.clone(),
            wake_tx.clone(),
            idle.clone(),
            services.clone(),
        ));
        let completer = tokio::spawn(complete(shared.clone(), done_rx));
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), services.clone()));
        let rescuer = tokio::spawn(rescue(shared.clone(), services.clone()));

        let mut producers = Vec::new();
        let mut semaphores = Vec::new();
        for (queue, concurrency) in self.queues.clone() {
            let sem = Arc::new(Semaphore::new(concurrency));
            semaphores.push((sem.clone(), concurrency));
            producers.push(tokio::spawn(produce(
                shared.clone(),
                queue,
                sem,
                wake_rx.clone(),
                idle.clone(),
                done_tx.clone(),
                shutdown.clone(),
            )));
        }
        tracing::info!(worker = %shared.id, queues = ?self.queues, "worker started");
        for p in producers {
            let _ = p.await;
        }
        // Shutdown: wait for the tasks in flight, up to the grace period.
        let grace = shared.config.worker.shutdown_grace;
        let all_back = async {
            for (sem, n) in &semaphores {
                let _ = sem.acquire_many(*n as u32).await;
            }
        };
        if tokio::time::timeout(grace, all_back).await.is_err() {
            let mut running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
            tracing::warn!(
                tasks = running.len(),
                ?grace,
                "tasks still running after the grace period; cancelling them and releasing their leases"
            );
            for r in running.values_mut() {
                r.reason.get_or_insert(StopReason::Shutdown);
                r.token.cancel();
            }
        }
        // Executors hold their own sender; once all have sent, the
        // completer drains and ends.
        drop(done_tx);
        let _ = completer.await;
        services.cancel();
        let _ = tokio::join!(listener, heartbeat, rescuer);
        tracing::info!(worker = %shared.id, "worker stopped");
        Ok(())
    }
}

/// LISTEN herald_tasks (wake producers) and herald_cancel (fire tokens).
async fn listen(
    shared: Arc<Shared>,
    wake: Arc<watch::Sender<u64>>,
    idle: Arc<crate::wake::Idle>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut sessions = 0u64;
    loop {
        let sessions = &mut sessions;
        let session = async {
            let pg = crate::db::pg_config(&shared.config, LISTEN_APPLICATION_NAME)?;
            let (client, mut connection) = pg
                .connect(NoTls)
                .await
                .context("opening the worker's LISTEN connection")?;
            let (end_tx, end_rx) = tokio::sync::oneshot::channel::<String>();
            let shared2 = shared.clone();
            let wake2 = wake.clone();
            let notified = Arc::new(tokio::sync::Notify::new());
            let notified2 = notified.clone();
            tokio::spawn(async move {
                let end = loop {
                    match poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if n.channel() == "herald_cancel" {
                                if let Ok(id) = n.payload().parse::<i64>() {
                                    shared2.stop_task(id, StopReason::Cancelled);
                                }
                            } else {
                                wake2.send_modify(|g| *g += 1);
                                notified2.notify_one();
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break describe_pg(&e),
                        None => break "closed by the server".to_string(),
                    }
                };
                let _ = end_tx.send(end);
            });
            client
                .batch_execute("LISTEN herald_tasks; LISTEN herald_cancel")
                .await
                .context("LISTEN herald_tasks, herald_cancel")?;
            *sessions += 1;
            if *sessions > 1 {
                crate::telemetry::reconnected("postgres", "worker");
            }
            shared
                .stats
                .listening
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // The wake lock, on a session of its own (the LISTEN session
            // must stay idle to receive notifications while it waits).
            let lock = crate::wake::WakeLock::open(
                &shared.config,
                WAKE_LOCK_APPLICATION_NAME,
                WAKE_LOCK,
                false,
            )
            .await?;
            // Anything enqueued before LISTEN took effect is found now.
            wake.send_modify(|g| *g += 1);
            let listen_closed =
                async move { Some(end_rx.await.unwrap_or_else(|_| "driver ended".into())) };
            let gauges = crate::wake::Gauges {
                sleeps: &shared.stats.sleeps,
                asleep: &shared.stats.asleep,
            };
            let reason = lock
                .serve(Box::pin(listen_closed), &notified, &idle, &wake, gauges)
                .await
                .unwrap_or_else(|| "closed by the server".into());
            drop(client);
            Ok::<String, Error>(reason)
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            o = session => o,
        };
        shared
            .stats
            .listening
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                backoff = Duration::from_millis(50);
                tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "worker",
                    %reason, "worker LISTEN connection lost; reconnecting");
            }
            Err(error) => {
                tracing::warn!(%error, "worker LISTEN connection failed");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        wake.send_modify(|g| *g += 1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

impl Shared {
    /// Stop every attempt of task `id` this worker runs (a cancellation
    /// request names the task, not the attempt).
    fn stop_task(&self, id: i64, reason: StopReason) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for ((task, _), r) in running.iter_mut() {
            if *task == id {
                r.reason.get_or_insert(reason);
                r.token.cancel();
            }
        }
    }

    fn stop_attempt(&self, key: AttemptKey, reason: StopReason) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get_mut(&key) {
            r.reason.get_or_insert(reason);
            r.token.cancel();
        }
    }

    /// Longest a claim may wait for its reply: a claim answered later
    /// than this would start tasks with little of their lease left, and one
    /// whose reply never comes (a partition) must not hold the producer.
    /// Tasks it may have claimed are handed back after it (`hand_back`).
    fn claim_timeout(&self) -> Duration {
        self.hold / 2
    }

    /// Claim up to `limit` ready tasks of `queue` in claim order, from
    /// the start of the claim index or, with `after`, from where the last
    /// claim ended.
    async fn claim(
        &self,
        queue: &str,
        limit: usize,
        after: Option<&Resume>,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "a claim").await?;
        let claimed =
            tokio::time::timeout_at(deadline, self.claim_on(&client, queue, limit, after)).await;
        match claimed {
            Ok(rows) => rows,
            Err(_) => {
                discard(client);
                Err(Error::Timeout(
                    bound,
                    format!("claiming tasks from queue {queue:?}"),
                ))
            }
        }
    }

    async fn claim_on(
        &self,
        client: &deadpool_postgres::Object,
        queue: &str,
        limit: usize,
        after: Option<&Resume>,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let sql: &str = match after {
            None => &CLAIM,
            Some(_) => &CLAIM_AFTER,
        };
        let stmt = client
            .prepare_cached(sql)
            .await
            .context("preparing the task claim")?;
        let (limit, lease) = (limit as i64, self.config.worker.lease.as_secs_f64());
        let worker: &str = &self.id;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&queue, &limit, &worker, &lease];
        if let Some(r) = after {
            params.extend([
                &r.priority as &(dyn tokio_postgres::types::ToSql + Sync),
                &r.run_at,
                &r.id,
            ]);
        }
        client
            .query(&stmt, &params)
            .await
            .context(format!("claiming tasks from queue {queue:?}"))
    }

    /// Hand back what a failed claim may have leased to this worker in
    /// `queue`: the tasks leased to it there that none of its executors
    /// runs. Returns how many.
    async fn hand_back(&self, queue: &str) -> Result<i64> {
        let known: Vec<i64> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| &*r.queue == queue)
            .map(|((id, _), _)| *id)
            .collect();
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "a hand-back").await?;
        let worker: &str = &self.id;
        let row = tokio::time::timeout_at(
            deadline,
            client.query_one(HAND_BACK, &[&worker, &queue, &known]),
        )
        .await;
        match row {
            Ok(row) => Ok(row.context("handing back unknown leases")?.get(0)),
            Err(_) => {
                discard(client);
                Err(Error::Timeout(bound, "handing back unknown leases".into()))
            }
        }
    }

    async fn next_due(&self, queue: &str) -> Result<Option<f64>> {
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "next-due").await?;
        let row = tokio::time::timeout_at(deadline, async {
            let stmt = client
                .prepare_cached(NEXT_DUE)
                .await
                .context("preparing next-due")?;
            client
                .query_one(&stmt, &[&queue])
                .await
                .context("finding the next due task")
        })
        .await;
        match row {
            Ok(row) => Ok(row?.get(0)),
            Err(_) => {
                discard(client);
                Err(Error::Timeout(bound, "finding the next due task".into()))
            }
        }
    }
}

/// A connection of `pool` by `deadline`.
async fn checkout(
    pool: &Pool,
    deadline: tokio::time::Instant,
    bound: Duration,
    what: &str,
) -> Result<deadpool_postgres::Object> {
    match tokio::time::timeout_at(deadline, pool.get()).await {
        Ok(client) => Ok(client?),
        Err(_) => Err(Error::Timeout(
            bound,
            format!("checking out a connection for {what}"),
        )),
    }
}

/// Close a connection whose statement overran instead of returning it to
/// the pool: its reply may still arrive, or never (a partition).
fn discard(client: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(client));
}

/// Claim and start tasks of one queue while permits are free.
async fn produce(
    shared: Arc<Shared>,
    queue: String,
    sem: Arc<Semaphore>,
    mut wake: watch::Receiver<u64>,
    idle: Arc<crate::wake::Idle>,
    done: mpsc::UnboundedSender<Completion>,
    shutdown: CancellationToken,
) {
    let cfg = &shared.config.worker;
    let mut backoff = Duration::from_millis(100);
    let queue_label: Arc<str> = queue.as_str().into();
    let pickup = metrics::histogram!(metric::TASK_PICKUP, "queue" => queue.clone());
    // Free permits worth a claim while the queue is busy.
    let low_water = (sem.available_permits() / 4).clamp(1, cfg.batch_size);
    // Set while claims come back full; see `Resume`.
    let mut resume: Option<Resume> = None;
    // Set after a failed claim: it may have committed with its reply lost,
    // leaving tasks leased to this worker that no executor runs.
    let mut unsure = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        wake.borrow_and_update();
        if sem.available_permits() < low_water {
            // Busy: claiming one task per freed permit would cost a round
            // trip per task. Wait for a permit, then briefly for a batch.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                p = sem.acquire() => drop(p),
            }
            let _ = tokio::time::timeout(Duration::from_millis(2), async {
                drop(sem.acquire_many(low_water as u32).await)
            })
            .await;
        }
        if unsure {
            match shared.hand_back(&queue).await {
                Ok(n) => {
                    unsure = false;
                    if n > 0 {
                        tracing::warn!(%queue, tasks = n,
                            "handed back tasks a failed claim had leased to this worker");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %queue, "handing back unknown leases failed; backing off");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let want = sem.available_permits().min(cfg.batch_size);
        let t0 = Instant::now();
        let after = resume.take().filter(|r| r.since.elapsed() < RESUME_FOR);
        let claimed_rows = shared.claim(&queue, want, after.as_ref()).await;
        tracing::debug!(%queue, want, resumed = after.is_some(), elapsed = ?t0.elapsed(), "claimed");
        let rows = match claimed_rows {
            Ok(rows) => {
                backoff = Duration::from_millis(100);
                if rows.len() >= want {
                    let since = after.map_or(t0, |r| r.since);
                    resume = Resume::after(&rows, since);
                }
                rows
            }
            Err(error) => {
                unsure = true;
                tracing::warn!(%error, %queue, "claiming tasks failed; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let claimed = rows.len();
        if claimed > 0 {
            tracing::debug!(
                event = event::TASK_CLAIMED,
                herald.queue = queue.as_str(),
                herald.task.count = claimed as i64,
                "tasks claimed"
            );
        }
        shared
            .stats
            .claimed
            .fetch_add(claimed as u64, std::sync::atomic::Ordering::Relaxed);
        for row in rows {
            // Only this producer takes permits, so the ones counted above
            // are still free.
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                tracing::error!("no permit for a claimed task; it will be rescued after its lease");
                continue;
            };
            start(
                shared.clone(),
                &queue_label,
                &pickup,
                row,
                t0,
                permit,
                done.clone(),
            );
        }
        if claimed >= want {
            continue;
        }
        // Idle: sleep until the next task is due, a NOTIFY, or the poll.
        let mut pause = cfg.poll_interval;
        match shared.next_due(&queue).await {
            Ok(Some(secs)) if secs <= 0.0 => continue,
            Ok(Some(secs)) => pause = pause.min(Duration::from_secs_f64(secs)),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "finding the next due task failed"),
        }
        idle.idle();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.changed() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        idle.busy();
    }
}

/// Spawn the executor of one claimed task.
fn start(
    shared: Arc<Shared>,
    queue: &Arc<str>,
    pickup: &metrics::Histogram,
    row: tokio_postgres::Row,
    claim_sent: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<Completion>,
) {
    let id: i64 = row.get(0);
    let kind: String = row.get(1);
    let payload: String = row.get(2);
    let headers: String = row.get(3);
    let attempt: i32 = row.get(4);
    let max_attempts: i32 = row.get(5);
    let task_timeout: Option<f64> = row.get(6);
    let waited: Option<f64> = row.get(7);
    pickup.record(waited.unwrap_or(0.0).max(0.0));
    let token = CancellationToken::new();
    let lease = Arc::new(Lease::new(&shared, claim_sent));
    shared
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            (id, attempt),
            Running {
                token: token.clone(),
                reason: None,
                lease: lease.clone(),
                queue: queue.clone(),
                started: Instant::now(),
            },
        );
    let headers = match serde_json::from_str::<Value>(&headers) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let span = tracing::info_span!(
        "herald.task.run",
        otel.kind = "consumer",
        herald.queue = &**queue,
        herald.task.kind = kind.as_str(),
        herald.task.id = id,
        herald.task.attempt = attempt,
        herald.task.max_attempts = max_attempts,
        herald.task.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // The producer's trace context, stored at enqueue (or copied from the
    // event by the relay's fan-out), makes this span its child.
    crate::telemetry::set_parent_from_headers(&span, &headers);
    let ctx = TaskContext {
        id,
        kind: kind.clone(),
        queue: queue.to_string(),
        attempt,
        max_attempts,
        headers,
        cancel: token.clone(),
        pool: shared.pool.clone(),
        worker_id: shared.id.clone(),
        retain_completed: shared.config.worker.retain_completed.is_some(),
    };
    let queue = queue.clone();
    let task_span = span.clone();
    tokio::spawn(
        async move {
            tracing::debug!(event = event::TASK_STARTED, "task started");
            let t0 = Instant::now();
            let result = execute(&shared, ctx, &kind, &payload, task_timeout, &token, &lease)
                .await
                .cleaned();
            let _ = done.send(Completion {
                id,
                attempt,
                result,
                lease,
                queue,
                kind,
                run: t0.elapsed(),
                span: task_span,
            });
            drop(permit);
        }
        .instrument(span),
    );
}

async fn execute(
    shared: &Shared,
    ctx: TaskContext,
    kind: &str,
    payload: &str,
    task_timeout: Option<f64>,
    token: &CancellationToken,
    lease: &Lease,
) -> Result_ {
    let id = ctx.id;
    let attempt = ctx.attempt;
    let Some(entry) = shared.registry.entries.get(kind) else {
        return Result_::Failed {
            error: format!(
                "no handler for task kind {kind:?} on worker {} (it handles: {})",
                shared.id,
                shared.registry.kinds().join(", ")
            ),
            permanent: false,
            retry_in: retry_policy(shared, None).delay(attempt),
        };
    };
    let retry = retry_policy(shared, Some(entry));
    let value: Value = match serde_json::from_str(payload) {
        Ok(v) => v,
        Err(e) => {
            return Result_::Failed {
                error: format!("payload is not JSON: {e}"),
                permanent: true,
                retry_in: Duration::ZERO,
            }
        }
    };
    // The task's own timeout, else its kind's, else the worker's default:
    // a hung handler must not hold its slot (and renew its lease) forever.
    let timeout = task_timeout
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(1e9)))
        .or(entry.options.timeout)
        .unwrap_or(shared.config.worker.task_timeout);
    // The `herald.task.run` span is kept out of the log output (see
    // telemetry::init); this one is not, so the lines a handler logs name
    // its task and attempt.
    let log_span = tracing::info_span!("task", task = id, attempt);
    let run = AssertUnwindSafe((entry.handler)(ctx, value).instrument(log_span)).catch_unwind();
    let timeout_at = Instant::now() + timeout;
    let outcome = tokio::select! {
        r = run => Some(r),
        _ = token.cancelled() => None,
        // One timer for both limits.
        limit = lease.expired_or(shared, timeout_at) => match limit {
            Limit::Timeout => {
                token.cancel();
                tracing::warn!(task = id, attempt, ?timeout, "task timed out; its handler was stopped");
                return Result_::Failed {
                    error: format!("timed out after {timeout:?}"),
                    permanent: false,
                    retry_in: retry.delay(attempt),
                };
            }
            // Dropping the handler's future here stops it before the
            // server's lease can end, and the outcome is not written.
            Limit::Lease => {
                shared.stop_attempt((id, attempt), StopReason::LeaseLost);
                tracing::warn!(task = id, attempt, worker = &*shared.id,
                    "lease not renewed in time; handler stopped before another worker can take the task");
                return Result_::Abandoned;
            }
        },
    };
    let stop_reason = || {
        shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id, attempt))
            .and_then(|r| r.reason)
    };
    // A handler that noticed the token may return Ok: why the token fired
    // decides the outcome, not what the handler returned.
    let outcome = if token.is_cancelled() { None } else { outcome };
    match outcome {
        None => match stop_reason() {
            Some(StopReason::Cancelled) => Result_::Cancelled("cancelled on request".into()),
            Some(StopReason::Shutdown) => Result_::Released,
            _ => Result_::Abandoned,
        },
        Some(Err(panic)) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Result_::Failed {
                error: format!("handler panicked: {msg}"),
                permanent: false,
                retry_in: retry.delay(attempt),
            }
        }
        Some(Ok(Ok(Outcome::Done))) => Result_::Done,
        Some(Ok(Ok(Outcome::Snooze(d)))) => Result_::Requeue(d),
        Some(Ok(Ok(Outcome::Cancel(reason)))) => Result_::Cancelled(reason),
        Some(Ok(Err(error))) => {
            let permanent = error.downcast_ref::<Permanent>().is_some();
            Result_::Failed {
                error: format!("{error:#}"),
                permanent,
                retry_in: retry.delay(attempt),
            }
        }
    }
}

fn retry_policy(shared: &Shared, entry: Option<&Entry>) -> RetryPolicy {
    entry
        .and_then(|e| e.options.retry)
        .unwrap_or(shared.default_retry)
}

/// Write outcomes: successes in batches, the rest one by one.
///
/// A batch is retried until every outcome in it is written or its lease
/// (renewed by the heartbeat meanwhile) has passed: dropping it earlier
/// would make tasks that ran run again. Each outcome is written on its own,
/// so one the server refuses does not hold back the others.
async fn complete(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    const MAX_BATCH: usize = 1000;
    const MAX_YIELDS: usize = 8;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut outcomes: Vec<Option<Ended>> = Vec::with_capacity(MAX_BATCH);
    let mut meters = Meters::default();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // A claimed batch's executors finish together, but each is its own
        // task: the first to send wakes us before the others have run, and
        // writing it alone cost a commit for one task (a third of the
        // writes in Q2 were of one task). Yielding lets the ones already
        // running send too; a yield that brings nothing ends the wait.
        for _ in 0..MAX_YIELDS {
            let before = batch.len();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if (batch.len() == before && before > 1) || batch.len() >= MAX_BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
        let t0 = Instant::now();
        outcomes.clear();
        // Nothing to write for an attempt whose lease is gone.
        outcomes.extend(
            batch
                .iter()
                .map(|c| matches!(c.result, Result_::Abandoned).then_some(Ended::Lost)),
        );
        let mut pause = Duration::from_millis(50);
        loop {
            let bound = shared.claim_timeout();
            let deadline = tokio::time::Instant::now() + bound;
            if outcomes.iter().all(Option::is_some) {
                break;
            }
            let written = match checkout(&shared.internal, deadline, bound, "completions").await {
                Ok(client) => {
                    let w = tokio::time::timeout_at(
                        deadline,
                        write_completions(&shared, &client, &batch, &mut outcomes),
                    )
                    .await;
                    match w {
                        Ok(w) => w,
                        Err(_) => {
                            discard(client);
                            Err(Error::Timeout(bound, "recording task outcomes".into()))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let Err(error) = written else { break };
            // Outcomes whose lease has passed are given up: fencing would
            // refuse them, and the rescuer returns their tasks to the queue.
            let now = Instant::now();
            let mut pending = 0;
            for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
                if o.is_none() {
                    if c.lease.deadline(&shared) <= now {
                        tracing::error!(parent: &c.span, task = c.id, attempt = c.attempt, %error,
                            "could not record the task's outcome before its lease ended; it will run again");
                        *o = Some(Ended::Lost);
                    } else {
                        pending += 1;
                    }
                }
            }
            if pending == 0 {
                break;
            }
            tracing::warn!(%error, tasks = pending, "recording task outcomes failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        let outcomes_now: Vec<Ended> = outcomes.iter().map(|o| o.unwrap_or(Ended::Lost)).collect();
        report(&shared, &mut meters, &batch, &outcomes_now);
        // Each task left a dead row at its claim and one at its end.
        shared.vacuum.removed(batch.len() as u64);
        tracing::debug!(tasks = batch.len(), elapsed = ?t0.elapsed(), "outcomes recorded");
        let mut running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
        for c in batch.drain(..) {
            running.remove(&(c.id, c.attempt));
        }
    }
}

/// Whether a failed write may succeed when tried again: the connection
/// broke or timed out, or the server asked for a retry. Anything else
/// (the server refused this statement) would fail the same way again.
fn retryable(error: &Error) -> bool {
    match error {
        Error::Postgres { error, .. } => match error.code() {
            None => true,
            Some(code) => {
                let c = code.code();
                c.starts_with("08")
                    || c.starts_with("40")
                    || c.starts_with("53")
                    || c.starts_with("57")
            }
        },
        Error::Json { .. } | Error::InvalidTask(_) => false,
        _ => true,
    }
}

/// What became of each attempt, in batch order, for metrics and spans.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ended {
    Succeeded,
    Retried,
    Dead,
    Cancelled,
    Snoozed,
    Released,
    /// Nothing was written: the lease had passed on (the rescuer or another
    /// worker owns the task now).
    Lost,
}

impl Ended {
    const ALL: [Ended; 7] = [
        Ended::Succeeded,
        Ended::Retried,
        Ended::Dead,
        Ended::Cancelled,
        Ended::Snoozed,
        Ended::Released,
        Ended::Lost,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Ended::Succeeded => "succeeded",
            Ended::Retried => "retried",
            Ended::Dead => "dead",
            Ended::Cancelled => "cancelled",
            Ended::Snoozed => "snoozed",
            Ended::Released => "released",
            Ended::Lost => "lost",
        }
    }
}

/// The `kind` label of tasks of kinds this worker has no handler for.
const UNKNOWN_KIND: &str = "unknown";

/// Metric handles by queue and kind, made once: the completer records
/// thousands of outcomes a second.
#[derive(Default)]
struct Meters {
    by_queue: HashMap<Arc<str>, HashMap<String, KindMeters>>,
}

struct KindMeters {
    run: metrics::Histogram,
    ended: [Option<metrics::Counter>; 7],
}

impl Meters {
    fn kind(&mut self, queue: &Arc<str>, kind: &str) -> &mut KindMeters {
        let kinds = self.by_queue.entry(queue.clone()).or_default();
        if !kinds.contains_key(kind) {
            let run = metrics::histogram!(metric::TASK_RUN,
                "queue" => queue.to_string(), "kind" => kind.to_string());
            kinds.insert(
                kind.to_string(),
                KindMeters {
                    run,
                    ended: Default::default(),
                },
            );
        }
        kinds.get_mut(kind).expect("inserted above")
    }
}

/// Count the outcomes just written and close each task's span with its own.
fn report(shared: &Shared, meters: &mut Meters, batch: &[Completion], outcomes: &[Ended]) {
    for (c, &ended) in batch.iter().zip(outcomes) {
        // Series only for kinds this worker handles: a producer may write
        // any kind, and each label pair is a series kept forever.
        let kind = if shared.registry.entries.contains_key(&c.kind) {
            c.kind.as_str()
        } else {
            UNKNOWN_KIND
        };
        let m = meters.kind(&c.queue, kind);
        if !matches!(c.result, Result_::Abandoned | Result_::Released) {
            m.run.record(c.run.as_secs_f64());
        }
        let i = Ended::ALL.iter().position(|e| *e == ended).unwrap_or(0);
        m.ended[i]
            .get_or_insert_with(|| {
                metrics::counter!(metric::TASKS_COMPLETED,
                    "queue" => c.queue.to_string(), "kind" => kind.to_string(),
                    "outcome" => ended.as_str())
            })
            .increment(1);
        let span = &c.span;
        span.record("herald.task.outcome", ended.as_str());
        match ended {
            Ended::Succeeded => {
                tracing::debug!(parent: span, event = event::TASK_SUCCEEDED, "task succeeded")
            }
            Ended::Retried => {
                span.record("otel.status_code", "ERROR");
                let retry_in = match &c.result {
                    Result_::Failed { retry_in, .. } => retry_in.as_secs_f64(),
                    _ => 0.0,
                };
                tracing::debug!(parent: span, event = event::TASK_RETRIED, retry_in, "task will be retried")
            }
            Ended::Dead => {
                span.record("otel.status_code", "ERROR");
                metrics::counter!(metric::DEAD_LETTERS, "source" => "task").increment(1);
                tracing::warn!(parent: span, event = event::TASK_DEAD_LETTERED, task = c.id,
                    queue = &*c.queue, kind = c.kind.as_str(), "task moved to herald.dead_letters")
            }
            Ended::Cancelled => {
                tracing::info!(parent: span, event = event::TASK_CANCELLED, task = c.id, "task cancelled")
            }
            Ended::Snoozed => {
                tracing::debug!(parent: span, event = event::TASK_SNOOZED, "task snoozed")
            }
            Ended::Released => {
                tracing::debug!(parent: span, event = event::TASK_RELEASED, "task released at shutdown")
            }
            Ended::Lost => {
                tracing::info!(parent: span, event = event::TASK_ABANDONED, task = c.id,
                    attempt = c.attempt, worker = &*shared.id,
                    "task's lease had passed on; outcome not written")
            }
        }
    }
}

/// Write the outcomes of `batch` not yet written (`None` in `outcomes`),
/// filling in what became of each. Returns an error, with the rest left
/// `None`, when the connection fails; an outcome the server refuses is
/// logged and given up on its own.
async fn write_completions(
    shared: &Shared,
    client: &deadpool_postgres::Object,
    batch: &[Completion],
    outcomes: &mut [Option<Ended>],
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    // Sorted and unique by id, as COMPLETE_* look attempts up by binary
    // search.
    let mut done: Vec<(i64, i32)> = batch
        .iter()
        .zip(outcomes.iter())
        .filter(|(c, o)| o.is_none() && matches!(c.result, Result_::Done))
        .map(|(c, _)| (c.id, c.attempt))
        .collect();
    done.sort_unstable();
    done.dedup_by_key(|(id, _)| *id);
    let (ids, attempts): (Vec<i64>, Vec<i32>) = done.into_iter().unzip();
    if !ids.is_empty() {
        let sql = if shared.config.worker.retain_completed.is_some() {
            COMPLETE_RETAIN
        } else {
            COMPLETE_DELETE
        };
        let stmt = client
            .prepare_cached(sql)
            .await
            .context("preparing completion")?;
        let worker: &str = &shared.id;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&ids, &attempts, &worker];
        let (begin, completed, commit) = tokio::join!(
            client.batch_execute(PLAN_ON_INDEXES),
            client.execute(&stmt, &params),
            client.batch_execute("COMMIT"),
        );
        begin.context("beginning a completion")?;
        let completed = completed.context(format!("completing {} tasks", ids.len()))?;
        commit.context(format!("committing the completion of {} tasks", ids.len()))?;
        // Fewer rows than ids: those leases had passed to someone else (or
        // the handler completed the task itself with `complete_in`).
        shared.stats.succeeded.fetch_add(completed, Relaxed);
        // Rare: find which were refused, so that each is reported (a task
        // still unfinished was rescued or taken by another worker).
        let refused: Vec<i64> = if (completed as usize) < ids.len() {
            client
                .query(STILL_UNFINISHED, &[&ids])
                .await
                .context("finding refused completions")?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
            if o.is_none() && matches!(c.result, Result_::Done) {
                *o = Some(if refused.contains(&c.id) {
                    Ended::Lost
                } else {
                    Ended::Succeeded
                });
            }
        }
    }
    for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
        if o.is_some() {
            continue;
        }
        let written = write_one(shared, client, c).await;
        *o = Some(match written {
            Ok(ended) => ended,
            Err(error) if retryable(&error) => return Err(error),
            Err(error) => {
                tracing::error!(parent: &c.span, task = c.id, attempt = c.attempt, %error,
                    "the task's outcome was refused; its lease will expire and it runs again");
                Ended::Lost
            }
        });
    }
    Ok(())
}

/// Write one outcome other than success.
async fn write_one(
    shared: &Shared,
    client: &deadpool_postgres::Object,
    c: &Completion,
) -> Result<Ended> {
    use std::sync::atomic::Ordering::Relaxed;
    Ok(match &c.result {
        Result_::Done => Ended::Succeeded,
        Result_::Abandoned => Ended::Lost,
        Result_::Failed {
            error,
            permanent,
            retry_in,
        } => {
            let row = client
                .query_one(
                    FAIL,
                    &[
                        &c.id,
                        &c.attempt,
                        &&*shared.id,
                        error,
                        &interval_secs(*retry_in),
                        permanent,
                    ],
                )
                .await
                .context(format!("recording the failure of task {}", c.id))?;
            shared.stats.failed.fetch_add(1, Relaxed);
            let what: String = row.get(0);
            tracing::info!(parent: &c.span, event = event::TASK_FAILED, task = c.id,
                attempt = c.attempt, outcome = %what, %error, "task failed");
            match what.as_str() {
                "retry" => Ended::Retried,
                "dead" => Ended::Dead,
                "cancelled" => Ended::Cancelled,
                _ => Ended::Lost,
            }
        }
        Result_::Requeue(after) => {
            if requeue(client, shared, c, interval_secs(*after)).await? {
                Ended::Snoozed
            } else {
                Ended::Lost
            }
        }
        Result_::Released => {
            if requeue(client, shared, c, 0.0).await? {
                Ended::Released
            } else {
                Ended::Lost
            }
        }
        Result_::Cancelled(reason) => {
            let n = client
                .execute(CANCELLED, &[&c.id, &c.attempt, &&*shared.id, reason])
                .await
                .context(format!("cancelling task {}", c.id))?;
            if n == 1 {
                Ended::Cancelled
            } else {
                Ended::Lost
            }
        }
    })
}

/// Longest delay a snooze or retry is written with: `now() + interval`
/// must stay a valid timestamp (a `Duration` may hold far more).
const MAX_DELAY_SECS: f64 = 100.0 * 365.25 * 86400.0;

fn interval_secs(d: Duration) -> f64 {
    d.as_secs_f64().min(MAX_DELAY_SECS)
}

/// Longest error text or cancellation reason written to a task, in bytes.
const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Text a `text` column accepts, of bounded length: Postgres refuses NUL
/// bytes, and a handler's error (a response body, say) may be any size.
fn clean_text(mut text: String) -> String {
    if text.contains('\0') {
        text = text.replace('\0', "");
    }
    if text.len() > MAX_ERROR_BYTES {
        let total = text.len();
        let mut cut = MAX_ERROR_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… ({} of {total} bytes cut)", total - cut));
    }
    text
}

async fn requeue(
    client: &deadpool_postgres::Object,
    shared: &Shared,
    c: &Completion,
    after_secs: f64,
) -> Result<bool> {
    let rows = client
        .query(REQUEUE, &[&c.id, &c.attempt, &&*shared.id, &after_secs])
        .await
        .context(format!("requeueing task {}", c.id))?;
    Ok(!rows.is_empty())
}

/// Extend the leases of running tasks; stop the ones whose lease is gone or
/// whose cancellation was requested. Runs on the worker's own pool, each
/// round bounded by the interval, so a starved handlers' pool or a dead
/// connection cannot hold it; a round that fails leaves the local deadlines
/// where they were, and the executors stop their handlers at them.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let lease = shared.config.worker.lease;
    let every = shared.config.worker.heartbeat_every();
    let mut oldest = OldestGauges::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Only the newest attempt of a task can hold its lease.
        let mut held: Vec<(i64, i32)> = {
            let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
            oldest.update(&running);
            running.keys().copied().collect()
        };
        if held.is_empty() {
            continue;
        }
        held.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        held.dedup_by_key(|(id, _)| *id);
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
        let deadline = tokio::time::Instant::now() + every;
        let result = async {
            let client = checkout(&shared.internal, deadline, every, "a heartbeat").await?;
            let sent = Instant::now();
            let rows = tokio::time::timeout_at(
                deadline,
                client.query(
                    HEARTBEAT,
                    &[&ids, &attempts, &&*shared.id, &lease.as_secs_f64()],
                ),
            )
            .await;
            match rows {
                Ok(rows) => Ok((sent, rows.context("extending task leases")?)),
                Err(_) => {
                    discard(client);
                    Err(Error::Timeout(every, "extending task leases".into()))
                }
            }
        }
        .await;
        match result {
            Ok((sent, rows)) => {
                let renewed: HashMap<(i64, i32), bool> = rows
                    .iter()
                    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                    .collect();
                let mut lost = Vec::new();
                {
                    let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
                    for key in &held {
                        let Some(r) = running.get(key) else { continue };
                        match renewed.get(key) {
                            Some(cancel) => {
                                r.lease.renew(&shared, sent);
                                if *cancel {
                                    lost.push((*key, StopReason::Cancelled));
                                }
                            }
                            // Completed meanwhile, or the lease is someone
                            // else's.
                            None => lost.push((*key, StopReason::LeaseLost)),
                        }
                    }
                }
                for (key, reason) in lost {
                    shared.stop_attempt(key, reason);
                }
            }
            Err(error) => tracing::warn!(%error, tasks = ids.len(), "heartbeat failed"),
        }
    }
}

/// `herald_task_oldest_running_seconds` per queue this worker has run:
/// how long its longest-running task has been at it (0 when none runs).
#[derive(Default)]
struct OldestGauges {
    by_queue: HashMap<Arc<str>, metrics::Gauge>,
}

impl OldestGauges {
    fn update(&mut self, running: &HashMap<AttemptKey, Running>) {
        let mut ages: HashMap<&Arc<str>, f64> = HashMap::new();
        for r in running.values() {
            let age = r.started.elapsed().as_secs_f64();
            let e = ages.entry(&r.queue).or_insert(0.0);
            *e = e.max(age);
        }
        for queue in ages.keys() {
            if !self.by_queue.contains_key(*queue) {
                let g = metrics::gauge!(metric::TASK_OLDEST_RUNNING, "queue" => queue.to_string());
                self.by_queue.insert((*queue).clone(), g);
            }
        }
        for (queue, gauge) in &self.by_queue {
            gauge.set(ages.get(queue).copied().unwrap_or(0.0));
        }
    }
}

/// Return expired leases to the queue; remove retained finished tasks.
async fn rescue(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config.worker;
    let mut last_cleanup = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.rescue_interval) => {}
        }
        let result = async {
            let client = shared.internal.get().await?;
            let n: i32 = client
                .query_one(RESCUE, &[])
                .await
                .context("rescuing expired leases")?
                .get(0);
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                let keep = cfg.retain_completed.unwrap_or(Duration::from_secs(86400));
                client
                    .execute(REMOVE_FINISHED, &[&keep.as_secs_f64()])
                    .await
                    .context("removing finished tasks")?;
                last_cleanup = Instant::now();
            }
            Ok::<i32, Error>(n)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                shared
                    .stats
                    .rescued
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(metric::TASK_RESCUED).increment(n as u64);
                tracing::warn!(
                    event = event::TASK_RESCUED,
                    tasks = n,
                    "rescued tasks whose lease expired"
                );
            }
            Err(error) => tracing::warn!(%error, "rescuer failed"),
        }
    }
}
