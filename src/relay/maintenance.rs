//! The relay's share of table upkeep, each isolated in one function so
//! that a maintenance leader can take it over: expiry of
//! `herald.outbox_archive` ([`maintain_archive`]) and the VACUUM of
//! `herald.outbox` after this relay removed enough rows ([`outbox_vacuum`]).
//!
//! It must never block a claim, and a failure here only logs: delivery
//! does not depend on it.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::Config;
use crate::error::{Context, Error};

/// How often the archive's old partitions are dropped.
pub(super) const ARCHIVE_MAINTENANCE_EVERY: Duration = Duration::from_secs(600);

/// Create the archive's coming partitions and drop those older than
/// `relay.retain_published` (`herald.maintain_archive`); nothing when
/// nothing is archived.
pub(super) async fn maintain_archive(config: &Config, pool: &Pool) {
    let Some(retain) = config.relay.retain_published else {
        return;
    };
    let result = async {
        let client = pool.get().await?;
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

/// The count of rows this relay removes from the outbox, which VACUUMs it
/// after `relay.vacuum_after` of them (see `crate::vacuum`).
pub(super) fn outbox_vacuum(config: &Config, pool: &Pool) -> crate::vacuum::Vacuum {
    crate::vacuum::Vacuum::new("herald.outbox", config.relay.vacuum_after, pool.clone())
}
