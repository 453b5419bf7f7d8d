//! [`Herald::builder`]: the services of one process, wired and started
//! together — what `herald run` does, for an application that wants Herald's
//! relay, workers, scheduler or admin server inside its own process.
//!
//! It owns the start-up order (migrate, check the schema, sync configured
//! subscriptions, then start the services), the process's row in
//! `herald.nodes`, its candidacy for maintenance leader, and the rule that
//! one service failing stops the others.
//! It must never start a service before the schema check passed, and never
//! hold a statement of its own: every query belongs to the services it
//! starts.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use herald::{Config, Herald, Registry};
//! use tokio_util::sync::{CancellationToken, DropGuard};
//!
//! let config = Config::load(None)?;
//! let mut registry = Registry::new();
//! registry.register("email.send", |_ctx, _payload: serde_json::Value| async { Ok(()) });
//! let shutdown = CancellationToken::new();
//! Herald::builder(&config)
//!     .relay(true)
//!     .scheduler(true)
//!     .workers(registry)
//!     .run(shutdown)
//!     .await?;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "admin")]
use std::sync::atomic::Ordering;

use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{mask_url, Config};
use crate::error::{Error, Result};
use crate::nodes::{Node, Role};
use crate::worker::Registry;

/// The services to run in this process; built by [`Herald::builder`].
#[must_use = "a builder does nothing until `start` or `run`"]
pub struct HeraldBuilder {
    config: Config,
    relay: bool,
    scheduler: bool,
    workers: Option<Registry>,
    #[cfg(feature = "admin")]
    admin: bool,
}

/// The services of this process, started; [`Herald::wait`] for them.
pub struct Herald {
    services: JoinSet<Result<()>>,
    shutdown: CancellationToken,
    /// The process's notifier, stopped once the services have (a worker
    /// still hears cancellations during its shutdown grace).
    notifier: Option<(tokio::task::JoinHandle<Result<()>>, DropGuard)>,
}

impl Herald {
    /// Start describing the services of this process; none is on yet.
    pub fn builder(config: &Config) -> HeraldBuilder {
        HeraldBuilder {
            config: config.clone(),
            relay: false,
            scheduler: false,
            workers: None,
            #[cfg(feature = "admin")]
            admin: false,
        }
    }

    /// Wait until every service has stopped (after the shutdown token is
    /// cancelled). The first service that fails cancels the others, and its
    /// error is returned once they have stopped.
    pub async fn wait(mut self) -> Result<()> {
        let mut failed = None;
        while let Some(done) = self.services.join_next().await {
            let outcome = match done {
                Ok(outcome) => outcome,
                Err(panic) => Err(Error::Other(format!("a service panicked: {panic}"))),
            };
            if let Err(e) = outcome {
                self.shutdown.cancel();
                while self.services.join_next().await.is_some() {}
                failed = Some(e);
                break;
            }
        }
        if let Some((task, stop)) = self.notifier.take() {
            drop(stop);
            let _ = task.await;
        }
        failed.map_or(Ok(()), Err)
    }
}

impl HeraldBuilder {
    /// Relay committed events from `herald.outbox` to Redis.
    pub fn relay(mut self, on: bool) -> Self {
        self.relay = on;
        self
    }

    /// Fire cron schedules (`herald.schedules`).
    pub fn scheduler(mut self, on: bool) -> Self {
        self.scheduler = on;
        self
    }

    /// Run tasks with these handlers (plus Herald's own: webhooks).
    pub fn workers(mut self, registry: Registry) -> Self {
        self.workers = Some(registry);
        self
    }

    /// Serve `/metrics`, `/healthz`, `/readyz` and the dashboard on
    /// `admin.bind`.
    #[cfg(feature = "admin")]
    pub fn admin(mut self, on: bool) -> Self {
        self.admin = on;
        self
    }

    /// What this builder starts, for [`crate::budget`].
    pub fn services(&self) -> crate::budget::Services {
        crate::budget::Services {
            relay: self.relay,
            worker: self.workers.is_some(),
            scheduler: self.scheduler,
            #[cfg(feature = "admin")]
            admin: self.admin,
            ..Default::default()
        }
    }

    /// The connections this process will hold at most; [`start`](Self::start)
    /// refuses pools smaller than its services need
    /// ([`Budget::check`](crate::budget::Budget::check)).
    pub fn budget(&self) -> crate::budget::Budget {
        crate::budget::Budget::of(&self.config, self.services())
    }

