//! `herald.tasks`: every statement the library's Rust code runs to write the
//! table (enqueue, COPY, claim, complete, fail, requeue, cancel, heartbeat,
//! hand back, rescue, remove finished), each a const beside the one
//! function that runs it, with the rows it returns read by column name.
//!
//! It owns the SQL, not the policy: it never decides when to claim, retry or
//! give up, never opens connections or transactions of its own (except the
//! completion's, pipelined with it), and never bounds statements in time;
//! the queue and the worker do. Every write a worker makes here is fenced:
//! it names the task's id, attempt and the worker's id, and changes nothing
//! once the lease has passed on.

use chrono::{DateTime, Utc};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::error::{Context, Error, Result};

/// The channel the tasks trigger (sql/V8) and requeues notify, as SQL text.
macro_rules! notify_channel {
    () => {
        "herald_tasks"
    };
}

/// The channel the tasks trigger (sql/V8) and requeues notify: idle workers
/// LISTEN on it.
pub(crate) const NOTIFY_CHANNEL: &str = notify_channel!();
/// The channel `herald.cancel_task` notifies with a running task's id.
pub(crate) const CANCEL_CHANNEL: &str = "herald_cancel";

/// The states of `herald.tasks.state` (its CHECK constraint,
/// `tasks_state_valid` in sql/V2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to be claimed, now or at `run_at`.
    Ready,
    /// Claimed under a lease by the worker in `leased_by`.
    Running,
    /// Done, kept while `worker.retain_completed` says so.
    Succeeded,
    Cancelled,
}

impl TaskState {
    /// Every state, in the order the operator views list them.
    pub const ALL: [TaskState; 4] = [
        TaskState::Ready,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            TaskState::Ready => "ready",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn parse(state: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|s| s.as_str() == state)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unfinished states, in which a unique key is held, as SQL.
macro_rules! unfinished_states {
    () => {
        "'ready', 'running'"
    };
}

/// The predicate of the `tasks_unique_key` partial index (sql/V2).
macro_rules! unique_key_predicate {
    () => {
        concat!(
            "unique_key IS NOT NULL AND state IN (",
            unfinished_states!(),
            ")"
        )
    };
}

/// The ON CONFLICT arbiter of every insert that may carry a unique key; it
/// must match the `tasks_unique_key` index or Postgres refuses the insert.
macro_rules! on_unique_key_do_nothing {
    () => {
        concat!(
            "ON CONFLICT (unique_key) WHERE ",
            unique_key_predicate!(),
            "\nDO NOTHING"
        )
    };
}

/// The predicate of the `tasks_unique_key` index, as written here.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const UNIQUE_KEY_PREDICATE: &str = unique_key_predicate!();
/// The arbiter every insert with a unique key uses.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const ON_UNIQUE_KEY_DO_NOTHING: &str = on_unique_key_do_nothing!();

// ------------------------------------------------------------- insert

/// A row about to be inserted into `herald.tasks`, as the queue, cron and
/// the relay's fan-out build them. `run_at` `None` means now (on the
/// database's clock), to which `delay_secs` is added.
#[derive(Debug, Clone)]
pub(crate) struct NewTask<'a> {
    pub queue: &'a str,
    pub kind: &'a str,
    /// JSON text.
    pub payload: &'a str,
    /// A JSON object as text.
    pub headers: String,
    pub priority: i32,
    pub run_at: Option<DateTime<Utc>>,
    pub delay_secs: f64,
    pub max_attempts: i32,
    pub unique_key: Option<&'a str>,
    pub timeout_secs: Option<f64>,
}

// One round trip, also for a unique key already held: the second branch
// returns the holder's id. It cannot see a holder committed after this
// statement's snapshot began, so the caller retries when neither branch
// returns a row.
const INSERT_UNIQUE: &str = concat!(
    "
WITH ins AS (
    INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, unique_key, timeout)
    VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5,
            coalesce($6, now()) + make_interval(secs => $7), $8, $9, make_interval(secs => $10))
    ",
    on_unique_key_do_nothing!(),
    "
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM herald.tasks
WHERE $9::text IS NOT NULL AND unique_key = $9 AND state IN (",
    unfinished_states!(),
    ")
  AND NOT EXISTS (SELECT 1 FROM ins)
LIMIT 1"
);

// A task without a unique key cannot conflict: the plain INSERT leaves out
// the arbiter and the lookup branch, whose parse and plan cost every single
// enqueue server time. It takes INSERT_UNIQUE's parameters, leaving out $9
// (the null unique key), and always returns the row.
const INSERT_PLAIN: &str = "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, timeout)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5,
        coalesce($6, now()) + make_interval(secs => $7), $8, make_interval(secs => $10))
