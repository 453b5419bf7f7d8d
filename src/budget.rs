//! Connection budgets: how many Postgres and Redis connections one Herald
//! process may hold at once, role by role, for a [`Config`] and the
//! services it runs; and the rules a configuration must meet so that no
//! service waits for a pooled connection it always needs.
//!
//! It is the one place that counts connections: when a service starts
//! holding another one, its line here changes with it. It reads the
//! configuration only and never opens, tests or inspects a connection
//! (how connections are made is `db`'s and `pubsub`'s business).
//!
//! ```
//! use herald::budget::{Budget, Services};
//! let config = herald::Config::default();
//! let budget = Budget::of(&config, Services::run(&config));
//! budget.check().unwrap();
//! assert!(budget.postgres >= config.postgres.pool_size);
//! ```

use serde::Serialize;

use crate::config::{Config, RedisTarget};
use crate::error::{Error, Result};

/// How a Cluster or Sentinel target connects (one multiplexed connection,
/// whatever `redis.pool_size` says), or `None` for a single server's pool.
/// A URL that does not parse counts as a single server: `Config::validate`
/// reports it.
fn multiplexed_redis(config: &Config) -> Option<&'static str> {
    match RedisTarget::parse(&config.redis_url) {
        Ok(RedisTarget::Cluster { .. }) => {
            Some("one multiplexed connection to each cluster node (redis.pool_size is not used)")
        }
        Ok(RedisTarget::Sentinel { .. }) => Some(
            "one multiplexed connection to the primary, and one to a sentinel to follow it \
             (redis.pool_size is not used)",
        ),
        _ => None,
    }
}

/// What one process runs (and, for embedders, the Redis clients it makes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Services {
    pub relay: bool,
    pub worker: bool,
    pub scheduler: bool,
    pub admin: bool,
    /// `Subscriber`s the application keeps connected, each
    /// `Cache::invalidate_on` included (it holds one).
    pub subscribers: usize,
    /// `Cache`s the application built, each with its own Redis pool.
    pub caches: usize,
}

impl Services {
    /// What `herald run` starts for `config`.
    pub fn run(config: &Config) -> Services {
        Services {
            relay: true,
            worker: true,
            scheduler: config.scheduler.enabled,
            admin: config.admin.enabled,
            ..Services::default()
        }
    }

    /// Any service that registers a node and campaigns for maintenance.
    fn any(&self) -> bool {
        self.relay || self.worker || self.scheduler || self.admin
    }
}

/// When a line's connections are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// From start to shutdown (reopened when lost).
    Always,
    /// Opened when needed, up to the number, then kept by the pool.
    OnDemand,
    /// Only while this process is the maintenance leader (one per database).
    WhileLeader,
    /// While the services start, next to them, then closed.
    Starting,
    /// At start, closed before the services start: never with the others.
    BeforeStart,
}

impl Held {
    fn as_str(self) -> &'static str {
        match self {
            Held::Always => "always",
            Held::OnDemand => "on demand",
            Held::WhileLeader => "while leader",
            Held::Starting => "at start",
            Held::BeforeStart => "before start",
        }
    }
}

/// One holder of connections.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// What holds them, e.g. `relay drain workers`.
    pub role: &'static str,
    /// Their `application_name` in `pg_stat_activity` (empty for Redis).
    pub application_name: &'static str,
    pub postgres: usize,
    pub redis: usize,
    pub held: Held,
    /// The settings the number comes from.
    pub from: String,
}

/// The connections of one process.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub services: Services,
    pub lines: Vec<Line>,
    /// Most Postgres connections open at once (every line but
    /// [`Held::BeforeStart`], the leader's included).
    pub postgres: usize,
    /// Most Redis connections open at once.
    pub redis: usize,
    /// Postgres connections held from start to shutdown whatever the load.
    pub postgres_always: usize,
    #[serde(skip)]
    config: Config,
}

