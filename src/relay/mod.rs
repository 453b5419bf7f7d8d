//! The relay: moves committed events from `herald.outbox` to Redis.
//!
//! It owns the claim → publish → delete → commit cycle, partition
//! ownership, backoff while Redis is down, dead-lettering of events that
//! never get through, and expiry of the archive. In the claim's transaction
//! it also checks events against the catalog (events that fail go to the
//! dead letters, undelivered) and inserts one task per matching durable
//! subscription; while Redis does not take the events it inserts those
//! tasks in transactions of their own and marks the rows (`fanned_out`), so
//! each event's tasks are inserted exactly once.
//!
//! It must never remove an event from the outbox before Redis acknowledged
//! its PUBLISH (that would lose events), never publish an event while an
//! earlier one of its partition waits out a backoff, and never let two
//! transactions drain one partition at the same time (either would reorder
//! a key), and never sleep without either holding the wake lock or knowing
//! another relay holds it (that would leave an event waiting for
//! `poll_interval`). NOTIFY is only a wake-up: every decision is taken from
//! the table.
//!
//! One batch, top to bottom ([`Drainer::claim_and_publish`]):
//! - [`claim`]: the claim transaction and partition ownership;
//! - [`dead_letter`]: the catalog check, and the dead letters of events
//!   that fail it or that Redis refused too often;
//! - [`fanout`]: tasks for durable subscriptions, in the claim and while
//!   Redis is down;
//! - [`publish`]: the pipelines to Redis and the batch's size;
//! - [`settle`]: the commit, or what each event's fate writes back.
//!
//! Around it: [`listener`] (its subscription to the process's notifier
//! and the wake lock, which only tell the drain workers when work may be
//! waiting) and `crate::backoff`;
//! archive expiry and the outbox's VACUUM are the maintenance leader's. The statements
//! that write the outbox are `crate::store::outbox`'s.

mod claim;
mod dead_letter;
pub(crate) mod fanout;
mod listener;
mod publish;
mod settle;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::Catalog;
use crate::telemetry::names::{event, metric};

pub(crate) use crate::backoff::Backoff;
pub use claim::claim_hold;
pub(crate) use publish::Pace;

/// The notification channel the outbox trigger signals.
pub const CHANNEL: &str = "herald_outbox";
/// First key of the transaction-level advisory locks that give one
/// transaction at a time a partition ("hera" in ASCII).
pub const PARTITION_LOCK_SPACE: i32 = 0x6865_7261;
/// The wake lock ("herw", 1) a sleeping relay holds exclusively on its
/// wake-lock session. The outbox trigger (sql/V6__wake_idle_relays_only.sql)
/// notifies only when it cannot take it shared, that is while a relay sleeps
/// or is about to; otherwise it holds it shared until its commit. See
/// [`crate::wake`].
pub const WAKE_LOCK: (i32, i32) = (crate::wake::WAKE_LOCK_SPACE, 1);
/// `application_name` of the session that holds the wake lock.
pub const WAKE_LOCK_APPLICATION_NAME: &str = "herald-relay-wake-lock";
/// `application_name` of the LISTEN connection (the notifier's session) of
/// a relay that runs alone or alone in its process, to find it in
/// pg_stat_activity; see `crate::notifier::APPLICATION_NAME`.
pub const LISTEN_APPLICATION_NAME: &str = "herald-relay-listen";

/// Counters a caller (the CLI, a test, the bench) can read while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub published: AtomicU64,
    pub batches: AtomicU64,
    pub failed_batches: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub listen_connects: AtomicU64,
    /// Whether the LISTEN connection is up now and every drain worker and
    /// the listener still run (`/readyz`): cleared for good when one of
    /// them died.
    pub listening: std::sync::atomic::AtomicBool,
    /// A drain worker or the listener died (panicked); the relay is no
    /// longer ready however well the rest runs.
    pub failed: std::sync::atomic::AtomicBool,
    /// Fault injection for tests: the next drain worker to look panics.
    #[doc(hidden)]
    pub inject_panic: std::sync::atomic::AtomicBool,
    /// Events refused by the catalog (schema or strict mode).
    pub invalid: AtomicU64,
    /// Tasks inserted for durable subscriptions.
    pub fanned_out: AtomicU64,
    /// Times this relay took the wake lock to sleep (producers notify only
    /// while a relay holds it).
    pub sleeps: AtomicU64,
    /// Whether this relay holds the wake lock now (it sleeps, producers
    /// notify).
    pub asleep: std::sync::atomic::AtomicBool,
}

