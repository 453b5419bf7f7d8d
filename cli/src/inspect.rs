//! Operator commands: `herald tasks …`, `herald dlq …` and `herald stats`.
//! They read and repair through `queue`, `dlq` and `stats`; this file only
//! parses arguments and prints (tables for people, `--json` for scripts).

use std::time::Duration;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;

use herald::config::Config;
use herald::dlq;
use herald::queue::{self, TaskFilter};

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks in claim order: running, then ready by priority and due time.
    #[command(
        after_help = "Example:\n  herald tasks list --queue emails --state ready --limit 20"
    )]
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// ready, running, succeeded or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one task with its payload, headers, progress and error history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task: a queued one at once, a running one through its
    /// handler's cancellation token.
    Cancel { id: i64 },
}

#[derive(Debug, Args)]
pub struct DlqFilterArgs {
    #[arg(long)]
    queue: Option<String>,
    /// A task kind or an event topic.
    #[arg(long)]
    kind: Option<String>,
    /// task or outbox.
    #[arg(long)]
    source: Option<String>,
    /// Failed within this long (e.g. 1h, 2d).
    #[arg(long, value_parser = super::parse_delay, allow_hyphen_values = true)]
    since: Option<Duration>,
    /// The last error contains this text (case-insensitive).
    #[arg(long)]
    error: Option<String>,
}

impl DlqFilterArgs {
    fn filter(self) -> dlq::Filter {
        dlq::Filter {
            queue: self.queue,
            kind: self.kind,
            source: self.source,
            since: self.since,
            error: self.error,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    #[command(
        after_help = "Example:\n  herald dlq list --queue emails --kind email.send --since 1h"
    )]
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload and every attempt's error.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back to work: tasks are enqueued again with fresh
    /// attempts (their error history kept), events go back to the outbox.
    #[command(
        after_help = "Examples:\n  herald dlq replay 41 42\n  herald dlq replay --all --kind email.send",
        group(clap::ArgGroup::new("which").required(true).args(["ids", "all"]))
    )]
    Replay {
        /// Dead letter ids.
        #[arg(conflicts_with = "all")]
        ids: Vec<i64>,
        /// Replay every dead letter matching the filters.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: DlqFilterArgs,
    },
    /// Delete dead letters that failed longer ago than --older-than.
    #[command(after_help = "Example:\n  herald dlq purge --older-than 7d")]
    Purge {
        #[arg(long, value_parser = super::parse_delay, allow_hyphen_values = true)]
        older_than: Duration,
    },
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print again every interval (e.g. 2s) until interrupted.
    #[arg(long, value_parser = super::parse_delay, allow_hyphen_values = true)]
    watch: Option<Duration>,
    /// One JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

async fn client(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let client = herald::db::connect(config, "herald-cli").await?;
    herald::migrate::check_schema(&client).await?;
    Ok(client)
}

fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Pretty JSON, its later lines indented to line up under a field label.
fn pretty<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| format!("<unprintable: {e}>"))
        .replace('\n', "\n                ")
}

pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(header.iter().copied());
    t
}

/// "3m 20s ago" / "in 5s", to the second.
fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = now.signed_duration_since(at);
    let secs = delta.num_seconds().unsigned_abs();
    let span = humantime::format_duration(Duration::from_secs(secs)).to_string();
    if secs == 0 {
        "now".into()
    } else if delta.num_seconds() > 0 {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

fn age(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0).round() as u64)).to_string()
}

