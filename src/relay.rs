//! The relay: moves committed events from `herald.outbox` to Redis.
//!
//! It owns the LISTEN connection (a dedicated session driven with
//! `poll_message`, never a pooled one), the claim → publish → delete → commit
//! cycle, partition ownership, backoff while Redis is down, dead-lettering of
//! events that never get through, and expiry of the archive. In the claim's
//! transaction it also checks events against the catalog (events that fail
//! go to the dead letters, undelivered) and inserts one task per matching
//! durable subscription; while Redis does not take the events it inserts
//! those tasks in transactions of their own and marks the rows
//! (`fanned_out`), so each event's tasks are inserted exactly once.
//!
//! It must never remove an event from the outbox before Redis acknowledged
//! its PUBLISH (that would lose events), never publish an event while an
//! earlier one of its partition waits out a backoff, and never let two
//! transactions drain one partition at the same time (either would reorder
//! a key), and never sleep without either
//! holding the wake lock or knowing another relay holds it (that would leave
//! an event waiting for `poll_interval`). NOTIFY is only a wake-up: every
//! decision is taken from the table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::poll_fn;
use rand::Rng;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Error, Result};
use crate::events::Catalog;
use crate::telemetry::names::{event, metric};

/// The notification channel the outbox trigger signals.
pub const CHANNEL: &str = "herald_outbox";
/// First key of the transaction-level advisory locks that give one
/// transaction at a time a partition ("hera" in ASCII).
pub const PARTITION_LOCK_SPACE: i32 = 0x6865_7261;
/// The wake lock ("herw", 1) a sleeping relay holds exclusively on its
/// wake-lock session. The outbox trigger (sql/V6__wake_idle_relays_only.sql)
/// notifies only when it cannot take it shared, that is while a relay sleeps
/// or is about to; otherwise it holds it shared until its commit. See
/// [`crate::wake`].
pub const WAKE_LOCK: (i32, i32) = (crate::wake::WAKE_LOCK_SPACE, 1);
/// `application_name` of the session that holds the wake lock.
pub const WAKE_LOCK_APPLICATION_NAME: &str = "herald-relay-wake-lock";
/// `application_name` of the LISTEN connection, to find it in pg_stat_activity.
pub const LISTEN_APPLICATION_NAME: &str = "herald-relay-listen";
/// How often the archive's old partitions are dropped.
const ARCHIVE_MAINTENANCE_EVERY: Duration = Duration::from_secs(600);