impl Budget {
    /// The budget of a process running `services` with `config`.
    pub fn of(config: &Config, services: Services) -> Budget {
        let pg = &config.postgres;
        let mut lines = Vec::new();
        let mut line = |role, application_name, postgres, redis, held, from: String| {
            lines.push(Line {
                role,
                application_name,
                postgres,
                redis,
                held,
                from,
            })
        };
        if services.any() && config.migrate_on_start {
            line(
                "migration session",
                "herald-migrate",
                1,
                0,
                Held::BeforeStart,
                "migrate_on_start".into(),
            );
        }
        if services.relay {
            line(
                "subscription sync session",
                "herald",
                1,
                0,
                Held::BeforeStart,
                "relay: [[subscriptions]]".into(),
            );
        }
        if services.any() {
            // One at a time each: the schema check then the node heartbeat,
            // and the scheduler; one per running task for handlers
            // (TaskContext::pool: webhooks, durable subscribers); any admin
            // request may take one, so with the admin server it may fill.
            let tasks = if services.worker {
                worker_tasks(config)
            } else {
                0
            };
            let holders = 1 + usize::from(services.scheduler) + tasks;
            let (n, from) = if services.admin {
                (
                    pg.pool_size,
                    "postgres.pool_size (admin requests may fill it)".to_string(),
                )
            } else {
                (
                    holders.min(pg.pool_size),
                    format!(
                        "node heartbeat{}{}, at most postgres.pool_size",
                        if services.scheduler {
                            " + scheduler"
                        } else {
                            ""
                        },
                        if services.worker {
                            " + tasks at once (worker.queues)"
                        } else {
                            ""
                        },
                    ),
                )
            };
            line("shared pool", "herald", n, 0, Held::OnDemand, from);
        }
        if services.relay {
            line(
                "relay drain workers",
                "herald-relay",
                config.relay.concurrency.min(pg.pool_size),
                0,
                Held::OnDemand,
                "relay.concurrency (its own pool of postgres.pool_size)".into(),
            );
            line(
                "relay wake-lock session",
                crate::relay::WAKE_LOCK_APPLICATION_NAME,
                1,
                0,
                Held::Always,
                "relay".into(),
            );
        }
        if services.worker {
            line(
                "worker claims, completer, heartbeat",
                "herald-worker",
                crate::worker::own_pool_size(&config.worker),
                0,
                Held::OnDemand,
                "worker.queues (one per queue) + 2".into(),
            );
            line(
                "worker wake-lock session",
                crate::worker::WAKE_LOCK_APPLICATION_NAME,
                1,
                0,
                Held::Always,
                "worker".into(),
            );
        }
        if services.scheduler {
            line(
                "scheduler start session",
                "herald-scheduler",
                1,
                0,
                Held::Starting,
                "scheduler: [[schedules]] sync, next to the other services starting".into(),
            );
        }
        if services.relay || services.worker || services.scheduler {
            line(
                "notifier LISTEN session",
                listen_name(&services),
                1,
                0,
                Held::Always,
                "one per process".into(),
            );
        }
        if services.any() {
            line(
                "maintenance candidate session",
                crate::maintenance::APPLICATION_NAME,
                1,
                0,
                Held::Always,
                "one per process".into(),
            );
            line(
                "maintenance leader services",
                crate::maintenance::SERVICES_APPLICATION_NAME,
                crate::maintenance::POOL_SIZE,
                0,
                Held::WhileLeader,
                "fixed".into(),
            );
        }
        // The process's Redis pool: the relay's publishes (one per drain
        // worker) and the admin server's PINGs; any admin request may take
        // one, so with the admin server it may fill.
        let multiplexed = multiplexed_redis(config);
        let redis_pool = match (services.relay, services.admin, multiplexed) {
            (false, false, _) => 0,
            (_, _, Some(_)) => 1,
            (_, true, None) => config.redis.pool_size,
            (true, false, None) => config.relay.concurrency.min(config.redis.pool_size),
        };
        if redis_pool > 0 {
            line(
                "Redis pool",
                "",
                0,
                redis_pool,
                Held::OnDemand,
                match multiplexed {
                    Some(what) => what.into(),
                    None if services.admin => {
                        "redis.pool_size (relay.concurrency publishing + admin requests)".into()
                    }
                    None => "relay.concurrency (its publishes), at most redis.pool_size".into(),
                },
            );
        }
        if services.subscribers > 0 {
            line(
                "Subscribers",
                "",
                0,
                services.subscribers,
                Held::Always,
                "one connection each".into(),
            );
        }
        if services.caches > 0 {
            line(
                "caches",
                "",
                0,
                services.caches * multiplexed.map_or(config.redis.pool_size, |_| 1),
                Held::OnDemand,
                match multiplexed {
                    Some(what) => format!("each: {what} (invalidate_on Subscribers count above)"),
                    None => "each: redis.pool_size (invalidate_on Subscribers count above)".into(),
                },
            );
        }
        let postgres = lines
            .iter()
            .filter(|l| l.held != Held::BeforeStart)
            .map(|l| l.postgres)
            .sum::<usize>()
            .max(lines.iter().map(|l| l.postgres).max().unwrap_or(0));
        let postgres_always = lines
            .iter()
            .filter(|l| l.held == Held::Always)
            .map(|l| l.postgres)
            .sum();
        let redis = lines.iter().map(|l| l.redis).sum();
        Budget {
            services,
            lines,
            postgres,
            redis,
            postgres_always,
            config: config.clone(),
        }
    }

