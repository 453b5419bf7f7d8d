//! Configuration: defaults, overlaid by an optional TOML file, overlaid by the
//! environment (`DATABASE_URL`, `REDIS_URL`, `HERALD_*`). Owns loading,
//! validating and printing settings; it never opens a connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Postgres connection URL (`DATABASE_URL`).
    pub database_url: String,
    /// Redis connection URL (`REDIS_URL`); `rediss://` for TLS.
    pub redis_url: String,
    /// Prefix of every Redis channel: an event on topic `t` goes to `<prefix>t`.
    pub channel_prefix: String,
    /// Largest accepted event payload, in bytes of its JSON text.
    pub max_payload_bytes: usize,
    /// Number of outbox partitions; events of one key share a partition.
    pub partitions: u16,
    /// Apply migrations when `herald run` / `herald relay` start.
    pub migrate_on_start: bool,
    /// `pretty` or `json` log lines.
    pub log_format: LogFormat,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub relay: RelayConfig,
    pub worker: WorkerConfig,
    pub scheduler: SchedulerConfig,
    /// Cron schedules declared here (`[[schedules]]`), synced to
    /// `herald.schedules` when `herald run` / `herald scheduler` start.
    pub schedules: Vec<Schedule>,
    pub admin: AdminConfig,
    pub nodes: NodesConfig,
    pub maintenance: MaintenanceConfig,
    pub catalog: CatalogConfig,
    /// The event catalog (`[[events]]`): declared topics, their payload
    /// schemas and delivery modes.
    pub events: Vec<EventType>,
    /// Durable subscriptions declared here (`[[subscriptions]]`), synced to
    /// `herald.subscriptions` when `herald run` / `herald relay` start.
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Upper bound of pooled Postgres connections per process (the LISTEN
    /// connection comes on top).
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// What a LISTEN session that notifications do not reach does (the
    /// notifier checks each one with a NOTIFY of its own).
    pub listen_check: ListenCheck,
}

/// `postgres.listen_check`: what happens when the notifier's check finds
/// that notifications do not reach its LISTEN session, as behind a pooler
/// in transaction or statement mode.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenCheck {
    /// Refuse to start (after a reconnect: log an error, report not ready
    /// and reconnect).
    #[default]
    Fail,
    /// Log a warning and go on; wake-ups come at the poll intervals only.
    Warn,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Upper bound of pooled Redis connections per process.
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one Redis round trip may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Most messages a `Subscriber` (and a cache's invalidator) holds for a
    /// consumer that has not taken them; past it they are dropped, counted
    /// and reported as a gap.
    pub subscriber_buffer: usize,
    /// Which pub/sub the relay publishes with and subscribers read:
    /// `classic` (PUBLISH, SUBSCRIBE/PSUBSCRIBE; patterns work) or `sharded`
    /// (SPUBLISH, SSUBSCRIBE; exact topics only; Redis Cluster only).
    pub pubsub: PubSubMode,
}

/// `redis.pubsub` (`HERALD_REDIS_PUBSUB`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PubSubMode {
    /// PUBLISH and SUBSCRIBE/PSUBSCRIBE: in a cluster every node carries
    /// every message.
    #[default]
    Classic,
    /// SPUBLISH and SSUBSCRIBE: a message stays in the shard that owns its
    /// channel's slot; exact channels only.
    Sharded,
}

impl std::fmt::Display for PubSubMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PubSubMode::Classic => "classic",
            PubSubMode::Sharded => "sharded",
        })
    }
}

/// Where `redis_url` points: what [`RedisTarget::parse`] makes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://`, `rediss://`, `unix://`): the URL as given.
    Single(String),
    /// A Redis Cluster (`redis+cluster://h1:7000,h2:7001`): one
    /// `redis://` (or `rediss://`) URL per seed node, credentials and query
    /// included.
    Cluster { nodes: Vec<String> },
    /// A primary found through Sentinel
    /// (`redis+sentinel://s1:26379,s2:26379/mymaster`).
    Sentinel {
        /// One `redis://` URL per sentinel (no credentials).
        sentinels: Vec<String>,
        /// The master name the sentinels monitor.
        master: String,
        /// Credentials for the primary (from the URL's user info).
        username: Option<String>,
        password: Option<String>,
        db: i64,
        tls: bool,
    },
}

