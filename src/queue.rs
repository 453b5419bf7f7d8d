//! The producer side of the task queue: the `Task` builder and `enqueue` /
//! `enqueue_batch` / `cancel`, which write `herald.tasks` through the
//! caller's own client or transaction.
//!
//! Like `outbox`, it must never commit or open connections of its own: a
//! task exists exactly when the caller's transaction commits, and the
//! statement trigger wakes idle workers then.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::error::{Context, Error, Result};
use crate::outbox::DEFAULT_MAX_PAYLOAD_BYTES;
use crate::telemetry::names::event;
use crate::telemetry::names::metric::TASKS_ENQUEUED;

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;

/// A task about to be enqueued.
///
/// ```no_run
/// # async fn demo(tx: &tokio_postgres::Transaction<'_>) -> herald::Result<()> {
/// let task = herald::Task::new("email.send", &serde_json::json!({"to": "a@example.com"}))?
///     .queue("emails")
///     .delay(std::time::Duration::from_secs(30))
///     .unique_key("welcome:17");
/// let id = herald::queue::enqueue(tx, &task).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    kind: String,
    payload: String,
    queue: String,
    priority: i32,
    run_at: Option<DateTime<Utc>>,
    delay: Duration,
    max_attempts: i32,
    unique_key: Option<String>,
    timeout: Option<Duration>,
    headers: Map<String, Value>,
}

impl Task {
    pub fn new<T: Serialize + ?Sized>(kind: impl Into<String>, payload: &T) -> Result<Task> {
        let kind = kind.into();
        validate_name("task kind", &kind, 255)?;
        let payload = serde_json::to_string(payload).map_err(|error| Error::Json {
            what: format!("payload of task kind {kind:?}"),
            error,
        })?;
        crate::outbox::check_depth(&payload)
            .map_err(|e| Error::InvalidTask(format!("payload of task kind {kind:?}: {e}")))?;
        Ok(Task::raw(kind, payload))
    }

    /// A task whose payload is JSON text, checked to be one JSON value.
    pub fn from_json_str(kind: impl Into<String>, json: &str) -> Result<Task> {
        let kind = kind.into();
        validate_name("task kind", &kind, 255)?;
        crate::outbox::check_depth(json)
            .map_err(|e| Error::InvalidTask(format!("payload of task kind {kind:?}: {e}")))?;
        let value: &serde_json::value::RawValue =
            serde_json::from_str(json).map_err(|error| Error::Json {
                what: format!("payload of task kind {kind:?}"),
                error,
            })?;
        Ok(Task::raw(kind, value.get().to_owned()))
    }

    fn raw(kind: String, payload: String) -> Task {
        Task {
            kind,
            payload,
            queue: DEFAULT_QUEUE.into(),
            priority: 0,
            run_at: None,
            delay: Duration::ZERO,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
            timeout: None,
            headers: Map::new(),
        }
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Task {
        self.queue = queue.into();
        self
    }

    /// Higher runs first (default 0).
    pub fn priority(mut self, priority: i32) -> Task {
        self.priority = priority;
        self
    }

    /// Run no earlier than `delay` after the enqueue (added to `run_at` when
    /// both are set).
    pub fn delay(mut self, delay: Duration) -> Task {
        self.delay = delay;
        self
    }

    pub fn run_at(mut self, at: DateTime<Utc>) -> Task {
        self.run_at = Some(at);
        self
    }

    /// Attempts before the task becomes a dead letter (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Task {
        self.max_attempts = n;
        self
    }

    /// While a task with this key is ready or running, enqueueing another
    /// returns the existing task's id instead.
    pub fn unique_key(mut self, key: impl Into<String>) -> Task {
        self.unique_key = Some(key.into());
        self
    }

