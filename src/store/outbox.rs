//! Every statement that writes `herald.outbox`: the producers' INSERTs
//! (`publish`, `publish_batch`), the relay's claim (DELETE ... RETURNING),
//! and what the relay records on rows it could not deliver (attempts,
//! backoff, outage, `fanned_out`, retirement to the dead letters). The
//! archive and dead-letter inserts that are CTE parts of these statements
//! live here too (see `store::outbox_archive`, `store::dead_letters`).
//!
//! This module only runs SQL on the client or transaction it is given: it
//! must never begin, commit or roll back, open a connection, or decide
//! anything (ordering, retries, which rows go where are the caller's). The
//! relay's invariants hold only if these statements run inside the
//! transactions the relay sets up (see `crate::relay`).

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Statement};
use uuid::Uuid;

use crate::error::{Context, Result};

const INSERT_ONE: &str =
    "INSERT INTO herald.outbox (event_id, topic, key, partition, payload, headers) \
     VALUES ($1, $2, $3, herald.partition_for($3), $4::text::jsonb, $5::text::jsonb)";

/// Insert one event (payload and headers as JSON text).
pub(crate) async fn insert_one<C: GenericClient + Sync>(
    client: &C,
    event_id: &Uuid,
    topic: &str,
    key: Option<&str>,
    payload: &str,
    headers: &str,
) -> Result<()> {
    client
        .execute_typed(
            INSERT_ONE,
            &[
                (&event_id, Type::UUID),
                (&topic, Type::TEXT),
                (&key, Type::TEXT),
                (&payload, Type::TEXT),
                (&headers, Type::TEXT),
            ],
        )
        .await
        .context(format!(
            "inserting event on topic {topic:?} into herald.outbox"
        ))?;
    Ok(())
}

// One statement for the whole batch; the partition count is read once.
const INSERT_BATCH: &str =
    "INSERT INTO herald.outbox (event_id, topic, key, partition, payload, headers) \
     SELECT e.event_id, e.topic, e.key, \
            CASE WHEN e.key IS NULL THEN floor(random() * s.partitions)::smallint \
                 ELSE herald.partition_for(e.key, s.partitions) END, \
            e.payload::jsonb, e.headers::jsonb \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) \
          WITH ORDINALITY AS e(event_id, topic, key, payload, headers, ord) \
     CROSS JOIN herald.settings s \
     ORDER BY e.ord";

/// Insert many events in one statement, in the order given (ids grow in
/// that order). The slices are parallel, one entry per event.
pub(crate) async fn insert_batch<C: GenericClient + Sync>(
    client: &C,
    event_ids: &[Uuid],
    topics: &[&str],
    keys: &[Option<&str>],
    payloads: &[&str],
    headers: &[String],
) -> Result<()> {
    client
        .execute_typed(
            INSERT_BATCH,
            &[
                (&event_ids, Type::UUID_ARRAY),
                (&topics, Type::TEXT_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&payloads, Type::TEXT_ARRAY),
                (&headers, Type::TEXT_ARRAY),
            ],
        )
        .await
        .context(format!(
            "inserting {} events into herald.outbox",
            event_ids.len()
        ))?;
    Ok(())
}

// The fan-out CTEs below (`fanned` in CLAIM, the INSERT of SETTLE_PUBLISHED)
// insert into herald.tasks; their text is `store::tasks::tasks_for_rows!`,
// the one place the relay writes herald.tasks.

