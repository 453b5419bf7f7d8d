//! The `herald` command line: parses arguments, loads the configuration and
//! runs one command. It owns user-facing messages and signal handling; the
//! work itself is done by the `herald` library, and `herald bench` by the
//! `herald-bench` crate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use herald::config::Config;
use herald::outbox::Event;
use herald::pubsub::{Delivery, Subscriber};

mod budget;
mod events;
mod inspect;
mod schedules;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Postgres-centric events: a transactional outbox relayed to Redis pub/sub",
    long_about = "Herald writes events to herald.outbox inside your own Postgres transaction and \
relays them to Redis pub/sub after COMMIT, at least once and in per-key order.\n\n\
Settings come from the environment (DATABASE_URL, REDIS_URL, HERALD_*) over an optional \
TOML file (--config or HERALD_CONFIG); `herald config` shows the result."
)]
pub struct Cli {
    /// TOML configuration file (default: $HERALD_CONFIG, if set).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending schema migrations and write the cluster settings.
    #[command(after_help = "Example:\n  DATABASE_URL=postgres://app@db/app herald migrate")]
    Migrate,

    /// Run every Herald service in this process: the relay, the workers, the scheduler and the admin server.
    #[command(
        after_help = "Migrates first unless HERALD_MIGRATE_ON_START=false. Workers run the \
built-in kinds (herald.noop, herald.sleep, herald.fail); applications embed the library to add \
their own handlers.\n\nExample:\n  HERALD_WORKER_QUEUES='[default, emails=4]' herald run"
    )]
    Run,

    /// Run workers for task queues until SIGTERM/SIGINT.
    #[command(
        after_help = "On SIGTERM: stop claiming, let tasks finish within worker.shutdown_grace, \
then hand the rest back to the queue.\n\nExample:\n  herald worker --queues default,emails --concurrency 20"
    )]
    Worker {
        /// Queues to work, comma-separated; `name=N` sets a queue's concurrency.
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
        /// Tasks run at once per queue.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Also serve the admin server on admin.bind: /metrics (this
        /// process's counters), /healthz, /readyz and the dashboard.
        #[arg(long)]
        admin: bool,
    },

    /// Enqueue one task (in its own transaction); prints its id.
    #[command(
        after_help = "Example:\n  herald enqueue email.send '{\"to\": \"a@example.com\"}' --queue emails --delay 30s --unique-key welcome:17"
    )]
    Enqueue {
        /// Task kind: letters, digits, '.', '_', '-', ':'.
        kind: String,
        /// Payload: one JSON value.
        json: String,
        #[arg(long, default_value = "default")]
        queue: String,
        /// Run no earlier than this from now (e.g. 30s, 5m, 2h).
        #[arg(long, value_parser = parse_delay, allow_hyphen_values = true)]
        delay: Option<std::time::Duration>,
        /// Higher runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Attempts before the task becomes a dead letter.
        #[arg(long, default_value_t = herald::queue::DEFAULT_MAX_ATTEMPTS, allow_negative_numbers = true)]
        max_attempts: i32,
        /// Return the unfinished task holding this key instead of a new one.
        #[arg(long)]
        unique_key: Option<String>,
        /// Fail the attempt when the handler runs longer (e.g. 30s).
        #[arg(long, value_parser = parse_delay)]
        timeout: Option<std::time::Duration>,
    },

    /// Relay committed outbox events to Redis until SIGTERM/SIGINT.
    #[command(
        after_help = "Run as many relays as you like; partitions are shared between them.\n\n\
Example:\n  HERALD_RELAY_BATCH_SIZE=500 herald relay"
    )]
    Relay {
        /// Also serve the admin server on admin.bind: /metrics (this
        /// process's counters), /healthz, /readyz and the dashboard.
        #[arg(long)]
        admin: bool,
    },

    /// Serve the admin HTTP server alone: /metrics, /healthz, /readyz and
    /// the dashboard (`herald run` serves it too).
    #[command(
        after_help = "Binds admin.bind (default 127.0.0.1:9187); any other address \
needs admin.token (HERALD_ADMIN_TOKEN).\n\nExample:\n  HERALD_ADMIN_BIND=0.0.0.0:9187 HERALD_ADMIN_TOKEN=... herald admin"
    )]
    Admin,

    /// Publish one event through the outbox (in its own transaction).
    #[command(
        after_help = "Example:\n  herald publish payment.captured '{\"amount\": 42}' --key customer-17 --header correlation_id=req-1"
    )]
    Publish {
        /// Topic: letters, digits, '.', '_', '-', ':'; at most 255 characters.
        topic: String,
        /// Payload: one JSON value.
        json: String,
        /// Events with the same key are delivered in order.
        #[arg(long)]
        key: Option<String>,
        /// A header as NAME=VALUE; repeatable.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
    },

    /// Subscribe on Redis and print each envelope as one JSON line.
    #[command(after_help = "A pattern may use Redis globs ('payment.*', '*').\n\n\
