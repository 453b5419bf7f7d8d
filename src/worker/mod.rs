//! The worker runtime: runs handlers for tasks claimed from `herald.tasks`.
//!
//! Small services, each with one job (after River's layout):
//! - the *listener* follows the process's notifier (`herald_tasks`
//!   wakes producers, `herald_cancel` fires a running task's token);
//! - one *producer* per queue claims due tasks in batches with
//!   `FOR UPDATE SKIP LOCKED` into `running` under a lease, bounded by the
//!   queue's concurrency, and sleeps until the next `run_at` when idle;
//! - *executors* run one handler each, with timeout (the task's, its
//!   kind's, or `worker.task_timeout`), panic capture, cancellation, and a
//!   local lease deadline: a handler whose lease was not renewed in time is
//!   stopped before any other worker may rescue its task;
//! - the *completer* writes outcomes, successes in batches, each outcome on
//!   its own, retried while its lease holds;
//! - the *heartbeat* extends the leases of running attempts (fenced by
//!   attempt), pushes their local deadlines on, and notices lost ones and
//!   cancellation requests a NOTIFY missed;
//!
//! Expired leases are returned to the queue by the maintenance leader's
//! rescuer (`crate::maintenance`), whichever process that is.
//!
//! Claims, completions and heartbeats use a small pool of the worker's own,
//! which handlers never see, each statement bounded in time.
//!
//! It must never complete, retry or release a task whose lease it no longer
//! holds: every write names the task's id, attempt and this worker's id. It
//! must never let a handler run past the point where another worker may
//! take its task.
//!
//! Files, in the order a task passes through them: `registry` (handlers
//! and what they get and return), `producer` (claims), `executor` (runs one
//! handler), `completer` (writes outcomes; `retry` decides when a failed
//! attempt runs again, `outcomes` counts them), `heartbeat` and `lease`
//! (lease renewal and the local deadline), `listener` (LISTEN and the wake lock), `shared` (the
//! state they share). The SQL is in `store::tasks`.

mod builtin;
mod completer;
mod executor;
mod heartbeat;
mod lease;
mod listener;
mod outcomes;
mod producer;
mod registry;
mod retry;
mod shared;
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

pub use registry::{permanent, KindOptions, Outcome, Permanent, Registry, TaskContext};
pub use retry::RetryPolicy;

use crate::config::Config;
use crate::error::{Error, Result};
use completer::Completion;
use shared::{Shared, StopReason};

/// `application_name` of the worker's LISTEN connection (the notifier's
/// session) when it runs alone or alone in its process; see
/// `crate::notifier::APPLICATION_NAME`.
pub const LISTEN_APPLICATION_NAME: &str = "herald-worker-listen";
/// The wake lock ("herw", 2) an idle worker holds while it sleeps; the tasks
/// trigger (sql/V8) notifies only then. See [`crate::wake`].
pub const WAKE_LOCK: (i32, i32) = (crate::wake::WAKE_LOCK_SPACE, 2);
/// `application_name` of the session that holds it.
pub const WAKE_LOCK_APPLICATION_NAME: &str = "herald-worker-wake-lock";

/// Counters for tests, benches and the CLI.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub claimed: std::sync::atomic::AtomicU64,
    pub succeeded: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Always 0 since rescue moved to the maintenance leader (see
    /// `herald_task_rescued_total`); kept for the API.
    pub rescued: std::sync::atomic::AtomicU64,
    /// Whether the LISTEN connection is up now (`/readyz`).
    pub listening: std::sync::atomic::AtomicBool,
    /// Times this worker took the wake lock to sleep.
    pub sleeps: std::sync::atomic::AtomicU64,
    /// Whether it holds the wake lock now (producers notify).
    pub asleep: std::sync::atomic::AtomicBool,
}

pub struct Worker {
    shared: Arc<Shared>,
    queues: Vec<(String, usize)>,
    /// The process's notifier; `None`: the worker runs one of its own.
    notifier: Option<crate::notifier::Notifier>,
    /// Why the worker's own pool could not be built; `run` returns it.
    setup_error: Option<Error>,
}

/// Size of the worker's own pool: one connection per producer (claims, one
/// per queue), one each for the completer and the heartbeat; opened on
/// demand, never seen by handlers (counted by `crate::budget`).
pub fn own_pool_size(worker: &crate::config::WorkerConfig) -> usize {
    worker.queues.len() + 2
}

impl Worker {
    /// A worker for the queues and concurrency of `config.worker`.
    pub fn new(config: &Config, pool: Pool, registry: Registry) -> Worker {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let id = format!(
            "{host}:{}:{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[24..]
        );
        let queues = config.worker.queue_concurrency();
        let mut own = config.clone();
        own.postgres.pool_size = own_pool_size(&config.worker);
        let (internal, setup_error) = match crate::db::pool(&own, "herald-worker") {
            Ok(p) => (p, None),
            Err(e) => (pool.clone(), Some(e)),
        };
        let cfg = &config.worker;
        Worker {
            setup_error,
            shared: Arc::new(Shared {
                default_retry: RetryPolicy {
                    base: config.worker.retry_base,
                    max: config.worker.retry_max,
                    jitter: 0.2,
                },
                config: config.clone(),
                pool,
                internal,
                registry,
                id: id.into(),
                running: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                hold: cfg.lease.saturating_sub(cfg.lease_safety_margin()),
                stats: Arc::new(WorkerStats::default()),
            }),
            queues,
            notifier: None,
        }
    }