const REDIS_URL_SETTING: &str = "redis_url (REDIS_URL)";

impl RedisTarget {
    /// Parse `redis_url`. Errors name the setting and what is wrong.
    pub fn parse(raw: &str) -> Result<RedisTarget> {
        let bad = |reason: String| Error::Url {
            setting: REDIS_URL_SETTING,
            reason: format!("{reason}: {}", mask_url(raw)),
        };
        let Some((scheme, rest)) = raw.split_once("://") else {
            return Err(bad("not a URL (no scheme://)".into()));
        };
        let scheme = scheme.to_ascii_lowercase();
        let (tls, kind) = match scheme.as_str() {
            "redis+cluster" => (false, "cluster"),
            "rediss+cluster" => (true, "cluster"),
            "redis+sentinel" => (false, "sentinel"),
            "rediss+sentinel" => (true, "sentinel"),
            "redis" | "rediss" | "unix" | "redis+unix" => {
                let url = url::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
                if url.scheme().starts_with("redis") && url.host_str().unwrap_or("").is_empty() {
                    return Err(bad("no host".into()));
                }
                return Ok(RedisTarget::Single(raw.to_string()));
            }
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://"
                )))
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let default_port = if kind == "cluster" { 6379 } else { 26379 };
        let mut addrs = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            if host.is_empty() {
                return Err(bad(format!(
                    "an empty {kind} node address (list them as host:port,host:port)"
                )));
            }
            let (name, port) = split_host_port(host).map_err(bad)?;
            addrs.push(format!("{name}:{}", port.unwrap_or(default_port)));
        }
        let node_scheme = if tls { "rediss" } else { "redis" };
        if kind == "cluster" {
            if !path.trim_matches('/').is_empty() && path.trim_matches('/') != "0" {
                return Err(bad(format!(
                    "a cluster has database 0 only, but the URL names /{path}"
                )));
            }
            let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let query = query.map(|q| format!("/?{q}")).unwrap_or_default();
            let nodes = addrs
                .iter()
                .map(|a| format!("{node_scheme}://{userinfo}{a}{query}"))
                .collect();
            return Ok(RedisTarget::Cluster { nodes });
        }
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let Some(master) = parts.next() else {
            return Err(bad(
                "no master name: give it as the path, e.g. redis+sentinel://s1:26379,s2:26379/mymaster"
                    .into(),
            ));
        };
        let db = match parts.next() {
            None => 0,
            Some(db) => db.parse::<i64>().map_err(|_| {
                bad(format!(
                    "database {db:?} after the master name is not a number"
                ))
            })?,
        };
        let decode = percent_decode;
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(decode(user)).filter(|u| !u.is_empty()),
                    Some(decode(pass)),
                ),
                None => (Some(decode(u)).filter(|u| !u.is_empty()), None),
            },
        };
        Ok(RedisTarget::Sentinel {
            sentinels: addrs.iter().map(|a| format!("redis://{a}")).collect(),
            master: decode(master),
            username,
            password,
            db,
            tls,
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster { .. })
    }
}