/// The durable subscriptions' tasks for the outbox rows of CTE `$rows`
/// (as claimed: event_id, topic, key, payload, headers, created_at,
/// fanned_out), one per matching enabled subscription; the caller adds the
/// WHERE and ORDER BY. CLAIM and SETTLE_PUBLISHED share it.
macro_rules! fan_out_rows {
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

// Claim a batch: take up to $5 partitions that have due events and whose
// transaction lock is free, delete their oldest $1 due rows, archive them
// when $2, and return the envelopes in id order. The statement runs in a
// transaction that commits only after Redis acknowledged them. $3 rotates
// the starting partition so that every partition gets its turn.
//
// The lock is taken in the select list of the LATERAL's first due row, so
// empty partitions are never locked (a WHERE on the lock could be pushed
// below the LIMIT 1). The LATERAL is one probe of outbox_claim per
// partition: as an EXISTS, the planner hashed a sequential scan of the
// whole heap, dead rows included, into every claim (0.33 ms of an empty
// claim with 20,000 dead rows; 0.14 ms as probes).
//
// `id = ANY(ARRAY(...))` deletes by primary key: `id IN (...)` was planned
// as a hash join over a sequential scan of the outbox, 28 ms of a
// 1,000-event claim with 200,000 waiting (6 ms now; EXPLAIN ANALYZE).
//
// The claim runs on a generic plan (begin_claim), planned once per
// connection and again when the outbox's statistics change: planning it
// afresh was 0.2 ms of an empty claim's 0.3 ms, on every claim. A generic
// plan cannot look at the parameters, so the statement is written to leave
// it one sound shape whatever the outbox holds:
// - each owned partition is read by its own outbox_claim scan in id order.
//   The range `partition >= p AND partition <= p` is on purpose: with an
//   equality the planner treats the partition as fixed, takes the primary
//   key as already in order, and walked it past every other partition's
//   rows (12 ms for 1,000 events with 200,000 waiting, against 6 ms);
// - the few candidates are then locked (SKIP LOCKED) by primary key, so
//   only rows that will be deleted are locked;
// - herald.settings is read with LIMIT 1, so a never-analyzed settings
//   table is not estimated at 1,810 rows.
//
// A partition is taken only when its oldest row is due: an event Redis
// refused waits out its backoff in `available_at` and holds back everything
// after it in its partition, so no later event of its key passes it. Due
// means `available_at <= clock_timestamp()`, read after the statement's
// snapshot: a producer's `available_at` (its transaction's start) is before
// its commit, so every row the claim can see is due unless the relay held
// it back; `now()`, the claim transaction's start, could call a
// just-committed row not due. Only the head needs the test: the relay holds
// back only rows with nothing but held rows before them in their partition
// (see `Settle`), so behind a due head every row may go (a held row behind
// it merely goes before its own backoff ends, still in order).
const CLAIM: &str = concat!("
WITH owned AS MATERIALIZED (
    SELECT s.p
    FROM (SELECT partitions FROM herald.settings LIMIT 1) AS st,
         LATERAL (SELECT ((g + $3) % st.partitions)::smallint AS p
                  FROM generate_series(0, st.partitions - 1) AS g) AS s,
         LATERAL (SELECT pg_try_advisory_xact_lock($4, s.p) AS got
                  FROM (SELECT o.available_at FROM herald.outbox o
                        WHERE o.partition >= s.p AND o.partition <= s.p
                        ORDER BY o.partition, o.id
                        LIMIT 1) AS head
                  WHERE head.available_at <= clock_timestamp()) AS due
    WHERE due.got AND current_setting('herald.relay_fan_out', true) = 'on'
    LIMIT $5
), claimed AS (
    DELETE FROM herald.outbox
    WHERE id = ANY(ARRAY(
        SELECT l.id FROM herald.outbox l
        WHERE l.id = ANY(ARRAY(
            SELECT c.id
            FROM owned,
                 LATERAL (SELECT id FROM herald.outbox
                          WHERE partition >= owned.p AND partition <= owned.p
                          ORDER BY partition, id
                          LIMIT $1) AS c
            ORDER BY c.id
            LIMIT $1))
        FOR UPDATE SKIP LOCKED))
    RETURNING id, event_id, topic, key, partition, payload, headers, created_at, attempts, fanned_out
), archived AS (
    INSERT INTO herald.outbox_archive (id, event_id, topic, key, partition, payload, headers, created_at, attempts)
    SELECT id, event_id, topic, key, partition, payload, headers, created_at, attempts
    FROM claimed WHERE $2
), fanned AS (
    -- When $6 (no catalog check can refuse an event of this batch), the
    -- durable subscriptions' tasks are inserted here, in the same statement:
    -- no second round trip, no second parse of the envelopes. Events
    -- fanned out while Redis was down (fanned_out) already have theirs.
    ", fan_out_rows!("claimed"), "
    WHERE $6 AND NOT c.fanned_out
    ORDER BY c.id, s.name
    RETURNING 1
)
SELECT id, topic, partition,
       json_build_object('id', event_id, 'topic', topic, 'key', key, 'payload', payload,
                         'headers', headers, 'created_at', created_at)::text,
       (SELECT count(*) FROM fanned) AS fanned_out,
       fanned_out AS was_fanned_out
FROM claimed
ORDER BY id");

// For the claim's transaction: its fan-out INSERT leaves herald_tasks'
// NOTIFY to the relay (sql/V8__tasks_notify_only_when_needed.sql), and its
// commit does not wait for the WAL flush. A commit that a Postgres crash
// loses takes the whole batch with it (deletes, archive rows, fanned-out
// tasks): the events are still in the outbox and are published again, the
// at-least-once redelivery a relay killed mid-batch already causes. Under
// load the flush wait was most of a batch's cycle, and events arriving
// meanwhile waited for it (O4).
//
// CLAIM is planned once per connection, on indexes
// (crate::db::plan_on_indexes): see its comment above.
//
// BEGIN is sent in the same simple query, pipelined ahead of CLAIM. Should
// it ever not take effect, CLAIM would run on its own, and its first CTE
// requires herald.relay_fan_out, which a SET LOCAL outside a transaction
// block does not leave set: it claims nothing rather than deleting events
// with no transaction left to roll back.
//
// The server bounds the transaction (claim_hold): a relay that stops while
// it holds partitions (SIGSTOP, a hung host, a partition from Postgres) is
// disconnected after `idle_in_transaction_session_timeout`, or when its
// unacknowledged data times out (`tcp_user_timeout`), so its partitions
// pass to another relay. Both are longer than the longest publish the relay
// waits for, and SET LOCAL, so no other user of the pool inherits them.
fn begin_claim(hold: Duration) -> String {
    format!(
        "BEGIN; SET LOCAL herald.relay_fan_out = on; SET LOCAL synchronous_commit = off; \
         SET LOCAL idle_in_transaction_session_timeout = {ms}; SET LOCAL tcp_user_timeout = {ms}; {}",
        crate::db::plan_on_indexes!(),
        ms = hold.as_millis()
    )
}

/// How long a claim transaction may legitimately sit idle while its batch is
/// published: a Redis connection from the pool (waiting for one, then
/// creating it: twice `redis.connect_timeout`), the pipelines that start
/// within one `redis.response_timeout` of that (`publish_each` starts none
/// later), each up to `redis.response_timeout`, and a second of margin. A
/// stopped relay's partitions pass to another relay after this and at most
/// that relay's `relay.poll_interval`.
pub fn claim_hold(config: &Config) -> Duration {
    config.redis.connect_timeout * 2 + config.redis.response_timeout * 2 + Duration::from_secs(1)
}

// Record an outage on rows Redis did not run: never an attempt, and they
// stay due (the relay backs off as a whole).
const RECORD_FAILURE: &str = "
UPDATE herald.outbox SET last_error = $2 WHERE id = ANY($1)";

// Record Redis's refusal of each of these rows: an attempt, the reason, and
// a backoff ($3 ms doubling per attempt up to $4 ms) in available_at, which
// holds back the rest of the row's partition (see CLAIM).
const RECORD_REFUSED: &str = "
UPDATE herald.outbox o
SET attempts = o.attempts + 1, last_error = r.error,
    available_at = clock_timestamp()
        + least($4::float8, $3::float8 * power(2, least(o.attempts, 30))) * interval '1 millisecond'
FROM unnest($1::bigint[], $2::text[]) AS r(id, error)
WHERE o.id = r.id";

// Rows Redis accepted in a batch that could not commit as a whole: removed,
// archived when $2, and fanned out to durable subscriptions, as CLAIM does
// (the claim's own fan-out was rolled back with it).
const SETTLE_PUBLISHED: &str = concat!("
WITH gone AS (
    DELETE FROM herald.outbox WHERE id = ANY($1)
    RETURNING id, event_id, topic, key, partition, payload, headers, created_at, attempts, fanned_out
), archived AS (
    INSERT INTO herald.outbox_archive (id, event_id, topic, key, partition, payload, headers, created_at, attempts)
    SELECT id, event_id, topic, key, partition, payload, headers, created_at, attempts
    FROM gone WHERE $2
)
", fan_out_rows!("gone"), "
WHERE NOT c.fanned_out
ORDER BY c.id, s.name");

// Mark rows as fanned out (sql/V9__outbox_fanned_out.sql); returns those
// that were not yet, whose tasks the caller then inserts in the same
// transaction (FAN_OUT), under their partitions' locks.
const MARK_FANNED_OUT: &str = "
UPDATE herald.outbox SET fanned_out = true
WHERE id = ANY($1) AND NOT fanned_out
  AND EXISTS (SELECT 1 FROM herald.subscriptions WHERE enabled)
RETURNING id";

// While Redis is down: take up to $3 partitions whose lock is free (from
// $2 on) and return their oldest $1 rows not yet fanned out, when any
// durable subscription is enabled. The caller checks them against the
// catalog, fans out the valid ones and marks them all, then commits.
const UNFANNED: &str = "
WITH owned AS MATERIALIZED (
    SELECT s.p
    FROM (SELECT partitions FROM herald.settings LIMIT 1) AS st,
         LATERAL (SELECT ((g + $2) % st.partitions)::smallint AS p
                  FROM generate_series(0, st.partitions - 1) AS g) AS s,
         LATERAL (SELECT pg_try_advisory_xact_lock($4, s.p) AS got
                  FROM herald.outbox o
                  WHERE o.partition >= s.p AND o.partition <= s.p AND NOT o.fanned_out
                  LIMIT 1) AS due
    WHERE due.got AND EXISTS (SELECT 1 FROM herald.subscriptions WHERE enabled)
    LIMIT $3
)
SELECT c.id, c.topic,
       json_build_object('id', c.event_id, 'topic', c.topic, 'key', c.key, 'payload', c.payload,
                         'headers', c.headers, 'created_at', c.created_at)::text
FROM owned,
     LATERAL (SELECT id, event_id, topic, key, payload, headers, created_at
              FROM herald.outbox
              WHERE partition >= owned.p AND partition <= owned.p AND NOT fanned_out
              ORDER BY partition, id
              LIMIT $1) AS c
ORDER BY c.id
LIMIT $1";

// Wait for (not try) the partitions' transaction locks, in a fixed order.
const LOCK_PARTITIONS: &str = "
SELECT count(pg_advisory_xact_lock($1, p))
FROM (SELECT DISTINCT unnest($2::smallint[]) AS p ORDER BY 1) AS parts";

const DEAD_LETTER: &str = "
WITH dead AS (
    DELETE FROM herald.outbox WHERE id = ANY($1) AND attempts >= $2
    RETURNING id, event_id, topic, key, payload, headers, attempts, last_error, created_at
)
INSERT INTO herald.dead_letters
    (source, original_id, event_id, topic, key, payload, headers, attempts, errors, last_error, created_at)
SELECT 'outbox', id, event_id, topic, key, payload, headers, attempts,
       jsonb_build_array(jsonb_build_object('at', now(), 'attempt', attempts, 'error', last_error)),
       last_error, created_at
FROM dead";

// Events that fail their catalog check, removed by the claim, kept as dead
// letters in the same transaction.
const DEAD_LETTER_INVALID: &str = "
INSERT INTO herald.dead_letters
    (source, original_id, event_id, topic, key, payload, headers, attempts, errors, last_error, created_at)
SELECT 'outbox', x.id, (x.env->>'id')::uuid, x.env->>'topic', x.env->>'key', x.env->'payload',
       x.env->'headers', 0,
       jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 0, 'error', x.err)),
       x.err, (x.env->>'created_at')::timestamptz
FROM (SELECT id, env::jsonb AS env, err
      FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, env, err)) AS x";