// Claim a batch: take up to $5 partitions that have due events and whose
// transaction lock ($4, partition) is free, delete their oldest $1 due
// rows, archive them when $2, and return the envelopes in id order. The
// statement runs in a transaction that commits only after Redis
// acknowledged them. $3 rotates the starting partition so that every
// partition gets its turn.
//
// The lock is taken in the select list of the LATERAL's first due row, so
// empty partitions are never locked (a WHERE on the lock could be pushed
// below the LIMIT 1). The LATERAL is one probe of outbox_claim per
// partition: as an EXISTS, the planner hashed a sequential scan of the
// whole heap, dead rows included, into every claim.
//
// `id = ANY(ARRAY(...))` deletes by primary key: `id IN (...)` was planned
// as a hash join over a sequential scan of the outbox.
//
// The claim runs on a generic plan (relay::claim::begin_claim), planned
// once per connection and again when the outbox's statistics change:
// planning it afresh was most of an empty claim's time. A generic plan
// cannot look at the parameters, so the statement is written to leave it
// one sound shape whatever the outbox holds:
// - each owned partition is read by its own outbox_claim scan in id order.
//   The range `partition >= p AND partition <= p` is on purpose: with an
//   equality the planner treats the partition as fixed, takes the primary
//   key as already in order, and walks it past every other partition's
//   rows;
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
// (see `relay::settle`), so behind a due head every row may go (a held row
// behind it merely goes before its own backoff ends, still in order).
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
    ", crate::store::tasks::tasks_for_rows!("claimed"), "
    WHERE $6 AND NOT c.fanned_out
    ORDER BY c.id, s.name
    RETURNING 1
)
SELECT id, topic, partition,
       json_build_object('id', event_id, 'topic', topic, 'key', key, 'payload', payload,
                         'headers', headers, 'created_at', created_at)::text AS envelope,
       (SELECT count(*) FROM fanned) AS fanned_out,
       fanned_out AS was_fanned_out
FROM claimed
ORDER BY id");

/// The claim's parameters (see CLAIM).
pub(crate) struct ClaimParams {
    /// At most this many events.
    pub limit: i64,
    /// Copy the claimed rows into `herald.outbox_archive`.
    pub archive: bool,
    /// Where the rotation over partitions starts.
    pub offset: i32,
    /// First key of the partitions' transaction-level advisory locks.
    pub lock_space: i32,
    /// At most this many partitions.
    pub partitions: i64,
    /// Insert the durable subscriptions' tasks in the claim itself.
    pub fan_out: bool,
}

/// One claimed event, as CLAIM returns it.
pub(crate) struct ClaimedRow {
    pub id: i64,
    pub topic: String,
    pub partition: i16,
    /// The envelope consumers receive, as JSON text.
    pub envelope: String,
    /// Tasks the claim inserted for the whole batch (the same on every row).
    pub tasks: i64,
    /// Its tasks were inserted before, while Redis was down.
    pub was_fanned_out: bool,
}

impl ClaimedRow {
    fn from_row(row: &Row) -> ClaimedRow {
        ClaimedRow {
            id: row.get("id"),
            topic: row.get("topic"),
            partition: row.get("partition"),
            envelope: row.get("envelope"),
            tasks: row.get("fanned_out"),
            was_fanned_out: row.get("was_fanned_out"),
        }
    }
}

/// CLAIM prepared (and cached) on the claim's connection.
pub(crate) async fn prepare_claim(client: &deadpool_postgres::Object) -> Result<Statement> {
    client
        .prepare_cached(CLAIM)
        .await
        .context("preparing the outbox claim")
}

/// Run CLAIM (prepared by [`prepare_claim`]) inside the caller's claim
/// transaction.
pub(crate) async fn claim(
    client: &tokio_postgres::Client,
    claim: &Statement,
    p: &ClaimParams,
) -> Result<Vec<ClaimedRow>> {
    let params: [&(dyn ToSql + Sync); 6] = [
        &p.limit,
        &p.archive,
        &p.offset,
        &p.lock_space,
        &p.partitions,
        &p.fan_out,
    ];
    let rows = client
        .query(claim, &params)
        .await
        .context("claiming a batch from herald.outbox")?;
    Ok(rows.iter().map(ClaimedRow::from_row).collect())
}

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
", crate::store::tasks::tasks_for_rows!("gone"), "
WHERE NOT c.fanned_out
ORDER BY c.id, s.name");

/// Remove `ids` (published), archive them when `archive`, and insert their
/// durable subscriptions' tasks; returns how many tasks.
pub(crate) async fn remove_published(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
    archive: bool,
) -> Result<u64> {
    tx.execute(SETTLE_PUBLISHED, &[&ids, &archive])
        .await
        .context("removing the events Redis accepted from herald.outbox")
}