/// `%XX` escapes of a URL part decoded (anything else kept as it is).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host:port`, `host` or `[v6]:port`.
fn split_host_port(host: &str) -> std::result::Result<(String, Option<u16>), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return Err(format!("{host:?} opens '[' without closing it"));
        };
        (format!("[{v6}]"), after.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name.to_string(), Some(port)),
            None => (host.to_string(), None),
        }
    };
    if name.is_empty() || name == "[]" {
        return Err(format!("{host:?} has no host name"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} of {host:?} is not a port number"))?,
        ),
    };
    Ok((name, port))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Most events claimed and published in one transaction.
    pub batch_size: usize,
    /// Most bytes of envelopes in one pipelined PUBLISH round trip; a batch
    /// holding more goes out in several, and the next claims take fewer
    /// events. An event larger than this still goes, alone.
    pub batch_bytes: usize,
    /// Batches a relay process drains at the same time (each on its own
    /// partitions).
    pub concurrency: usize,
    /// Most partitions one batch takes at once.
    pub partitions_per_batch: usize,
    /// Safety sweep when no notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Failed publish attempts after which an event becomes a dead letter.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// The maintenance leader VACUUMs `herald.outbox` once it gained this
    /// many dead rows since its last VACUUM (checked every
    /// `maintenance.vacuum_interval`); 0 leaves it to autovacuum alone.
    pub vacuum_after: u64,
    /// Keep published events in `herald.outbox_archive` this long; unset
    /// deletes them on publish.
    #[serde(with = "humantime_serde")]
    pub retain_published: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Queues this process works, each `name` or `name=concurrency`.
    pub queues: Vec<String>,
    /// Tasks run at once per queue, unless the queue names its own.
    pub concurrency: usize,
    /// Most tasks claimed in one statement.
    pub batch_size: usize,
    /// How long a claim holds a task; extended every `heartbeat_interval`
    /// while the handler runs. A task whose lease expired is rescued (its
    /// worker died or lost Postgres).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often the leases of running tasks are extended; unset is a third
    /// of `lease`. Two intervals and `lease_margin` must fit in `lease`, so
    /// that one failed heartbeat costs nothing.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// A worker stops a handler whose lease it has not renewed within
    /// `lease - lease_margin` of the last renewal it sent, so the handler has
    /// stopped before any other worker may rescue the task; unset is a tenth
    /// of `lease`.
    #[serde(with = "humantime_serde")]
    pub lease_margin: Option<Duration>,
    /// Longest a task may run when neither the task (`timeout`) nor its kind
    /// (`KindOptions::timeout`) sets a limit; then it fails as timed out and
    /// its slot is freed.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// Safety poll when no notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often the maintenance leader looks for expired leases, unless
    /// `maintenance.rescue_interval` is set.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// On SIGTERM, how long tasks in flight may take before they are
    /// cancelled and handed back to the queue.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Keep succeeded tasks (state `succeeded`) this long; unset deletes
    /// them at once. Cancelled tasks are kept this long, or a day.
    #[serde(with = "humantime_serde")]
    pub retain_completed: Option<Duration>,
    /// First retry delay; doubles with every attempt, with ±20 % jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// The maintenance leader VACUUMs `herald.tasks` once it gained this
    /// many dead rows since its last VACUUM (checked every
    /// `maintenance.vacuum_interval`); 0 leaves it to autovacuum alone.
    pub vacuum_after: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Whether `herald run` runs the scheduler (`herald scheduler` always does).
    pub enabled: bool,
    /// Safety poll: the longest a scheduler sleeps without looking at the
    /// table, whatever the next tick (NOTIFY wakes it sooner).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A tick more than this late when a scheduler gets to it was missed and
    /// follows its schedule's misfire policy.
    #[serde(with = "humantime_serde")]
    pub misfire_grace: Duration,
    /// …or more than this fraction of the schedule's period late, when that
    /// is longer (0.1: a daily tick has 2.4 h, an hourly one 6 min), so an
    /// outage of seconds never drops a daily tick. 0 leaves the fixed grace.
    pub misfire_grace_fraction: f64,
    /// Most missed ticks one catch-up of a `misfire = "all"` schedule fires
    /// (the latest ones).
    pub max_backfill: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            enabled: true,
            poll_interval: Duration::from_secs(30),
            misfire_grace: Duration::from_secs(5),
            misfire_grace_fraction: 0.1,
            max_backfill: 100,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            queues: vec!["default".into()],
            concurrency: 10,
            batch_size: 500,
            lease: Duration::from_secs(30),
            heartbeat_interval: None,
            lease_margin: None,
            task_timeout: Duration::from_secs(90 * 60),
            poll_interval: Duration::from_secs(5),
            rescue_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(25),
            retain_completed: None,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(3600),
            vacuum_after: 2000,
        }
    }
}

impl WorkerConfig {
    /// `heartbeat_interval`, or a third of the lease.
    pub fn heartbeat_every(&self) -> Duration {
        self.heartbeat_interval
            .unwrap_or((self.lease / 3).max(Duration::from_millis(100)))
    }

    /// `lease_margin`, or a tenth of the lease.
    pub fn lease_safety_margin(&self) -> Duration {
        self.lease_margin.unwrap_or(self.lease / 10)
    }