    /// The handler is cancelled after this long and the attempt fails.
    pub fn timeout(mut self, timeout: Duration) -> Task {
        self.timeout = Some(timeout);
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Task {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub fn traceparent(self, traceparent: impl Into<String>) -> Task {
        self.header(crate::outbox::headers::TRACEPARENT, traceparent.into())
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    fn check(&self, limit: usize) -> Result<()> {
        validate_name("queue", &self.queue, 128)?;
        if self.max_attempts < 1 {
            return Err(Error::InvalidTask(format!(
                "task kind {:?}: max_attempts must be at least 1, got {}",
                self.kind, self.max_attempts
            )));
        }
        if self.payload.len() > limit {
            // Named as a task kind: PayloadTooLarge speaks of topics.
            return Err(Error::InvalidTask(format!(
                "payload too large for task kind {:?}: {} bytes, the limit is {limit} bytes (max_payload_bytes)",
                self.kind,
                self.payload.len()
            )));
        }
        if !self.headers.is_empty() {
            let headers = serde_json::to_string(&self.headers).unwrap_or_default();
            crate::outbox::check_depth(&headers).map_err(|e| {
                Error::InvalidTask(format!("headers of task kind {:?}: {e}", self.kind))
            })?;
        }
        Ok(())
    }

    /// Headers as JSON text; `traceparent` (the producer's trace context)
    /// is added when the task has none.
    /// Nothing but defaults beyond queue, kind, payload, headers, priority
    /// and attempts: the bulk COPY path can take it.
    fn plain(&self) -> bool {
        self.unique_key.is_none()
            && self.run_at.is_none()
            && self.delay.is_zero()
            && self.timeout.is_none()
    }

    fn headers_json(&self, traceparent: Option<&str>) -> String {
        crate::telemetry::headers_json_with(&self.headers, traceparent)
    }
}

/// Names of kinds and queues: letters, digits, `.`, `_`, `-`, `:`.
pub fn validate_name(what: &str, name: &str, max: usize) -> Result<()> {
    let reason = if name.is_empty() {
        format!("{what} is empty")
    } else if name.len() > max {
        format!("{} characters, at most {max} allowed", name.len())
    } else if !crate::outbox::valid_topic_chars(name) {
        "only letters, digits, '.', '_', '-' and ':' are allowed".to_string()
    } else {
        return Ok(());
    };
    Err(Error::InvalidTask(format!("{what} {name:?}: {reason}")))
}

// One round trip, also for a unique key already held: the second branch
// returns the holder's id. It cannot see a holder committed after this
// statement's snapshot began, so the caller retries when neither branch
// returns a row.
const ENQUEUE_ONE: &str = "
WITH ins AS (
    INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, unique_key, timeout)
    VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5,
            coalesce($6, now()) + make_interval(secs => $7), $8, $9, make_interval(secs => $10))
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('ready', 'running')
    DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM herald.tasks
WHERE $9::text IS NOT NULL AND unique_key = $9 AND state IN ('ready', 'running')
  AND NOT EXISTS (SELECT 1 FROM ins)
LIMIT 1";

// A task without a unique key cannot conflict: the plain INSERT is the
// same statement without the ON CONFLICT arbiter and the lookup branch,
// whose parse and plan made every single enqueue cost 0.34 ms of server
// time against 0.24 (pgbench, extended protocol, synchronous_commit off).
// It takes ENQUEUE_ONE's parameters, leaving out $9 (the null unique key),
// and always returns the row.
const ENQUEUE_PLAIN: &str = "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, timeout)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5,
        coalesce($6, now()) + make_interval(secs => $7), $8, make_interval(secs => $10))
RETURNING id";

const ENQUEUE_BATCH: &str = "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, unique_key, timeout)
SELECT x.queue, x.kind, x.payload::jsonb, x.headers::jsonb, x.priority,
       coalesce(x.run_at, now()) + make_interval(secs => x.delay), x.max_attempts, x.unique_key,
       make_interval(secs => x.timeout)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
            $7::float8[], $8::int[], $9::text[], $10::float8[])
     WITH ORDINALITY AS x(queue, kind, payload, headers, priority, run_at, delay, max_attempts,
                          unique_key, timeout, ord)
ORDER BY x.ord
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('ready', 'running')
DO NOTHING
RETURNING id, unique_key";

// Batches without unique keys, delays, run_at or timeouts, the common bulk
// case, take the COPY path: ids are reserved from the identity's sequence in
// one statement, then the rows go in by binary COPY (no SQL text to parse,
// no planning, no speculative insertion for ON CONFLICT). COPY writes the
// given ids, as INSERT … OVERRIDING SYSTEM VALUE would; run_at and the rest
// take their defaults, on the database's clock.
const RESERVE_IDS: &str = "SELECT nextval('herald.tasks_id_seq') FROM generate_series(1, $1::int)";
const COPY_TASKS: &str =
    "COPY herald.tasks (id, queue, kind, payload, headers, priority, max_attempts) \
     FROM STDIN (FORMAT binary)";
/// Below this many tasks the two extra round trips of COPY cost more than
/// they save.
const COPY_MIN_TASKS: usize = 64;

