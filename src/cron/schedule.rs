//! The schedule model: [`Schedule`] as declared (configuration, code, CLI)
//! with its builder and validation, the [`Misfire`] policies, and the Rust
//! API that saves, pauses, resumes, removes, triggers, lists and syncs
//! schedules through the statements in `store::schedules`.
//!
//! It must never write `herald.schedules` but through `store::schedules`
//! (the SQL functions there validate again, for callers in other
//! languages), and never save a definition it has not validated: the error
//! names the schedule and quotes the offending text.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use tokio_postgres::GenericClient;

use super::expr::CronSchedule;
use super::inner;
use crate::error::{Context, Error, Result};
use crate::store::schedules as store;
use crate::store::schedules::ScheduleRow;

pub use crate::config::{Misfire, Schedule};

impl Schedule {
    pub fn new<T: Serialize + ?Sized>(
        name: impl Into<String>,
        cron: impl Into<String>,
        kind: impl Into<String>,
        payload: &T,
    ) -> Result<Schedule> {
        let name = name.into();
        let payload = serde_json::to_value(payload).map_err(|error| Error::Json {
            what: format!("payload of schedule {name:?}"),
            error,
        })?;
        Ok(Schedule {
            name,
            cron: cron.into(),
            kind: kind.into(),
            payload,
            tz: "UTC".into(),
            queue: crate::config::DEFAULT_QUEUE.into(),
            misfire: Misfire::Skip,
            priority: 0,
            max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
            enabled: None,
        })
    }

    pub fn tz(mut self, tz: impl Into<String>) -> Schedule {
        self.tz = tz.into();
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Schedule {
        self.queue = queue.into();
        self
    }

    pub fn misfire(mut self, misfire: Misfire) -> Schedule {
        self.misfire = misfire;
        self
    }

    pub fn priority(mut self, priority: i32) -> Schedule {
        self.priority = priority;
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Schedule {
        self.max_attempts = n;
        self
    }

    pub fn enabled(mut self, enabled: bool) -> Schedule {
        self.enabled = Some(enabled);
        self
    }

    /// Check everything a scheduler will need; the error names the schedule
    /// and quotes the offending text.
    pub fn validate(&self) -> Result<CronSchedule> {
        validate_schedule_name(&self.name)?;
        let in_schedule =
            |e: Error| Error::InvalidSchedule(format!("schedule {:?}: {}", self.name, inner(e)));
        let when = CronSchedule::parse(&self.cron, &self.tz).map_err(in_schedule)?;
        crate::queue::validate_name("task kind", &self.kind, 255).map_err(in_schedule)?;
        crate::queue::validate_name("queue", &self.queue, 128).map_err(in_schedule)?;
        if self.max_attempts < 1 {
            return Err(Error::InvalidSchedule(format!(
                "schedule {:?}: max_attempts must be at least 1, got {}",
                self.name, self.max_attempts
            )));
        }
        Ok(when)
    }
}

pub fn validate_schedule_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
    {
        return Err(Error::InvalidSchedule(format!(
            "invalid schedule name {name:?}: expected 1 to 200 letters, digits, '.', '_', '-' or ':'"
        )));
    }
    Ok(())
}

/// Where a schedule was declared. Only `config` rows are removed by the
/// configuration sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
}

// ---------------------------------------------------------------------------
// Saving, changing and listing schedules

/// Create or change a schedule (source `api`) through `client`, which may be
/// a transaction; validated here first, then by `herald.upsert_schedule`.
/// A change of its expression or zone makes the schedulers recompute its
/// next tick from now. Returns its id.
pub async fn upsert<C: GenericClient + Sync>(client: &C, schedule: &Schedule) -> Result<i64> {
    upsert_as(client, schedule, Source::Api).await
}

async fn upsert_as<C: GenericClient + Sync>(
    client: &C,
    schedule: &Schedule,
    source: Source,
) -> Result<i64> {
    schedule.validate()?;
    store::upsert(
        client,
        &store::Upsert {
            name: &schedule.name,
            cron: &schedule.cron,
            kind: &schedule.kind,
            payload: &schedule.payload,
            tz: &schedule.tz,
            queue: &schedule.queue,
            misfire: schedule.misfire.as_str(),
            priority: schedule.priority,
            max_attempts: schedule.max_attempts,
            enabled: schedule.enabled,
            source: source.as_str(),
        },
    )
    .await
}

