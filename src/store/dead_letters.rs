//! `herald.dead_letters`, the events the relay gives up on.
//!
//! Events that fail their catalog check are inserted here
//! ([`insert_invalid_events`]), in the claim's transaction that removed them
//! from the outbox. Events Redis refused `relay.max_attempts` times move
//! here in one statement that deletes them from the outbox, which is
//! `store::outbox::retire_exhausted` (it mainly works on the outbox).
//!
//! It must never insert a dead letter for an event that is not removed from
//! the outbox in the same transaction (the event would be both delivered
//! and dead). Listing, replaying and purging dead letters is `crate::dlq`;
//! the worker's task dead letters are `crate::worker`'s.

use crate::error::{Context, Result};

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

/// Insert one dead letter per outbox event (`ids`, their envelopes as JSON
/// text, and the reason each was refused), never attempted.
pub(crate) async fn insert_invalid_events(
    client: &tokio_postgres::Client,
    ids: &[i64],
    envelopes: &[String],
    reasons: &[String],
) -> Result<()> {
    client
        .execute(DEAD_LETTER_INVALID, &[&ids, &envelopes, &reasons])
        .await
        .context("moving events that fail the catalog to herald.dead_letters")?;
    Ok(())
}
