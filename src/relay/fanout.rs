//! Fan-out to durable subscriptions: one task in `herald.tasks` per event
//! and matching enabled subscription, inserted in the transaction that
//! removes the event from the outbox; and, while Redis does not take
//! events, in transactions of their own that mark the rows `fanned_out`,
//! so each event's tasks are inserted exactly once.
//!
//! The INSERTs themselves are `store::tasks`' (`FAN_OUT` and the
//! `tasks_for_rows!` CTE that the outbox claim pastes in). It must never insert an event's tasks in a transaction that does not
//! also remove the event or mark it `fanned_out`, nor without holding the
//! event's partition (tasks of one key would be inserted out of order).

use std::sync::atomic::Ordering;

use crate::error::{Context, Result};
use crate::store::tasks;
use crate::telemetry::names::metric;

use super::claim::Claim;
use super::dead_letter::Checked;
use super::{Drainer, PARTITION_LOCK_SPACE};

/// FAN_OUT in the claim's transaction (prepared, it runs on every checked
/// batch).
async fn insert_tasks_in_claim(
    claim: &Claim,
    topics: &[String],
    envelopes: &[String],
) -> Result<u64> {
    tasks::fan_out_prepared(&claim.tx, topics, envelopes).await
}

// ---- The steps. ----

impl Drainer {
    /// The batch's tasks in the claim's transaction: inserted by the claim
    /// itself when the catalog checks nothing, else here for the valid
    /// events; then the workers are woken at commit.
    pub(super) async fn fan_out_claimed(&self, claim: &Claim, batch: &Checked) -> Result<()> {
        let tasks = if !claim.checks {
            claim.tasks
        } else if !batch.fan_topics.is_empty() {
            insert_tasks_in_claim(claim, &batch.fan_topics, &batch.fan_envelopes).await?
        } else {
            0
        };
        self.fanned_out(tasks);
        claim.span.record("herald.relay.fanned_out", tasks as i64);
        if tasks > 0 {
            // The claim silenced the tasks trigger (herald.relay_fan_out);
            // wake the workers at commit.
            tasks::notify_workers(&***claim.tx).await?;
        }
        Ok(())
    }

    /// Count `tasks` inserted for durable subscriptions.
    pub(super) fn fanned_out(&self, tasks: u64) {
        self.stats.fanned_out.fetch_add(tasks, Ordering::Relaxed);
        if tasks > 0 {
            metrics::counter!(metric::RELAY_FANNED_OUT).increment(tasks);
        }
    }

    /// Mark `ids` fanned out and insert the tasks of those that were not
    /// yet (and that the catalog accepts), in the caller's transaction,
    /// which holds their partitions.
    pub(super) async fn fan_out_marked(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ids: &[i64],
        topics: &[String],
        envelopes: &[String],
    ) -> Result<u64> {
        let marked = crate::store::outbox::mark_fanned_out(tx, ids).await?;
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
        let tasks = tasks::fan_out_apart(tx, &fan_topics, &fan_envelopes).await?;
        self.fanned_out(tasks);
        Ok(tasks)
    }

    /// While Redis is down: fan out events waiting in the outbox to their
    /// durable subscriptions (webhooks and task subscribers need only
    /// Postgres), a batch of partitions at a time; returns how many events
    /// it took.
    pub(super) async fn fan_out_waiting(&self, offset: i32, limit: usize) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .context("beginning a fan-out while Redis is down")?;
        let waiting = crate::store::outbox::unfanned(
            &tx,
            limit as i64,
            offset,
            self.config.relay.partitions_per_batch as i64,
            PARTITION_LOCK_SPACE,
        )
        .await?;
        if !waiting.ids.is_empty() {
            self.fan_out_marked(&tx, &waiting.ids, &waiting.topics, &waiting.envelopes)
                .await?;
        }
        tx.commit()
            .await
            .context("committing a fan-out while Redis is down")?;
        Ok(waiting.ids.len())
    }
}