pub struct Relay {
    config: Config,
    pool: Pool,
    redis: crate::RedisPool,
    stats: Arc<RelayStats>,
    /// The process's notifier; `None`: the relay runs one of its own.
    notifier: Option<crate::notifier::Notifier>,
    // Compiled from the configuration; an error stops `run` at once.
    catalog: std::result::Result<Catalog, String>,
}

impl Relay {
    /// `redis`: a [`crate::RedisPool`] (single server, Sentinel or Cluster)
    /// or a `deadpool_redis::Pool` (single server, classic pub/sub).
    pub fn new(config: &Config, pool: Pool, redis: impl Into<crate::RedisPool>) -> Relay {
        Relay {
            config: config.clone(),
            pool,
            redis: redis.into(),
            stats: Arc::new(RelayStats::default()),
            notifier: None,
            catalog: Catalog::from_config(config).map_err(|e| e.to_string()),
        }
    }

    /// Hear `herald_outbox` through the process's `notifier` (which the
    /// caller runs) instead of a LISTEN session of the relay's own.
    pub fn with_notifier(mut self, notifier: crate::notifier::Notifier) -> Relay {
        self.notifier = Some(notifier);
        self
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Run until `shutdown` is cancelled; the batches in flight finish and
    /// commit (their partition locks go with the commit) before it returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let catalog = self.catalog.clone().map_err(Error::Config)?;
        let own = self.notifier.is_none();
        if own {
            // Before any statement (`Herald::builder` checks for its services).
            crate::notifier::check(&self.config).await?;
        }
        {
            let client = self.pool.get().await?;
            crate::migrate::check_schema(&client).await?;
        }
        let notifier = self.notifier.clone().unwrap_or_else(|| {
            crate::notifier::Notifier::new(&self.config, LISTEN_APPLICATION_NAME)
        });
        // Notifications that cannot reach the LISTEN session stop the relay.
        let (shutdown, notifier_failure) = notifier.stop_on_failure(&shutdown);
        let (signals, listener_task) = listener::spawn(
            &self.config,
            &notifier,
            self.stats.clone(),
            shutdown.clone(),
        );
        // Alone, the relay runs its notifier until its drain workers stop.
        let stop_notifier = shutdown.child_token();
        let own_notifier = own.then(|| tokio::spawn(notifier.run(stop_notifier.clone())));
        let shared = Arc::new(Drainer {
            config: self.config.clone(),
            pool: self.pool.clone(),
            redis: self.redis.clone(),
            stats: self.stats.clone(),
            catalog,
            redis_down: Default::default(),
            begin_claim: claim::begin_claim(claim_hold(&self.config)),
        });
        let listener_abort = listener_task.abort_handle();
        let listener = tokio::spawn(watch_task("listener", listener_task, self.stats.clone()));
        // Create today's archive partition before the first claim, so
        // archived rows never start out in the default partition.
        // (Expiry afterwards is the maintenance leader's.)
        if let Some(retain) = self.config.relay.retain_published {
            let created = async {
                let client = self.pool.get().await?;
                crate::maintenance::archive::maintain(&**client, retain).await
            };
            if let Err(error) = created.await {
                tracing::warn!(%error, "archive maintenance failed");
            }
        }
        let mut workers = Vec::new();
        for n in 0..self.config.relay.concurrency {
            let worker = tokio::spawn(shared.clone().work(
                n,
                signals.wake.clone(),
                signals.up.clone(),
                signals.idle.clone(),
                shutdown.clone(),
            ));
            workers.push(tokio::spawn(watch_task(
                "drain worker",
                worker,
                self.stats.clone(),
            )));
        }
        tracing::info!(
            concurrency = self.config.relay.concurrency,
            batch_size = self.config.relay.batch_size,
            "relay started"
        );
        for worker in workers {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "relay worker panicked");
            }
        }
        listener_abort.abort();
        let _ = listener.await;
        stop_notifier.cancel();
        if let Some(task) = own_notifier {
            let _ = task.await;
        }
        if let Ok(Some(error)) = notifier_failure.await {
            return Err(error);
        }
        tracing::info!(
            published = self.stats.published.load(Ordering::Relaxed),
            "relay stopped"
        );
        Ok(())
    }
}