// One task per (event, matching enabled durable subscription), in event
// order; the task's payload is the envelope. Runs in the claim's
// transaction, so the tasks exist exactly when the events leave the outbox.
// Used when the catalog may refuse events (only valid ones fan out);
// otherwise CLAIM does the same in its `fanned` CTE.
const FAN_OUT: &str = "
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

/// The claim's transaction, begun by begin_claim pipelined with the claim
/// itself (tokio-postgres' `Transaction` waits for its BEGIN first). Like
/// `Transaction`, it rolls back when dropped unfinished, here on a task of
/// its own that then returns the connection to the pool, or closes it if the
/// ROLLBACK did not go through.
struct ClaimTx(Option<deadpool_postgres::Object>);

impl ClaimTx {
    async fn commit(self) -> std::result::Result<(), tokio_postgres::Error> {
        self.finish("COMMIT").await
    }

    async fn rollback(self) -> std::result::Result<(), tokio_postgres::Error> {
        self.finish("ROLLBACK").await
    }

    async fn finish(mut self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        end_claim(self.0.take().expect("an unfinished claim transaction"), sql).await
    }
}

/// Send COMMIT or ROLLBACK; a connection on which it failed does not go
/// back to the pool, since its transaction state is unknown.
async fn end_claim(
    client: deadpool_postgres::Object,
    sql: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    let done = client.batch_execute(sql).await;
    if done.is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
    done
}

impl std::ops::Deref for ClaimTx {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("an unfinished claim transaction")
    }
}

impl Drop for ClaimTx {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            tokio::spawn(async move {
                let _ = end_claim(client, "ROLLBACK").await;
            });
        }
    }
}

/// Counters a caller (the CLI, a test, the bench) can read while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub published: AtomicU64,
    pub batches: AtomicU64,
    pub failed_batches: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub listen_connects: AtomicU64,
    /// Whether the LISTEN connection is up now and every drain worker and
    /// the listener still run (`/readyz`): cleared for good when one of
    /// them died.
    pub listening: std::sync::atomic::AtomicBool,
    /// A drain worker or the listener died (panicked); the relay is no
    /// longer ready however well the rest runs.
    pub failed: std::sync::atomic::AtomicBool,
    /// Fault injection for tests: the next drain worker to look panics.
    #[doc(hidden)]
    pub inject_panic: std::sync::atomic::AtomicBool,
    /// Events refused by the catalog (schema or strict mode).
    pub invalid: AtomicU64,
    /// Tasks inserted for durable subscriptions.
    pub fanned_out: AtomicU64,
    /// Times this relay took the wake lock to sleep (producers notify only
    /// while a relay holds it).
    pub sleeps: AtomicU64,
    /// Whether this relay holds the wake lock now (it sleeps, producers
    /// notify).
    pub asleep: std::sync::atomic::AtomicBool,
}

pub struct Relay {
    config: Config,
    pool: Pool,
    redis: deadpool_redis::Pool,
    stats: Arc<RelayStats>,
    // Compiled from the configuration; an error stops `run` at once.
    catalog: std::result::Result<Catalog, String>,
}

