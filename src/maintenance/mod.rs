//! Maintenance: the upkeep of the whole database, run by one elected
//! process at a time.
//!
//! Every long-running `herald` process (`run`, `relay`, `worker`,
//! `scheduler`, `admin`) starts a [`Maintenance`]. Each holds one dedicated
//! session and tries `pg_try_advisory_lock` on [`LEADER_LOCK`] every
//! `maintenance.leader_retry`; the one that gets it is the leader of that
//! database and runs the services below until its session ends, then
//! another process takes over on its next try. Advisory locks belong to a
//! database, so each database has its own leader.
//!
//! The services, one file each, each with its own interval:
//! - [`rescuer`]: running tasks whose lease expired go back to the queue;
//! - [`cleaner`]: finished tasks past `worker.retain_completed` are removed;
//! - [`archive`]: the archive's daily partitions are created and dropped;
//! - [`node_expiry`]: rows of processes that stopped heartbeating go;
//! - [`retention`]: `herald.processed_events` past its retention go;
//! - [`vacuum`]: VACUUM of the claim tables once enough rows died.
//!
//! This module owns the election and the services' lifetimes. It must never
//! run a service without holding the lock: losing the session (or failing
//! to confirm it) stops every service at once, before it campaigns again.
//! Every service stays safe if two processes run it at once (they all ran
//! in every process before), so a leader whose session ended unnoticed for
//! a moment costs work, not correctness.

pub mod archive;
pub mod cleaner;
pub mod node_expiry;
pub mod rescuer;
pub mod retention;
pub mod vacuum;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Context, Result};

/// First key of the leader lock ("herm" in ASCII), beside the wake locks'
/// "herw" ([`crate::wake::WAKE_LOCK_SPACE`]) and the relay's partition
/// locks' "hera".
pub const LEADER_LOCK_SPACE: i32 = 0x6865_726d;
/// The session-level advisory lock the maintenance leader holds.
pub const LEADER_LOCK: (i32, i32) = (LEADER_LOCK_SPACE, 1);
/// `application_name` of the session that campaigns for (and holds) the
/// leader lock, to find it in pg_stat_activity.
pub const APPLICATION_NAME: &str = "herald-maintenance";
/// `application_name` of the leader's service connections.
pub const SERVICES_APPLICATION_NAME: &str = "herald-maintenance-services";
/// Name of the gauge that is 1 while this process is the leader.
pub const LEADER_GAUGE: &str = crate::telemetry::names::metric::MAINTENANCE_LEADER;

/// Connections the leader's services share, opened on demand; a follower
/// opens none (counted by `crate::budget`).
pub const POOL_SIZE: usize = 4;
/// Longest the leader waits for its session to answer its check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Least idle time after which the server ends a silent candidate's
/// session (and so a cut-off leader's lock). A cut-off leader stops its
/// services within `leader_retry + PROBE_TIMEOUT`, which is always less
/// than `max(3 × leader_retry, this)`: it has stopped before another leads.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the services may take to stop once leadership ends.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where this process stands, for tests, `/metrics` and operators.
#[derive(Debug, Default)]
pub struct MaintenanceStatus {
    /// Whether this process is the leader now.
    pub leader: AtomicBool,
    /// How many times it became the leader.
    pub terms: AtomicU64,
}

/// The election and, while this process leads, the maintenance services.
pub struct Maintenance {
    config: Config,
    status: Arc<MaintenanceStatus>,
}

impl Maintenance {
    /// A candidate with the settings of `config.maintenance` (and the
    /// retention settings of `[worker]`, `[relay]` and `[nodes]`).
    pub fn new(config: &Config) -> Maintenance {
        Maintenance {
            config: config.clone(),
            status: Arc::new(MaintenanceStatus::default()),
        }
    }

    pub fn status(&self) -> Arc<MaintenanceStatus> {
        self.status.clone()
    }