RETURNING id";

/// Insert one task through `client` (a transaction joins it). Returns its
/// id, or the id of the unfinished task holding its unique key; `None` when
/// that holder finished while the statement ran (try again).
pub(crate) async fn insert<C: GenericClient + Sync>(
    client: &C,
    task: &NewTask<'_>,
) -> Result<Option<i64>> {
    let sql = if task.unique_key.is_none() {
        INSERT_PLAIN
    } else {
        INSERT_UNIQUE
    };
    let row = client
        .query_typed_opt(
            sql,
            &[
                (&task.queue, Type::TEXT),
                (&task.kind, Type::TEXT),
                (&task.payload, Type::TEXT),
                (&task.headers, Type::TEXT),
                (&task.priority, Type::INT4),
                (&task.run_at, Type::TIMESTAMPTZ),
                (&task.delay_secs, Type::FLOAT8),
                (&task.max_attempts, Type::INT4),
                (&task.unique_key, Type::TEXT),
                (&task.timeout_secs, Type::FLOAT8),
            ],
        )
        .await
        .context(format!(
            "enqueueing task kind {:?} into herald.tasks",
            task.kind
        ))?;
    Ok(row.map(|r| r.get("id")))
}

const INSERT_BATCH: &str = concat!(
    "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, run_at, max_attempts, unique_key, timeout)
SELECT x.queue, x.kind, x.payload::jsonb, x.headers::jsonb, x.priority,
       coalesce(x.run_at, now()) + make_interval(secs => x.delay), x.max_attempts, x.unique_key,
       make_interval(secs => x.timeout)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
            $7::float8[], $8::int[], $9::text[], $10::float8[])
     WITH ORDINALITY AS x(queue, kind, payload, headers, priority, run_at, delay, max_attempts,
                          unique_key, timeout, ord)
ORDER BY x.ord
",
    on_unique_key_do_nothing!(),
    "
RETURNING id, unique_key"
);

/// A row [`insert_batch`] inserted.
#[derive(Debug, Clone)]
pub(crate) struct Inserted {
    pub id: i64,
    pub unique_key: Option<String>,
}

impl Inserted {
    fn from_row(r: &Row) -> Inserted {
        Inserted {
            id: r.get("id"),
            unique_key: r.get("unique_key"),
        }
    }
}

