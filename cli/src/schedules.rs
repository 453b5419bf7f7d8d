//! `herald schedules …`: list, add, remove, pause, resume and trigger cron
//! schedules. Parsing and printing only; the work is in `cron`.

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use anyhow::Context as _;
use herald::config::Config;
use herald::cron::{
    check_schedules_table, list, pause, remove, resume, trigger, upsert, CronSchedule, Misfire,
    Schedule, ScheduleRow,
};
use herald::error::{Error, Result};

#[derive(Debug, clap::Subcommand)]
pub enum SchedulesCommand {
    /// List schedules with their next three fire times, in each schedule's zone.
    #[command(after_help = "Example:\n  herald schedules list\n  herald schedules list --json")]
    List {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create or change a schedule (source `api`).
    #[command(
        after_help = "CRON has 5 fields (minute hour day-of-month month day-of-week) or 6 with \
seconds first.\n\nExamples:\n  herald schedules add nightly-report '30 2 * * *' report.build '{}' --tz Europe/Berlin --misfire once\n  herald schedules add heartbeat '*/10 * * * * *' herald.noop '{}'"
    )]
    Add {
        name: String,
        cron: String,
        /// Task kind to enqueue on each tick.
        kind: String,
        /// The task's payload: one JSON value.
        json: String,
        /// IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        #[arg(long, default_value = herald::queue::DEFAULT_QUEUE)]
        queue: String,
        /// Missed ticks: skip, once or all.
        #[arg(long, default_value = "skip")]
        misfire: String,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        #[arg(long, default_value_t = herald::queue::DEFAULT_MAX_ATTEMPTS, allow_negative_numbers = true)]
        max_attempts: i32,
    },
    /// Delete a schedule.
    Remove { name: String },
    /// Stop firing a schedule.
    Pause { name: String },
    /// Fire again, from the next tick after now.
    Resume { name: String },
    /// Enqueue the schedule's task now, once; prints the task id.
    Trigger { name: String },
}

/// Run one `herald schedules …` command; output on stdout.
pub async fn run_schedules_command(
    config: &Config,
    command: SchedulesCommand,
) -> anyhow::Result<()> {
    let client = herald::db::connect(config, "herald-cli").await?;
    herald::migrate::check_schema(&client).await?;
    check_schedules_table(&client).await?;
    match command {
        SchedulesCommand::List { json } => {
            let rows = list(&client).await?;
            if rows.is_empty() && !json {
                println!("no schedules");
            }
            for row in rows {
                let upcoming = row.upcoming(3);
                if json {
                    let mut v = serde_json::to_value(&row).map_err(|error| Error::Json {
                        what: "a schedule".into(),
                        error,
                    })?;
                    if let Value::Object(m) = &mut v {
                        m.insert(
                            "upcoming".into(),
                            match &upcoming {
                                Ok(u) => Value::from(
                                    u.iter()
                                        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, false))
                                        .collect::<Vec<_>>(),
                                ),
                                Err(_) => Value::Array(Vec::new()),
                            },
                        );
                    }
                    println!("{v}");
                    continue;
                }
                print_row(&row, &upcoming);
            }
        }
        SchedulesCommand::Add {
            name,
            cron,
            kind,
            json,
            tz,
            queue,
            misfire,
            priority,
            max_attempts,
        } => {
            let payload: Value = serde_json::from_str(&json).map_err(|error| Error::Json {
                what: format!("payload of schedule {name:?}"),
                error,
            })?;
            let misfire: Misfire = misfire.parse().map_err(|e| {
                Error::InvalidSchedule(format!("schedule {name:?}: {}", message(&e)))
            })?;
            let schedule = Schedule::new(name, cron, kind, &payload)?
                .tz(tz)
                .queue(queue)
                .misfire(misfire)
                .priority(priority)
                .max_attempts(max_attempts);
            let when = schedule.validate()?;
            upsert(&client, &schedule).await?;
            let now: DateTime<Utc> = client
                .query_one("SELECT now()", &[])
                .await
                .context("reading the database clock")?
                .get(0);
            let next = when.upcoming(when.next_after(now)?, 3)?;
            println!(
                "schedule {:?} saved; next: {}",
                schedule.name,
                next.iter()
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, false))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        SchedulesCommand::Remove { name } => {
            remove(&client, &name).await?;
            println!("schedule {name:?} removed");
        }
        SchedulesCommand::Pause { name } => {
            pause(&client, &name).await?;
            println!("schedule {name:?} paused");
        }
        SchedulesCommand::Resume { name } => {
            resume(&client, &name).await?;
            println!("schedule {name:?} resumed");
        }
        SchedulesCommand::Trigger { name } => {
            let id = trigger(&client, &name).await?;
            println!("{id}");
        }
    }
    Ok(())
}

fn print_row(row: &ScheduleRow, upcoming: &Result<Vec<DateTime<Tz>>>) {
    let state = if row.enabled { "enabled" } else { "paused" };
    println!(
        "{}  {:?}  {}  {}  misfire={}  kind={}  queue={}  source={}",
        row.name, row.cron, row.tz, state, row.misfire, row.kind, row.queue, row.source
    );
    match upcoming {
        Ok(times) => {
            let label = if row.enabled {
                "next"
            } else {
                "next if resumed"
            };
            println!(
                "  {label}: {}",
                times
                    .iter()
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S %:z").to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Err(e) => println!("  next: none ({})", message(e)),
    }
    if let Ok(when) = CronSchedule::parse(&row.cron, &row.tz) {
        println!("  means: {}", when.describe());
    }
    if let Some(last) = row.last_run_at {
        println!(
            "  last tick: {}",
            last.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
    }
    if let Some(error) = &row.last_error {
        println!("  error: {error}");
    }
}

/// The message of an error without its variant's prefix.
fn message(e: &Error) -> String {
    match e {
        Error::InvalidSchedule(m) | Error::InvalidTask(m) => m.clone(),
        other => other.to_string(),
    }
}