    /// Campaign, and lead when elected, until `shutdown`. Connection
    /// failures are logged and retried; they never stop the process.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut own = self.config.clone();
        own.postgres.pool_size = POOL_SIZE;
        let pool = crate::db::pool(&own, SERVICES_APPLICATION_NAME)?;
        let retry = self.config.maintenance.leader_retry;
        self.set_leader(false);
        let mut failing = false;
        while !shutdown.is_cancelled() {
            let session = tokio::select! {
                _ = shutdown.cancelled() => break,
                session = Session::open(&self.config) => session,
            };
            match session {
                Ok(mut session) => {
                    if failing {
                        tracing::info!("maintenance election session reconnected");
                        failing = false;
                    }
                    self.campaign(&mut session, &pool, &shutdown).await;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "maintenance election cannot connect; retrying");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        Ok(())
    }

    /// Try for the lock every `leader_retry` on `session`; lead once it is
    /// ours. Returns when the session ends (or fails) or at shutdown.
    async fn campaign(&self, session: &mut Session, pool: &Pool, shutdown: &CancellationToken) {
        let retry = self.config.maintenance.leader_retry;
        loop {
            match session.try_lock().await {
                Ok(true) => {
                    self.lead(session, pool, shutdown).await;
                    return;
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "maintenance election failed; reconnecting");
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                end = &mut session.closed => {
                    tracing::debug!(reason = end.unwrap_or_default(), "maintenance election session ended");
                    return;
                }
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Run the services while `session` holds the lock; stop them the
    /// moment it ends, cannot be confirmed, or at shutdown.
    async fn lead(&self, session: &mut Session, pool: &Pool, shutdown: &CancellationToken) {
        let retry = self.config.maintenance.leader_retry;
        self.status.terms.fetch_add(1, Ordering::Relaxed);
        self.set_leader(true);
        tracing::info!(
            backend_pid = session.backend_pid,
            "this process is now the maintenance leader"
        );
        let stop = shutdown.child_token();
        let mut services = self.spawn_services(pool, &stop);
        let why = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                end = &mut session.closed => {
                    break Some(format!("its session ended: {}", end.unwrap_or_default()))
                }
                done = services.join_next() => {
                    // Services end only when stopped: this one failed.
                    let what = match done {
                        Some(Err(e)) if e.is_panic() => "a maintenance service panicked",
                        _ => "a maintenance service ended",
                    };
                    break Some(what.to_string());
                }
                _ = tokio::time::sleep(retry) => {
                    if let Err(error) = session.probe().await {
                        break Some(format!("its session does not answer: {error}"));
                    }
                }
            }
        };
        stop.cancel();
        self.set_leader(false);
        match &why {
            Some(why) => tracing::warn!(
                reason = %why,
                "lost the maintenance leadership; services stopped, campaigning again"
            ),
            None => tracing::info!("leaving the maintenance leadership at shutdown"),
        }
        let stopped = async { while services.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_GRACE, stopped).await.is_err() {
            services.abort_all();
        }
    }

    fn spawn_services(&self, pool: &Pool, stop: &CancellationToken) -> JoinSet<()> {
        let c = &self.config;
        let m = &c.maintenance;
        let mut set = JoinSet::new();
        set.spawn(rescuer::run(
            pool.clone(),
            m.rescue_interval.unwrap_or(c.worker.rescue_interval),
            stop.clone(),
        ));
        set.spawn(cleaner::run(
            pool.clone(),
            m.clean_interval,
            cleaner::retention(&c.worker),
            stop.clone(),
        ));
        if let Some(retain) = c.relay.retain_published {
            set.spawn(archive::run(
                pool.clone(),
                m.archive_interval,
                retain,
                stop.clone(),
            ));
        }
        set.spawn(node_expiry::run(
            pool.clone(),
            m.node_expiry_interval.unwrap_or(c.nodes.heartbeat_interval),
            stop.clone(),
        ));
        set.spawn(retention::run(
            pool.clone(),
            m.retention_interval,
            m.processed_events_retention,
            stop.clone(),
        ));
        set.spawn(vacuum::run(
            pool.clone(),
            m.vacuum_interval,
            vacuum::Thresholds {
                outbox: c.relay.vacuum_after,
                tasks: c.worker.vacuum_after,
            },
            stop.clone(),
        ));
        set
    }

    fn set_leader(&self, leader: bool) {
        self.status.leader.store(leader, Ordering::Relaxed);
        metrics::gauge!(LEADER_GAUGE).set(if leader { 1.0 } else { 0.0 });
    }
}

/// The dedicated session that campaigns for, and holds, the leader lock.
struct Session {
    client: tokio_postgres::Client,
    closed: oneshot::Receiver<String>,
    backend_pid: i32,
}

impl Session {
    async fn open(config: &Config) -> Result<Session> {
        let (client, connection) = crate::db::connect_session(
            config,
            APPLICATION_NAME,
            "opening the maintenance election session",
        )
        .await?;
        let (closed_tx, closed) = oneshot::channel::<String>();
        tokio::spawn(async move {
            let end = match connection.await {
                Ok(()) => "closed by the server".to_string(),
                Err(e) => crate::error::describe_pg(&e),
            };
            let _ = closed_tx.send(end);
        });
        // A leader cut off from Postgres (lost host, hung proxy) keeps its
        // lock until the server ends its session; candidates talk every
        // leader_retry, so a session idle far longer is dead. Postgres
        // before 14 lacks the setting: then only TCP keepalives end it.
        let idle = (config.maintenance.leader_retry * 3).max(MIN_IDLE_TIMEOUT);
        if let Err(error) = client
            .batch_execute(&format!(
                "SET idle_session_timeout = '{}ms'",
                idle.as_millis()
            ))
            .await
        {
            tracing::debug!(%error, "idle_session_timeout not set on the election session");
        }
        let backend_pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .context("opening the maintenance election session")?
            .get(0);
        Ok(Session {
            client,
            closed,
            backend_pid,
        })
    }

    /// Take the leader lock if it is free; it is held until the session ends.
    async fn try_lock(&self) -> Result<bool> {
        Ok(self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LEADER_LOCK.0, &LEADER_LOCK.1],
            )
            .await
            .context("trying for the maintenance leader lock")?
            .get(0))
    }

    /// A session that answers still holds its session-level lock.
    async fn probe(&self) -> Result<()> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.client.simple_query("SELECT 1")).await {
            Ok(result) => result.map(|_| ()).context("checking the leader session"),
            Err(_) => Err(crate::error::Error::Timeout(
                PROBE_TIMEOUT,
                "checking the leader session".into(),
            )),
        }
    }
}

/// Run `pass` now and then every `interval` until `stop`; a pass in flight
/// is dropped at `stop` (the statement it sent finishes on the server,
/// which is harmless: every pass is safe to repeat). Failures are logged
/// once until the next success.
async fn every<F, Fut>(name: &'static str, interval: Duration, stop: CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut failing = false;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = pass() => result,
        };
        match result {
            Ok(()) if failing => {
                tracing::info!(service = name, "maintenance service recovered");
                failing = false;
            }
            Ok(()) => {}
            Err(error) => {
                if !failing {
                    tracing::warn!(service = name, %error, "maintenance service failed; retrying");
                    failing = true;
                } else {
                    tracing::debug!(service = name, %error, "maintenance service failed again");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
