//! Configuration: defaults, overlaid by an optional TOML file, overlaid by the
//! environment (`DATABASE_URL`, `REDIS_URL`, `HERALD_*`). Owns loading,
//! validating and printing settings; it never opens a connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

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
    pub schedules: Vec<crate::cron::Schedule>,
    pub admin: AdminConfig,
    pub nodes: NodesConfig,
    pub maintenance: MaintenanceConfig,
    pub catalog: crate::events::CatalogConfig,
    /// The event catalog (`[[events]]`): declared topics, their payload
    /// schemas and delivery modes.
    pub events: Vec<crate::events::EventType>,
    /// Durable subscriptions declared here (`[[subscriptions]]`), synced to
    /// `herald.subscriptions` when `herald run` / `herald relay` start.
    pub subscriptions: Vec<crate::subscriptions::Subscription>,
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
            catalog: crate::events::CatalogConfig::default(),
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
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            subscriber_buffer: crate::pubsub::DEFAULT_SUBSCRIBER_BUFFER,
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: "127.0.0.1:9187".into(),
            token: None,
            read_only: false,
        }
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
    /// then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config> {
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
        config.validate()?;
        Ok(config)
    }

    /// Reject settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<()> {
        self.admin
            .bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| {
                Error::Config(format!(
                    "admin.bind {:?} is not an address:port (e.g. 127.0.0.1:9187): {e}",
                    self.admin.bind
                ))
            })?;
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
        crate::events::Catalog::from_config(self)?;
        let mut names = std::collections::HashSet::new();
        for sub in &self.subscriptions {
            sub.validate()?;
            if !names.insert(sub.name.as_str()) {
                return Err(Error::Config(format!(
                    "[[subscriptions]] {:?} is declared twice",
                    sub.name
                )));
            }
        }
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
        let url = url::Url::parse(&self.redis_url).map_err(|e| Error::Url {
            setting: "redis_url (REDIS_URL)",
            reason: format!("{e}: {}", mask_url(&self.redis_url)),
        })?;
        if !matches!(url.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(Error::Url {
                setting: "redis_url (REDIS_URL)",
                reason: format!(
                    "scheme {:?} is not redis://, rediss:// or unix://",
                    url.scheme()
                ),
            });
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
        if self.redis.subscriber_buffer > crate::pubsub::MAX_SUBSCRIBER_BUFFER {
            return Err(Error::Config(format!(
                "redis.subscriber_buffer must be at most {}, got {}",
                crate::pubsub::MAX_SUBSCRIBER_BUFFER,
                self.redis.subscriber_buffer
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
        for q in &self.worker.queues {
            let (name, n) = match q.split_once('=') {
                Some((name, n)) => (name.trim(), Some(n.trim())),
                None => (q.trim(), None),
            };
            crate::queue::validate_name("queue", name, 128)
                .map_err(|e| Error::Config(format!("worker.queues: {e}")))?;
            if let Some(n) = n {
                match n.parse::<usize>() {
                    Ok(n) if n >= 1 => {}
                    _ => {
                        return Err(Error::Config(format!(
                            "worker.queues: {q:?}: the concurrency after '=' must be a whole number of at least 1"
                        )))
                    }
                }
            }
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
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.schedules.iter().enumerate() {
            s.validate().map_err(|e| {
                let msg = match e {
                    Error::InvalidSchedule(m) => m,
                    other => other.to_string(),
                };
                Error::Config(format!("schedules[{i}]: {msg}"))
            })?;
            if !names.insert(s.name.as_str()) {
                return Err(Error::Config(format!(
                    "schedules[{i}]: the name {:?} is used by another [[schedules]] entry; names must be unique",
                    s.name
                )));
            }
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

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn worker_settings_that_cannot_work_are_refused() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.worker.heartbeat_interval = Some(Duration::from_secs(14));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("worker.heartbeat_interval"), "{e}");
        c.worker.heartbeat_interval = None;
        c.worker.lease_margin = Some(Duration::from_secs(20));
        assert!(c.validate().is_err());
        c.worker.lease_margin = None;
        c.worker.task_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                channel_prefix = "file:"
                partitions = 32
                [relay]
                batch_size = 10
                retain_published = "24h"
                [redis]
                pool_size = 3
                "#,
            )?;
            jail.set_env("HERALD_CONFIG", "herald.toml");
            jail.set_env("HERALD_RELAY_BATCH_SIZE", "500");
            jail.set_env("HERALD_POSTGRES_POOL_SIZE", "4");
            jail.set_env("REDIS_URL", "rediss://:s3cret@cache.example:6380/0");
            jail.set_env("HERALD_TEST_DATABASE_URL", "ignored");
            jail.set_env("HERALD_DEV_PG_PORT", "5432");
            jail.set_env("HERALD_CI_REDIS_PORT", "6379");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.channel_prefix, "file:");
            assert_eq!(c.partitions, 32);
            assert_eq!(c.relay.batch_size, 500, "environment wins over the file");
            assert_eq!(c.relay.retain_published, Some(Duration::from_secs(86400)));
            assert_eq!(c.postgres.pool_size, 4);
            assert_eq!(c.redis.pool_size, 3);
            let shown = c.to_masked_toml();
            assert!(
                shown.contains("rediss://:****@cache.example:6380/0"),
                "{shown}"
            );
            assert!(!shown.contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn bad_settings_name_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_RELAY_BATCH_SIZE", "many");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("batch_size"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_RELAY_BACH_SIZE", "5");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("bach_size"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "mysql://db/x");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(
                err.contains("database_url") && err.contains("mysql"),
                "{err}"
            );
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_REDIS_URL", "not a url");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("redis_url"), "{err}");
            Ok(())
        });
        let err = Config::load(Some(Path::new("/nonexistent/herald.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/herald.toml"), "{err}");
    }

    #[test]
    fn schedules_and_scheduler_settings_load_from_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                [scheduler]
                max_backfill = 7
                misfire_grace = "2s"
                [[schedules]]
                name = "nightly"
                cron = "30 2 * * *"
                kind = "report.build"
                tz = "Europe/Berlin"
                misfire = "once"
                payload = { format = "pdf" }
                [[schedules]]
                name = "heartbeat"
                cron = "*/10 * * * * *"
                kind = "herald.noop"
                "#,
            )?;
            jail.set_env("HERALD_CONFIG", "herald.toml");
            jail.set_env("HERALD_SCHEDULER_POLL_INTERVAL", "10s");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.scheduler.max_backfill, 7);
            assert_eq!(c.scheduler.misfire_grace, Duration::from_secs(2));
            assert_eq!(c.scheduler.poll_interval, Duration::from_secs(10));
            assert_eq!(c.schedules.len(), 2);
            assert_eq!(c.schedules[0].misfire, crate::cron::Misfire::Once);
            assert_eq!(c.schedules[0].payload, serde_json::json!({"format": "pdf"}));
            assert_eq!(c.schedules[1].tz, "UTC");
            assert_eq!(c.schedules[1].queue, "default");
            Ok(())
        });
    }

    #[test]
    fn bad_schedules_are_rejected_quoting_the_text() {
        for (entry, needles) in [
            (
                r#"name = "a"
                cron = "61 * * * *"
                kind = "k""#,
                vec!["schedules[0]", "\"61 * * * *\"", "expected 5 fields"],
            ),
            (
                r#"name = "a"
                cron = "* * * * *"
                kind = "k"
                tz = "Europe/Bärlin""#,
                vec!["\"Europe/Bärlin\"", "IANA"],
            ),
            (
                r#"name = "a"
                cron = "* * * * *"
                kind = "k"
                misfire = "sometimes""#,
                vec!["\"sometimes\"", "skip, once or all"],
            ),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.create_file("herald.toml", &format!("[[schedules]]\n{entry}\n"))?;
                jail.set_env("HERALD_CONFIG", "herald.toml");
                let err = Config::load(None).unwrap_err().to_string();
                for n in &needles {
                    assert!(err.contains(n), "{n:?} not in {err}");
                }
                Ok(())
            });
        }
    }

    #[test]
    fn subscriber_buffer_and_grace_fraction_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_REDIS_SUBSCRIBER_BUFFER", "500");
            jail.set_env("HERALD_SCHEDULER_MISFIRE_GRACE_FRACTION", "0.25");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.subscriber_buffer, 500);
            assert_eq!(c.scheduler.misfire_grace_fraction, 0.25);
            Ok(())
        });
        for (var, value, needle) in [
            (
                "HERALD_REDIS_SUBSCRIBER_BUFFER",
                "0",
                "redis.subscriber_buffer",
            ),
            (
                "HERALD_SCHEDULER_MISFIRE_GRACE_FRACTION",
                "1.5",
                "misfire_grace_fraction",
            ),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains(needle), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn maintenance_settings_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_MAINTENANCE_LEADER_RETRY", "500ms");
            jail.set_env("HERALD_MAINTENANCE_PROCESSED_EVENTS_RETENTION", "7days");
            jail.set_env("HERALD_MAINTENANCE_RESCUE_INTERVAL", "1s");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.maintenance.leader_retry, Duration::from_millis(500));
            assert_eq!(
                c.maintenance.processed_events_retention,
                Duration::from_secs(7 * 86400)
            );
            assert_eq!(c.maintenance.rescue_interval, Some(Duration::from_secs(1)));
            assert_eq!(c.maintenance.node_expiry_interval, None);
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_MAINTENANCE_VACUUM_INTERVAL", "0s");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("maintenance.vacuum_interval must be more than 0"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn masking_hides_passwords() {
        assert_eq!(
            mask_url("postgres://app:hunter2@db:5432/app"),
            "postgres://app:****@db:5432/app"
        );
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_url("::::"), "<unparsable URL>");
        assert_eq!(
            mask_url("postgres://db/app?user=app&password=hunter2&sslmode=require"),
            "postgres://db/app?user=app&password=****&sslmode=require"
        );
    }

    fn subscription(name: &str, pattern: &str) -> crate::subscriptions::Subscription {
        serde_json::from_value(serde_json::json!({"name": name, "pattern": pattern}))
            .expect("a subscription")
    }

    /// `validate` refuses each setting that cannot work with a message that
    /// names the setting and the value it got.
    #[test]
    fn each_unworkable_setting_is_refused_by_name() {
        type Tweak = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Tweak, Vec<&str>)> = vec![
            (
                Box::new(|c: &mut Config| c.admin.bind = "localhost".into()),
                vec!["admin.bind \"localhost\" is not an address:port (e.g. 127.0.0.1:9187)"],
            ),
            (
                Box::new(|c: &mut Config| c.nodes.heartbeat_interval = Duration::ZERO),
                vec!["nodes.heartbeat_interval must be more than 0"],
            ),
            (
                Box::new(|c: &mut Config| c.nodes.missed_heartbeats = 0),
                vec!["nodes.missed_heartbeats must be at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.subscriptions = vec![subscription("s1", "a b")]),
                vec!["subscription \"s1\"", "pattern \"a b\" is not a topic or a glob"],
            ),
            (
                Box::new(|c: &mut Config| {
                    c.subscriptions = vec![subscription("s1", "a.*"), subscription("s1", "b.*")]
                }),
                vec!["[[subscriptions]] \"s1\" is declared twice"],
            ),
            (
                Box::new(|c: &mut Config| {
                    c.redis.subscriber_buffer = crate::pubsub::MAX_SUBSCRIBER_BUFFER + 1
                }),
                vec!["redis.subscriber_buffer must be at most 16777216, got 16777217"],
            ),
            (
                Box::new(|c: &mut Config| c.partitions = 0),
                vec!["partitions must be between 1 and 1024, got 0"],
            ),
            (
                Box::new(|c: &mut Config| c.partitions = 1025),
                vec!["partitions must be between 1 and 1024, got 1025"],
            ),
            (
                Box::new(|c: &mut Config| c.max_payload_bytes = i32::MAX as usize + 1),
                vec!["max_payload_bytes must be below 2147483647, got 2147483648"],
            ),
            (
                Box::new(|c: &mut Config| c.relay.max_attempts = 0),
                vec!["relay.max_attempts must be at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.relay.backoff_min = Duration::from_secs(20)),
                vec!["relay.backoff_min (20s) is larger than relay.backoff_max (10s)"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues.clear()),
                vec!["worker.queues must name at least one queue"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["default".into(), "mail=0".into()]),
                vec!["worker.queues: \"mail=0\": the concurrency after '=' must be a whole number of at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["mail=four".into()]),
                vec!["worker.queues: \"mail=four\": the concurrency after '='"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["bad name".into()]),
                vec!["worker.queues:", "queue \"bad name\": only letters"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.lease = Duration::from_millis(200)),
                vec!["worker.lease must be at least 300ms, got 200ms"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.heartbeat_interval = Some(Duration::ZERO)),
                vec!["worker.heartbeat_interval must be more than 0"],
            ),
            (
                Box::new(|c: &mut Config| c.scheduler.poll_interval = Duration::from_millis(50)),
                vec!["scheduler.poll_interval must be at least 100ms, got 50ms"],
            ),
            (
                Box::new(|c: &mut Config| {
                    let nightly =
                        crate::cron::Schedule::new("nightly", "0 2 * * *", "report.build", &())
                            .expect("a schedule");
                    c.schedules = vec![nightly.clone(), nightly];
                }),
                vec!["schedules[1]: the name \"nightly\" is used by another [[schedules]] entry"],
            ),
            (
                Box::new(|c: &mut Config| c.channel_prefix = "herald :".into()),
                vec!["channel_prefix \"herald :\" must not contain whitespace or control characters"],
            ),
            (
                Box::new(|c: &mut Config| c.channel_prefix = "herald\u{7}".into()),
                vec!["must not contain whitespace or control characters"],
            ),
        ];
        for (tweak, needles) in cases {
            let mut c = Config::default();
            tweak(&mut c);
            let err = c.validate().expect_err(&format!("{needles:?} accepted"));
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            let err = err.to_string();
            assert!(err.starts_with("invalid configuration: "), "{err}");
            for n in &needles {
                assert!(err.contains(n), "{n:?} not in {err}");
            }
        }
    }

    #[test]
    fn queue_concurrency_may_be_set_per_queue() {
        let mut c = Config::default();
        c.worker.concurrency = 3;
        c.worker.queues = vec!["default".into(), " mail = 4 ".into()];
        assert!(c.validate().is_ok());
        assert_eq!(
            c.worker.queue_concurrency(),
            vec![("default".to_string(), 3), ("mail".to_string(), 4)]
        );
    }

    /// A URL that does not parse is refused without echoing it: it may hold
    /// a password.
    #[test]
    fn unparsable_urls_are_refused_without_their_password() {
        let mut c = Config {
            database_url: "postgres://app:hunter2@db:port/app".into(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("invalid URL in database_url (DATABASE_URL)")
                && err.contains("<unparsable URL>"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        c.database_url = Config::default().database_url;
        c.redis_url = "redis://:s3cret@cache:99999".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("invalid URL in redis_url (REDIS_URL)")
                && err.contains("<unparsable URL>"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        c.redis_url = "http://cache:6379".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("scheme \"http\" is not redis://"), "{err}");
    }

    /// A webhook URL that does not parse is refused without echoing it: its
    /// user info or query may hold a credential.
    #[test]
    fn an_unparsable_webhook_url_is_refused_without_its_credential() {
        let mut hook = subscription("billing", "payment.*");
        hook.webhook = Some("https://hook:wh-s3cret@hooks.example:99999/in".into());
        hook.secret = Some("key".into());
        let c = Config {
            subscriptions: vec![hook],
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("subscription \"billing\"") && err.contains("is not a URL"),
            "{err}"
        );
        assert!(!err.contains("wh-s3cret"), "{err}");
    }

    /// `herald config` prints this: every secret masked, and what is left is
    /// still a configuration file that loads.
    #[test]
    fn the_masked_toml_hides_every_secret_and_still_loads() {
        let mut hook = subscription("billing", "payment.*");
        hook.webhook = Some("https://hooks.example/in?token=abc123&v=1".into());
        hook.secret = Some("wh-s3cret".into());
        let plain = subscription("audit", "*");
        let c = Config {
            database_url: "postgres://app:hunter2@db:5432/app".into(),
            admin: AdminConfig {
                token: Some("adm1n-token".into()),
                ..AdminConfig::default()
            },
            subscriptions: vec![hook, plain],
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        let shown = c.to_masked_toml();
        for secret in ["hunter2", "adm1n-token", "wh-s3cret", "abc123"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://app:****@db:5432/app"), "{shown}");
        assert!(shown.contains("token = \"****\""), "{shown}");
        assert!(shown.contains("secret = \"****\""), "{shown}");
        assert!(
            shown.contains("https://hooks.example/in?token=****&v=1"),
            "{shown}"
        );
        let back: Config = toml::from_str(&shown).expect("the printed configuration loads");
        assert_eq!(back.subscriptions.len(), 2);
        assert_eq!(back.subscriptions[1].secret, None, "none was added");
        assert_eq!(back.subscriptions[1].webhook, None);
        assert_eq!(back.admin.bind, c.admin.bind);
        assert_eq!(back.partitions, c.partitions);
        assert_eq!(back.worker, c.worker);
        assert_eq!(back.relay, c.relay);
    }
}
