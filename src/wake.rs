//! The wake lock: producers NOTIFY only while a consumer sleeps.
//!
//! A transaction that sends NOTIFY takes one cluster-wide lock at commit and
//! holds it through its WAL flush, so notifying producers commit one at a
//! time. A consumer that is draining needs no notification: it claims again
//! before it sleeps. So the insert triggers of `herald.outbox` (sql/V6) and
//! `herald.tasks` (sql/V8) notify only when they cannot take a session-level
//! advisory lock shared, and a consumer that is about to sleep takes that
//! lock exclusively, then sweeps once more. A producer that took it shared
//! holds it until its transaction ends, so the consumer's request waits for
//! it and the sweep after the request sees its rows. See "Notify only a
//! sleeping relay" in docs/architecture.md.
//!
//! This module owns the consumer's side: the idle count of its claim loops
//! and the session that holds the lock. It must never let its owner sleep
//! without the lock unless another consumer that serves the same rows holds
//! or waits for it, and it never holds the LISTEN session (Postgres delivers
//! notifications only to an idle session, and the lock wait can be long).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Context, Result};
use crate::notifier::{Signal, Subscription};

/// First key of the wake locks ("herw" in ASCII); the second key names the
/// table: 1 for `herald.outbox`, 2 for `herald.tasks`.
pub const WAKE_LOCK_SPACE: i32 = 0x6865_7277;

/// How long a consumer going to sleep waits at most for producers that hold
/// the lock shared (their commits, or another consumer's sleep) before it
/// sweeps and tries again.
const WAIT: &str = "5s";
/// How often a relay that sleeps while another holds the lock checks that
/// the other is still there (a relay killed in its sleep lets go).
const RECHECK: Duration = Duration::from_secs(1);

/// Does another session hold or wait for the lock exclusively?
const TAKEN_ELSEWHERE: &str = "
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND mode = 'ExclusiveLock'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 2
      AND pid <> pg_backend_pid())";

/// What the claim loops tell the LISTEN task: how many of them are working,
/// and a signal when the last one found nothing to claim.
pub(crate) struct Idle {
    busy: AtomicUsize,
    all_idle: Notify,
}

impl Idle {
    /// `loops` claim loops, all working at first.
    pub(crate) fn new(loops: usize) -> Idle {
        Idle {
            busy: AtomicUsize::new(loops),
            all_idle: Notify::new(),
        }
    }
    pub(crate) fn busy(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn idle(&self) {
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.all_idle.notify_one();
        }
    }
}

/// Counters of one consumer's sleeps.
#[derive(Clone, Copy)]
pub(crate) struct Gauges<'a> {
    pub sleeps: &'a AtomicU64,
    pub asleep: &'a AtomicBool,
}

/// The session that holds one wake lock.
pub(crate) struct WakeLock {
    client: tokio_postgres::Client,
    closed: oneshot::Receiver<String>,
    driver: tokio::task::JoinHandle<()>,
    key: (i32, i32),
    /// Consumers that serve the same rows (relays) may leave the lock to one
    /// of them; workers of different queues may not.
    share: bool,
    holds: bool,
    covered: bool,
}

impl WakeLock {
    pub(crate) async fn open(
        config: &Config,
        application_name: &str,
        key: (i32, i32),
        share: bool,
    ) -> Result<WakeLock> {
        let (client, connection) = crate::db::connect_session(
            config,
            application_name,
            "opening the wake-lock connection",
        )
        .await?;
        let (closed_tx, closed) = oneshot::channel::<String>();
        let driver = tokio::spawn(async move {
            let end = match connection.await {
                Ok(()) => "closed by the server".to_string(),
                Err(e) => crate::error::describe_pg(&e),
            };
            let _ = closed_tx.send(end);
        });
        client
            .batch_execute(&format!("SET lock_timeout = '{WAIT}'"))
            .await
            .context("setting up the wake-lock connection")?;
        Ok(WakeLock {
            client,
            closed,
            driver,
            key,
            share,
            holds: false,
            covered: false,
        })
    }

    /// Serve until the LISTEN session (`listen_closed`) or this one ends;
    /// returns why. `notified` fires for every notification (the claim loops
    /// are already woken); `wake` wakes the claim loops for a sweep.
    pub(crate) async fn serve(
        mut self,
        mut listen_closed: impl std::future::Future<Output = Option<String>> + Unpin,
        notified: &Notify,
        idle: &Idle,
        wake: &watch::Sender<u64>,
        gauges: Gauges<'_>,
    ) -> Option<String> {
        let mut closed = std::mem::replace(&mut self.closed, oneshot::channel().1);
        let end = loop {
            let recheck = self.covered;
            let this = &mut self;
            let step = async {
                tokio::select! {
                    _ = notified.notified() => this.wake(&gauges).await,
                    _ = idle.all_idle.notified() => this.sleep(idle, wake, &gauges).await,
                    _ = tokio::time::sleep(RECHECK), if recheck => {
                        this.sleep(idle, wake, &gauges).await
                    }
                }
            };
            // Either session ending ends both: the lock goes with its
            // session, and a consumer that lost it must not sleep as if it
            // held it.
            tokio::select! {
                end = &mut listen_closed => break end,
                end = &mut closed => {
                    break Some(format!("wake-lock connection: {}", end.unwrap_or_default()))
                }
                done = step => if let Err(e) = done {
                    break Some(e.to_string());
                }
            }
        };
        gauges.asleep.store(false, Ordering::Relaxed);
        drop(self.client);
        let _ = self.driver.await;
        end
    }

