//! `herald.nodes`: the live Herald processes. Every process that runs a
//! relay, workers, a scheduler or the admin server registers one row (host,
//! pid, roles, version, started_at), refreshes `last_seen` every
//! `nodes.heartbeat_interval` and deletes its row when it stops. A row that
//! has missed `nodes.missed_heartbeats` heartbeats (its process was killed,
//! its host lost) is deleted by the maintenance leader
//! ([`crate::maintenance::node_expiry`], through [`expire`]); heartbeats
//! never expire other rows.
//!
//! It owns every statement on `herald.nodes`; it never touches other tables.
//! Times come from the database clock, so hosts whose clocks drift do not
//! expire each other. A heartbeat that fails (Postgres down, pool exhausted)
//! is logged and retried on the next tick; the upsert re-creates a row that
//! others expired meanwhile. Shutdown abandons a heartbeat still waiting on
//! Postgres and waits at most 5 s to deregister.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::error::{Context, Result};

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Relay,
    Worker,
    Scheduler,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Relay => "relay",
            Role::Worker => "worker",
            Role::Scheduler => "scheduler",
            Role::Admin => "admin",
        }
    }

    pub const ALL: [Role; 4] = [Role::Relay, Role::Worker, Role::Scheduler, Role::Admin];
}

/// This process's registration.
#[derive(Debug, Clone)]
pub struct Node {
    id: Uuid,
    host: String,
    pid: i32,
    roles: Vec<Role>,
    details: serde_json::Value,
    started_at: DateTime<Utc>,
    heartbeat_interval: Duration,
    missed_heartbeats: u32,
}

/// One row of `herald.nodes`, as the dashboard and `/metrics` show it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub id: Uuid,
    pub host: String,
    pub pid: i32,
    pub roles: Vec<String>,
    pub version: String,
    pub details: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Seconds since `last_seen`, by the database clock.
    pub since_last_seen_secs: f64,
}

const UPSERT: &str = "
INSERT INTO herald.nodes (id, host, pid, roles, version, details, started_at,
                          heartbeat_interval, missed_heartbeats)
VALUES ($1, $2, $3, $4, $5, $6, $7, make_interval(secs => $8), $9)
ON CONFLICT (id) DO UPDATE
SET last_seen = now(), heartbeat_interval = EXCLUDED.heartbeat_interval,
    missed_heartbeats = EXCLUDED.missed_heartbeats";

const EXPIRE: &str = "
DELETE FROM herald.nodes
WHERE last_seen + missed_heartbeats * heartbeat_interval < now()
RETURNING id, host, pid, roles, version, details, started_at, last_seen,
          extract(epoch FROM now() - last_seen)::float8 AS since_last_seen_secs";

const LIST: &str = "
SELECT id, host, pid, roles, version, details, started_at, last_seen,
       extract(epoch FROM now() - last_seen)::float8 AS since_last_seen_secs
FROM herald.nodes
WHERE last_seen + missed_heartbeats * heartbeat_interval >= now()
ORDER BY host, pid, started_at";

impl Node {
    /// A registration for this process with `roles`, using `[nodes]`.
    pub fn new(config: &Config, roles: &[Role]) -> Node {
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let mut details = serde_json::Map::new();
        if roles.contains(&Role::Worker) {
            details.insert("queues".into(), serde_json::json!(config.worker.queues));
        }
        if roles.contains(&Role::Admin) {
            details.insert("admin_bind".into(), serde_json::json!(config.admin.bind));
        }
        Node {
            id: Uuid::now_v7(),
            host: hostname(),
            pid: std::process::id() as i32,
            roles,
            details: serde_json::Value::Object(details),
            started_at: Utc::now(),
            heartbeat_interval: config.nodes.heartbeat_interval,
            missed_heartbeats: config.nodes.missed_heartbeats,
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    /// Insert this node's row, or refresh its `last_seen`.
    pub async fn heartbeat<C: GenericClient + Sync>(&self, client: &C) -> Result<()> {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        client
            .execute(
                UPSERT,
                &[
                    &self.id,
                    &self.host,
                    &self.pid,
                    &roles,
                    &env!("CARGO_PKG_VERSION"),
                    &self.details,
                    &self.started_at,
                    &self.heartbeat_interval.as_secs_f64(),
                    &(self.missed_heartbeats.max(1) as i32),
                ],
            )
            .await
            .context("heartbeating in herald.nodes")?;
        Ok(())
    }

    /// Remove this node's row (on a clean shutdown).
    pub async fn deregister<C: GenericClient + Sync>(&self, client: &C) -> Result<()> {
        client
            .execute("DELETE FROM herald.nodes WHERE id = $1", &[&self.id])
            .await
            .context("deregistering from herald.nodes")?;
        Ok(())
    }

    /// Register, then heartbeat every `heartbeat_interval` until
    /// `shutdown`; deregister on the way out.
    /// Failures are logged and retried: registration never stops the
    /// process's real work.
    pub async fn run(self, pool: Pool, shutdown: CancellationToken) -> Result<()> {
        let mut ticker = tokio::time::interval(self.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        tracing::info!(
            node = %self.id,
            roles = ?self.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "registering in herald.nodes"
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            // A heartbeat stuck on a Postgres that stopped answering must not
            // hold up shutdown; the row is left to expire.
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                result = self.tick(&pool) => result,
            };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!(node = %self.id, "node heartbeat recovered");
                        failing = false;
                    }
                }
                Err(error) => {
                    metrics::counter!("herald_node_heartbeat_errors_total").increment(1);
                    if !failing {
                        tracing::warn!(node = %self.id, %error, "node heartbeat failed; retrying");
                        failing = true;
                    }
                }
            }
        }
        let deregister = async {
            let client = pool.get().await?;
            self.deregister(&**client).await
        };
        match tokio::time::timeout(Duration::from_secs(5), deregister).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(node = %self.id, %error, "could not deregister; the row expires")
            }
            Err(_) => tracing::warn!(node = %self.id, "deregistering timed out; the row expires"),
        }
        Ok(())
    }

    async fn tick(&self, pool: &Pool) -> Result<()> {
        let client = pool.get().await?;
        self.heartbeat(&**client).await
    }
}

/// Delete the nodes that missed their heartbeats; returns them.
pub async fn expire<C: GenericClient + Sync>(client: &C) -> Result<Vec<NodeRow>> {
    Ok(client
        .query(EXPIRE, &[])
        .await
        .context("expiring dead nodes in herald.nodes")?
        .iter()
        .map(row)
        .collect())
}

/// The live nodes (heartbeat current), ordered by host and pid.
pub async fn list<C: GenericClient + Sync>(client: &C) -> Result<Vec<NodeRow>> {
    Ok(client
        .query(LIST, &[])
        .await
        .context("reading herald.nodes")?
        .iter()
        .map(row)
        .collect())
}

fn row(r: &tokio_postgres::Row) -> NodeRow {
    NodeRow {
        id: r.get("id"),
        host: r.get("host"),
        pid: r.get("pid"),
        roles: r.get("roles"),
        version: r.get("version"),
        details: r.get("details"),
        started_at: r.get("started_at"),
        last_seen: r.get("last_seen"),
        since_last_seen_secs: r.get("since_last_seen_secs"),
    }
}

/// `HOSTNAME`, else /etc/hostname, else "localhost".
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