/// The first line of an error, shortened for a table cell.
fn short(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max {
        line.to_string()
    } else {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub async fn tasks(config: &Config, command: TasksCommand) -> anyhow::Result<()> {
    let client = client(config).await?;
    match command {
        TasksCommand::List {
            queue,
            kind,
            state,
            limit,
            json,
        } => {
            if limit < 1 {
                bail!("--limit must be at least 1");
            }
            let filter = TaskFilter { queue, kind, state };
            let tasks = queue::list_tasks(&client, &filter, limit).await?;
            if json {
                for t in &tasks {
                    json_line(t)?;
                }
                return Ok(());
            }
            if tasks.is_empty() {
                println!("no tasks match");
                return Ok(());
            }
            let now = Utc::now();
            let mut t = table(&[
                "ID",
                "QUEUE",
                "KIND",
                "STATE",
                "PRI",
                "RUN AT",
                "ATTEMPTS",
                "LAST ERROR",
            ]);
            for task in &tasks {
                t.add_row(vec![
                    task.id.to_string(),
                    task.queue.clone(),
                    task.kind.clone(),
                    task.state.clone(),
                    task.priority.to_string(),
                    relative(task.run_at, now),
                    format!("{}/{}", task.attempts, task.max_attempts),
                    short(task.last_error.as_deref().unwrap_or(""), 60),
                ]);
            }
            println!("{t}");
        }
        TasksCommand::Show { id, json } => {
            let Some(task) = queue::get_task(&client, id).await? else {
                bail!(
                    "no task with id {id} (finished tasks are removed unless worker.retain_completed is set; \
                     spent ones are in `herald dlq list`)"
                );
            };
            if json {
                return json_line(&task);
            }
            let now = Utc::now();
            let opt = |at: Option<DateTime<Utc>>| {
                at.map(|a| format!("{} ({})", a.to_rfc3339(), relative(a, now)))
                    .unwrap_or_else(|| "-".into())
            };
            println!("task {}", task.id);
            println!("  queue:        {}", task.queue);
            println!("  kind:         {}", task.kind);
            println!("  state:        {}", task.state);
            println!("  priority:     {}", task.priority);
            println!("  run at:       {}", opt(Some(task.run_at)));
            println!("  attempts:     {} of {}", task.attempts, task.max_attempts);
            println!(
                "  unique key:   {}",
                task.unique_key.as_deref().unwrap_or("-")
            );
            println!(
                "  timeout:      {}",
                task.timeout_secs.map(age).unwrap_or_else(|| "-".into())
            );
            println!(
                "  leased by:    {}",
                task.leased_by.as_deref().unwrap_or("-")
            );
            println!("  lease until:  {}", opt(task.lease_expires_at));
            println!("  created:      {}", opt(Some(task.created_at)));
            println!("  started:      {}", opt(task.started_at));
            println!("  finished:     {}", opt(task.finished_at));
            if task.cancel_requested_at.is_some() {
                println!("  cancel asked: {}", opt(task.cancel_requested_at));
            }
            println!("  payload:      {}", pretty(&task.payload));
            println!("  headers:      {}", pretty(&task.headers));
            if let Some(p) = &task.progress {
                println!("  progress:     {}", pretty(p));
            }
            print_errors(&task.errors);
        }
        TasksCommand::Cancel { id } => match queue::cancel(&client, id).await?.as_deref() {
            Some("cancelled") => println!("task {id} cancelled"),
            Some("cancelling") => {
                println!("task {id} is running: its worker was asked to stop; it ends as cancelled")
            }
            Some(other) => println!("task {id}: {other}"),
            None => bail!("no unfinished task with id {id}"),
        },
    }
    Ok(())
}

fn print_errors(errors: &serde_json::Value) {
    let list = errors.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        println!("  errors:       none");
        return;
    }
    println!("  errors:");
    for e in list {
        let field = |k: &str| match e.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) if !v.is_null() => v.to_string(),
            _ => "-".into(),
        };
        println!(
            "    #{} at {} on {}: {}",
            field("attempt"),
            field("at"),
            field("worker"),
            field("error")
        );
    }
}

