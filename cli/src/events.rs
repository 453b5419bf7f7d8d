//! `herald events list` and `herald subscriptions …`: the event catalog from
//! the configuration and the durable subscriptions in `herald.subscriptions`.
//! Parsing and printing only; the work is in `events` and `subscriptions`.

use std::time::Duration;

use super::inspect::table;
use anyhow::bail;
use clap::Subcommand;

use herald::config::Config;
use herald::subscriptions::{self, Subscription};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The declared event types ([[events]] in the configuration).
    List {
        /// One JSON object per line, schemas included.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Every durable subscription, with its target and state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create or replace a durable subscription.
    #[command(
        after_help = "Examples:\n  herald subscriptions add billing-audit 'payment.*' --kind billing.audit\n  \
herald subscriptions add crm 'customer.*' --webhook https://crm.example.com/hooks/herald --secret \"$CRM_SECRET\""
    )]
    Add {
        name: String,
        /// A topic or a glob ('payment.*', '*').
        pattern: String,
        /// Task kind each matching event becomes (default: sub:NAME).
        #[arg(long, conflicts_with = "webhook")]
        kind: Option<String>,
        /// POST each event to this URL (kind herald.webhook).
        #[arg(long, requires = "secret")]
        webhook: Option<String>,
        /// HMAC-SHA256 key for the webhook signature.
        #[arg(long)]
        secret: Option<String>,
        #[arg(long, default_value = "default")]
        queue: String,
        #[arg(long, default_value_t = herald::queue::DEFAULT_MAX_ATTEMPTS, allow_negative_numbers = true)]
        max_attempts: i32,
        /// Per-attempt timeout (e.g. 30s).
        #[arg(long, value_parser = super::parse_delay)]
        timeout: Option<Duration>,
    },
    /// Delete a subscription (its queued tasks still run).
    Remove { name: String },
    /// Stop creating tasks for it; events relayed meanwhile are not queued for it.
    Pause { name: String },
    /// Create tasks for it again, for events relayed from now on.
    Resume { name: String },
}

pub fn events(config: &Config, command: EventsCommand) -> anyhow::Result<()> {
    let catalog = herald::events::Catalog::from_config(config)?;
    match command {
        EventsCommand::List { json } => {
            if json {
                for t in catalog.types() {
                    println!("{}", serde_json::to_string(t)?);
                }
                return Ok(());
            }
            if catalog.is_empty() {
                println!("no event types declared (add [[events]] to the configuration)");
            } else {
                let mut t = table(&["NAME", "VERSION", "DELIVERY", "SCHEMA", "DESCRIPTION"]);
                for e in catalog.types() {
                    t.add_row(vec![
                        e.name.clone(),
                        e.version.to_string(),
                        e.delivery.to_string(),
                        match (&e.schema_file, &e.schema) {
                            (Some(path), _) => path.display().to_string(),
                            (None, Some(_)) => "inline".into(),
                            (None, None) => "-".into(),
                        },
                        e.description.clone(),
                    ]);
                }
                println!("{t}");
            }
            println!(
                "undeclared topics are {}",
                if catalog.is_strict() {
                    "refused ([catalog] strict = true)"
                } else {
                    "accepted ([catalog] strict = false)"
                }
            );
        }
    }
    Ok(())
}

pub async fn subscriptions(config: &Config, command: SubscriptionsCommand) -> anyhow::Result<()> {
    let client = herald::db::connect(config, "herald-cli").await?;
    herald::migrate::check_schema(&client).await?;
    match command {
        SubscriptionsCommand::List { json } => {
            let subs = subscriptions::list(&client).await?;
            if json {
                for s in &subs {
                    let mut s = s.clone();
                    s.webhook_url = s.webhook_url.as_deref().map(herald::config::mask_url);
                    println!("{}", serde_json::to_string(&s)?);
                }
                return Ok(());
            }
            if subs.is_empty() {
                println!("no subscriptions");
                return Ok(());
            }
            let mut t = table(&[
                "NAME", "PATTERN", "TARGET", "QUEUE", "ATTEMPTS", "STATE", "SOURCE",
            ]);
            for s in &subs {
                t.add_row(vec![
                    s.name.clone(),
                    s.pattern.clone(),
                    match &s.webhook_url {
                        // The URL may carry a credential; show it masked.
                        Some(url) => format!("POST {}", herald::config::mask_url(url)),
                        None => s.kind.clone(),
                    },
                    s.queue.clone(),
                    s.max_attempts.to_string(),
                    if s.enabled { "active" } else { "paused" }.into(),
                    s.source.clone(),
                ]);
            }
            println!("{t}");
        }
        SubscriptionsCommand::Add {
            name,
            pattern,
            kind,
            webhook,
            secret,
            queue,
            max_attempts,
            timeout,
        } => {
            let sub = Subscription {
                kind,
                webhook,
                secret,
                queue,
                max_attempts,
                timeout,
                ..Subscription::new(name, pattern)
            };
            subscriptions::upsert(&client, &sub, "api").await?;
            println!(
                "subscription {:?} on {:?} → {}",
                sub.name,
                sub.pattern,
                sub.webhook
                    .as_ref()
                    .map(|u| format!("POST {}", herald::config::mask_url(u)))
                    .unwrap_or_else(|| sub.task_kind())
            );
        }
        SubscriptionsCommand::Remove { name } => {
            if !subscriptions::remove(&client, &name).await? {
                bail!("no subscription named {name:?}");
            }
            println!("subscription {name:?} removed");
        }
        SubscriptionsCommand::Pause { name } => {
            if !subscriptions::set_enabled(&client, &name, false).await? {
                bail!("no subscription named {name:?}");
            }
            println!("subscription {name:?} paused");
        }
        SubscriptionsCommand::Resume { name } => {
            if !subscriptions::set_enabled(&client, &name, true).await? {
                bail!("no subscription named {name:?}");
            }
            println!("subscription {name:?} resumed");
        }
    }
    Ok(())
}