/// JSON text sent as binary jsonb (a version byte, then the text), so the
/// server parses it once and the client not at all.
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl tokio_postgres::types::ToSql for JsonbText<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    tokio_postgres::types::accepts!(JSONB);
    tokio_postgres::types::to_sql_checked!();
}

const HOLDERS: &str = "
SELECT unique_key, id FROM herald.tasks
WHERE unique_key = ANY($1) AND state IN ('ready', 'running')";

/// Enqueues with a configured payload limit; the free functions use the
/// default one.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    max_payload_bytes: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl Queue {
    pub fn new(max_payload_bytes: usize) -> Queue {
        Queue { max_payload_bytes }
    }

    pub fn from_config(config: &crate::Config) -> Queue {
        Queue::new(config.max_payload_bytes)
    }

    /// Insert one task through `client` (a transaction joins it); returns
    /// its id, or the id of the unfinished task holding its unique key.
    pub async fn enqueue<C: GenericClient + Sync>(&self, client: &C, task: &Task) -> Result<i64> {
        task.check(self.max_payload_bytes)?;
        let traceparent = crate::telemetry::current_traceparent();
        let headers = task.headers_json(traceparent.as_deref());
        let delay = task.delay.as_secs_f64();
        let timeout = task.timeout.map(|t| t.as_secs_f64());
        let sql = if task.unique_key.is_none() {
            ENQUEUE_PLAIN
        } else {
            ENQUEUE_ONE
        };
        for _ in 0..5 {
            let row = client
                .query_typed_opt(
                    sql,
                    &[
                        (&task.queue, Type::TEXT),
                        (&task.kind, Type::TEXT),
                        (&task.payload, Type::TEXT),
                        (&headers, Type::TEXT),
                        (&task.priority, Type::INT4),
                        (&task.run_at, Type::TIMESTAMPTZ),
                        (&delay, Type::FLOAT8),
                        (&task.max_attempts, Type::INT4),
                        (&task.unique_key, Type::TEXT),
                        (&timeout, Type::FLOAT8),
                    ],
                )
                .await
                .context(format!(
                    "enqueueing task kind {:?} into herald.tasks",
                    task.kind
                ))?;
            if let Some(row) = row {
                let id: i64 = row.get(0);
                metrics::counter!(TASKS_ENQUEUED, "queue" => task.queue.clone()).increment(1);
                tracing::debug!(
                    event = event::TASK_ENQUEUED,
                    herald.queue = task.queue.as_str(),
                    herald.task.kind = task.kind.as_str(),
                    herald.task.id = id,
                    "task enqueued"
                );
                return Ok(id);
            }
        }
        Err(Error::Other(format!(
            "enqueueing task kind {:?}: unique key {:?} kept changing hands",
            task.kind, task.unique_key
        )))
    }

    /// Insert many tasks in one statement; ids come back in the order given
    /// (for a unique key already held, the holder's id).
    pub async fn enqueue_batch<C: GenericClient + Sync>(
        &self,
        client: &C,
        tasks: &[Task],
    ) -> Result<Vec<i64>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        for task in tasks {
            task.check(self.max_payload_bytes)?;
        }
        if tasks.len() >= COPY_MIN_TASKS && tasks.iter().all(Task::plain) {
            return copy_batch(client, tasks).await;
        }
        let queues: Vec<&str> = tasks.iter().map(|t| t.queue.as_str()).collect();
        let kinds: Vec<&str> = tasks.iter().map(|t| t.kind.as_str()).collect();
        let payloads: Vec<&str> = tasks.iter().map(|t| t.payload.as_str()).collect();
        let traceparent = crate::telemetry::current_traceparent();
        let headers: Vec<String> = tasks
            .iter()
            .map(|t| t.headers_json(traceparent.as_deref()))
            .collect();
        let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
        let run_ats: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_at).collect();
        let delays: Vec<f64> = tasks.iter().map(|t| t.delay.as_secs_f64()).collect();
        let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
        let unique_keys: Vec<Option<&str>> =
            tasks.iter().map(|t| t.unique_key.as_deref()).collect();
        let timeouts: Vec<Option<f64>> = tasks
            .iter()
            .map(|t| t.timeout.map(|d| d.as_secs_f64()))
            .collect();
        let rows = client
            .query_typed(
                ENQUEUE_BATCH,
                &[
                    (&queues, Type::TEXT_ARRAY),
                    (&kinds, Type::TEXT_ARRAY),
                    (&payloads, Type::TEXT_ARRAY),
                    (&headers, Type::TEXT_ARRAY),
                    (&priorities, Type::INT4_ARRAY),
                    (&run_ats, Type::TIMESTAMPTZ_ARRAY),
                    (&delays, Type::FLOAT8_ARRAY),
                    (&max_attempts, Type::INT4_ARRAY),
                    (&unique_keys, Type::TEXT_ARRAY),
                    (&timeouts, Type::FLOAT8_ARRAY),
                ],
            )
            .await
            .context(format!(
                "enqueueing {} tasks into herald.tasks",
                tasks.len()
            ))?;
        count_enqueued(tasks);
        // Identity values grow in insertion order, which follows the input.
        let mut inserted: Vec<(i64, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        inserted.sort_by_key(|(id, _)| *id);
        let mut by_key: std::collections::HashMap<String, i64> = inserted
            .iter()
            .filter_map(|(id, key)| key.clone().map(|k| (k, *id)))
            .collect();
        let missing: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t.unique_key.as_deref())
            .filter(|k| !by_key.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            for row in client
                .query(HOLDERS, &[&missing])
                .await
                .context("looking up the holders of unique keys")?
            {
                by_key.insert(row.get(0), row.get(1));
            }
        }
        let mut plain = inserted
            .iter()
            .filter(|(_, key)| key.is_none())
            .map(|(id, _)| *id);
        tasks
            .iter()
            .map(|t| match &t.unique_key {
                Some(key) => by_key.get(key).copied().ok_or_else(|| {
                    Error::Other(format!(
                        "unique key {key:?}: its holder finished meanwhile; enqueue again"
                    ))
                }),
                None => plain.next().ok_or_else(|| {
                    Error::Other("batch enqueue returned fewer ids than tasks".into())
                }),
            })
            .collect()
    }
}