impl Relay {
    pub fn new(config: &Config, pool: Pool, redis: deadpool_redis::Pool) -> Relay {
        Relay {
            config: config.clone(),
            pool,
            redis,
            stats: Arc::new(RelayStats::default()),
            catalog: Catalog::from_config(config).map_err(|e| e.to_string()),
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Run until `shutdown` is cancelled; the batches in flight finish and
    /// commit (their partition locks go with the commit) before it returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let catalog = self.catalog.clone().map_err(Error::Config)?;
        {
            let client = self.pool.get().await?;
            crate::migrate::check_schema(&client).await?;
        }
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let wake_tx = Arc::new(wake_tx);
        let idle = Arc::new(crate::wake::Idle::new(self.config.relay.concurrency));
        let listener_task = tokio::spawn(listen(
            self.config.clone(),
            wake_tx.clone(),
            idle.clone(),
            self.stats.clone(),
            shutdown.clone(),
        ));
        let shared = Arc::new(Drainer {
            config: self.config.clone(),
            pool: self.pool.clone(),
            redis: self.redis.clone(),
            stats: self.stats.clone(),
            catalog,
            redis_down: Default::default(),
            begin_claim: begin_claim(claim_hold(&self.config)),
            vacuum: crate::vacuum::Vacuum::new(
                "herald.outbox",
                self.config.relay.vacuum_after,
                self.pool.clone(),
            ),
        });
        let listener_abort = listener_task.abort_handle();
        let listener = tokio::spawn(watch_task("listener", listener_task, self.stats.clone()));
        // Create today's archive partition before the first claim, so
        // archived rows never start out in the default partition.
        shared.maintain_archive().await;
        let mut workers = Vec::new();
        for n in 0..self.config.relay.concurrency {
            let worker = tokio::spawn(shared.clone().work(
                n,
                wake_rx.clone(),
                idle.clone(),
                shutdown.clone(),
            ));
            workers.push(tokio::spawn(watch_task(
                "drain worker",
                worker,
                self.stats.clone(),
            )));
        }
        tracing::info!(
            concurrency = self.config.relay.concurrency,
            batch_size = self.config.relay.batch_size,
            "relay started"
        );
        for worker in workers {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "relay worker panicked");
            }
        }
        listener_abort.abort();
        let _ = listener.await;
        tracing::info!(
            published = self.stats.published.load(Ordering::Relaxed),
            "relay stopped"
        );
        Ok(())
    }
}

/// Wait for one of the relay's tasks; if it panicked, the relay is no
/// longer ready (`RelayStats::failed`, and `listening` cleared for good).
async fn watch_task(what: &'static str, task: tokio::task::JoinHandle<()>, stats: Arc<RelayStats>) {
    if let Err(error) = task.await {
        if error.is_panic() {
            stats.failed.store(true, Ordering::SeqCst);
            stats.listening.store(false, Ordering::SeqCst);
            tracing::error!(task = what, %error, "relay task panicked; the relay reports itself not ready");
        }
    }
}

/// Keep a LISTEN session open and turn every notification, and every
/// (re)connect, into a wake-up of the drain workers.
async fn listen(
    config: Config,
    wake: Arc<watch::Sender<u64>>,
    idle: Arc<crate::wake::Idle>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let attempt = listen_once(&config, &wake, &idle, &stats);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = attempt => outcome,
        };
        stats.listening.store(false, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                // We had a working session: retry at once-ish.
                backoff.reset();
                tracing::warn!(event = event::POSTGRES_CONNECTION_LOST, component = "relay",
                    %reason, "relay LISTEN connection lost; reconnecting");
            }
            Err(error) => tracing::warn!(%error, "relay LISTEN connection failed"),
        }
        // Whatever happened, sweep: events may have committed while no
        // notification could reach us.
        wake.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// One LISTEN session. `Err` when it could not be set up; `Ok(reason)` when
/// it was up and then ended. The session also holds the wake lock while the
/// relay sleeps: taken when every drain worker is idle, let go of at the
/// first notification.
async fn listen_once(
    config: &Config,
    wake: &watch::Sender<u64>,
    idle: &crate::wake::Idle,
    stats: &RelayStats,
) -> Result<String> {
    let pg = crate::db::pg_config(config, LISTEN_APPLICATION_NAME)?;
    let (client, mut connection) = pg
        .connect(NoTls)
        .await
        .context("opening the LISTEN connection")?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let notified = Arc::new(tokio::sync::Notify::new());
    let (wake_driver, notified_driver) = (wake.clone(), notified.clone());
    // The connection is driven here rather than spawned as a plain future so
    // that notifications come out of poll_message.
    let driver = tokio::spawn(async move {
        let end = loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    wake_driver.send_modify(|g| *g += 1);
                    notified_driver.notify_one();
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(notice = %notice.message(), "postgres notice")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(crate::error::describe_pg(&e)),
                None => break None,
            }
        };
        let _ = closed_tx.send(end);
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .context("LISTEN herald_outbox")?;
    // The wake lock lives on a second session: waiting for it must not hold
    // back the notifications, which the server sends only to an idle session.
    let lock =
        crate::wake::WakeLock::open(config, WAKE_LOCK_APPLICATION_NAME, WAKE_LOCK, true).await?;
    if stats.listen_connects.fetch_add(1, Ordering::Relaxed) > 0 {
        crate::telemetry::reconnected("postgres", "relay");
    }
    stats.listening.store(true, Ordering::Relaxed);
    // A task that died meanwhile keeps the relay unready (watch_task sets
    // `failed` before clearing `listening`).
    if stats.failed.load(Ordering::SeqCst) {
        stats.listening.store(false, Ordering::SeqCst);
    }
    tracing::debug!("relay listening on {CHANNEL}");
    // Sweep right after LISTEN took effect: anything committed before is
    // found by the sweep, anything after sends a notification or is found
    // by the sweep after the wake lock.
    wake.send_modify(|g| *g += 1);
    let listen_closed = async move { closed_rx.await.ok().flatten() };
    let gauges = crate::wake::Gauges {
        sleeps: &stats.sleeps,
        asleep: &stats.asleep,
    };
    let end = lock
        .serve(Box::pin(listen_closed), &notified, idle, wake, gauges)
        .await;
    drop(client);
    let _ = driver.await;
    Ok(end.unwrap_or_else(|| "closed by the server".into()))
}

