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
use tokio_postgres::GenericClient;

use crate::error::{Context, Error, Result};
use crate::outbox::DEFAULT_MAX_PAYLOAD_BYTES;
pub use crate::store::tasks::TaskState;
use crate::store::tasks::{self, NewTask};
use crate::telemetry::names::event;
use crate::telemetry::names::metric::TASKS_ENQUEUED;

pub use crate::config::{DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE};

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

    /// The row to insert, with `traceparent` added to the headers when the
    /// task has none.
    fn new_task(&self, traceparent: Option<&str>) -> NewTask<'_> {
        NewTask {
            queue: &self.queue,
            kind: &self.kind,
            payload: &self.payload,
            headers: self.headers_json(traceparent),
            priority: self.priority,
            run_at: self.run_at,
            delay_secs: self.delay.as_secs_f64(),
            max_attempts: self.max_attempts,
            unique_key: self.unique_key.as_deref(),
            timeout_secs: self.timeout.map(|t| t.as_secs_f64()),
        }
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

/// Below this many tasks the two extra round trips of COPY cost more than
/// they save.
const COPY_MIN_TASKS: usize = 64;

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
        let row = task.new_task(traceparent.as_deref());
        for _ in 0..5 {
            if let Some(id) = tasks::insert(client, &row).await? {
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
        let traceparent = crate::telemetry::current_traceparent();
        let rows: Vec<NewTask> = tasks
            .iter()
            .map(|t| t.new_task(traceparent.as_deref()))
            .collect();
        let inserted = tasks::insert_batch(client, &rows).await?;
        count_enqueued(tasks);
        // Identity values grow in insertion order, which follows the input.
        let mut inserted: Vec<(i64, Option<String>)> =
            inserted.into_iter().map(|r| (r.id, r.unique_key)).collect();
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
            by_key.extend(tasks::holders(client, &missing).await?);
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
    let traceparent = crate::telemetry::current_traceparent();
    let rows: Vec<NewTask> = tasks
        .iter()
        .map(|t| t.new_task(traceparent.as_deref()))
        .collect();
    // COPY prepares a named statement in one round trip and runs it in the
    // next: behind transaction pooling both must be in one transaction, so
    // a bare client gets one of its own. The check is repeated after BEGIN:
    // inside a block BEGIN starts nothing, and the caller's transaction must
    // never be committed here.
    let own = !in_transaction_block(client, "").await?
        && !in_transaction_block(client, "BEGIN; ").await?;
    let copied = tasks::copy_in(client, &rows).await;
    if own {
        match &copied {
            Ok(_) => client
                .batch_execute("COMMIT")
                .await
                .context("committing the COPY transaction")?,
            // The COPY's error is the one to report.
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
    }
    let ids = copied?;
    count_enqueued(tasks);
    Ok(ids)
}

/// Whether `client` is inside a transaction block (after running `first`).
/// In autocommit each simple query is a transaction of its own, started when
/// the query arrived; inside a block the transaction started with an
/// earlier message.
async fn in_transaction_block<C: GenericClient + Sync>(client: &C, first: &str) -> Result<bool> {
    let check = format!("{first}SELECT transaction_timestamp() <> statement_timestamp()");
    let rows = client
        .simple_query(&check)
        .await
        .context("checking for a transaction block")?;
    Ok(rows.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
        _ => false,
    }))
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
    let outcome = tasks::cancel(client, id).await?;
    if let Some(outcome) = &outcome {
        // `cancelled` ends a ready task now; `cancelling` asks its worker.
        let event = if outcome == TaskState::Cancelled.as_str() {
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

pub const TASK_STATES: [&str; 4] = [
    TaskState::Ready.as_str(),
    TaskState::Running.as_str(),
    TaskState::Succeeded.as_str(),
    TaskState::Cancelled.as_str(),
];

/// Tasks matching `filter` in the order workers would take them (running
/// first, then ready by priority and due time, then finished), at most
/// `limit`.
pub async fn list_tasks<C: GenericClient + Sync>(
    client: &C,
    filter: &TaskFilter,
    limit: i64,
) -> Result<Vec<TaskInfo>> {
    if let Some(state) = &filter.state {
        if TaskState::parse(state).is_none() {
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