/// Stop firing a schedule (it stays, with its definition).
pub async fn pause<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    store::pause(client, name).await
}

/// Fire again, from the next tick after now.
pub async fn resume<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    store::resume(client, name).await
}

pub async fn remove<C: GenericClient + Sync>(client: &C, name: &str) -> Result<()> {
    store::remove(client, name).await
}

/// Enqueue the schedule's task now, once; returns the task id.
pub async fn trigger<C: GenericClient + Sync>(client: &C, name: &str) -> Result<i64> {
    store::trigger(client, name).await
}

/// Every schedule as stored, by name.
pub async fn list<C: GenericClient + Sync>(client: &C) -> Result<Vec<ScheduleRow>> {
    store::list(client).await
}

// `ScheduleRow` is defined beside its SELECT in `store::schedules`; what it
// means in time is computed here, where the expressions are understood.
impl ScheduleRow {
    /// The next `n` fire times in the schedule's zone: from `next_run_at`
    /// when a scheduler has computed it, else (new, or paused) from now.
    pub fn upcoming(&self, n: usize) -> Result<Vec<DateTime<Tz>>> {
        let when = CronSchedule::parse(&self.cron, &self.tz)?;
        match self.next_run_at.filter(|_| self.enabled) {
            Some(next) => when.upcoming(next, n),
            None => when.upcoming(when.next_after(self.read_at)?, n),
        }
    }
}

/// Fail with a clear message when the database predates `herald.schedules`.
pub async fn check_schedules_table<C: GenericClient + Sync>(client: &C) -> Result<()> {
    if !store::table_exists(client).await? {
        return Err(Error::Config(
            "herald.schedules is missing: the database predates cron schedules; run \
             `herald migrate` (or enable migrate_on_start)"
                .into(),
        ));
    }
    Ok(())
}

/// What a configuration sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

/// Make the `config` schedules in the database match `schedules`: create the
/// new ones, update the changed ones, remove those no longer declared.
/// Schedules of source `api` are never removed; one declared in the
/// configuration under the same name becomes a `config` schedule. One
/// transaction, serialized with other processes' syncs.
pub async fn sync_config(
    client: &mut tokio_postgres::Client,
    schedules: &[Schedule],
) -> Result<SyncReport> {
    for s in schedules {
        s.validate()?;
    }
    let tx = client
        .transaction()
        .await
        .context("beginning the schedule sync")?;
    store::take_sync_lock(&tx).await?;
    let before: HashMap<String, DateTime<Utc>> = store::versions(&tx)
        .await?
        .into_iter()
        .map(|v| (v.name, v.updated_at))
        .collect();
    let mut report = SyncReport::default();
    for s in schedules {
        upsert_as(&tx, s, Source::Config).await?;
    }
    let names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    for after in store::versions_of(&tx, &names).await? {
        match before.get(&after.name) {
            None => report.created.push(after.name),
            Some(at) if *at != after.updated_at => report.updated.push(after.name),
            Some(_) => {}
        }
    }
    report.removed = store::remove_undeclared(&tx, &names).await?;
    tx.commit().await.context("committing the schedule sync")?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_quotes_the_text_and_says_what_is_expected() {
        for (expr, needle) in [
            ("61 * * * *", "61 * * * *"),
            ("* * * *", "4 fields"),
            ("* * * * * * *", "7 fields"),
            ("", "empty"),
            ("0 0 31 2 *", "never matches"),
            ("*/0 * * * *", "*/0 * * * *"),
        ] {
            let err = CronSchedule::parse(expr, "UTC").unwrap_err().to_string();
            assert!(err.contains(needle), "{expr:?}: {err}");
            assert!(err.contains("expected 5 fields"), "{expr:?}: {err}");
        }
        let err = CronSchedule::parse("* * * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"Mars/Olympus\"") && err.contains("IANA"),
            "{err}"
        );
        let err = "sometimes".parse::<Misfire>().unwrap_err().to_string();
        assert!(
            err.contains("\"sometimes\"") && err.contains("skip, once or all"),
            "{err}"
        );
        let s = Schedule::new("bad name", "* * * * *", "k", &serde_json::json!({})).unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("bad name"));
    }
}