    /// Settings of the worker that cannot work together.
    pub fn validate(&self) -> Result<()> {
        let every = self.heartbeat_every();
        let margin = self.lease_safety_margin();
        if every.is_zero() {
            return Err(Error::Config(
                "worker.heartbeat_interval must be more than 0".into(),
            ));
        }
        // A renewal may fail once (a dropped connection) without the local
        // deadline stopping healthy handlers.
        if every * 2 + margin > self.lease {
            return Err(Error::Config(format!(
                "worker.heartbeat_interval ({every:?}) twice plus worker.lease_margin ({margin:?}) \
                 must fit in worker.lease ({:?}): handlers would be stopped after a single \
                 failed heartbeat; shorten the interval or the margin, or lengthen the lease",
                self.lease
            )));
        }
        if self.task_timeout.is_zero() {
            return Err(Error::Config(
                "worker.task_timeout must be more than 0 (e.g. 90m)".into(),
            ));
        }
        Ok(())
    }

    /// `(queue, concurrency)` pairs from `queues`.
    pub fn queue_concurrency(&self) -> Vec<(String, usize)> {
        self.queues
            .iter()
            .map(|q| match q.split_once('=') {
                Some((name, n)) => (
                    name.trim().to_string(),
                    n.trim().parse().unwrap_or(self.concurrency),
                ),
                None => (q.trim().to_string(), self.concurrency),
            })
            .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/herald".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            channel_prefix: "herald:".into(),
            max_payload_bytes: 1024 * 1024,
            partitions: 16,
            migrate_on_start: true,
            log_format: LogFormat::Pretty,
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            relay: RelayConfig::default(),
            worker: WorkerConfig::default(),
            scheduler: SchedulerConfig::default(),
            schedules: Vec::new(),
            admin: AdminConfig::default(),
            nodes: NodesConfig::default(),
            maintenance: MaintenanceConfig::default(),
            catalog: CatalogConfig::default(),
            events: Vec::new(),
            subscriptions: Vec::new(),
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            listen_check: ListenCheck::Fail,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            subscriber_buffer: DEFAULT_SUBSCRIBER_BUFFER,
            pubsub: PubSubMode::Classic,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            batch_bytes: 4 * 1024 * 1024,
            concurrency: 2,
            partitions_per_batch: 4,
            poll_interval: Duration::from_secs(5),
            max_attempts: 1000,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            vacuum_after: 2000,
            retain_published: None,
        }
    }
}

/// `[admin]`: the HTTP server for `/metrics`, `/healthz`, `/readyz` and the
/// dashboard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether `herald run` serves it (`herald admin` always does).
    pub enabled: bool,
    /// Address to listen on. Anything but loopback requires `token`.
    pub bind: String,
    /// Bearer token required on every request (`HERALD_ADMIN_TOKEN`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Disable every action (replay, purge, pause, …); pages stay readable.
    pub read_only: bool,
    /// Reverse proxies (IP addresses or CIDR networks) whose
    /// `X-Forwarded-Proto` and `X-Forwarded-For` headers are believed: the
    /// first marks the session cookie `Secure`, the second names the client
    /// the sign-in limit counts. Empty: both headers are ignored.
    pub trusted_proxies: Vec<String>,
    /// Failed sign-ins (wrong `/login` token or wrong bearer token) one
    /// client address may make within `login_window`; past it every attempt
    /// from that address, right or wrong, answers 429 until the oldest
    /// failure leaves the window.
    pub login_max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: "127.0.0.1:9187".into(),
            token: None,
            read_only: false,
            trusted_proxies: Vec::new(),
            login_max_failures: 5,
            login_window: Duration::from_secs(300),
        }
    }
}

impl AdminConfig {
    /// The token, when one is set and not empty: an empty
    /// `HERALD_ADMIN_TOKEN` (as compose files pass on) means none.
    pub fn active_token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }

    /// `trusted_proxies` parsed; an entry that is neither an address nor a
    /// network is named.
    pub fn trusted_networks(&self) -> Result<Vec<ipnet::IpNet>> {
        self.trusted_proxies
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        Error::Config(format!(
                            "admin.trusted_proxies: {entry:?} is neither an IP address nor a \
                             network (e.g. 10.0.0.5 or 10.0.0.0/8)"
                        ))
                    })
            })
            .collect()
    }
}