struct Drainer {
    config: Config,
    pool: Pool,
    redis: deadpool_redis::Pool,
    stats: Arc<RelayStats>,
    catalog: Catalog,
    /// A publish failed because Redis was unreachable; the next success is
    /// a reconnect.
    redis_down: std::sync::atomic::AtomicBool,
    /// Events removed since this relay last vacuumed the outbox.
    vacuum: crate::vacuum::Vacuum,
    /// BEGIN and the claim transaction's settings (see [`begin_claim`]).
    begin_claim: String,
}

impl Drainer {
    async fn work(
        self: Arc<Self>,
        n: usize,
        mut wake: watch::Receiver<u64>,
        idle: Arc<crate::wake::Idle>,
        shutdown: CancellationToken,
    ) {
        let relay = &self.config.relay;
        let mut backoff = Backoff::new(relay.backoff_min, relay.backoff_max);
        let mut pace = Pace::new(relay.batch_size);
        // Each worker starts at another partition so that they spread out.
        let mut offset: i32 = (n as i32) * 7919;
        let mut next_maintenance = Instant::now() + ARCHIVE_MAINTENANCE_EVERY;
        loop {
            wake.borrow_and_update();
            if n == 0 && relay.retain_published.is_some() && Instant::now() >= next_maintenance {
                self.maintain_archive().await;
                next_maintenance = Instant::now() + ARCHIVE_MAINTENANCE_EVERY;
            }
            // Drain until nothing is left for us, or until asked to stop.
            let mut failed = false;
            while !shutdown.is_cancelled() {
                if self.stats.inject_panic.swap(false, Ordering::Relaxed) {
                    panic!("relay drain worker {n}: panic injected by a test");
                }
                offset = offset.wrapping_add(1) & 0x3fff_ffff;
                match self.claim_and_publish(offset, &mut pace).await {
                    // Nothing due in any partition this worker could take.
                    Ok(0) => break,
                    Ok(_) => backoff.reset(),
                    Err(error) => {
                        self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(metric::RELAY_FAILED_BATCHES).increment(1);
                        tracing::warn!(event = event::RELAY_BATCH_FAILED, %error, "relay batch failed; backing off");
                        failed = true;
                        break;
                    }
                }
            }
            if failed && self.redis_down.load(Ordering::Relaxed) {
                // Webhooks and task subscribers need only Postgres: fan the
                // waiting events out now, once each (herald.outbox.fanned_out).
                while !shutdown.is_cancelled() {
                    offset = offset.wrapping_add(1) & 0x3fff_ffff;
                    match self.fan_out_waiting(offset, relay.batch_size).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "fan-out while Redis is down failed");
                            break;
                        }
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            let pause = if failed {
                backoff.next()
            } else {
                relay.poll_interval
            };
            idle.idle();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = wake.changed(), if !failed => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
            idle.busy();
        }
    }

