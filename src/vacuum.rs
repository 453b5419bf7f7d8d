//! Vacuuming the queue tables by the process that churns them: the old
//! per-process count, superseded by the maintenance leader's
//! [`crate::maintenance::vacuum`], which holds the VACUUM statement and
//! its rules (never block a claim, SKIP_LOCKED, never truncate). Kept
//! only while the worker and the relay still count their removed rows here;
//! remove it with their last call.
//!
//! It owns the per-process count; it must never run VACUUM other than
//! through [`crate::maintenance::vacuum::vacuum_table`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

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
                Ok(client) => crate::maintenance::vacuum::vacuum_table(&**client, table).await,
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
