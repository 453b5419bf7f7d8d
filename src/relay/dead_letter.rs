//! The relay's dead letters: the catalog check of each claimed event (an
//! event that fails it is moved to `herald.dead_letters` in the claim's
//! transaction, never published), and the report of events retired after
//! `relay.max_attempts` refusals by Redis (retired in `settle`).
//!
//! It must never dead-letter an event because of an outage: only the
//! catalog's verdict or Redis's refusal of that event itself counts. The
//! statements are `crate::store::dead_letters` and
//! `crate::store::outbox::retire_exhausted`.

use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::store::outbox::ClaimedRow;
use crate::telemetry::names::{event, metric};

use super::claim::Claim;
use super::Drainer;

/// A claimed batch after the catalog check: what goes to Redis, as
/// parallel columns in id order, and what the catalog refused.
pub(super) struct Checked {
    pub(super) ids: Vec<i64>,
    pub(super) partitions: Vec<i16>,
    /// (channel, envelope) per event.
    pub(super) messages: Vec<(String, String)>,
    /// Whether each event still needs its durable subscriptions' tasks.
    pub(super) unfanned: Vec<bool>,
    /// Topics and envelopes of the events to fan out here, when the
    /// catalog checks (otherwise the claim fanned out itself).
    pub(super) fan_topics: Vec<String>,
    pub(super) fan_envelopes: Vec<String>,
    pub(super) invalid: Invalid,
}

/// Events the catalog refused, with the reason for each.
#[derive(Default)]
pub(super) struct Invalid {
    pub(super) ids: Vec<i64>,
    pub(super) envelopes: Vec<String>,
    pub(super) reasons: Vec<String>,
}

impl Drainer {
    /// Split a claimed batch by the catalog's verdict on each event.
    pub(super) fn check_catalog(&self, claim: &Claim, rows: Vec<ClaimedRow>) -> Checked {
        let checks = claim.checks;
        let mut out = Checked {
            ids: Vec::with_capacity(rows.len()),
            partitions: Vec::with_capacity(rows.len()),
            messages: Vec::with_capacity(rows.len()),
            unfanned: Vec::with_capacity(rows.len()),
            fan_topics: Vec::new(),
            fan_envelopes: Vec::new(),
            invalid: Invalid::default(),
        };
        for row in rows {
            if checks {
                if let Err(reason) = self.check(&row.topic, &row.envelope) {
                    out.invalid.ids.push(row.id);
                    out.invalid.envelopes.push(row.envelope);
                    out.invalid.reasons.push(reason);
                    continue;
                }
            }
            out.ids.push(row.id);
            out.partitions.push(row.partition);
            out.unfanned.push(!row.was_fanned_out);
            // Only batches the catalog checks fan out separately and need
            // their own copy; the usual path moves the envelope.
            if checks && !row.was_fanned_out {
                out.fan_topics.push(row.topic.clone());
                out.fan_envelopes.push(row.envelope.clone());
            }
            out.messages.push((
                format!("{}{}", self.config.channel_prefix, row.topic),
                row.envelope,
            ));
        }
        out
    }

    /// The catalog's verdict on one envelope: the reason it is refused, if
    /// it is.
    pub(super) fn check(&self, topic: &str, envelope: &str) -> std::result::Result<(), String> {
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

    /// Keep the events the catalog refused as dead letters, in the claim's
    /// transaction (which removed them from the outbox).
    pub(super) async fn dead_letter_invalid(&self, claim: &Claim, invalid: &Invalid) -> Result<()> {
        if invalid.ids.is_empty() {
            return Ok(());
        }
        crate::store::dead_letters::insert_invalid_events(
            &claim.tx,
            &invalid.ids,
            &invalid.envelopes,
            &invalid.reasons,
        )
        .await?;
        let span = &claim.span;
        self.stats
            .invalid
            .fetch_add(invalid.ids.len() as u64, Ordering::Relaxed);
        span.record("herald.relay.refused", invalid.ids.len() as i64);
        metrics::counter!(metric::DEAD_LETTERS, "source" => "outbox")
            .increment(invalid.ids.len() as u64);
        for (id, reason) in invalid.ids.iter().zip(&invalid.reasons) {
            tracing::warn!(parent: span, event = event::RELAY_EVENT_REFUSED, outbox_id = id,
                %reason, "event refused by the catalog; moved to herald.dead_letters");
        }
        Ok(())
    }

    /// Count and report `dead` events retired after too many refusals
    /// (`reasons`: the refusals of their batch).
    pub(super) fn retired(&self, dead: u64, reasons: &[String]) {
        if dead == 0 {
            return;
        }
        self.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        metrics::counter!(metric::DEAD_LETTERS, "source" => "outbox").increment(dead);
        tracing::error!(
            event = event::RELAY_DEAD_LETTERED,
            events = dead,
            max_attempts = self.config.relay.max_attempts,
            error = reasons.first().map(String::as_str).unwrap_or_default(),
            "events could not be published and were moved to herald.dead_letters"
        );
    }
}