    /// Claim, publish and commit one batch; returns how many events it held.
    async fn claim_and_publish(&self, offset: i32, pace: &mut Pace) -> Result<usize> {
        let relay = &self.config.relay;
        let client = self.pool.get().await?;
        let claim = client
            .prepare_cached(CLAIM)
            .await
            .context("preparing the outbox claim")?;
        let tx = ClaimTx(Some(client));
        let claim_started = Instant::now();
        // With nothing to check, the claim fans out to subscriptions itself.
        let checks = self.catalog.checks_anything();
        // begin_claim goes in the same round trip as the claim
        // (tokio-postgres pipelines them in order): a round trip less on
        // every event's way to Redis, and on every empty sweep.
        let (batch_size, retain, per_batch, fan_out_here) = (
            pace.limit() as i64,
            relay.retain_published.is_some(),
            relay.partitions_per_batch as i64,
            !checks,
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &batch_size,
            &retain,
            &offset,
            &PARTITION_LOCK_SPACE,
            &per_batch,
            &fan_out_here,
        ];
        let (quiet, rows) = tokio::join!(
            tx.batch_execute(&self.begin_claim),
            tx.query(&claim, &params)
        );
        quiet.context("setting up the claim transaction")?;
        let rows = rows.context("claiming a batch from herald.outbox")?;
        if rows.is_empty() {
            tx.commit().await.context("ending an empty claim")?;
            return Ok(0);
        }
        // One span per non-empty batch (never per event): an empty claim,
        // the idle relay's poll, leaves no trace.
        let span = tracing::info_span!(
            "herald.relay.batch",
            herald.relay.events = rows.len() as i64,
            herald.relay.partitions = tracing::field::Empty,
            herald.relay.published = tracing::field::Empty,
            herald.relay.fanned_out = tracing::field::Empty,
            herald.relay.refused = tracing::field::Empty,
            herald.relay.claim_ms = claim_started.elapsed().as_secs_f64() * 1000.0,
            otel.status_code = tracing::field::Empty,
        );
        metrics::histogram!(metric::RELAY_BATCH_SIZE).record(rows.len() as f64);
        // The partition locks this batch holds until it commits or rolls
        // back: those its events came from.
        let held = if span.is_disabled() && !tracing::enabled!(tracing::Level::DEBUG) {
            String::new()
        } else {
            let mut parts: Vec<i16> = rows.iter().map(|r| r.get::<_, i16>(2)).collect();
            parts.sort_unstable();
            parts.dedup();
            let list = parts
                .iter()
                .map(i16::to_string)
                .collect::<Vec<_>>()
                .join(",");
            span.record("herald.relay.partitions", list.as_str());
            tracing::debug!(parent: &span, event = event::RELAY_BATCH_CLAIMED,
                events = rows.len() as i64, "relay batch claimed");
            tracing::debug!(parent: &span, event = event::RELAY_PARTITION_ACQUIRED,
                partitions = list.as_str(), "relay partitions acquired");
            list
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut partitions = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        let mut topics = Vec::with_capacity(rows.len());
        let mut envelopes = Vec::with_capacity(rows.len());
        let mut invalid: (Vec<i64>, Vec<String>, Vec<String>) = Default::default();
        let mut unfanned = Vec::with_capacity(rows.len());
        for row in &rows {
            let id = row.get::<_, i64>(0);
            let topic: &str = row.get(1);
            let envelope = row.get::<_, String>(3);
            if checks {
                if let Err(reason) = self.check(topic, &envelope) {
                    invalid.0.push(id);
                    invalid.1.push(envelope);
                    invalid.2.push(reason);
                    continue;
                }
            }
            ids.push(id);
            partitions.push(row.get::<_, i16>(2));
            let was_fanned_out = row.get::<_, bool>(5);
            unfanned.push(!was_fanned_out);
            // Only batches the catalog checks fan out separately and need
            // their own copy; the usual path moves the envelope.
            if checks && !was_fanned_out {
                topics.push(topic.to_string());
                envelopes.push(envelope.clone());
            }
            messages.push((format!("{}{}", self.config.channel_prefix, topic), envelope));
        }
        if !invalid.0.is_empty() {
            tx.execute(DEAD_LETTER_INVALID, &[&invalid.0, &invalid.1, &invalid.2])
                .await
                .context("moving events that fail the catalog to herald.dead_letters")?;
            self.stats
                .invalid
                .fetch_add(invalid.0.len() as u64, Ordering::Relaxed);
            span.record("herald.relay.refused", invalid.0.len() as i64);
            metrics::counter!(metric::DEAD_LETTERS, "source" => "outbox")
                .increment(invalid.0.len() as u64);
            for (id, reason) in invalid.0.iter().zip(&invalid.2) {
                tracing::warn!(parent: &span, event = event::RELAY_EVENT_REFUSED, outbox_id = id,
                    %reason, "event refused by the catalog; moved to herald.dead_letters");
            }
        }
        let tasks = if !checks {
            rows[0].get::<_, i64>(4) as u64
        } else if !topics.is_empty() {
            let fan_out = tx
                .prepare_cached(FAN_OUT)
                .await
                .context("preparing the subscription fan-out")?;
            tx.execute(&fan_out, &[&topics, &envelopes])
                .await
                .context("inserting tasks for durable subscriptions")?
        } else {
            0
        };
        self.stats.fanned_out.fetch_add(tasks, Ordering::Relaxed);
        span.record("herald.relay.fanned_out", tasks as i64);
        if tasks > 0 {
            metrics::counter!(metric::RELAY_FANNED_OUT).increment(tasks);
            // The claim silenced the tasks trigger (herald.relay_fan_out);
            // wake the workers at commit.
            tx.batch_execute("NOTIFY herald_tasks")
                .await
                .context("notifying workers of fanned-out tasks")?;
        }
        // No pipeline starts later than this, so the claim transaction
        // stays well inside claim_hold.
        let last_start = claim_started
            + self.config.redis.connect_timeout * 2
            + self.config.redis.response_timeout;
        let publication = crate::pubsub::publish_each(
            &self.redis,
            &messages,
            self.config.redis.response_timeout,
            relay.batch_bytes,
            last_start,
        )
        .await;
        if publication.all_accepted() {
            if self.redis_down.swap(false, Ordering::Relaxed) {
                crate::telemetry::reconnected("redis", "relay");
            }
            tx.commit().await.context("committing a published batch")?;
            pace.published(publication.first_pipeline, messages.len());
            self.vacuum.removed(rows.len() as u64);
            self.stats
                .published
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::RELAY_PUBLISHED).increment(messages.len() as u64);
            span.record("herald.relay.published", messages.len() as i64);
            tracing::debug!(parent: &span, event = event::RELAY_BATCH_PUBLISHED,
                events = messages.len() as i64, "relay batch published");
            tracing::debug!(parent: &span, event = event::RELAY_PARTITION_RELEASED,
                partitions = held.as_str(), outcome = "committed", "relay partitions released");
            return Ok(rows.len());
        }
        // Not all accepted: roll the claim back (its fan-out and its
        // dead-lettered invalid events with it; the catalog checks them
        // again), then settle each row by what Redis did with it.
        tx.rollback().await.context("rolling back a failed batch")?;
        span.record("otel.status_code", "ERROR");
        tracing::debug!(parent: &span, event = event::RELAY_PARTITION_RELEASED,
            partitions = held.as_str(), outcome = "rolled back", "relay partitions released");
        let mut settle = Settle::default();
        let prefix = self.config.channel_prefix.len();
        // Partitions with an event Redis did not run: a refusal behind one
        // is not held back (that would leave a due row before a held one,
        // which CLAIM's head test does not look past); it waits uncharged.
        let mut unsent_in: std::collections::HashSet<i16> = Default::default();
        for (i, ((id, sent), partition)) in ids
            .iter()
            .zip(&publication.sent)
            .zip(&partitions)
            .enumerate()
        {
            match sent {
                crate::pubsub::Sent::Accepted => settle.accepted.push(*id),
                crate::pubsub::Sent::Refused(reason) if !unsent_in.contains(partition) => {
                    settle.refused.push(*id);
                    settle.reasons.push(reason.clone());
                }
                _ => {
                    unsent_in.insert(*partition);
                    settle.unsent.push(*id);
                }
            }
            // Its durable subscriptions must not wait for Redis.
            if *sent != crate::pubsub::Sent::Accepted && unfanned[i] {
                settle.fan_ids.push(*id);
                settle.fan_topics.push(messages[i].0[prefix..].to_string());
                settle.fan_envelopes.push(messages[i].1.clone());
            }
            settle.partitions.push(*partition);
        }
        if publication.timed_out {
            // A head that keeps timing out alone while Redis answers a PING
            // is the event's fault (too large, too slow for Redis): charge
            // it, so it is dead-lettered in the end; an outage never is.
            if pace.timed_out(ids.first().copied()) && self.redis_answers().await {
                if let Some(head) = settle.unsent.first().copied() {
                    settle.unsent.remove(0);
                    settle.refused.insert(0, head);
                    settle.reasons.insert(
                        0,
                        format!(
                            "redis: publishing this event alone timed out repeatedly while Redis answered: {}",
                            publication.outage.as_ref().map(|e| e.to_string()).unwrap_or_default()
                        ),
                    );
                }
            }
        }
        let outage = publication.outage;
        if let Some(error) = &outage {
            if is_auth_outage(error) {
                tracing::error!(parent: &span, event = event::REDIS_CONNECTION_LOST,
                    component = "relay", %error,
                    "Redis refuses the relay's PUBLISH (authentication or ACL): no event can be delivered until this is fixed; events wait in herald.outbox");
                self.redis_down.store(true, Ordering::Relaxed);
            } else if !self.redis_down.swap(true, Ordering::Relaxed) {
                tracing::warn!(parent: &span, event = event::REDIS_CONNECTION_LOST,
                    component = "relay", %error, "Redis unreachable; the relay holds events back");
            }
        }
        let outage_text = outage.as_ref().map_or_else(
            || "redis: not sent: the batch's publish time ran out".to_string(),
            |e| e.to_string(),
        );
        self.settle(&settle, &outage_text).await?;
        if !settle.accepted.is_empty() {
            self.vacuum.removed(settle.accepted.len() as u64);
            self.stats
                .published
                .fetch_add(settle.accepted.len() as u64, Ordering::Relaxed);
            metrics::counter!(metric::RELAY_PUBLISHED).increment(settle.accepted.len() as u64);
        }
        for (id, reason) in settle.refused.iter().zip(&settle.reasons) {
            tracing::warn!(parent: &span, event = event::RELAY_EVENT_REFUSED, outbox_id = id,
                %reason, "Redis refused an event; it waits with backoff and holds back its partition");
        }
        match outage {
            Some(error) => Err(error),
            // Only refusals: the rest went through, keep draining.
            None => Ok(rows.len()),
        }
    }