/// Insert many tasks in one statement, in the order given; a task whose
/// unique key is held is left out (no row returned for it).
pub(crate) async fn insert_batch<C: GenericClient + Sync>(
    client: &C,
    tasks: &[NewTask<'_>],
) -> Result<Vec<Inserted>> {
    let queues: Vec<&str> = tasks.iter().map(|t| t.queue).collect();
    let kinds: Vec<&str> = tasks.iter().map(|t| t.kind).collect();
    let payloads: Vec<&str> = tasks.iter().map(|t| t.payload).collect();
    let headers: Vec<&str> = tasks.iter().map(|t| t.headers.as_str()).collect();
    let priorities: Vec<i32> = tasks.iter().map(|t| t.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.run_at).collect();
    let delays: Vec<f64> = tasks.iter().map(|t| t.delay_secs).collect();
    let max_attempts: Vec<i32> = tasks.iter().map(|t| t.max_attempts).collect();
    let unique_keys: Vec<Option<&str>> = tasks.iter().map(|t| t.unique_key).collect();
    let timeouts: Vec<Option<f64>> = tasks.iter().map(|t| t.timeout_secs).collect();
    let rows = client
        .query_typed(
            INSERT_BATCH,
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
    Ok(rows.iter().map(Inserted::from_row).collect())
}

const HOLDERS: &str = concat!(
    "
SELECT unique_key, id FROM herald.tasks
WHERE unique_key = ANY($1) AND state IN (",
    unfinished_states!(),
    ")"
);

/// The unfinished tasks holding `keys`, as (unique key, id).
pub(crate) async fn holders<C: GenericClient + Sync>(
    client: &C,
    keys: &[&str],
) -> Result<Vec<(String, i64)>> {
    Ok(client
        .query_typed(HOLDERS, &[(&keys, Type::TEXT_ARRAY)])
        .await
        .context("looking up the holders of unique keys")?
        .iter()
        .map(|r| (r.get("unique_key"), r.get("id")))
        .collect())
}

// Batches without unique keys, delays, run_at or timeouts, the common bulk
// case, take the COPY path: ids are reserved from the identity's sequence in
// one statement, then the rows go in by binary COPY (no SQL text to parse,
// no planning, no speculative insertion for ON CONFLICT). COPY writes the
// given ids, as INSERT … OVERRIDING SYSTEM VALUE would; run_at and the rest
// take their defaults, on the database's clock.
const RESERVE_IDS: &str =
    "SELECT nextval('herald.tasks_id_seq') AS id FROM generate_series(1, $1::int)";
const COPY_TASKS: &str =
    "COPY herald.tasks (id, queue, kind, payload, headers, priority, max_attempts) \
     FROM STDIN (FORMAT binary)";

/// JSON text sent as binary jsonb (a version byte, then the text), so the
/// server parses it once and the client not at all.
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl ToSql for JsonbText<'_> {
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

/// Insert `tasks` by binary COPY, with ids reserved first; returns the ids
/// in the order given. Only queue, kind, payload, headers, priority and
/// max_attempts are written: the rest take the column defaults.
pub(crate) async fn copy_in<C: GenericClient + Sync>(
    client: &C,
    tasks: &[NewTask<'_>],
) -> Result<Vec<i64>> {
    use futures_util::pin_mut;
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    let n = i32::try_from(tasks.len())
        .map_err(|_| Error::Other(format!("a batch of {} tasks is too large", tasks.len())))?;
    let ids: Vec<i64> = client
        .query_typed(RESERVE_IDS, &[(&n, Type::INT4)])
        .await
        .context(format!("reserving {n} task ids"))?
        .iter()
        .map(|r| r.get("id"))
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
    for (task, id) in tasks.iter().zip(&ids) {
        writer
            .as_mut()
            .write(&[
                id,
                &task.queue,
                &task.kind,
                &JsonbText(task.payload),
                &JsonbText(&task.headers),
                &task.priority,
                &task.max_attempts,
            ])
            .await
            .context(what())?;
    }
    writer.finish().await.context(what())?;
    Ok(ids)
}

// ------------------------------------------------------------- cron ticks

// One task per due tick, each with its tick's unique key (a tick whose
// task is still unfinished gets no second one).
const INSERT_TICKS: &str = concat!(
    "
INSERT INTO herald.tasks (queue, kind, payload, headers, priority, max_attempts, unique_key)
SELECT x.queue, x.kind, x.payload::jsonb, x.headers::jsonb, x.priority, x.max_attempts, x.unique_key
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[])
     AS x(queue, kind, payload, headers, priority, max_attempts, unique_key)
",
    on_unique_key_do_nothing!()
);

/// The tasks of due cron ticks, column by column (JSON as text).
pub(crate) struct Ticks<'a> {
    pub queue: &'a [String],
    pub kind: &'a [String],
    pub payload: &'a [String],
    pub headers: &'a [String],
    pub priority: &'a [i32],
    pub max_attempts: &'a [i32],
    pub unique_key: &'a [String],
}

/// Insert the tasks of due ticks in the scheduler's claim transaction;
/// returns how many were inserted (fewer when a key was held).
pub(crate) async fn insert_ticks<C: GenericClient + Sync>(client: &C, t: Ticks<'_>) -> Result<u64> {
    client
        .execute(
            INSERT_TICKS,
            &[
                &t.queue,
                &t.kind,
                &t.payload,
                &t.headers,
                &t.priority,
                &t.max_attempts,
                &t.unique_key,
            ],
        )
        .await
        .context("inserting the tasks of due schedules")
}

// ------------------------------------------------------------- fan-out

// One task per (event, matching enabled durable subscription), in event
// order; the task's payload is the envelope. The relay runs it in its
// claim's transaction, so the tasks exist exactly when the events leave the
// outbox; when the catalog checks nothing, the claim itself inserts them
// with the `tasks_for_rows!` CTE below instead.
pub(crate) const FAN_OUT: &str = "
INSERT INTO herald.tasks (queue, kind, payload, headers, max_attempts, timeout)
SELECT s.queue, s.kind, e.env,
       jsonb_build_object('herald_subscription', s.name, 'herald_event_id', e.env->>'id',
                          'herald_topic', e.topic)
         || CASE WHEN e.env->'headers' ? 'traceparent'
                 THEN jsonb_build_object('traceparent', e.env->'headers'->'traceparent')
                 ELSE '{}'::jsonb END,
       s.max_attempts, s.timeout
FROM (SELECT topic, env::jsonb AS env, ord
      FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(topic, env, ord)) AS e
JOIN herald.subscriptions s ON s.enabled AND e.topic LIKE s.topic_like
ORDER BY e.ord, s.name";

/// Insert the durable subscriptions' tasks for events (`topics[i]`, with
/// envelope JSON `envelopes[i]`) while Redis does not take them, in the
/// transaction that marks them `fanned_out`; returns how many tasks.
pub(crate) async fn fan_out_apart<C: GenericClient + Sync>(
    client: &C,
    topics: &[&str],
    envelopes: &[&str],
) -> Result<u64> {
    client
        .execute(FAN_OUT, &[&topics, &envelopes])
        .await
        .context("inserting tasks for durable subscriptions while Redis is down")
}

/// The same in the claim's transaction, through its statement cache (it
/// runs on every batch the catalog checks).
pub(crate) async fn fan_out_prepared(
    tx: &deadpool_postgres::ClientWrapper,
    topics: &[String],
    envelopes: &[String],
) -> Result<u64> {
    let statement = tx
        .prepare_cached(FAN_OUT)
        .await
        .context("preparing the subscription fan-out")?;
    tx.execute(&statement, &[&topics, &envelopes])
        .await
        .context("inserting tasks for durable subscriptions")
}

/// The durable subscriptions' tasks for the outbox rows of CTE `$rows`
/// (as claimed: event_id, topic, key, payload, headers, created_at,
/// fanned_out), one per matching enabled subscription; the caller adds the
/// WHERE and ORDER BY. The CTEs of `store::outbox`'s CLAIM and
/// SETTLE_PUBLISHED paste it in.
macro_rules! tasks_for_rows {
    ($rows:literal) => {
        concat!(
            "
INSERT INTO herald.tasks (queue, kind, payload, headers, max_attempts, timeout)
SELECT s.queue, s.kind,
       jsonb_build_object('id', c.event_id, 'topic', c.topic, 'key', c.key,
                          'payload', c.payload, 'headers', c.headers,
                          'created_at', c.created_at),
       jsonb_build_object('herald_subscription', s.name, 'herald_event_id', c.event_id::text,
                          'herald_topic', c.topic)
         || CASE WHEN c.headers ? 'traceparent'
                 THEN jsonb_build_object('traceparent', c.headers->'traceparent')
                 ELSE '{}'::jsonb END,
       s.max_attempts, s.timeout
FROM ",
            $rows,
            " c
JOIN herald.subscriptions s ON s.enabled AND c.topic LIKE s.topic_like"
        )
    };
}
pub(crate) use tasks_for_rows;

const NOTIFY_WORKERS: &str = concat!("NOTIFY ", notify_channel!());

/// Wake idle workers when the caller's transaction commits, for inserts
/// that silenced the tasks trigger (the relay's fan-out).
pub(crate) async fn notify_workers<C: GenericClient + Sync>(client: &C) -> Result<()> {
    client
        .batch_execute(NOTIFY_WORKERS)
        .await
        .context("notifying workers of fanned-out tasks")
}

// ------------------------------------------------------------- cancel

const CANCEL: &str = "SELECT herald.cancel_task($1) AS outcome";

/// `herald.cancel_task`: `cancelled`, `cancelling`, or `None` when no
/// unfinished task has that id.
pub(crate) async fn cancel<C: GenericClient + Sync>(client: &C, id: i64) -> Result<Option<String>> {
    let rows = client
        .query_typed(CANCEL, &[(&id, Type::INT8)])
        .await
        .context(format!("cancelling task {id}"))?;
    Ok(rows.first().and_then(|r| r.get("outcome")))
}

// ------------------------------------------------------------- claim

// `id = ANY(ARRAY(...))` keeps the update on the primary key: a join
// against the CTE lets the planner hash-join over a scan of the whole table.
// `{after}` is empty, or CLAIM_AFTER's bound (see `ResumePoint`).
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
RETURNING t.id, t.kind, t.payload::text AS payload, t.headers::text AS headers, t.attempts,
          t.max_attempts, extract(epoch FROM t.timeout)::float8 AS timeout_secs,
          extract(epoch FROM now() - t.run_at)::float8 AS waited_secs, t.priority, t.run_at";
static CLAIM: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| CLAIM_TEMPLATE.replace("{after}", ""));
// The row comparison is a bound of the index scan: it starts at the
// resume point instead of walking the entries of tasks claimed since the
// last VACUUM.
static CLAIM_AFTER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    CLAIM_TEMPLATE.replace("{after}", "AND priority = $5 AND (run_at, id) > ($6, $7)")
});