/// `[nodes]`: every relay, worker, scheduler and admin process registers in
/// `herald.nodes` and heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodesConfig {
    /// How often a process refreshes its row (and, unless
    /// `maintenance.node_expiry_interval` is set, how often the maintenance
    /// leader expires dead ones).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node that missed this many heartbeats is considered dead and its
    /// row is deleted by the maintenance leader.
    pub missed_heartbeats: u32,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
        }
    }
}

/// `[maintenance]`: the upkeep one elected process runs for the whole
/// database (every process campaigns; see `src/maintenance/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// How often a process that is not the leader tries to become it, and
    /// the leader checks that its session still answers.
    #[serde(with = "humantime_serde")]
    pub leader_retry: Duration,
    /// How often expired leases are rescued; unset is
    /// `worker.rescue_interval`.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Option<Duration>,
    /// How often finished tasks past `worker.retain_completed` are removed.
    #[serde(with = "humantime_serde")]
    pub clean_interval: Duration,
    /// How often the archive's partitions are created and dropped (only
    /// while `relay.retain_published` is set).
    #[serde(with = "humantime_serde")]
    pub archive_interval: Duration,
    /// How often the rows of dead nodes are deleted; unset is
    /// `nodes.heartbeat_interval`.
    #[serde(with = "humantime_serde")]
    pub node_expiry_interval: Option<Duration>,
    /// How often `herald.processed_events` past its retention are deleted.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Keep durable subscribers' idempotency records this long; longer than
    /// any event can be redelivered.
    #[serde(with = "humantime_serde")]
    pub processed_events_retention: Duration,
    /// How often the dead rows of `herald.outbox` and `herald.tasks` are
    /// compared with `relay.vacuum_after` and `worker.vacuum_after`.
    #[serde(with = "humantime_serde")]
    pub vacuum_interval: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            leader_retry: Duration::from_secs(2),
            rescue_interval: None,
            clean_interval: Duration::from_secs(60),
            archive_interval: Duration::from_secs(600),
            node_expiry_interval: None,
            retention_interval: Duration::from_secs(3600),
            processed_events_retention: Duration::from_secs(30 * 86400),
            vacuum_interval: Duration::from_secs(1),
        }
    }
}

impl MaintenanceConfig {
    /// Every interval must be more than 0 (a zero one would spin).
    pub fn validate(&self) -> Result<()> {
        let intervals = [
            ("maintenance.leader_retry", Some(self.leader_retry)),
            ("maintenance.rescue_interval", self.rescue_interval),
            ("maintenance.clean_interval", Some(self.clean_interval)),
            ("maintenance.archive_interval", Some(self.archive_interval)),
            (
                "maintenance.node_expiry_interval",
                self.node_expiry_interval,
            ),
            (
                "maintenance.retention_interval",
                Some(self.retention_interval),
            ),
            (
                "maintenance.processed_events_retention",
                Some(self.processed_events_retention),
            ),
            ("maintenance.vacuum_interval", Some(self.vacuum_interval)),
        ];
        for (name, value) in intervals {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(Error::Config(format!("{name} must be more than 0")));
            }
        }
        Ok(())
    }
}

/// `HERALD_<prefix>*` variables that are not settings.
const RESERVED_ENV_PREFIXES: [&str; 3] = ["test_", "dev_", "ci_"];

/// Sections whose keys the environment spells `HERALD_<SECTION>_<KEY>`.
const SECTIONS: [&str; 9] = [
    "postgres",
    "redis",
    "relay",
    "worker",
    "scheduler",
    "catalog",
    "admin",
    "nodes",
    "maintenance",
];

