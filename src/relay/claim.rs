//! Claiming a batch: the claim transaction (begun in the same round trip
//! as the claim, bounded by the server), partition ownership through
//! transaction-level advisory locks, and the batch's trace span.
//!
//! It must never leave a claim transaction open longer than [`claim_hold`]
//! allows, and never let the claim run outside its transaction (it would
//! delete events with nothing left to roll back). The CLAIM statement is
//! `crate::store::outbox::claim`.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Context, Result};
use crate::store::outbox::{ClaimParams, ClaimedRow};
use crate::telemetry::names::{event, metric};

use super::{Drainer, PARTITION_LOCK_SPACE};

// For the claim's transaction: its fan-out INSERT leaves herald_tasks'
// NOTIFY to the relay (sql/V8__tasks_notify_only_when_needed.sql), and its
// commit does not wait for the WAL flush. A commit that a Postgres crash
// loses takes the whole batch with it (deletes, archive rows, fanned-out
// tasks): the events are still in the outbox and are published again, the
// at-least-once redelivery a relay killed mid-batch already causes. Waiting
// for the flush would put it in every batch's cycle, and events arriving
// meanwhile would wait for it.
//
// CLAIM is planned once per connection, on indexes
// (crate::db::plan_on_indexes): see its comment in store::outbox.
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
pub(super) fn begin_claim(hold: Duration) -> String {
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

/// The claim's transaction, begun by begin_claim pipelined with the claim
/// itself (tokio-postgres' `Transaction` waits for its BEGIN first). Like
/// `Transaction`, it rolls back when dropped unfinished, here on a task of
/// its own that then returns the connection to the pool, or closes it if the
/// ROLLBACK did not go through.
pub(super) struct ClaimTx(Option<deadpool_postgres::Object>);

impl ClaimTx {
    pub(super) async fn commit(self) -> std::result::Result<(), tokio_postgres::Error> {
        self.finish("COMMIT").await
    }

    /// ROLLBACK, keeping the connection for a caller that holds session
    /// locks on it; `None` when the ROLLBACK failed (the connection is
    /// closed, and its session locks go with it).
    pub(super) async fn rollback_keeping(mut self) -> Option<deadpool_postgres::Object> {
        let client = self.0.take().expect("an unfinished claim transaction");
        match client.batch_execute("ROLLBACK").await {
            Ok(()) => Some(client),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                None
            }
        }
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

/// A claimed batch whose transaction is still open: its rows are deleted
/// and its partitions held until it commits or rolls back.
pub(super) struct Claim {
    pub(super) tx: ClaimTx,
    pub(super) started: Instant,
    /// One span per non-empty batch.
    pub(super) span: tracing::Span,
    /// The partitions held, for the logs (empty when nothing logs them).
    pub(super) held: String,
    /// Events claimed.
    pub(super) events: usize,
    /// Whether the catalog checks anything: if not, the claim fanned out
    /// to durable subscriptions itself.
    pub(super) checks: bool,
    /// Tasks the claim statement inserted for durable subscriptions.
    pub(super) tasks: u64,
}

impl Drainer {
    /// Begin a claim transaction and claim up to `limit` due events of the
    /// partitions it can take (from `offset` on); `None` when there were
    /// none, the transaction then ended.
    pub(super) async fn claim(
        &self,
        offset: i32,
        limit: usize,
    ) -> Result<Option<(Claim, Vec<ClaimedRow>)>> {
        let relay = &self.config.relay;
        let client = self.pool.get().await?;
        let claim = crate::store::outbox::prepare_claim(&client).await?;
        let tx = ClaimTx(Some(client));
        let started = Instant::now();
        // With nothing to check, the claim fans out to subscriptions itself.
        let checks = self.catalog.checks_anything();
        let params = ClaimParams {
            limit: limit as i64,
            archive: relay.retain_published.is_some(),
            offset,
            lock_space: PARTITION_LOCK_SPACE,
            partitions: relay.partitions_per_batch as i64,
            fan_out: !checks,
        };
        // begin_claim goes in the same round trip as the claim
        // (tokio-postgres pipelines them in order): a round trip less on
        // every event's way to Redis, and on every empty sweep.
        let (quiet, rows) = tokio::join!(
            tx.batch_execute(&self.begin_claim),
            crate::store::outbox::claim(&tx, &claim, &params)
        );
        quiet.context("setting up the claim transaction")?;
        let rows = rows?;
        if rows.is_empty() {
            tx.commit().await.context("ending an empty claim")?;
            return Ok(None);
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
            herald.relay.claim_ms = started.elapsed().as_secs_f64() * 1000.0,
            otel.status_code = tracing::field::Empty,
        );
        metrics::histogram!(metric::RELAY_BATCH_SIZE).record(rows.len() as f64);
        // The partition locks this batch holds until it commits or rolls
        // back: those its events came from.
        let held = if span.is_disabled() && !tracing::enabled!(tracing::Level::DEBUG) {
            String::new()
        } else {
            let mut parts: Vec<i16> = rows.iter().map(|r| r.partition).collect();
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
        let claim = Claim {
            tx,
            started,
            span,
            held,
            events: rows.len(),
            checks,
            tasks: rows[0].tasks as u64,
        };
        Ok(Some((claim, rows)))
    }
}