    /// A notification arrived: let go of the lock so that producers stop
    /// notifying while the consumer drains.
    async fn wake(&mut self, gauges: &Gauges<'_>) -> Result<()> {
        self.covered = false;
        if self.holds {
            self.holds = false;
            gauges.asleep.store(false, Ordering::Relaxed);
            self.client
                .query_one(
                    "SELECT pg_advisory_unlock($1, $2)",
                    &[&self.key.0, &self.key.1],
                )
                .await
                .context("letting go of the wake lock")?;
        }
        Ok(())
    }

    /// Every claim loop is idle: take the lock, then have the loops sweep
    /// once more, since producers that held it shared did not notify.
    async fn sleep(
        &mut self,
        idle: &Idle,
        wake: &watch::Sender<u64>,
        gauges: &Gauges<'_>,
    ) -> Result<()> {
        if self.holds || idle.busy.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        let key = [
            &self.key.0 as &(dyn tokio_postgres::types::ToSql + Sync),
            &self.key.1,
        ];
        let got: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &key)
            .await
            .context("taking the wake lock")?
            .get(0);
        if !got {
            if self.share {
                let elsewhere: bool = self
                    .client
                    .query_one(
                        TAKEN_ELSEWHERE,
                        &[&i64::from(self.key.0), &i64::from(self.key.1)],
                    )
                    .await
                    .context("looking for the consumer holding the wake lock")?
                    .get(0);
                // Another relay sleeps (or is about to): producers notify
                // it, and every relay hears every notification.
                self.covered = elsewhere;
                if elsewhere {
                    return Ok(());
                }
            }
            // Producers hold it shared (or, for workers, another worker
            // sleeps with it): wait. Meanwhile producers notify, and the
            // LISTEN session, idle, wakes the claim loops.
            match self
                .client
                .query_one("SELECT pg_advisory_lock($1, $2)", &key)
                .await
            {
                Ok(_) => {}
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    // Sweep now and try again when idle.
                    wake.send_modify(|g| *g += 1);
                    return Ok(());
                }
                Err(e) => return Err(e).context("waiting for the wake lock"),
            }
        }
        self.holds = true;
        self.covered = false;
        gauges.sleeps.fetch_add(1, Ordering::Relaxed);
        gauges.asleep.store(true, Ordering::Relaxed);
        wake.send_modify(|g| *g += 1);
        Ok(())
    }
}

/// Where one consumer's wake lock lives, and what it serves.
pub(crate) struct Consumer<'a> {
    pub config: &'a Config,
    pub application_name: &'a str,
    pub key: (i32, i32),
    pub share: bool,
    pub idle: &'a Idle,
    /// Wakes the claim loops for a sweep.
    pub wake: &'a watch::Sender<u64>,
    pub gauges: Gauges<'a>,
}

/// After the notifier's `Up`: hold the wake lock (on a session of its own,
/// opened now) until the subscription goes `Down`, and return why (`None`
/// when the notifier is gone). `on_notification(channel, payload)` says
/// whether a notification is work (the claim loops are woken and the lock
/// let go of) or not. A lost wake-lock session is reopened with backoff
/// while LISTEN stays up, and the claim loops sweep: producers that held
/// the lock shared while it was gone did not notify.
pub(crate) async fn serve_while_up(
    subscription: &mut Subscription,
    consumer: Consumer<'_>,
    on_notification: &(dyn Fn(&str, &str) -> bool + Sync),
) -> Option<String> {
    let notified = Notify::new();
    let down = AtomicBool::new(false);
    let pump = async {
        let end = loop {
            match subscription.recv().await {
                Some(Signal::Notification { channel, payload }) => {
                    if on_notification(&channel, &payload) {
                        consumer.wake.send_modify(|g| *g += 1);
                        notified.notify_one();
                    }
                }
                Some(Signal::Up) => {}
                Some(Signal::Down(reason)) => break Some(reason),
                None => break None,
            }
        };
        down.store(true, Ordering::Relaxed);
        end
    };
    let mut pump = std::pin::pin!(pump);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let open = WakeLock::open(
            consumer.config,
            consumer.application_name,
            consumer.key,
            consumer.share,
        );
        let opened = tokio::select! {
            end = &mut pump => return end,
            opened = open => opened,
        };
        match opened {
            Ok(lock) => {
                backoff.reset();
                let end = lock
                    .serve(
                        pump.as_mut(),
                        &notified,
                        consumer.idle,
                        consumer.wake,
                        consumer.gauges,
                    )
                    .await;
                if down.load(Ordering::Relaxed) {
                    return end;
                }
                tracing::warn!(
                    reason = end.unwrap_or_default(),
                    "wake lock lost; reopening"
                );
            }
            Err(error) => tracing::warn!(%error, "opening the wake lock failed"),
        }
        consumer.wake.send_modify(|g| *g += 1);
        tokio::select! {
            end = &mut pump => return end,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}