impl Config {
    /// Defaults, then the TOML file (`path`, else `HERALD_CONFIG` when set),
    /// then the environment, unchecked: [`Config::load`] also validates.
    pub fn from_sources(path: Option<&Path>) -> Result<Config> {
        let path: Option<PathBuf> = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("HERALD_CONFIG").map(PathBuf::from));
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &path {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(Env::raw().only(&["database_url", "redis_url"]))
            .merge(
                Env::prefixed("HERALD_")
                    .ignore(&["config"])
                    // HERALD_TEST_*, HERALD_DEV_* and HERALD_CI_* belong to the
                    // test suite and the scripts, not to the daemon.
                    .filter(|key| {
                        let key = key.as_str().to_ascii_lowercase();
                        !RESERVED_ENV_PREFIXES.iter().any(|p| key.starts_with(p))
                    })
                    .map(|key| {
                        // Keys keep the environment's case until figment
                        // lowercases them after this mapping.
                        let key = key.as_str().to_ascii_lowercase();
                        if key == "database_url" || key == "redis_url" {
                            return key.into();
                        }
                        for section in SECTIONS {
                            if let Some(rest) =
                                key.strip_prefix(section).and_then(|r| r.strip_prefix('_'))
                            {
                                return format!("{section}.{rest}").into();
                            }
                        }
                        key.into()
                    }),
            )
            .extract()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(config)
    }

