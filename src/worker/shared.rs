//! The state the worker's services share: its pools and id, the attempts
//! it runs (each with its token, stop reason and local lease), and the
//! bounded checkout every service uses on the worker's own pool.
//!
//! It must never write to the database: the services do, through
//! `store::tasks`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use super::registry::Registry;
use super::retry::RetryPolicy;
use super::WorkerStats;
use crate::config::Config;
use crate::error::{Error, Result};

/// Why a running task's token fired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum StopReason {
    Cancelled,
    LeaseLost,
    Shutdown,
}

pub(super) struct Running {
    pub(super) token: CancellationToken,
    pub(super) reason: Option<StopReason>,
    pub(super) lease: Arc<Lease>,
    pub(super) queue: Arc<str>,
    pub(super) started: Instant,
}

/// A running attempt's key: a task re-claimed by this worker while its
/// earlier attempt is still finishing is a second entry, renewed on its own.
pub(super) type AttemptKey = (i64, i32);

pub(super) struct Shared {
    pub(super) config: Config,
    /// The handlers' pool (`TaskContext::pool`).
    pub(super) pool: Pool,
    /// The worker's own connections (claims, completions, heartbeats,
    /// rescues), which no handler can take: handlers holding every pooled
    /// connection must not stop leases from being renewed.
    pub(super) internal: Pool,
    pub(super) registry: Registry,
    pub(super) id: Arc<str>,
    pub(super) running: Mutex<HashMap<AttemptKey, Running>>,
    /// Base of every `Lease` deadline.
    pub(super) epoch: Instant,
    /// How long after a renewal is sent the handler may run on:
    /// `lease - lease_margin`.
    pub(super) hold: Duration,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) default_retry: RetryPolicy,
}

impl Shared {
    /// Stop every attempt of task `id` this worker runs (a cancellation
    /// request names the task, not the attempt).
    pub(super) fn stop_task(&self, id: i64, reason: StopReason) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for ((task, _), r) in running.iter_mut() {
            if *task == id {
                r.reason.get_or_insert(reason);
                r.token.cancel();
            }
        }
    }

    pub(super) fn stop_attempt(&self, key: AttemptKey, reason: StopReason) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get_mut(&key) {
            r.reason.get_or_insert(reason);
            r.token.cancel();
        }
    }

    /// Longest a claim may wait for its reply: a claim answered later
    /// than this would start tasks with little of their lease left, and one
    /// whose reply never comes (a partition) must not hold the producer.
    /// Tasks it may have claimed are handed back after it (`hand_back`).
    pub(super) fn claim_timeout(&self) -> Duration {
        self.hold / 2
    }
}

/// A connection of `pool` by `deadline`.
pub(super) async fn checkout(
    pool: &Pool,
    deadline: tokio::time::Instant,
    bound: Duration,
    what: &str,
) -> Result<deadpool_postgres::Object> {
    match tokio::time::timeout_at(deadline, pool.get()).await {
        Ok(client) => Ok(client?),
        Err(_) => Err(Error::Timeout(
            bound,
            format!("checking out a connection for {what}"),
        )),
    }
}

/// Close a connection whose statement overran instead of returning it to
/// the pool: its reply may still arrive, or never (a partition).
pub(super) fn discard(client: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(client));
}
