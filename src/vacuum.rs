//! Vacuuming the queue tables a process churns, as it churns them.
//!
//! A relay removes every event it publishes and a worker updates then
//! removes every task it runs. Each leaves dead rows and dead index entries
//! at the front of the claim indexes (`outbox_claim`, `tasks_claim`), where
//! every claim starts, until VACUUM. Autovacuum comes by at most once per
//! `autovacuum_naptime` (a minute by default): at 1,000 events/s that is
//! 60,000 dead rows passed by every claim and every empty sweep. So the
//! process that made them runs VACUUM itself once it has removed
//! `vacuum_after` rows, at most once a second, in the background. A table
//! that holds few live rows vacuums in milliseconds.
//!
//! This module owns the count and the VACUUM statement. It must never block
//! a claim (the VACUUM runs on a task of its own, and SKIP_LOCKED gives way
//! to autovacuum or another process's VACUUM) and never truncate the table:
//! truncation takes an ACCESS EXCLUSIVE lock that producers' inserts queue
//! behind. A role that does not own the table gets a warning from Postgres
//! and nothing happens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use crate::error::Context;

/// Least time between two VACUUMs of one table by one process.
const AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Rows one process removed from `table` since it last vacuumed it.
pub(crate) struct Vacuum {
    table: &'static str,
    after: u64,
    pool: Pool,
    removed: AtomicU64,
    running: Arc<AtomicBool>,
    last: Mutex<Option<Instant>>,
}

impl Vacuum {
    /// `after` 0: never (autovacuum alone). The VACUUM runs on a
    /// connection of `pool`.
    pub(crate) fn new(table: &'static str, after: u64, pool: Pool) -> Vacuum {
        Vacuum {
            table,
            after,
            pool,
            removed: AtomicU64::new(0),
            running: Arc::new(AtomicBool::new(false)),
            last: Mutex::new(None),
        }
    }

    /// Count `n` more dead rows; start a VACUUM when they are enough.
    pub(crate) fn removed(&self, n: u64) {
        if self.after == 0 || self.removed.fetch_add(n, Ordering::Relaxed) + n < self.after {
            return;
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < AT_MOST_EVERY)
                || self.running.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Some(Instant::now());
        }
        self.removed.store(0, Ordering::Relaxed);
        let (pool, running, table) = (self.pool.clone(), self.running.clone(), self.table);
        tokio::spawn(async move {
            let started = Instant::now();
            let done = match pool.get().await {
                Ok(client) => client
                    .batch_execute(&format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {table}"))
                    .await
                    .context(format!("VACUUM {table}")),
                Err(e) => Err(e.into()),
            };
            match done {
                Ok(()) => tracing::debug!(table, elapsed = ?started.elapsed(), "vacuumed"),
                Err(error) => {
                    tracing::warn!(table, %error, "VACUUM failed; autovacuum will do it")
                }
            }
            running.store(false, Ordering::Release);
        });
    }
}
