//! Ending a batch: the commit of a batch Redis took whole, or, when it did
//! not, the rollback and then the settlement of each event by what Redis
//! did with it (removed and archived, charged an attempt with a backoff,
//! noted as not sent, retired to the dead letters), in a transaction on the
//! same connection, which holds the batch's partitions from before the
//! rollback until the settlement commits.
//!
//! It must never remove an event Redis did not accept, and never leave a
//! due event behind a held one in its partition (CLAIM tests only the
//! head). The statements are `crate::store::outbox`'s.

use std::sync::atomic::Ordering;

use crate::error::{Context, Result};
use crate::pubsub::{Publication, Sent};
use crate::telemetry::names::{event, metric};

use super::claim::Claim;
use super::dead_letter::Checked;
use super::publish::Pace;
use super::{Drainer, PARTITION_LOCK_SPACE};

// The claim's partitions, held at session level through its ROLLBACK until
// the settlement commits: between the two, another claim would find the
// accepted events back in the outbox and publish them again.
const HOLD_PARTITIONS: &str = "
SELECT count(pg_advisory_lock($1, p))
FROM (SELECT DISTINCT unnest($2::smallint[]) AS p ORDER BY 1) AS parts";
const RELEASE_PARTITIONS: &str = "SELECT pg_advisory_unlock_all()";

// Wait for (not try) the partitions' transaction locks, in a fixed order.
const LOCK_PARTITIONS: &str = "
SELECT count(pg_advisory_xact_lock($1, p))
FROM (SELECT DISTINCT unnest($2::smallint[]) AS p ORDER BY 1) AS parts";

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

impl Drainer {
    /// Redis took every event: commit the claim (deletes, archive rows,
    /// dead letters, tasks), which releases the partitions.
    pub(super) async fn commit(
        &self,
        claim: Claim,
        batch: &Checked,
        publication: &Publication,
        pace: &mut Pace,
    ) -> Result<usize> {
        self.redis_up();
        claim
            .tx
            .commit()
            .await
            .context("committing a published batch")?;
        let published = batch.messages.len();
        pace.published(publication.first_pipeline, published);
        self.stats
            .published
            .fetch_add(published as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::RELAY_PUBLISHED).increment(published as u64);
        let span = &claim.span;
        span.record("herald.relay.published", published as i64);
        tracing::debug!(parent: span, event = event::RELAY_BATCH_PUBLISHED,
            events = published as i64, "relay batch published");
        tracing::debug!(parent: span, event = event::RELAY_PARTITION_RELEASED,
            partitions = claim.held.as_str(), outcome = "committed", "relay partitions released");
        Ok(claim.events)
    }