    /// Hear `herald_tasks` and `herald_cancel` through the process's
    /// `notifier` (which the caller runs) instead of a LISTEN session of the
    /// worker's own.
    pub fn with_notifier(mut self, notifier: crate::notifier::Notifier) -> Worker {
        self.notifier = Some(notifier);
        self
    }

    /// This worker's id, as written to `herald.tasks.leased_by`.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.shared.stats.clone()
    }

    /// Run until `shutdown`: then stop claiming, give tasks in flight
    /// `worker.shutdown_grace` to finish, cancel the rest and hand their
    /// leases back so another worker takes them at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if let Some(e) = self.setup_error {
            return Err(e);
        }
        self.shared.config.worker.validate()?;
        if self.notifier.is_none() {
            // Before any statement (`Herald::builder` checks for its services).
            crate::notifier::check(&self.shared.config).await?;
        }
        {
            let client = self.shared.pool.get().await?;
            crate::migrate::check_schema(&client).await?;
            for row in &self.shared.registry.durable {
                crate::store::subscriptions::upsert(&**client, row, "api").await?;
            }
        }
        let shared = self.shared;
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let wake_tx = Arc::new(wake_tx);
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
        let services = CancellationToken::new();

        let idle = Arc::new(crate::wake::Idle::new(self.queues.len()));
        let (up_tx, up_rx) = watch::channel(0u64);
        let signals = listener::Signals {
            wake: wake_tx.clone(),
            up: Arc::new(up_tx),
            cancel: {
                let shared = shared.clone();
                Arc::new(move |id| shared.stop_task(id, StopReason::Cancelled))
            },
        };
        let own = self.notifier.is_none();
        let notifier = self.notifier.unwrap_or_else(|| {
            crate::notifier::Notifier::new(&shared.config, LISTEN_APPLICATION_NAME)
        });
        // Notifications that cannot reach the LISTEN session stop the worker.
        let (shutdown, notifier_failure) = notifier.stop_on_failure(&shutdown);
        let listener = tokio::spawn(listener::listen(
            shared.config.clone(),
            notifier.subscribe(&[
                crate::store::tasks::NOTIFY_CHANNEL,
                crate::store::tasks::CANCEL_CHANNEL,
            ]),
            shared.stats.clone(),
            signals,
            idle.clone(),
            services.clone(),
        ));
        // Alone, the worker runs its notifier until its tasks are settled
        // (cancellations arrive through it during the grace period).
        let own_notifier = own.then(|| tokio::spawn(notifier.run(services.clone())));
        let completer = tokio::spawn(completer::complete(shared.clone(), done_rx));
        let heartbeat = tokio::spawn(heartbeat::heartbeat(shared.clone(), services.clone()));

        let mut producers = Vec::new();
        let mut semaphores = Vec::new();
        for (queue, concurrency) in self.queues.clone() {
            let sem = Arc::new(Semaphore::new(concurrency));
            semaphores.push((sem.clone(), concurrency));
            producers.push(tokio::spawn(producer::produce(
                shared.clone(),
                queue,
                sem,
                producer::Wakeups {
                    wake: wake_rx.clone(),
                    up: up_rx.clone(),
                },
                idle.clone(),
                done_tx.clone(),
                shutdown.clone(),
            )));
        }
        tracing::info!(worker = %shared.id, queues = ?self.queues, "worker started");
        for p in producers {
            let _ = p.await;
        }
        // Shutdown: wait for the tasks in flight, up to the grace period.
        let grace = shared.config.worker.shutdown_grace;
        let all_back = async {
            for (sem, n) in &semaphores {
                let _ = sem.acquire_many(*n as u32).await;
            }
        };
        if tokio::time::timeout(grace, all_back).await.is_err() {
            let mut running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
            tracing::warn!(
                tasks = running.len(),
                ?grace,
                "tasks still running after the grace period; cancelling them and releasing their leases"
            );
            for r in running.values_mut() {
                r.reason.get_or_insert(StopReason::Shutdown);
                r.token.cancel();
            }
        }
        // Executors hold their own sender; once all have sent, the
        // completer drains and ends.
        drop(done_tx);
        let _ = completer.await;
        services.cancel();
        let _ = tokio::join!(listener, heartbeat);
        if let Some(task) = own_notifier {
            let _ = task.await;
        }
        if let Ok(Some(error)) = notifier_failure.await {
            return Err(error);
        }
        tracing::info!(worker = %shared.id, "worker stopped");
        Ok(())
    }
}
