//! `herald.processed_events`: which events each durable subscription has
//! applied, so a redelivered event is applied once. Rows are written in the
//! subscriber's own transaction; the maintenance leader removes old ones.
//!
//! It must never record an event outside the transaction that applies it
//! (that would mark it applied when the handler's work rolled back).

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::error::{Context, Result};

// Taken first in the transaction: a second delivery running at the same time
// waits here for the first to commit, then sees its record.
const RECORD: &str = "INSERT INTO herald.processed_events (subscription, event_id) VALUES ($1, $2)
 ON CONFLICT DO NOTHING";

/// Record `event_id` as applied by `subscription`; `false` when it already was.
pub(crate) async fn record<C: GenericClient + Sync>(
    client: &C,
    subscription: &str,
    event_id: Uuid,
) -> Result<bool> {
    let n = client
        .execute(RECORD, &[&subscription, &event_id])
        .await
        .context("recording the processed event")?;
    Ok(n == 1)
}