/// A task the claim moved to `running` under this worker's lease.
#[derive(Debug, Clone)]
pub(crate) struct ClaimedTask {
    pub id: i64,
    pub kind: String,
    /// JSON text.
    pub payload: String,
    /// A JSON object as text.
    pub headers: String,
    /// This attempt's number (1 on the first run).
    pub attempt: i32,
    pub max_attempts: i32,
    /// The task's own timeout, in seconds.
    pub timeout_secs: Option<f64>,
    /// Seconds from `run_at` to the claim.
    pub waited_secs: Option<f64>,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
}

impl ClaimedTask {
    fn from_row(r: &Row) -> ClaimedTask {
        ClaimedTask {
            id: r.get("id"),
            kind: r.get("kind"),
            payload: r.get("payload"),
            headers: r.get("headers"),
            attempt: r.get("attempts"),
            max_attempts: r.get("max_attempts"),
            timeout_secs: r.get("timeout_secs"),
            waited_secs: r.get("waited_secs"),
            priority: r.get("priority"),
            run_at: r.get("run_at"),
        }
    }
}

/// Where in claim order (priority descending, then run_at, then id) a claim
/// starts instead of the start of the claim index.
#[derive(Debug, Clone)]
pub(crate) struct ResumePoint {
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub id: i64,
}