    /// Migrate (when `migrate_on_start`), check the schema, then start the
    /// chosen services; they stop when `shutdown` is cancelled.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Herald> {
        let budget = self.budget();
        let config = self.config;
        // Before connecting: pools too small for the services fail at once.
        budget.check()?;
        tracing::info!(
            postgres = budget.postgres,
            postgres_always = budget.postgres_always,
            redis = budget.redis,
            lines = %budget.summary(),
            "connection budget: most connections this process holds at once (herald budget explains)"
        );
        if let Some(note) = budget.handler_note() {
            tracing::info!("{note}");
        }
        #[cfg(feature = "admin")]
        if self.admin {
            // Before migrating or connecting: a wrong bind fails at once.
            crate::admin::check_bind(&config)?;
            crate::telemetry::init_metrics();
        }
        let any = self.relay || self.scheduler || self.workers.is_some();
        #[cfg(feature = "admin")]
        let any = any || self.admin;
        if any {
            // Before any statement: behind transaction pooling, LISTEN, the
            // wake locks and the maintenance leader's lock (every process
            // campaigns) would hold nothing, and named statements could run
            // on other clients' sessions.
            crate::notifier::check(&config).await?;
        }
        if config.migrate_on_start {
            crate::migrate::migrate(&config)
                .await
                .map_err(|e| Error::Startup {
                    context: "migrating the database at start (disable with HERALD_MIGRATE_ON_START=false)".into(),
                    error: Box::new(e),
                })?;
        }
        let pool = crate::db::pool(&config, "herald")?;
        let redis = crate::RedisPool::from_config(&config)?;
        {
            // Fail fast on a wrong URL instead of backing off forever.
            let client = pool.get().await.map_err(|e| Error::Startup {
                context: format!("connecting to {}", mask_url(&config.database_url)),
                error: Box::new(
                    crate::db::explain_pool_error(&config, &e)
                        .unwrap_or_else(|| Error::Other(crate::error::chain(&e))),
                ),
            })?;
            crate::migrate::check_schema(&client).await?;
        }
        if self.relay {
            let mut client = crate::db::connect(&config, "herald").await?;
            crate::subscriptions::sync_config(&mut client, &config.subscriptions)
                .await
                .map_err(|e| Error::Startup {
                    context: "syncing [[subscriptions]] to herald.subscriptions".into(),
                    error: Box::new(e),
                })?;
        }

        let mut services = JoinSet::new();
        #[cfg(feature = "admin")]
        let readiness = crate::admin::Readiness::default();
        let mut roles = Vec::new();
        // One LISTEN session for the process, named for its one listening
        // service when there is only one (as when that service runs alone).
        let listeners = [
            (self.relay, crate::relay::LISTEN_APPLICATION_NAME),
            (
                self.workers.is_some(),
                crate::worker::LISTEN_APPLICATION_NAME,
            ),
            (self.scheduler, crate::cron::LISTEN_APPLICATION_NAME),
        ];
        let mut on = listeners.iter().filter(|(on, _)| *on);
        let name = match (on.next(), on.next()) {
            (Some((_, name)), None) => name,
            _ => crate::notifier::APPLICATION_NAME,
        };
        let notifier = crate::notifier::Notifier::new(&config, name);
        if self.relay {
            match redis.check().await {
                // A Redis that is not there yet is an outage the relay
                // rides out; a URL that names the wrong thing never heals.
                Err(e @ Error::Url { .. }) => return Err(e),
                Err(e) => tracing::warn!(
                    error = %e,
                    url = %mask_url(&config.redis_url),
                    "Redis does not answer yet; the relay keeps events in the outbox and retries"
                ),
                Ok(()) => {}
            }
            // A pool of its own (connections open on demand): the relay's
            // claims never queue behind the workers' for a connection.
            let relay_pool = crate::db::pool(&config, "herald-relay")?;
            let relay = crate::relay::Relay::new(&config, relay_pool, redis.clone())
                .with_notifier(notifier.clone());
            #[cfg(feature = "admin")]
            {
                let stats = relay.stats();
                readiness.listener("relay", move || stats.listening.load(Ordering::Relaxed));
            }
            roles.push(Role::Relay);
            services.spawn(relay.run(shutdown.clone()));
        }
        if self.scheduler {
            let scheduler =
                crate::cron::Scheduler::new(&config, pool.clone()).with_notifier(notifier.clone());
            #[cfg(feature = "admin")]
            {
                let stats = scheduler.stats();
                readiness.listener("scheduler", move || stats.listening.load(Ordering::Relaxed));
            }
            roles.push(Role::Scheduler);
            services.spawn(scheduler.run(shutdown.clone()));
        }
        let workers = self.workers.is_some();
        if let Some(registry) = self.workers {
            let worker = crate::worker::Worker::new(&config, pool.clone(), registry)
                .with_notifier(notifier.clone());
            #[cfg(feature = "admin")]
            {
                let stats = worker.stats();
                readiness.listener("worker", move || stats.listening.load(Ordering::Relaxed));
            }
            roles.push(Role::Worker);
            services.spawn(worker.run(shutdown.clone()));
        }
        #[cfg(feature = "admin")]
        if self.admin {
            let mut state = crate::admin::AdminState::new(config.clone(), pool.clone(), redis);
            state.readiness = readiness;
            roles.push(Role::Admin);
            services.spawn(crate::admin::serve(state, shutdown.clone()));
        }
        if !roles.is_empty() {
            // One row in herald.nodes for this process, heartbeating until shutdown.
            let node = Node::new(&config, &roles);
            services.spawn(node.run(pool, shutdown.clone()));
            // Every process campaigns; the elected one runs the maintenance.
            let maintenance = crate::maintenance::Maintenance::new(&config);
            services.spawn(maintenance.run(shutdown.clone()));
        }
        let notifier = (self.relay || self.scheduler || workers).then(|| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(notifier.run(stop.clone()));
            (task, stop.drop_guard())
        });
        Ok(Herald {
            services,
            shutdown,
            notifier,
        })
    }

    /// [`start`](Self::start), then [`Herald::wait`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.start(shutdown).await?.wait().await
    }
}