    /// Refuse a configuration whose pools are smaller than what its
    /// services hold at once, naming the settings and the numbers.
    pub fn check(&self) -> Result<()> {
        let c = &self.config;
        if self.services.relay && c.relay.concurrency > c.postgres.pool_size {
            // Each drain worker holds a connection of the relay's pool from
            // its claim to its commit, through the Redis round trip.
            return Err(Error::Config(format!(
                "relay.concurrency is {} but postgres.pool_size is {}: each relay drain worker \
                 holds one pooled Postgres connection from claim to commit; raise \
                 postgres.pool_size (HERALD_POSTGRES_POOL_SIZE) to at least {} or lower \
                 relay.concurrency (HERALD_RELAY_CONCURRENCY)",
                c.relay.concurrency, c.postgres.pool_size, c.relay.concurrency
            )));
        }
        if self.services.relay
            && multiplexed_redis(c).is_none()
            && c.relay.concurrency > c.redis.pool_size
        {
            // …and a Redis connection for its publish while it holds the
            // claim: fewer would keep partitions locked waiting for Redis.
            return Err(Error::Config(format!(
                "relay.concurrency is {} but redis.pool_size is {}: each relay drain worker \
                 publishes on its own pooled Redis connection while it holds its claim; raise \
                 redis.pool_size (HERALD_REDIS_POOL_SIZE) to at least {} or lower \
                 relay.concurrency (HERALD_RELAY_CONCURRENCY)",
                c.relay.concurrency, c.redis.pool_size, c.relay.concurrency
            )));
        }
        Ok(())
    }

    /// Tasks of this process that can run at once (all its queues).
    pub fn worker_tasks(&self) -> usize {
        if self.services.worker {
            worker_tasks(&self.config)
        } else {
            0
        }
    }

    /// Most Postgres connections of `n` such processes together: only one
    /// of them leads the maintenance at a time.
    pub fn fleet_postgres(&self, n: usize) -> usize {
        let leader: usize = self
            .lines
            .iter()
            .filter(|l| l.held == Held::WhileLeader)
            .map(|l| l.postgres)
            .sum();
        match n {
            0 => 0,
            n => (self.postgres - leader) * n + leader,
        }
    }

    /// A note when handlers may wait for the shared pool: more tasks run at
    /// once than it has connections (only handlers that use
    /// `TaskContext::pool` take one: webhooks briefly, durable subscribers
    /// for their transaction).
    pub fn handler_note(&self) -> Option<String> {
        let tasks = self.worker_tasks();
        (tasks > self.config.postgres.pool_size).then(|| {
            format!(
                "up to {tasks} tasks run at once but postgres.pool_size is {}: handlers that \
                 use TaskContext::pool (webhooks, durable subscribers) wait for a connection \
                 beyond that",
                self.config.postgres.pool_size
            )
        })
    }

    /// The lines as `role=postgres/redis` pairs, for one log line.
    pub fn summary(&self) -> String {
        self.lines
            .iter()
            .map(|l| format!("{}={}/{}", l.role.replace(' ', "_"), l.postgres, l.redis))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One line per holder, then the totals, for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<38} {:<30} {:>8} {:>5}  {:<13} {}\n",
            "holder", "application_name", "postgres", "redis", "held", "from"
        );
        for l in &self.lines {
            out.push_str(&format!(
                "{:<38} {:<30} {:>8} {:>5}  {:<13} {}\n",
                l.role,
                l.application_name,
                l.postgres,
                l.redis,
                l.held.as_str(),
                l.from
            ));
        }
        out.push_str(&format!(
            "{:<38} {:<30} {:>8} {:>5}\n",
            "most at once (per process)", "", self.postgres, self.redis
        ));
        out
    }
}