/// Claim up to `limit` ready tasks of `queue` in claim order for `worker`,
/// leased for `lease_secs`: from the start of the claim index or, with
/// `after`, from that point on within its priority.
pub(crate) async fn claim(
    client: &deadpool_postgres::Object,
    queue: &str,
    limit: usize,
    worker: &str,
    lease_secs: f64,
    after: Option<&ResumePoint>,
) -> Result<Vec<ClaimedTask>> {
    let sql: &str = match after {
        None => &CLAIM,
        Some(_) => &CLAIM_AFTER,
    };
    let stmt = client
        .prepare_cached(sql)
        .await
        .context("preparing the task claim")?;
    let limit = limit as i64;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&queue, &limit, &worker, &lease_secs];
    if let Some(r) = after {
        params.extend([&r.priority as &(dyn ToSql + Sync), &r.run_at, &r.id]);
    }
    Ok(client
        .query(&stmt, &params)
        .await
        .context(format!("claiming tasks from queue {queue:?}"))?
        .iter()
        .map(ClaimedTask::from_row)
        .collect())
}

// Seconds until the queue's earliest ready task is due (≤ 0: due now).
const NEXT_DUE: &str = "
SELECT extract(epoch FROM (min(run_at) - now()))::float8 AS due_in
FROM herald.tasks WHERE state = 'ready' AND queue = $1";

/// Seconds until the earliest ready task of `queue` is due (≤ 0: due now;
/// `None`: none is ready).
pub(crate) async fn next_due(
    client: &deadpool_postgres::Object,
    queue: &str,
) -> Result<Option<f64>> {
    let stmt = client
        .prepare_cached(NEXT_DUE)
        .await
        .context("preparing next-due")?;
    Ok(client
        .query_one(&stmt, &[&queue])
        .await
        .context("finding the next due task")?
        .get("due_in"))
}

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
SELECT count(*) AS handed_back FROM u";

/// Return the tasks of `queue` leased to `worker` but not in `known` to the
/// queue; returns how many.
pub(crate) async fn hand_back(
    client: &deadpool_postgres::Object,
    worker: &str,
    queue: &str,
    known: &[i64],
) -> Result<i64> {
    Ok(client
        .query_one(HAND_BACK, &[&worker, &queue, &known])
        .await
        .context("handing back unknown leases")?
        .get("handed_back"))
}