Example:\n  herald tail 'payment.*'")]
    Tail {
        /// Topics or patterns to follow.
        #[arg(required = true)]
        patterns: Vec<String>,
    },

    /// Inspect and cancel tasks.
    #[command(subcommand)]
    Tasks(inspect::TasksCommand),

    /// Inspect, replay and purge dead letters (herald.dead_letters).
    #[command(subcommand)]
    Dlq(inspect::DlqCommand),

    /// Queues by state, the outbox backlog and dead letters at a glance.
    #[command(after_help = "Reads herald.queue_stats, herald.outbox_backlog and \
herald.dead_letter_summary.\n\nExample:\n  herald stats --watch 2s")]
    Stats(inspect::StatsArgs),

    /// The event catalog: declared topics, schemas and delivery modes.
    #[command(subcommand)]
    Events(events::EventsCommand),

    /// Durable subscriptions: each matching event becomes a task.
    #[command(subcommand)]
    Subscriptions(events::SubscriptionsCommand),

    /// Run the cron scheduler alone until SIGTERM/SIGINT.
    #[command(
        after_help = "Syncs [[schedules]] from the configuration, then fires due schedules. Run \
as many as you like: each tick fires once across all of them.\n\nExample:\n  herald --config herald.toml scheduler"
    )]
    Scheduler {
        /// Also serve the admin server on admin.bind: /metrics (this
        /// process's counters), /healthz, /readyz and the dashboard.
        #[arg(long)]
        admin: bool,
    },

    /// List, add, remove, pause, resume and trigger cron schedules.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCommand),

    /// The Postgres and Redis connections a process may hold at once, by role.
    #[command(
        after_help = "Reads the configuration only; fails (after printing) when a pool is smaller than the services need, as the process itself would at start.

Examples:
  herald budget
  herald budget --for worker --processes 3
  herald budget --for relay --admin --json"
    )]
    Budget(budget::BudgetArgs),

    /// Print the effective configuration (TOML) with secrets masked.
    #[command(after_help = "Example:\n  HERALD_PARTITIONS=32 herald config")]
    Config,

    /// Run benchmark workloads (docs/benchmarks.md#workloads: O1 to C1, or all; S1 when named).
    #[command(
        after_help = "Each run uses a fresh database, created and dropped by the bench. A progress \
bar shows on stderr when it is a terminal (--quiet hides it); --write rewrites the file's \
generated block and --charts (default: beside that file) draws SVG charts. S1, the 10-minute \
soak, runs only when named and writes a section of its own.\n\n\
Examples:\n  herald bench all --runs 3 --large --write docs/benchmarks.md\n  \
herald bench S1 --write docs/benchmarks.md\n  herald bench S1 --duration 60s"
    )]
    Bench(herald_bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match run_cli().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parse arguments, run the command; errors carry their context chain.
async fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    herald::telemetry::init(config.log_format);
    // Flushes spans still buffered for OTLP when main returns, error or not.
    let _telemetry = herald::telemetry::ShutdownOnDrop;
    match cli.command {
        Command::Migrate => {
            let report = herald::migrate::migrate(&config)
                .await
                .context("migrating the database")?;
            if report.applied.is_empty() {
                println!(
                    "schema is current (version {})",
                    report.current_version.unwrap_or_default()
                );
            } else {
                for m in &report.applied {
                    println!("applied {m}");
                }
            }
        }
        Command::Relay { admin } => run_services(&config, true, false, admin).await?,
        Command::Run => {
            let services = Services {
                relay: true,
                workers: true,
                scheduler: config.scheduler.enabled,
                admin: config.admin.enabled,
            };
            run(&config, services).await?
        }
        Command::Admin => {
            let services = Services {
                admin: true,
                ..Services::default()
            };
            run(&config, services).await?
        }
        Command::Scheduler { admin } => {
            let services = Services {
                scheduler: true,
                admin,
                ..Services::default()
            };
            run(&config, services).await?
        }
        Command::Schedules(command) => schedules::run_schedules_command(&config, command).await?,
        Command::Worker {
            queues,
            concurrency,
            admin,
        } => {
            let mut config = config;
            if let Some(n) = concurrency {
                if n == 0 {
                    bail!("--concurrency must be at least 1");
                }
                config.worker.concurrency = n;
            }
            if let Some(q) = queues {
                config.worker.queues = q;
            }
            config.validate()?;
            run_services(&config, false, true, admin).await?
        }
        Command::Enqueue {
            kind,
            json,
            queue,
            delay,
            priority,
            max_attempts,
            unique_key,
            timeout,
        } => {
            let mut task = herald::queue::Task::from_json_str(&kind, &json)?
                .queue(queue)
                .priority(priority)
                .max_attempts(max_attempts);
            if let Some(d) = delay {
                task = task.delay(d);
            }
            if let Some(k) = unique_key {
                task = task.unique_key(k);
            }
            if let Some(t) = timeout {
                task = task.timeout(t);
            }
            let client = herald::db::connect(&config, "herald-cli").await?;
            let id = herald::queue::Queue::from_config(&config)
                .enqueue(&client, &task)
                .await
                .context("enqueueing the task")?;
            println!("{id}");
        }
        Command::Publish {
            topic,
            json,
            key,
            headers,
        } => {
            let mut event = Event::from_json_str(&topic, &json)?;
            if let Some(key) = key {
                event = event.key(key);
            }
            for header in headers {
                let Some((name, value)) = header.split_once('=') else {
                    bail!("--header {header:?}: expected NAME=VALUE");
                };
                if name.is_empty() {
                    bail!("--header {header:?}: the name is empty");
                }
                event = event.header(name, value);
            }
            // Checked against the catalog, and sent the way its type says
            // (building the Redis pool opens no connection).
            let redis = herald::RedisPool::from_config(&config)?;
            let publisher = herald::events::Publisher::with_redis(&config, Some(redis))?;
            let id = if publisher.catalog().delivery(event.topic())
                == herald::events::DeliveryMode::FireAndForget
            {
                publisher.emit(&event).await
            } else {
                let client = herald::db::connect(&config, "herald-cli").await?;
                publisher.publish(&client, &event).await
            }
            .context("publishing the event")?;
            println!("{id}");
        }
        Command::Tail { patterns } => tail(&config, &patterns).await?,
        Command::Tasks(command) => inspect::tasks(&config, command).await?,
        Command::Dlq(command) => inspect::dead_letters(&config, command).await?,
        Command::Stats(args) => inspect::stats(&config, args).await?,
        Command::Events(command) => events::events(&config, command)?,
        Command::Subscriptions(command) => events::subscriptions(&config, command).await?,
        Command::Config => print!("{}", config.to_masked_toml()),
        Command::Budget(args) => budget::budget(&config, args)?,
        Command::Bench(args) => herald_bench::run(&config, args).await?,
    }
    Ok(())
}

/// Cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested; finishing the batches in flight");
        cancel.cancel();
    });
    token
}

/// Parse a non-negative duration such as `30s`; a negative one is refused.
fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "{s:?} is negative; expected a duration of 0 or more (e.g. 30s)"
        ));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 250ms, 30s, 5m, 2h)"))
}

/// The relay and/or the workers (and the admin server) in this process,
/// until SIGTERM/SIGINT.
async fn run_services(
    config: &Config,
    relay: bool,
    workers: bool,
    admin: bool,
) -> anyhow::Result<()> {
    let services = Services {
        relay,
        workers,
        admin,
        ..Services::default()
    };
    run(config, services).await
}

/// The relay, the workers and/or the scheduler in this process, until
/// SIGTERM/SIGINT.
/// Which services one process runs.
#[derive(Debug, Clone, Copy, Default)]
struct Services {
    relay: bool,
    workers: bool,
    scheduler: bool,
    admin: bool,
}

/// The chosen services in this process, until SIGTERM/SIGINT.
async fn run(config: &Config, which: Services) -> anyhow::Result<()> {
    let Services {
        relay,
        workers,
        scheduler,
        admin,
    } = which;
    let mut herald = herald::Herald::builder(config)
        .relay(relay)
        .scheduler(scheduler)
        .admin(admin);
    if workers {
        herald = herald.workers(herald::worker::Registry::new());
    }
    herald.run(shutdown_signal()).await?;
    Ok(())
}

async fn tail(config: &Config, patterns: &[String]) -> anyhow::Result<()> {
    let mut subscriber = Subscriber::from_config(config)?;
    for p in patterns {
        subscriber = subscriber.subscribe(p);
    }
    subscriber.connect().await.context("subscribing on Redis")?;
    let shutdown = shutdown_signal();
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            d = subscriber.next() => d?,
        };
        match delivery {
            Delivery::Event { envelope, .. } => {
                println!("{}", serde_json::to_string(&envelope)?);
            }
            Delivery::Gap(gap) => match gap.dropped {
                Some(n) => eprintln!(
                    "herald tail: {n} events dropped {} .. {}: {}",
                    gap.disconnected_at.to_rfc3339(),
                    gap.reconnected_at.to_rfc3339(),
                    gap.reason
                ),
                None => eprintln!(
                    "herald tail: disconnected from Redis {} .. {} ({}); events published then were missed",
                    gap.disconnected_at.to_rfc3339(),
                    gap.reconnected_at.to_rfc3339(),
                    gap.reason
                ),
            },
            Delivery::Undecodable { channel, error } => {
                eprintln!("herald tail: not a Herald envelope on {channel}: {error}")
            }
        }
    }
}