fn worker_tasks(config: &Config) -> usize {
    config
        .worker
        .queue_concurrency()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// The LISTEN session's name: its one listening service's, or the shared one.
fn listen_name(s: &Services) -> &'static str {
    match (s.relay, s.worker, s.scheduler) {
        (true, false, false) => crate::relay::LISTEN_APPLICATION_NAME,
        (false, true, false) => crate::worker::LISTEN_APPLICATION_NAME,
        (false, false, true) => crate::cron::LISTEN_APPLICATION_NAME,
        _ => crate::notifier::APPLICATION_NAME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn herald_run_with_the_defaults() {
        let config = Config::default();
        let b = Budget::of(&config, Services::run(&config));
        b.check().unwrap();
        // shared 8 + relay 2 + relay wake 1 + worker 3 + worker wake 1
        // + scheduler start 1 + LISTEN 1 + candidate 1 + leader 4.
        assert_eq!(b.postgres, 22, "{}", b.table());
        assert_eq!(b.postgres_always, 4, "{}", b.table());
        assert_eq!(b.redis, 8, "{}", b.table());
        assert!(b.handler_note().unwrap().contains("10 tasks"));
    }

    #[test]
    fn each_role_alone() {
        let config = Config::default();
        let only = |relay, worker, scheduler| Services {
            relay,
            worker,
            scheduler,
            ..Services::default()
        };
        let relay = Budget::of(&config, only(true, false, false));
        // Shared pool: the node heartbeat alone; drain workers 2, wake lock,
        // LISTEN, candidate, leader 4.
        assert_eq!((relay.postgres, relay.redis), (1 + 2 + 1 + 1 + 1 + 4, 2));
        assert_eq!(relay.fleet_postgres(3), 3 * 6 + 4);
        // Shared pool: heartbeat + 10 tasks, capped at 8.
        let worker = Budget::of(&config, only(false, true, false));
        assert_eq!((worker.postgres, worker.redis), (8 + 3 + 1 + 1 + 1 + 4, 0));
        let scheduler = Budget::of(&config, only(false, false, true));
        assert_eq!(
            (scheduler.postgres, scheduler.redis),
            (2 + 1 + 1 + 1 + 4, 0)
        );
        let embedder = Budget::of(
            &config,
            Services {
                subscribers: 3,
                caches: 1,
                ..Services::default()
            },
        );
        assert_eq!((embedder.postgres, embedder.redis), (0, 3 + 8));
    }

    #[test]
    fn pools_smaller_than_the_relay_are_refused_by_name() {
        let mut config = Config::default();
        config.relay.concurrency = 6;
        config.postgres.pool_size = 4;
        let run = Services::run(&config);
        let e = Budget::of(&config, run).check().unwrap_err().to_string();
        assert!(
            e.contains("relay.concurrency is 6") && e.contains("postgres.pool_size is 4"),
            "{e}"
        );
        config.postgres.pool_size = 6;
        config.redis.pool_size = 5;
        let e = Budget::of(&config, run).check().unwrap_err().to_string();
        assert!(e.contains("redis.pool_size is 5"), "{e}");
        // A process without the relay does not need them.
        let worker = Services {
            worker: true,
            ..Services::default()
        };
        Budget::of(&config, worker).check().unwrap();
    }

    #[test]
    fn cluster_and_sentinel_hold_one_multiplexed_connection_whatever_the_pool_size() {
        for url in [
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            "redis+sentinel://127.0.0.1:26379/mymaster",
        ] {
            let mut config = Config {
                redis_url: url.into(),
                ..Config::default()
            };
            config.relay.concurrency = 6;
            config.postgres.pool_size = 6;
            config.redis.pool_size = 2;
            let run = Services::run(&config);
            let budget = Budget::of(&config, run);
            budget.check().unwrap();
            assert_eq!(budget.redis, 1, "{url}: {}", budget.table());
            let cached = Budget::of(
                &config,
                Services {
                    caches: 2,
                    ..Services::default()
                },
            );
            assert_eq!(cached.redis, 2, "{url}");
        }
    }
}