// ------------------------------------------------------------- complete

// Completions run in a transaction of their own, pipelined with them and
// with its COMMIT (one round trip, as for the statement alone), that plans
// them on indexes (crate::db::plan_on_indexes). Their `id = ANY(...)`
// primary-key lookups were planned as a sequential scan of the table
// whenever the statistics showed few live rows, which is the normal state of
// a queue that keeps up: VACUUM counts the live rows but the table keeps its
// pages, and dead rows fill them. All three messages are sent at the first
// poll, so a completion dropped midway still ends its transaction on the
// server before the connection is reused.
// The claim has the same lookup but stays a statement of its own: the two
// extra statements cost it more than the scan they save.
const PLAN_ON_INDEXES: &str = concat!("BEGIN; ", crate::db::plan_on_indexes!());

// Ids go through `= ANY` (primary-key lookups); $1 is sorted and unique, so
// the attempt each id was claimed at is found by binary search
// (width_bucket): array_position scanned the array for every row, and a
// join against unnest() gets a generic plan that scans the table once per
// id.
const COMPLETE_DELETE: &str = "
DELETE FROM herald.tasks t
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]";

const COMPLETE_RETAIN: &str = "
UPDATE herald.tasks t
SET state = 'succeeded', finished_at = now(), lease_expires_at = NULL, leased_by = NULL
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]";

fn complete_sql(retain: bool) -> &'static str {
    if retain {
        COMPLETE_RETAIN
    } else {
        COMPLETE_DELETE
    }
}

/// Complete the attempts `(ids[i], attempts[i])` leased to `worker`, in a
/// transaction of their own: deleted, or kept as `succeeded` when `retain`.
/// `ids` must be sorted and unique. Returns how many rows matched (fewer
/// than ids: those leases had passed on, or the handler completed its task
/// itself).
pub(crate) async fn complete(
    client: &deadpool_postgres::Object,
    ids: &[i64],
    attempts: &[i32],
    worker: &str,
    retain: bool,
) -> Result<u64> {
    let stmt = client
        .prepare_cached(complete_sql(retain))
        .await
        .context("preparing completion")?;
    let params: [&(dyn ToSql + Sync); 3] = [&ids, &attempts, &worker];
    let (begin, completed, commit) = tokio::join!(
        client.batch_execute(PLAN_ON_INDEXES),
        client.execute(&stmt, &params),
        client.batch_execute("COMMIT"),
    );
    begin.context("beginning a completion")?;
    let completed = completed.context(format!("completing {} tasks", ids.len()))?;
    commit.context(format!("committing the completion of {} tasks", ids.len()))?;
    Ok(completed)
}

/// Complete one attempt through `client` (the handler's own transaction,
/// say). `false` when the attempt no longer holds the lease.
pub(crate) async fn complete_one<C: GenericClient + Sync>(
    client: &C,
    id: i64,
    attempt: i32,
    worker: &str,
    retain: bool,
) -> Result<bool> {
    let n = client
        .execute(complete_sql(retain), &[&vec![id], &vec![attempt], &worker])
        .await
        .context(format!("completing task {id}"))?;
    Ok(n == 1)
}

// Completions that matched no row: those of tasks still unfinished were
// refused by fencing (the others the handler completed itself).
const STILL_UNFINISHED: &str = concat!(
    "SELECT id FROM herald.tasks WHERE id = ANY($1) AND state IN (",
    unfinished_states!(),
    ")"
);

/// Which of `ids` are still unfinished.
pub(crate) async fn still_unfinished(
    client: &deadpool_postgres::Object,
    ids: &[i64],
) -> Result<Vec<i64>> {
    Ok(client
        .query(STILL_UNFINISHED, &[&ids])
        .await
        .context("finding refused completions")?
        .iter()
        .map(|r| r.get("id"))
        .collect())
}

const PROGRESS: &str = "UPDATE herald.tasks SET progress = $1::text::jsonb \
     WHERE id = $2 AND attempts = $3 AND leased_by = $4 AND state = 'running'";