// Record an outage on rows Redis did not run: never an attempt, and they
// stay due (the relay backs off as a whole).
const RECORD_FAILURE: &str = "
UPDATE herald.outbox SET last_error = $2 WHERE id = ANY($1)";

/// Note `error` on `ids`, which Redis did not run.
pub(crate) async fn record_outage(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
    error: &str,
) -> Result<()> {
    tx.execute(RECORD_FAILURE, &[&ids, &error])
        .await
        .context("recording a failed publish on herald.outbox")?;
    Ok(())
}

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

/// Charge one attempt to each of `ids` with its reason, and hold it back
/// for a backoff between `backoff_min_ms` and `backoff_max_ms`.
pub(crate) async fn record_refused(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
    reasons: &[String],
    backoff_min_ms: f64,
    backoff_max_ms: f64,
) -> Result<()> {
    tx.execute(
        RECORD_REFUSED,
        &[&ids, &reasons, &backoff_min_ms, &backoff_max_ms],
    )
    .await
    .context("recording refused events on herald.outbox")?;
    Ok(())
}

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

/// Move those of `ids` that have had `max_attempts` attempts to
/// `herald.dead_letters`; returns how many.
pub(crate) async fn retire_exhausted(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
    max_attempts: i32,
) -> Result<u64> {
    tx.execute(DEAD_LETTER, &[&ids, &max_attempts])
        .await
        .context("moving undeliverable events to herald.dead_letters")
}

// Mark rows as fanned out (sql/V9__outbox_fanned_out.sql); returns those
// that were not yet, whose tasks the caller then inserts in the same
// transaction, under their partitions' locks.
const MARK_FANNED_OUT: &str = "
UPDATE herald.outbox SET fanned_out = true
WHERE id = ANY($1) AND NOT fanned_out
  AND EXISTS (SELECT 1 FROM herald.subscriptions WHERE enabled)
RETURNING id";

/// Mark `ids` fanned out; returns those that were not yet.
pub(crate) async fn mark_fanned_out(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[i64],
) -> Result<std::collections::HashSet<i64>> {
    let rows = tx
        .query(MARK_FANNED_OUT, &[&ids])
        .await
        .context("marking events fanned out in herald.outbox")?;
    Ok(rows.iter().map(|r| r.get("id")).collect())
}

// While Redis is down: take up to $3 partitions whose lock ($4, partition)
// is free (from $2 on) and return their oldest $1 rows not yet fanned out,
// when any durable subscription is enabled. The caller checks them against
// the catalog, fans out the valid ones and marks them all, then commits.
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
                         'headers', c.headers, 'created_at', c.created_at)::text AS envelope
FROM owned,
     LATERAL (SELECT id, event_id, topic, key, payload, headers, created_at
              FROM herald.outbox
              WHERE partition >= owned.p AND partition <= owned.p AND NOT fanned_out
              ORDER BY partition, id
              LIMIT $1) AS c
ORDER BY c.id
LIMIT $1";

/// Events not yet fanned out, as parallel columns in id order.
#[derive(Default)]
pub(crate) struct Unfanned {
    pub ids: Vec<i64>,
    pub topics: Vec<String>,
    pub envelopes: Vec<String>,
}

/// Lock up to `partitions` partitions (from `offset` on) that hold events
/// not yet fanned out, and read their oldest `limit` such events.
pub(crate) async fn unfanned(
    tx: &tokio_postgres::Transaction<'_>,
    limit: i64,
    offset: i32,
    partitions: i64,
    lock_space: i32,
) -> Result<Unfanned> {
    let rows = tx
        .query(UNFANNED, &[&limit, &offset, &partitions, &lock_space])
        .await
        .context("reading events not yet fanned out from herald.outbox")?;
    let mut out = Unfanned::default();
    for row in &rows {
        out.ids.push(row.get("id"));
        out.topics.push(row.get("topic"));
        out.envelopes.push(row.get("envelope"));
    }
    Ok(out)
}
