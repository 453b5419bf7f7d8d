//! The `herald` command line: parses arguments, loads the configuration and
//! runs one command. It owns user-facing messages and signal handling; the
//! work itself is done by the library modules.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::outbox::{Event, Outbox};
use crate::pubsub::{Delivery, Subscriber};
use crate::relay::Relay;

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

    /// Run every Herald service in this process (today: the relay).
    #[command(
        after_help = "Migrates first unless HERALD_MIGRATE_ON_START=false.\n\nExample:\n  herald run"
    )]
    Run,

    /// Relay committed outbox events to Redis until SIGTERM/SIGINT.
    #[command(
        after_help = "Run as many relays as you like; partitions are shared between them.\n\n\
Example:\n  HERALD_RELAY_BATCH_SIZE=500 herald relay"
    )]
    Relay,

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

    /// Print the effective configuration (TOML) with secrets masked.
    #[command(after_help = "Example:\n  HERALD_PARTITIONS=32 herald config")]
    Config,

    /// Run benchmark workloads of shared/bench-spec.md (O1, O2, O3, all).
    #[command(
        after_help = "Each run uses a fresh database, created and dropped by the bench.\n\n\
Example:\n  herald bench O1 O2 O3 --runs 3 --write docs/benchmarks.md"
    )]
    Bench(crate::bench::BenchArgs),
}

/// Parse arguments, run the command; errors carry their context chain.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref()).context("loading the configuration")?;
    crate::telemetry::init(config.log_format);
    match cli.command {
        Command::Migrate => {
            let report = crate::migrate::migrate(&config)
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
        Command::Run | Command::Relay => run_relay(&config).await?,
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
            let client = crate::db::connect(&config, "herald-cli").await?;
            let id = Outbox::from_config(&config)
                .publish(&client, &event)
                .await
                .context("publishing the event")?;
            println!("{id}");
        }
        Command::Tail { patterns } => tail(&config, &patterns).await?,
        Command::Config => print!("{}", config.to_masked_toml()),
        Command::Bench(args) => crate::bench::run(&config, args).await?,
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

async fn run_relay(config: &Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    if config.migrate_on_start {
        crate::migrate::migrate(config).await.context(
            "migrating the database at start (disable with HERALD_MIGRATE_ON_START=false)",
        )?;
    }
    let pool = crate::db::pool(config, "herald-relay")?;
    let redis = crate::pubsub::redis_pool(config)?;
    // Fail fast on a wrong URL instead of backing off forever.
    {
        let client = pool.get().await.with_context(|| {
            format!(
                "connecting to {}",
                crate::config::mask_url(&config.database_url)
            )
        })?;
        crate::migrate::check_schema(&client).await?;
    }
    if let Err(e) = redis.get().await {
        tracing::warn!(
            error = %e,
            url = %crate::config::mask_url(&config.redis_url),
            "Redis does not answer yet; the relay keeps events in the outbox and retries"
        );
    }
    Relay::new(config, pool, redis).run(shutdown).await?;
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
            Delivery::Gap(gap) => eprintln!(
                "herald tail: disconnected from Redis {} .. {} ({}); events published then were missed",
                gap.disconnected_at.to_rfc3339(),
                gap.reconnected_at.to_rfc3339(),
                gap.reason
            ),
            Delivery::Undecodable { channel, error } => {
                eprintln!("herald tail: not a Herald envelope on {channel}: {error}")
            }
        }
    }
}