    /// Reject settings that cannot work, naming the setting: each setting
    /// on its own. [`Config::validate`] adds what needs the modules they
    /// configure (catalog, subscriptions, schedules, names).
    pub fn check_settings(&self) -> Result<()> {
        self.admin
            .bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| {
                Error::Config(format!(
                    "admin.bind {:?} is not an address:port (e.g. 127.0.0.1:9187): {e}",
                    self.admin.bind
                ))
            })?;
        self.admin.trusted_networks()?;
        if self.admin.login_max_failures == 0 {
            return Err(Error::Config(
                "admin.login_max_failures must be at least 1 (e.g. 5)".into(),
            ));
        }
        if self.admin.login_window.is_zero() {
            return Err(Error::Config(
                "admin.login_window must be more than 0 (e.g. 5m)".into(),
            ));
        }
        if self.nodes.heartbeat_interval.is_zero() {
            return Err(Error::Config(
                "nodes.heartbeat_interval must be more than 0 (e.g. 10s)".into(),
            ));
        }
        if self.nodes.missed_heartbeats == 0 {
            return Err(Error::Config(
                "nodes.missed_heartbeats must be at least 1 (e.g. 3)".into(),
            ));
        }
        self.maintenance.validate()?;
        let url = url::Url::parse(&self.database_url).map_err(|e| Error::Url {
            setting: "database_url (DATABASE_URL)",
            reason: format!("{e}: {}", mask_url(&self.database_url)),
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(Error::Url {
                setting: "database_url (DATABASE_URL)",
                reason: format!(
                    "scheme {:?} is not postgres:// or postgresql://",
                    url.scheme()
                ),
            });
        }
        let target = RedisTarget::parse(&self.redis_url)?;
        if self.redis.pubsub == PubSubMode::Sharded && !target.is_cluster() {
            return Err(Error::Config(format!(
                "redis.pubsub (HERALD_REDIS_PUBSUB) is \"sharded\", which needs a Redis Cluster, but redis_url is {}: use a redis+cluster:// URL or redis.pubsub = \"classic\"",
                mask_url(&self.redis_url)
            )));
        }
        let positive = [
            ("max_payload_bytes", self.max_payload_bytes),
            ("postgres.pool_size", self.postgres.pool_size),
            ("redis.pool_size", self.redis.pool_size),
            ("redis.subscriber_buffer", self.redis.subscriber_buffer),
            ("relay.batch_size", self.relay.batch_size),
            ("relay.batch_bytes", self.relay.batch_bytes),
            ("relay.concurrency", self.relay.concurrency),
            (
                "relay.partitions_per_batch",
                self.relay.partitions_per_batch,
            ),
            ("worker.concurrency", self.worker.concurrency),
            ("worker.batch_size", self.worker.batch_size),
            ("scheduler.max_backfill", self.scheduler.max_backfill),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be at least 1")));
            }
        }
        if self.redis.subscriber_buffer > MAX_SUBSCRIBER_BUFFER {
            return Err(Error::Config(format!(
                "redis.subscriber_buffer must be at most {}, got {}",
                MAX_SUBSCRIBER_BUFFER, self.redis.subscriber_buffer
            )));
        }
        if self.partitions == 0 || self.partitions > 1024 {
            return Err(Error::Config(format!(
                "partitions must be between 1 and 1024, got {}",
                self.partitions
            )));
        }
        if self.max_payload_bytes > i32::MAX as usize {
            return Err(Error::Config(format!(
                "max_payload_bytes must be below {}, got {}",
                i32::MAX,
                self.max_payload_bytes
            )));
        }
        if self.relay.max_attempts == 0 {
            return Err(Error::Config(
                "relay.max_attempts must be at least 1".into(),
            ));
        }
        if self.relay.backoff_min > self.relay.backoff_max {
            return Err(Error::Config(format!(
                "relay.backoff_min ({:?}) is larger than relay.backoff_max ({:?})",
                self.relay.backoff_min, self.relay.backoff_max
            )));
        }
        if self.worker.queues.is_empty() {
            return Err(Error::Config(
                "worker.queues must name at least one queue".into(),
            ));
        }
        if self.worker.lease < Duration::from_millis(300) {
            return Err(Error::Config(format!(
                "worker.lease must be at least 300ms, got {:?}",
                self.worker.lease
            )));
        }
        if !(0.0..=1.0).contains(&self.scheduler.misfire_grace_fraction) {
            return Err(Error::Config(format!(
                "scheduler.misfire_grace_fraction must be between 0 and 1, got {}",
                self.scheduler.misfire_grace_fraction
            )));
        }
        self.worker.validate()?;
        if self.scheduler.poll_interval < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "scheduler.poll_interval must be at least 100ms, got {:?}",
                self.scheduler.poll_interval
            )));
        }
        if self
            .channel_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::Config(format!(
                "channel_prefix {:?} must not contain whitespace or control characters",
                self.channel_prefix
            )));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with passwords masked.
    pub fn to_masked_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = mask_url(&self.database_url);
        shown.redis_url = mask_url(&self.redis_url);
        if shown.admin.token.is_some() {
            shown.admin.token = Some("****".into());
        }
        for sub in &mut shown.subscriptions {
            if sub.secret.is_some() {
                sub.secret = Some("****".into());
            }
            if let Some(url) = &sub.webhook {
                sub.webhook = Some(mask_url(url));
            }
        }
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Replace the password of a URL, and the value of every query parameter
/// that may hold a secret (`?password=`, `sslpassword`, `token`, `secret`,
/// `api_key`, …), with `****`; leave anything unparsable as
/// `<unparsable URL>` so that a secret never reaches a log.
pub fn mask_url(raw: &str) -> String {
    let lower = raw.to_ascii_lowercase();
    if lower.contains("+cluster://") || lower.contains("+sentinel://") {
        // Host lists are no URL for the url crate: mask the user info by hand.
        let (scheme, rest) = raw.split_once("://").unwrap_or(("", raw));
        let rest = rest.split_once('?').map(|(r, _)| r).unwrap_or(rest);
        return match rest.rsplit_once('@') {
            Some((user, hosts)) => match user.split_once(':') {
                Some((name, _)) => format!("{scheme}://{name}:****@{hosts}"),
                None => format!("{scheme}://{user}@{hosts}"),
            },
            None => format!("{scheme}://{rest}"),
        };
    }
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            if url.query().is_some() {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret_param(&k) {
                            "****".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

/// Query parameter names whose values are (or may be) secrets.
fn secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "sig",
    ]
    .iter()
    .any(|s| name.contains(s))
}

// ---------------------------------------------------------------------------
// Defaults and limits the modules that use them re-export.

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;
/// Default of `Subscriber::buffer` and `redis.subscriber_buffer`.
pub const DEFAULT_SUBSCRIBER_BUFFER: usize = 10_000;
/// Largest `Subscriber::buffer` (and `redis.subscriber_buffer`).
pub const MAX_SUBSCRIBER_BUFFER: usize = 1 << 24;

// ---------------------------------------------------------------------------
// `[catalog]`, `[[events]]` and `[[subscriptions]]`: their data; what they
// mean is in `events` and `subscriptions`.

/// How an event travels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Through the outbox: at least once to Redis and to every durable
    /// subscription, only if the producer's transaction commits.
    #[default]
    Durable,
    /// Straight to Redis pub/sub, now, whatever the transaction does: best
    /// effort, lowest latency (metrics, presence, notifications).
    FireAndForget,
}

