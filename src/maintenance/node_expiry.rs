//! Node expiry: the `herald.nodes` rows of processes that missed
//! `nodes.missed_heartbeats` of their heartbeats (killed, host lost) are
//! deleted, each logged with what it ran.
//!
//! It owns the pacing and the log; the statement is [`crate::nodes::expire`]
//! (the module of that table). It must never delete a live node: each row
//! expires by its own heartbeat interval, on the database clock, so hosts
//! whose clocks drift do not expire each other.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

/// Expire now and every `interval` until `stop`.
pub(crate) async fn run(pool: Pool, interval: Duration, stop: CancellationToken) {
    let pool = &pool;
    super::every("node_expiry", interval, stop, || async move {
        let client = pool.get().await?;
        for dead in crate::nodes::expire(&**client).await? {
            tracing::warn!(
                node = %dead.id,
                host = %dead.host,
                pid = dead.pid,
                roles = ?dead.roles,
                last_seen = %dead.last_seen.to_rfc3339(),
                "expired a node that stopped heartbeating"
            );
        }
        Ok(())
    })
    .await
}