/// [`Queue::enqueue_batch`]'s COPY path, for tasks that are all
/// [`Task::plain`].
async fn copy_batch<C: GenericClient + Sync>(client: &C, tasks: &[Task]) -> Result<Vec<i64>> {
    use futures_util::pin_mut;
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    let n = i32::try_from(tasks.len())
        .map_err(|_| Error::Other(format!("a batch of {} tasks is too large", tasks.len())))?;
    let ids: Vec<i64> = client
        .query(RESERVE_IDS, &[&n])
        .await
        .context(format!("reserving {n} task ids"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let what = || format!("enqueueing {} tasks into herald.tasks by COPY", tasks.len());
    // A transaction's client() is its connection, still inside it.
    let sink = client.client().copy_in(COPY_TASKS).await.context(what())?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
            Type::JSONB,
            Type::INT4,
            Type::INT4,
        ],
    );
    pin_mut!(writer);
    let traceparent = crate::telemetry::current_traceparent();
    for (task, id) in tasks.iter().zip(&ids) {
        let headers = task.headers_json(traceparent.as_deref());
        writer
            .as_mut()
            .write(&[
                id,
                &task.queue,
                &task.kind,
                &JsonbText(&task.payload),
                &JsonbText(&headers),
                &task.priority,
                &task.max_attempts,
            ])
            .await
            .context(what())?;
    }
    writer.finish().await.context(what())?;
    count_enqueued(tasks);
    Ok(ids)
}

/// Count a batch by queue (usually one) and log it.
fn count_enqueued(tasks: &[Task]) {
    let mut i = 0;
    while i < tasks.len() {
        let queue = &tasks[i].queue;
        let n = tasks[i..].iter().take_while(|t| &t.queue == queue).count();
        metrics::counter!(TASKS_ENQUEUED, "queue" => queue.clone()).increment(n as u64);
        i += n;
    }
    tracing::debug!(
        event = event::TASK_ENQUEUED,
        herald.queue = tasks[0].queue.as_str(),
        herald.task.kind = tasks[0].kind.as_str(),
        herald.task.count = tasks.len() as i64,
        "tasks enqueued"
    );
}

/// [`Queue::enqueue`] with the default payload limit.
pub async fn enqueue<C: GenericClient + Sync>(client: &C, task: &Task) -> Result<i64> {
    Queue::default().enqueue(client, task).await
}

/// [`Queue::enqueue_batch`] with the default payload limit.
pub async fn enqueue_batch<C: GenericClient + Sync>(
    client: &C,
    tasks: &[Task],
) -> Result<Vec<i64>> {
    Queue::default().enqueue_batch(client, tasks).await
}