    /// Not all accepted: roll the claim back (its fan-out and its
    /// dead-lettered invalid events with it; the catalog checks them
    /// again), then settle each event by what Redis did with it. `Err` when
    /// Redis had an outage (the worker backs off).
    pub(super) async fn settle_failed(
        &self,
        claim: Claim,
        batch: Checked,
        publication: Publication,
        pace: &mut Pace,
    ) -> Result<usize> {
        let Claim {
            tx,
            span,
            held,
            events,
            ..
        } = claim;
        // Already held by this session (for the transaction), so at once.
        tx.execute(HOLD_PARTITIONS, &[&PARTITION_LOCK_SPACE, &batch.partitions])
            .await
            .context("holding a failed batch's partitions")?;
        let held_client = tx.rollback_keeping().await;
        span.record("otel.status_code", "ERROR");
        tracing::debug!(parent: &span, event = event::RELAY_PARTITION_RELEASED,
            partitions = held.as_str(), outcome = "rolled back", "relay partitions released");
        let mut settle = self.sort(&batch, &publication);
        if publication.timed_out {
            // A head that keeps timing out alone while Redis answers a PING
            // is the event's fault (too large, too slow for Redis): charge
            // it, so it is dead-lettered in the end; an outage never is.
            if pace.timed_out(batch.ids.first().copied()) && self.redis_answers().await {
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
            self.redis_failed(&span, error);
        }
        let outage_text = outage.as_ref().map_or_else(
            || "redis: not sent: the batch's publish time ran out".to_string(),
            |e| e.to_string(),
        );
        self.settle_holding(held_client, &settle, &outage_text)
            .await?;
        if !settle.accepted.is_empty() {
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
            None => Ok(events),
        }
    }

    /// Sort a batch's events by what Redis did with each.
    fn sort(&self, batch: &Checked, publication: &Publication) -> Settle {
        let mut settle = Settle::default();
        let prefix = self.config.channel_prefix.len();
        // Partitions with an event Redis did not run: a refusal behind one
        // is not held back (that would leave a due row before a held one,
        // which CLAIM's head test does not look past); it waits uncharged.
        let mut unsent_in: std::collections::HashSet<i16> = Default::default();
        for (i, ((id, sent), partition)) in batch
            .ids
            .iter()
            .zip(&publication.sent)
            .zip(&batch.partitions)
            .enumerate()
        {
            match sent {
                Sent::Accepted => settle.accepted.push(*id),
                Sent::Refused(reason) if !unsent_in.contains(partition) => {
                    settle.refused.push(*id);
                    settle.reasons.push(reason.clone());
                }
                _ => {
                    unsent_in.insert(*partition);
                    settle.unsent.push(*id);
                }
            }
            // Its durable subscriptions must not wait for Redis.
            if *sent != Sent::Accepted && batch.unfanned[i] {
                settle.fan_ids.push(*id);
                settle
                    .fan_topics
                    .push(batch.messages[i].0[prefix..].to_string());
                settle.fan_envelopes.push(batch.messages[i].1.clone());
            }
            settle.partitions.push(*partition);
        }
        settle
    }

    /// Settle a batch that did not commit as a whole, holding its
    /// partitions: remove what Redis accepted, charge what it refused (with
    /// a backoff that holds back their partitions), note the outage on what
    /// it did not run, and retire what has failed too often.
    /// [`settle`](Self::settle) on the claim's own connection, which holds
    /// the partitions at session level (`None` when its ROLLBACK failed: the
    /// session and its locks are gone, and any connection will do); then
    /// let the partitions go.
    async fn settle_holding(
        &self,
        held: Option<deadpool_postgres::Object>,
        settle: &Settle,
        outage: &str,
    ) -> Result<()> {
        let Some(mut client) = held else {
            let mut client = self.pool.get().await?;
            return self.settle(&mut client, settle, outage).await;
        };
        let settled = self.settle(&mut client, settle, outage).await;
        if client.batch_execute(RELEASE_PARTITIONS).await.is_err() {
            // Closing the session lets go of its locks.
            drop(deadpool_postgres::Object::take(client));
        }
        settled
    }

    async fn settle(
        &self,
        client: &mut deadpool_postgres::Object,
        settle: &Settle,
        outage: &str,
    ) -> Result<()> {
        use crate::store::outbox;
        let relay = &self.config.relay;
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
            let tasks =
                outbox::remove_published(&tx, &settle.accepted, relay.retain_published.is_some())
                    .await?;
            self.fanned_out(tasks);
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
            outbox::record_outage(&tx, &settle.unsent, outage).await?;
        }
        let mut dead = 0;
        if !settle.refused.is_empty() {
            let (min, max) = (
                relay.backoff_min.as_millis() as f64,
                relay.backoff_max.as_millis() as f64,
            );
            outbox::record_refused(&tx, &settle.refused, &settle.reasons, min, max).await?;
            dead =
                outbox::retire_exhausted(&tx, &settle.refused, relay.max_attempts as i32).await?;
        }
        tx.commit()
            .await
            .context("committing a failed batch's attempts")?;
        self.retired(dead, &settle.reasons);
        Ok(())
    }
}