    /// Mark `ids` fanned out and insert the tasks of those that were not
    /// yet (and that the catalog accepts), in the caller's transaction,
    /// which holds their partitions.
    async fn fan_out_marked(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ids: &[i64],
        topics: &[String],
        envelopes: &[String],
    ) -> Result<u64> {
        let marked: std::collections::HashSet<i64> = tx
            .query(MARK_FANNED_OUT, &[&ids])
            .await
            .context("marking events fanned out in herald.outbox")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (mut fan_topics, mut fan_envelopes) = (Vec::new(), Vec::new());
        for ((id, topic), envelope) in ids.iter().zip(topics).zip(envelopes) {
            if marked.contains(id)
                && (!self.catalog.checks_anything() || self.check(topic, envelope).is_ok())
            {
                fan_topics.push(topic.as_str());
                fan_envelopes.push(envelope.as_str());
            }
        }
        if fan_topics.is_empty() {
            return Ok(0);
        }
        let tasks = tx
            .execute(FAN_OUT, &[&fan_topics, &fan_envelopes])
            .await
            .context("inserting tasks for durable subscriptions while Redis is down")?;
        self.stats.fanned_out.fetch_add(tasks, Ordering::Relaxed);
        metrics::counter!(metric::RELAY_FANNED_OUT).increment(tasks);
        Ok(tasks)
    }

    /// While Redis is down: fan out events waiting in the outbox to their
    /// durable subscriptions (webhooks and task subscribers need only
    /// Postgres), a batch of partitions at a time; returns how many events
    /// it took.
    async fn fan_out_waiting(&self, offset: i32, limit: usize) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .context("beginning a fan-out while Redis is down")?;
        let rows = tx
            .query(
                UNFANNED,
                &[
                    &(limit as i64),
                    &offset,
                    &(self.config.relay.partitions_per_batch as i64),
                    &PARTITION_LOCK_SPACE,
                ],
            )
            .await
            .context("reading events not yet fanned out from herald.outbox")?;
        if !rows.is_empty() {
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let topics: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
            let envelopes: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
            self.fan_out_marked(&tx, &ids, &topics, &envelopes).await?;
        }
        tx.commit()
            .await
            .context("committing a fan-out while Redis is down")?;
        Ok(rows.len())
    }

    /// Whether Redis answers a PING within the response timeout.
    async fn redis_answers(&self) -> bool {
        let ping = async {
            let mut conn = self.redis.get().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut *conn)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(self.config.redis.response_timeout, ping).await,
            Ok(Some(_))
        )
    }

    /// The catalog's verdict on one claimed envelope: the reason it is
    /// refused, if it is.
    fn check(&self, topic: &str, envelope: &str) -> std::result::Result<(), String> {
        let parsed: serde_json::Value =
            serde_json::from_str(envelope).map_err(|e| format!("the envelope is not JSON: {e}"))?;
        let payload = parsed.get("payload").unwrap_or(&serde_json::Value::Null);
        self.catalog.check(topic, payload).map_err(|violations| {
            format!(
                "payload of topic {topic:?} does not match its schema: {}",
                crate::events::describe(&violations)
            )
        })
    }

    /// Settle a batch that did not commit as a whole, holding its
    /// partitions: remove what Redis accepted, charge what it refused (with
    /// a backoff that holds back their partitions), note the outage on what
    /// it did not run, and retire what has failed too often.
    async fn settle(&self, settle: &Settle, outage: &str) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .context("beginning to record a failed batch")?;
        // Hold the partitions while the rows are locked: a claim running
        // meanwhile would skip them (SKIP LOCKED) and publish later events
        // of their keys first.
        tx.execute(
            LOCK_PARTITIONS,
            &[&PARTITION_LOCK_SPACE, &settle.partitions],
        )
        .await
        .context("locking the failed batch's partitions")?;
        if !settle.accepted.is_empty() {
            let tasks = tx
                .execute(
                    SETTLE_PUBLISHED,
                    &[
                        &settle.accepted,
                        &self.config.relay.retain_published.is_some(),
                    ],
                )
                .await
                .context("removing the events Redis accepted from herald.outbox")?;
            self.stats.fanned_out.fetch_add(tasks, Ordering::Relaxed);
            if tasks > 0 {
                metrics::counter!(metric::RELAY_FANNED_OUT).increment(tasks);
            }
        }
        if !settle.fan_ids.is_empty() {
            self.fan_out_marked(
                &tx,
                &settle.fan_ids,
                &settle.fan_topics,
                &settle.fan_envelopes,
            )
            .await?;
        }
        if !settle.unsent.is_empty() {
            tx.execute(RECORD_FAILURE, &[&settle.unsent, &outage])
                .await
                .context("recording a failed publish on herald.outbox")?;
        }
        let mut dead = 0;
        if !settle.refused.is_empty() {
            let (min, max) = (
                self.config.relay.backoff_min.as_millis() as f64,
                self.config.relay.backoff_max.as_millis() as f64,
            );
            tx.execute(
                RECORD_REFUSED,
                &[&settle.refused, &settle.reasons, &min, &max],
            )
            .await
            .context("recording refused events on herald.outbox")?;
            dead = tx
                .execute(
                    DEAD_LETTER,
                    &[&settle.refused, &(self.config.relay.max_attempts as i32)],
                )
                .await
                .context("moving undeliverable events to herald.dead_letters")?;
        }
        tx.commit()
            .await
            .context("committing a failed batch's attempts")?;
        if dead > 0 {
            self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
            metrics::counter!(metric::DEAD_LETTERS, "source" => "outbox").increment(dead);
            tracing::error!(
                event = event::RELAY_DEAD_LETTERED,
                events = dead,
                max_attempts = self.config.relay.max_attempts,
                error = settle
                    .reasons
                    .first()
                    .map(String::as_str)
                    .unwrap_or_default(),
                "events could not be published and were moved to herald.dead_letters"
            );
        }
        Ok(())
    }

    async fn maintain_archive(&self) {
        let Some(retain) = self.config.relay.retain_published else {
            return;
        };
        let result = async {
            let client = self.pool.get().await?;
            let interval = format!("{} seconds", retain.as_secs());
            let row = client
                .query_one(
                    "SELECT herald.maintain_archive($1::text::interval)",
                    &[&interval],
                )
                .await
                .context("maintaining herald.outbox_archive")?;
            Ok::<i32, Error>(row.get(0))
        }
        .await;
        match result {
            Ok(dropped) => tracing::debug!(dropped, "archive maintained"),
            Err(error) => tracing::warn!(%error, "archive maintenance failed"),
        }
    }
}