/// Record `progress` (JSON text) on a running attempt.
pub(crate) async fn record_progress<C: GenericClient + Sync>(
    client: &C,
    id: i64,
    attempt: i32,
    worker: &str,
    progress: &str,
) -> Result<u64> {
    client
        .execute(PROGRESS, &[&progress, &id, &attempt, &worker])
        .await
        .context(format!("recording progress of task {id}"))
}

// ------------------------------------------------------------- fail, requeue, cancel

const FAIL: &str =
    "SELECT herald.fail_task($1, $2, $3, $4, now() + make_interval(secs => $5), $6) \
     AS outcome";

/// What `herald.fail_task` made of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Back to `ready`, at the retry time.
    Retry,
    /// Moved to `herald.dead_letters`.
    Dead,
    /// Cancellation had been requested: ended `cancelled`.
    Cancelled,
    /// The lease had passed on: nothing changed.
    NotHeld,
}

impl Failed {
    fn parse(outcome: Option<&str>) -> Failed {
        match outcome {
            Some("retry") => Failed::Retry,
            Some("dead") => Failed::Dead,
            Some("cancelled") => Failed::Cancelled,
            _ => Failed::NotHeld,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Failed::Retry => "retry",
            Failed::Dead => "dead",
            Failed::Cancelled => "cancelled",
            Failed::NotHeld => "lost",
        }
    }
}

/// `herald.fail_task`: record `error` on the attempt and retry it after
/// `retry_in_secs`, or dead-letter it when `permanent` or out of attempts.
pub(crate) async fn fail(
    client: &deadpool_postgres::Object,
    id: i64,
    attempt: i32,
    worker: &str,
    error: &str,
    retry_in_secs: f64,
    permanent: bool,
) -> Result<Failed> {
    let row = client
        .query_one(
            FAIL,
            &[&id, &attempt, &worker, &error, &retry_in_secs, &permanent],
        )
        .await
        .context(format!("recording the failure of task {id}"))?;
    Ok(Failed::parse(row.get::<_, Option<&str>>("outcome")))
}

// Snooze and release give the attempt back: the task did not fail.
const REQUEUE: &str = concat!(
    "
WITH u AS (
    UPDATE herald.tasks
    SET state = 'ready', run_at = now() + make_interval(secs => $4), attempts = attempts - 1,
        lease_expires_at = NULL, leased_by = NULL
    WHERE id = $1 AND attempts = $2 AND leased_by = $3 AND state = 'running'
    RETURNING 1
)
SELECT pg_notify('",
    notify_channel!(),
    "', '') FROM u"
);

/// Put the attempt back to `ready` after `after_secs`, giving the attempt
/// back. `false` when the lease had passed on.
pub(crate) async fn requeue(
    client: &deadpool_postgres::Object,
    id: i64,
    attempt: i32,
    worker: &str,
    after_secs: f64,
) -> Result<bool> {
    let rows = client
        .query(REQUEUE, &[&id, &attempt, &worker, &after_secs])
        .await
        .context(format!("requeueing task {id}"))?;
    Ok(!rows.is_empty())
}

const CANCELLED: &str = "
UPDATE herald.tasks
SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL, leased_by = NULL,
    last_error = $4
WHERE id = $1 AND attempts = $2 AND leased_by = $3 AND state = 'running'";

/// End a running attempt `cancelled` with `reason`. `false` when the lease
/// had passed on.
pub(crate) async fn cancel_running(
    client: &deadpool_postgres::Object,
    id: i64,
    attempt: i32,
    worker: &str,
    reason: &str,
) -> Result<bool> {
    let n = client
        .execute(CANCELLED, &[&id, &attempt, &worker, &reason])
        .await
        .context(format!("cancelling task {id}"))?;
    Ok(n == 1)
}

// ------------------------------------------------------------- leases

// Fenced by attempt: an earlier attempt's renewal must not extend a later
// one's lease. $1 sorted and unique, as for COMPLETE_*.
const HEARTBEAT: &str = "
UPDATE herald.tasks t
SET lease_expires_at = now() + make_interval(secs => $4)
WHERE t.id = ANY($1) AND t.leased_by = $3 AND t.state = 'running'
  AND t.attempts = ($2::int[])[width_bucket(t.id, $1)]
RETURNING t.id, t.attempts, t.cancel_requested_at IS NOT NULL AS cancel_requested";

/// A lease the heartbeat renewed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Renewed {
    pub id: i64,
    pub attempt: i32,
    /// `herald.cancel_task` asked for the task to stop.
    pub cancel_requested: bool,
}

