//! VACUUM of the claim tables, run by the leader as they churn.
//!
//! A relay removes every event it publishes and a worker updates then
//! removes every task it runs. Each leaves dead rows and dead index entries
//! at the front of the claim indexes (`outbox_claim`, `tasks_claim`), where
//! every claim starts, until VACUUM. Autovacuum comes by at most once per
//! `autovacuum_naptime` (a minute by default): at 1,000 events/s that is
//! 60,000 dead rows passed by every claim and every empty sweep. So the
//! leader reads `n_dead_tup` of `herald.outbox` and `herald.tasks` from
//! `pg_stat_user_tables` every `maintenance.vacuum_interval` and runs
//! VACUUM on a table once it gained `relay.vacuum_after` (outbox) or
//! `worker.vacuum_after` (tasks) dead rows since its last VACUUM. A table
//! that holds few live rows vacuums quickly.
//!
//! This module owns the check and the VACUUM statement. It must never block
//! a claim (VACUUM takes no lock that a claim, insert or delete waits for,
//! and SKIP_LOCKED gives way to autovacuum or another VACUUM) and never
//! truncate the table: truncation takes an ACCESS EXCLUSIVE lock that
//! producers' inserts queue behind. A role that does not own the table gets
//! a warning from Postgres and nothing happens.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Result};

/// Dead rows of one table by the statistics (0 before its first count).
const DEAD_ROWS: &str = "
SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass($1)), 0)";

/// Dead rows after which each table is vacuumed; 0 leaves it to autovacuum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Thresholds {
    pub outbox: u64,
    pub tasks: u64,
}

/// VACUUM `table` without waiting for a lock and without truncating it.
pub async fn vacuum_table<C: GenericClient + Sync>(client: &C, table: &'static str) -> Result<()> {
    client
        .batch_execute(&format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {table}"))
        .await
        .context(format!("VACUUM {table}"))
}

/// `n_dead_tup` of `table`.
pub async fn dead_rows<C: GenericClient + Sync>(client: &C, table: &str) -> Result<i64> {
    Ok(client
        .query_one(DEAD_ROWS, &[&table])
        .await
        .context(format!("reading the dead rows of {table}"))?
        .get(0))
}

/// One table's count: dead rows left right after its last VACUUM (those a
/// running transaction still sees), so only new ones count toward the next.
struct Watched {
    table: &'static str,
    after: u64,
    baseline: AtomicI64,
}

impl Watched {
    async fn check<C: GenericClient + Sync>(&self, client: &C) -> Result<()> {
        let dead = dead_rows(client, self.table).await?;
        let baseline = self.baseline.load(Ordering::Relaxed);
        if dead < baseline {
            // Autovacuum (or anyone) vacuumed it meanwhile.
            self.baseline.store(dead, Ordering::Relaxed);
            return Ok(());
        }
        if ((dead - baseline) as u64) < self.after {
            return Ok(());
        }
        let started = Instant::now();
        vacuum_table(client, self.table).await?;
        tracing::debug!(table = self.table, dead, elapsed = ?started.elapsed(), "vacuumed");
        let left = dead_rows(client, self.table).await?;
        self.baseline.store(left, Ordering::Relaxed);
        Ok(())
    }
}

/// Check now and every `interval` until `stop`.
pub(crate) async fn run(
    pool: Pool,
    interval: Duration,
    thresholds: Thresholds,
    stop: CancellationToken,
) {
    let watched: Vec<Watched> = [
        ("herald.outbox", thresholds.outbox),
        ("herald.tasks", thresholds.tasks),
    ]
    .into_iter()
    .filter(|(_, after)| *after > 0)
    .map(|(table, after)| Watched {
        table,
        after,
        baseline: AtomicI64::new(0),
    })
    .collect();
    if watched.is_empty() {
        return stop.cancelled().await;
    }
    let (pool, watched) = (&pool, &watched);
    super::every("vacuum", interval, stop, || async move {
        let client = pool.get().await?;
        for w in watched {
            w.check(&**client).await?;
        }
        Ok(())
    })
    .await
}