/// Wait for one of the relay's tasks; if it panicked, the relay is no
/// longer ready (`RelayStats::failed`, and `listening` cleared for good).
async fn watch_task(what: &'static str, task: tokio::task::JoinHandle<()>, stats: Arc<RelayStats>) {
    if let Err(error) = task.await {
        if error.is_panic() {
            stats.failed.store(true, Ordering::SeqCst);
            stats.listening.store(false, Ordering::SeqCst);
            tracing::error!(task = what, %error, "relay task panicked; the relay reports itself not ready");
        }
    }
}

/// What every drain worker shares; the steps of a batch are its methods,
/// one file each.
struct Drainer {
    config: Config,
    pool: Pool,
    redis: crate::RedisPool,
    stats: Arc<RelayStats>,
    catalog: Catalog,
    /// A publish failed because Redis was unreachable; the next success is
    /// a reconnect.
    redis_down: std::sync::atomic::AtomicBool,
    /// BEGIN and the claim transaction's settings (see [`claim::begin_claim`]).
    begin_claim: String,
}

impl Drainer {
    /// One drain worker: drain while there is work, then sleep until the
    /// listener says work may be waiting (or `poll_interval`, or a backoff
    /// after a failure).
    async fn work(
        self: Arc<Self>,
        n: usize,
        mut wake: watch::Receiver<u64>,
        mut up: watch::Receiver<u64>,
        idle: Arc<crate::wake::Idle>,
        shutdown: CancellationToken,
    ) {
        let relay = &self.config.relay;
        let mut backoff = Backoff::new(relay.backoff_min, relay.backoff_max);
        let mut pace = Pace::new(relay.batch_size);
        // Each worker starts at another partition so that they spread out.
        let mut offset: i32 = (n as i32) * 7919;
        loop {
            wake.borrow_and_update();
            up.borrow_and_update();
            // Drain until nothing is left for us, or until asked to stop.
            let mut failed = false;
            while !shutdown.is_cancelled() {
                if self.stats.inject_panic.swap(false, Ordering::Relaxed) {
                    panic!("relay drain worker {n}: panic injected by a test");
                }
                offset = offset.wrapping_add(1) & 0x3fff_ffff;
                match self.claim_and_publish(offset, &mut pace).await {
                    // Nothing due in any partition this worker could take.
                    Ok(0) => break,
                    Ok(_) => backoff.reset(),
                    Err(error) => {
                        self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(metric::RELAY_FAILED_BATCHES).increment(1);
                        tracing::warn!(event = event::RELAY_BATCH_FAILED, %error, "relay batch failed; backing off");
                        failed = true;
                        break;
                    }
                }
            }
            if failed && self.redis_down.load(Ordering::Relaxed) {
                // Webhooks and task subscribers need only Postgres: fan the
                // waiting events out now, once each (herald.outbox.fanned_out).
                while !shutdown.is_cancelled() {
                    offset = offset.wrapping_add(1) & 0x3fff_ffff;
                    match self.fan_out_waiting(offset, relay.batch_size).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "fan-out while Redis is down failed");
                            break;
                        }
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            let pause = if failed {
                backoff.next()
            } else {
                relay.poll_interval
            };
            idle.idle();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = wake.changed(), if !failed => {
                    if changed.is_err() {
                        return;
                    }
                }
                // Backing off: notifications would only repeat the failure,
                // but a LISTEN session that connected again means Postgres
                // answers again (after a restart or failover).
                changed = up.changed(), if failed => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
            idle.busy();
        }
    }

    /// Claim, publish and commit one batch; returns how many events it held
    /// (0: nothing was due in any partition this worker could take).
    async fn claim_and_publish(&self, offset: i32, pace: &mut Pace) -> Result<usize> {
        // Claim: the batch's rows are deleted, its partitions held, in a
        // transaction still open.
        let Some((claim, rows)) = self.claim(offset, pace.limit()).await? else {
            return Ok(0);
        };
        // Check the catalog; what fails it becomes a dead letter.
        let batch = self.check_catalog(&claim, rows);
        self.dead_letter_invalid(&claim, &batch.invalid).await?;
        // Durable subscriptions' tasks, in the same transaction.
        self.fan_out_claimed(&claim, &batch).await?;
        // Publish to Redis.
        let publication = self.publish(&claim, &batch.messages).await;
        // Commit, or settle each event by what Redis did with it.
        if publication.all_accepted() {
            return self.commit(claim, &batch, &publication, pace).await;
        }
        self.settle_failed(claim, batch, publication, pace).await
    }
}