impl Renewed {
    fn from_row(r: &Row) -> Renewed {
        Renewed {
            id: r.get("id"),
            attempt: r.get("attempts"),
            cancel_requested: r.get("cancel_requested"),
        }
    }
}

/// Extend by `lease_secs` the leases `worker` holds on the attempts
/// `(ids[i], attempts[i])` (`ids` sorted and unique); those not returned
/// are no longer its own.
pub(crate) async fn heartbeat(
    client: &deadpool_postgres::Object,
    ids: &[i64],
    attempts: &[i32],
    worker: &str,
    lease_secs: f64,
) -> Result<Vec<Renewed>> {
    Ok(client
        .query(HEARTBEAT, &[&ids, &attempts, &worker, &lease_secs])
        .await
        .context("extending task leases")?
        .iter()
        .map(Renewed::from_row)
        .collect())
}

const RESCUE: &str = "SELECT herald.rescue_expired_leases(1000) AS rescued";

/// `herald.rescue_expired_leases`: return up to 1,000 tasks whose lease
/// expired to the queue (or dead-letter them); returns how many.
pub(crate) async fn rescue_expired<C: GenericClient + Sync>(client: &C) -> Result<i32> {
    Ok(client
        .query_one(RESCUE, &[])
        .await
        .context("rescuing expired leases")?
        .get("rescued"))
}

const REMOVE_FINISHED: &str = "
DELETE FROM herald.tasks WHERE id IN (
    SELECT id FROM herald.tasks
    WHERE state IN ('succeeded', 'cancelled') AND finished_at < now() - make_interval(secs => $1)
    LIMIT 1000)";

/// Delete up to 1,000 tasks finished more than `keep_secs` ago; returns how
/// many.
pub(crate) async fn remove_finished<C: GenericClient + Sync>(
    client: &C,
    keep_secs: f64,
) -> Result<u64> {
    client
        .execute(REMOVE_FINISHED, &[&keep_secs])
        .await
        .context("removing finished tasks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskState::parse("done"), None);
    }

    #[test]
    fn arbiter_is_in_every_keyed_insert() {
        assert!(INSERT_UNIQUE.contains(ON_UNIQUE_KEY_DO_NOTHING));
        assert!(INSERT_BATCH.contains(ON_UNIQUE_KEY_DO_NOTHING));
        assert!(ON_UNIQUE_KEY_DO_NOTHING.contains(UNIQUE_KEY_PREDICATE));
    }

    /// The arbiter's predicate is the `tasks_unique_key` index's, as
    /// Postgres normalizes both: an index on a scratch table built with the
    /// const must read back the same as the migrated one.
    #[tokio::test]
    async fn arbiter_matches_the_unique_key_index() {
        let admin_url = std::env::var("HERALD_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .expect("connecting to the test server");
        tokio::spawn(conn);
        let name = format!(
            "herald_unit_arbiter_{}_{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating a database");
        let mut url = url::Url::parse(&admin_url).expect("HERALD_TEST_DATABASE_URL");
        url.set_path(&format!("/{name}"));
        let config = crate::Config {
            database_url: url.to_string(),
            ..crate::Config::default()
        };
        let checked = async {
            crate::migrate::migrate(&config).await?;
            let client = crate::db::connect(&config, "herald-unit-test").await?;
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE probe (unique_key text, state text);
                     CREATE UNIQUE INDEX probe_unique_key ON probe (unique_key)
                         WHERE {UNIQUE_KEY_PREDICATE}"
                ))
                .await
                .context("creating the probe index")?;
            let pred = |index: &str| {
                format!(
                    "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i \
                     JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = '{index}'"
                )
            };
            let live: String = client
                .query_one(&pred("tasks_unique_key"), &[])
                .await
                .context("reading tasks_unique_key")?
                .get(0);
            let ours: String = client
                .query_one(&pred("probe_unique_key"), &[])
                .await
                .context("reading probe_unique_key")?
                .get(0);
            Ok::<_, Error>((live, ours))
        }
        .await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("dropping the database");
        let (live, ours) = checked.expect("comparing the predicates");
        assert_eq!(
            live, ours,
            "ON_UNIQUE_KEY_DO_NOTHING drifted from tasks_unique_key"
        );
    }
}
