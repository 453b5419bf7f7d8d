//! Herald: a Postgres-centric event system. Events are written to
//! `herald.outbox` in the producer's own transaction and relayed to Redis
//! pub/sub after COMMIT, at least once and in per-key order.
//!
//! - [`Herald::builder`]: relay, workers, scheduler and admin server wired
//!   into one process, as `herald run` does.
//! - [`outbox`]: the `Event` builder and `publish` / `publish_batch`.
//! - [`relay`]: the process that moves committed events to Redis.
//! - [`pubsub`]: Redis publishing and the reconnecting `Subscriber`.
//! - [`redis_pool`]: connections to one Redis, a Sentinel primary or a Redis Cluster.
//! - [`cache`]: cache-aside over Redis with event-driven invalidation.
//! - [`migrate`]: the schema in `sql/`, applied with refinery.
//! - [`queue`]: the `Task` builder and `enqueue` / `enqueue_batch`.
//! - [`worker`]: the worker runtime that runs handlers for tasks.
//! - [`wake`]: the wake lock, so that producers notify only sleeping consumers.
//! - [`dlq`]: dead letters listed, replayed and purged.
//! - [`events`]: the event catalog (schemas, delivery modes) and `Publisher`.
//! - [`subscriptions`]: durable subscriptions and exactly-once handlers.
//! - [`stats`]: the operator views in one snapshot.
//! - [`cron`]: cron schedules and the scheduler that fires them.
//! - [`nodes`]: the live Herald processes (`herald.nodes`) and their heartbeats.
//! - [`maintenance`]: rescue, cleanup, archive, node expiry, retention and
//!   VACUUM, run by one elected leader per database.
//! - [`admin`]: the admin HTTP server (`/metrics`, `/healthz`, `/readyz`, dashboard).
//! - [`config`]: settings from defaults, TOML and the environment.
//! - [`budget`]: the Postgres and Redis connections a process may hold.

#[cfg(feature = "admin")]
pub mod admin;
mod app;
mod backoff;
pub mod budget;
pub mod cache;
pub mod config;
pub mod cron;
pub mod db;
pub mod dlq;
pub mod error;
pub mod events;
pub mod maintenance;
pub mod migrate;
pub mod nodes;
pub mod notifier;
pub mod outbox;
pub mod pubsub;
pub mod queue;
pub mod redis_pool;
pub mod relay;
mod settings;
pub mod stats;
pub(crate) mod store;
pub mod subscriptions;
pub mod telemetry;
/// The VACUUM of the claim tables, now the maintenance leader's.
pub use maintenance::vacuum;
pub mod wake;
pub mod worker;

pub use app::{Herald, HeraldBuilder};
pub use cache::Cache;
pub use config::Config;
pub use error::{Error, Result};
pub use outbox::{publish, publish_batch, Envelope, Event, Outbox};
pub use pubsub::{Delivery, Subscriber};
pub use queue::{enqueue, enqueue_batch, Queue, Task};
pub use redis_pool::RedisPool;
pub use relay::Relay;
pub use worker::webhook;
pub use worker::{Outcome, Registry, TaskContext, Worker};