/// One `[[events]]` entry of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventType {
    /// The topic, e.g. `payment.captured`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_version")]
    pub version: u32,
    /// The payload's JSON Schema (draft 2020-12 unless `$schema` says
    /// otherwise), inline…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// …or in a file (relative paths: to the working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_file: Option<PathBuf>,
    #[serde(default)]
    pub delivery: DeliveryMode,
}

fn default_version() -> u32 {
    1
}

/// `[catalog]` settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// Refuse events whose topic is not declared in `[[events]]`.
    pub strict: bool,
}

/// A durable subscription, as declared in `[[subscriptions]]`, by the API or
/// the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Unique name: letters, digits, `.`, `_`, `-`, `:`.
    pub name: String,
    /// A topic or a glob: `payment.*`, `*`.
    pub pattern: String,
    /// The task kind each matching event becomes. Default: `sub:<name>`, the
    /// kind `Registry::subscribe_durable` registers; `herald.webhook` when
    /// `webhook` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// POST each event to this URL (the `herald.webhook` kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// HMAC-SHA256 key for the webhook's signature header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default = "default_queue")]
    pub queue: String,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// Per-attempt timeout of the subscription's tasks (e.g. `30s`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_queue() -> String {
    DEFAULT_QUEUE.into()
}
fn default_max_attempts() -> i32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_enabled() -> bool {
    true
}

// ---------------------------------------------------------------------------
// `[[schedules]]`: their data; parsing, planning and firing are in `cron`.

/// What to do with ticks that passed while no scheduler ran (more than
/// `scheduler.misfire_grace`, or `scheduler.misfire_grace_fraction` of the
/// schedule's period when that is longer, late when a scheduler gets to
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Fire nothing for them; continue with the next future tick.
    #[default]
    Skip,
    /// Fire one task, for the latest of them.
    Once,
    /// Fire every one of them (the latest `scheduler.max_backfill`), flagged
    /// `herald_backfilled`.
    All,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::Once => "once",
            Misfire::All => "all",
        }
    }
}

impl fmt::Display for Misfire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Misfire {
    type Err = Error;

    fn from_str(s: &str) -> Result<Misfire> {
        match s {
            "skip" => Ok(Misfire::Skip),
            "once" => Ok(Misfire::Once),
            "all" => Ok(Misfire::All),
            other => Err(Error::InvalidSchedule(format!(
                "unknown misfire policy {other:?}: expected skip, once or all"
            ))),
        }
    }
}

impl Serialize for Misfire {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Misfire {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Misfire, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_schedule_tz() -> String {
    "UTC".into()
}
fn default_schedule_queue() -> String {
    DEFAULT_QUEUE.into()
}
fn default_schedule_payload() -> Value {
    Value::Object(Map::new())
}
fn default_schedule_max_attempts() -> i32 {
    DEFAULT_MAX_ATTEMPTS
}

/// A schedule as declared: in `[[schedules]]` of the configuration, in code
/// (next to the handler registration) or from the CLI.
///
/// ```no_run
/// # async fn demo(client: &tokio_postgres::Client) -> herald::Result<()> {
/// use herald::cron::{Misfire, Schedule};
/// let nightly = Schedule::new("nightly-report", "30 2 * * *", "report.build", &serde_json::json!({}))?
///     .tz("Europe/Berlin")
///     .misfire(Misfire::Once);
/// herald::cron::upsert(client, &nightly).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Unique name: letters, digits, `.`, `_`, `-`, `:` (at most 200).
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds first.
    pub cron: String,
    /// Task kind the schedule enqueues.
    pub kind: String,
    /// The task's payload.
    #[serde(default = "default_schedule_payload")]
    pub payload: Value,
    /// IANA time zone the expression is read in.
    #[serde(default = "default_schedule_tz")]
    pub tz: String,
    #[serde(default = "default_schedule_queue")]
    pub queue: String,
    #[serde(default)]
    pub misfire: Misfire,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "default_schedule_max_attempts")]
    pub max_attempts: i32,
    /// `Some(false)` pauses it; unset leaves an existing schedule as it is
    /// (a new one starts enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}