pub async fn dead_letters(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let client = client(config).await?;
    match command {
        DlqCommand::List {
            filter,
            limit,
            json,
        } => {
            if limit < 1 {
                bail!("--limit must be at least 1");
            }
            let filter = filter.filter();
            let rows = dlq::list(&client, &filter, limit).await?;
            if json {
                for d in &rows {
                    json_line(d)?;
                }
                return Ok(());
            }
            if rows.is_empty() {
                println!("no dead letters match");
                return Ok(());
            }
            let now = Utc::now();
            let mut t = table(&[
                "ID",
                "SOURCE",
                "QUEUE",
                "KIND/TOPIC",
                "ATTEMPTS",
                "FAILED",
                "LAST ERROR",
            ]);
            for d in &rows {
                t.add_row(vec![
                    d.id.to_string(),
                    d.source.clone(),
                    d.queue.clone().unwrap_or_else(|| "-".into()),
                    d.name().to_string(),
                    d.attempts.to_string(),
                    relative(d.failed_at, now),
                    short(d.last_error.as_deref().unwrap_or(""), 60),
                ]);
            }
            println!("{t}");
            let total = dlq::count(&client, &filter).await?;
            if total > rows.len() as i64 {
                println!("({} of {total} shown; raise --limit for more)", rows.len());
            }
        }
        DlqCommand::Show { id, json } => {
            let Some(d) = dlq::get(&client, id).await? else {
                bail!("no dead letter with id {id}");
            };
            if json {
                return json_line(&d);
            }
            let now = Utc::now();
            println!("dead letter {} ({})", d.id, d.source);
            match d.source.as_str() {
                "task" => {
                    println!("  task id:      {}", d.original_id.unwrap_or_default());
                    println!("  queue:        {}", d.queue.as_deref().unwrap_or("-"));
                    println!("  kind:         {}", d.name());
                }
                _ => {
                    println!("  outbox id:    {}", d.original_id.unwrap_or_default());
                    println!(
                        "  event id:     {}",
                        d.event_id.map(|u| u.to_string()).unwrap_or_default()
                    );
                    println!("  topic:        {}", d.name());
                    println!("  key:          {}", d.key.as_deref().unwrap_or("-"));
                }
            }
            println!("  attempts:     {}", d.attempts);
            if let Some(c) = d.created_at {
                println!("  created:      {} ({})", c.to_rfc3339(), relative(c, now));
            }
            println!(
                "  failed:       {} ({})",
                d.failed_at.to_rfc3339(),
                relative(d.failed_at, now)
            );
            println!("  last error:   {}", d.last_error.as_deref().unwrap_or("-"));
            println!("  payload:      {}", pretty(&d.payload));
            println!("  headers:      {}", pretty(&d.headers));
            print_errors(&d.errors);
            println!("replay it with: herald dlq replay {}", d.id);
        }
        DlqCommand::Replay { ids, all, filter } => {
            if all {
                let filter = filter.filter();
                let mut replayed = 0usize;
                // Batches in their own transactions: a large replay neither
                // holds thousands of row locks nor starts over on an error.
                loop {
                    let batch = dlq::replay_matching(&client, &filter, 1000).await?;
                    if batch.is_empty() {
                        break;
                    }
                    replayed += batch.len();
                }
                println!("replayed {replayed} dead letters");
                // What is left matched but was skipped: a live task holds
                // its unique key.
                let left = dlq::count(&client, &filter).await?;
                if left > 0 {
                    println!(
                        "{left} matching dead letters were left: a live task holds their unique key (herald dlq replay ID names it)"
                    );
                }
            } else {
                let mut failed = Vec::new();
                for id in ids {
                    match dlq::replay(&client, id).await {
                        Ok(new_id) => println!("dead letter {id} replayed as {new_id}"),
                        Err(e) => {
                            eprintln!("dead letter {id}: {e}");
                            failed.push(id);
                        }
                    }
                }
                if !failed.is_empty() {
                    bail!(
                        "{} dead letters could not be replayed: {failed:?}",
                        failed.len()
                    );
                }
            }
        }
        DlqCommand::Purge { older_than } => {
            let n = dlq::purge(&client, older_than)
                .await
                .context("purging dead letters")?;
            println!(
                "purged {n} dead letters that failed more than {} ago",
                humantime::format_duration(older_than)
            );
        }
    }
    Ok(())
}

pub async fn stats(config: &Config, args: StatsArgs) -> anyhow::Result<()> {
    if args.watch == Some(Duration::ZERO) {
        bail!("--watch must be more than 0s (e.g. 2s)");
    }
    let client = client(config).await?;
    let shutdown = args.watch.map(|_| super::shutdown_signal());
    loop {
        let snap = herald::stats::snapshot(&client).await?;
        if args.json {
            json_line(&snap)?;
        } else {
            if args.watch.is_some() {
                println!("--- {}", snap.taken_at.to_rfc3339());
            }
            print_stats(&snap);
        }
        let (Some(every), Some(token)) = (args.watch, &shutdown) else {
            return Ok(());
        };
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

fn print_stats(s: &herald::stats::Snapshot) {
    println!("tasks");
    if s.queues.is_empty() {
        println!("  no tasks");
    } else {
        let mut t = table(&[
            "QUEUE",
            "STATE",
            "COUNT",
            "SCHEDULED",
            "OLDEST READY",
            "EXPIRED LEASES",
            "FAILED ATTEMPTS 1H",
        ]);
        for q in &s.queues {
            t.add_row(vec![
                q.queue.clone(),
                q.state.clone(),
                q.count.to_string(),
                q.scheduled.to_string(),
                q.oldest_ready_secs.map(age).unwrap_or_else(|| "-".into()),
                q.expired_leases.to_string(),
                q.failed_attempts_last_hour.to_string(),
            ]);
        }
        println!("{t}");
    }
    println!();
    println!(
        "outbox: {} unpublished, oldest {}, {} failing",
        s.outbox.unpublished,
        age(s.outbox.oldest_age_secs),
        s.outbox.failing
    );
    println!();
    println!("dead letters");
    if s.dead_letters.is_empty() {
        println!("  none");
    } else {
        let mut t = table(&["SOURCE", "QUEUE", "KIND/TOPIC", "COUNT", "LAST", "ERROR"]);
        for d in &s.dead_letters {
            t.add_row(vec![
                d.source.clone(),
                d.queue.clone(),
                d.kind.clone(),
                d.count.to_string(),
                relative(d.last_failed_at, s.taken_at),
                short(&d.error, 60),
            ]);
        }
        println!("{t}");
    }
}