/// Cancel a task: a ready one at once, a running one by asking its worker
/// (the handler's cancellation token fires). Returns `cancelled`,
/// `cancelling`, or `None` when no unfinished task has that id.
pub async fn cancel<C: GenericClient + Sync>(client: &C, id: i64) -> Result<Option<String>> {
    let row = client
        .query_one("SELECT herald.cancel_task($1)", &[&id])
        .await
        .context(format!("cancelling task {id}"))?;
    let outcome: Option<String> = row.get(0);
    if let Some(outcome) = &outcome {
        // `cancelled` ends a ready task now; `cancelling` asks its worker.
        let event = if outcome == "cancelled" {
            event::TASK_CANCELLED
        } else {
            event::TASK_CANCEL_REQUESTED
        };
        tracing::info!(
            event,
            herald.task.id = id,
            outcome = outcome.as_str(),
            "task cancel requested"
        );
    }
    Ok(outcome)
}

/// One row of `herald.tasks`, as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskInfo {
    pub id: i64,
    pub queue: String,
    pub kind: String,
    pub state: String,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub leased_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub unique_key: Option<String>,
    /// Seconds, when the task has a timeout.
    pub timeout_secs: Option<f64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub payload: Value,
    pub headers: Value,
    /// Every failed attempt: `[{attempt, at, worker, error}, …]`.
    pub errors: Value,
    pub progress: Option<Value>,
}

const TASK_COLUMNS: &str = "id, queue, kind, state, priority, run_at, attempts, max_attempts, \
     leased_by, lease_expires_at, unique_key, extract(epoch FROM timeout)::float8 AS timeout_secs, \
     last_error, created_at, started_at, finished_at, cancel_requested_at, payload, headers, \
     errors, progress";

impl TaskInfo {
    fn from_row(r: &tokio_postgres::Row) -> TaskInfo {
        TaskInfo {
            id: r.get("id"),
            queue: r.get("queue"),
            kind: r.get("kind"),
            state: r.get("state"),
            priority: r.get("priority"),
            run_at: r.get("run_at"),
            attempts: r.get("attempts"),
            max_attempts: r.get("max_attempts"),
            leased_by: r.get("leased_by"),
            lease_expires_at: r.get("lease_expires_at"),
            unique_key: r.get("unique_key"),
            timeout_secs: r.get("timeout_secs"),
            last_error: r.get("last_error"),
            created_at: r.get("created_at"),
            started_at: r.get("started_at"),
            finished_at: r.get("finished_at"),
            cancel_requested_at: r.get("cancel_requested_at"),
            payload: r.get("payload"),
            headers: r.get("headers"),
            errors: r.get("errors"),
            progress: r.get("progress"),
        }
    }
}

/// Which tasks [`list_tasks`] returns; unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// `ready`, `running`, `succeeded` or `cancelled`.
    pub state: Option<String>,
}

pub const TASK_STATES: [&str; 4] = ["ready", "running", "succeeded", "cancelled"];

/// Tasks matching `filter` in the order workers would take them (running
/// first, then ready by priority and due time, then finished), at most
/// `limit`.
pub async fn list_tasks<C: GenericClient + Sync>(
    client: &C,
    filter: &TaskFilter,
    limit: i64,
) -> Result<Vec<TaskInfo>> {
    if let Some(state) = &filter.state {
        if !TASK_STATES.contains(&state.as_str()) {
            return Err(Error::InvalidTask(format!(
                "unknown state {state:?}: expected one of {}",
                TASK_STATES.join(", ")
            )));
        }
    }
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM herald.tasks
         WHERE ($1::text IS NULL OR queue = $1)
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::text IS NULL OR state = $3)
         ORDER BY array_position(ARRAY['running', 'ready', 'succeeded', 'cancelled'], state),
                  priority DESC, run_at, id
         LIMIT $4"
    );
    let rows = client
        .query(&sql, &[&filter.queue, &filter.kind, &filter.state, &limit])
        .await
        .context("listing herald.tasks")?;
    Ok(rows.iter().map(TaskInfo::from_row).collect())
}

/// One task, or `None` when no row has that id (it finished and was removed,
/// or became a dead letter).
pub async fn get_task<C: GenericClient + Sync>(client: &C, id: i64) -> Result<Option<TaskInfo>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM herald.tasks WHERE id = $1");
    let row = client
        .query_opt(&sql, &[&id])
        .await
        .context(format!("reading task {id}"))?;
    Ok(row.as_ref().map(TaskInfo::from_row))
}