/// Whether Redis answered but refuses the relay as such (authentication,
/// the PUBLISH command denied): an outage an operator must fix.
fn is_auth_outage(error: &Error) -> bool {
    matches!(error, Error::Redis { error, .. } if error.code().is_some())
}

/// How a batch that did not commit as a whole is settled, by what Redis did
/// with each of its events.
#[derive(Default)]
struct Settle {
    accepted: Vec<i64>,
    refused: Vec<i64>,
    reasons: Vec<String>,
    unsent: Vec<i64>,
    partitions: Vec<i16>,
    /// Events not published that still need their durable subscriptions'
    /// tasks, with their topics and envelopes.
    fan_ids: Vec<i64>,
    fan_topics: Vec<String>,
    fan_envelopes: Vec<String>,
}

/// How many events a drain worker claims next. After a publish timed out
/// the next batch is half as large, down to one event, so a batch Redis
/// cannot take in `redis.response_timeout` gets smaller rather than being
/// re-published whole; a batch that needed more than one pipeline
/// (`relay.batch_bytes`) makes the next claim take what fitted in one.
/// Every fully published batch doubles it back, up to `relay.batch_size`.
pub(crate) struct Pace {
    limit: usize,
    max: usize,
    /// The head of the last single-event batch that timed out.
    stuck: Option<i64>,
}

impl Pace {
    pub(crate) fn new(max: usize) -> Pace {
        Pace {
            limit: max,
            max,
            stuck: None,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    fn published(&mut self, first_pipeline: usize, events: usize) {
        self.stuck = None;
        self.limit = if first_pipeline < events {
            first_pipeline.max(1)
        } else {
            (self.limit * 2).min(self.max)
        };
    }

    /// After a timeout; whether this is a single-event batch whose head
    /// already timed out alone, which is then charged (if Redis answers).
    fn timed_out(&mut self, head: Option<i64>) -> bool {
        if self.limit > 1 {
            self.limit /= 2;
            self.stuck = None;
            return false;
        }
        let again = head.is_some() && self.stuck == head;
        self.stuck = head;
        again
    }
}

/// Capped exponential backoff with full jitter.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }

    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let low = ceiling / 2;
        let jitter = rand::rng().random_range(0..=(ceiling - low).as_millis() as u64);
        low + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;

    #[test]
    fn pace_halves_after_timeouts_and_charges_only_a_lone_head_that_times_out_again() {
        let mut pace = Pace::new(8);
        assert_eq!(pace.limit(), 8);
        assert!(!pace.timed_out(Some(1)));
        assert_eq!(pace.limit(), 4);
        assert!(!pace.timed_out(Some(1)));
        assert!(!pace.timed_out(Some(1)));
        assert_eq!(pace.limit(), 1, "down to one event");
        assert!(!pace.timed_out(Some(1)), "first lone timeout of this head");
        assert!(pace.timed_out(Some(1)), "the same head again: charge it");
        assert!(!pace.timed_out(Some(2)), "another head starts over");
        pace.published(1, 1);
        assert_eq!(pace.limit(), 2, "success doubles");
        pace.published(2, 2);
        pace.published(4, 4);
        pace.published(8, 8);
        assert_eq!(pace.limit(), 8, "up to batch_size");
        pace.published(3, 8);
        assert_eq!(pace.limit(), 3, "what fitted in one pipeline");
        assert!(!pace.timed_out(Some(5)));
        pace.published(1, 1);
        assert!(
            !pace.timed_out(Some(5)),
            "a success in between resets the head"
        );
    }
}
