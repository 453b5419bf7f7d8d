//! The scheduler service, tick → enqueue: sync the declared schedules, then
//! until shutdown claim due `herald.schedules` rows, plan each one's ticks
//! (`misfire::plan`), insert their tasks, advance `next_run_at`, commit,
//! and sleep until the next tick, the safety poll, or a "schedules changed"
//! signal from the listener.
//!
//! It must never fire a tick twice: a tick's task is inserted, with the
//! unique key `cron:<name>:<tick RFC 3339>`, in the same transaction that
//! holds the schedule's row lock (`FOR UPDATE SKIP LOCKED`) and advances its
//! `next_run_at`. It must never decide that a tick is due by the local
//! clock: the database's `now()` decides, so skewed nodes cannot
//! double-fire. It must never let one unusable row stop the others: such a
//! row gets `last_error` and is skipped until its definition changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::expr::parse_tz;
use super::inner;
use super::listener;
use super::misfire::{plan, Fire, MisfireRules, Plan};
use super::schedule::{check_schedules_table, sync_config, upsert, Misfire, Schedule, SyncReport};
use super::SchedulerStats;
use crate::config::Config;
use crate::error::{Context, Result};
use crate::store::schedules::{self as store, DueSchedule};

/// Most due schedules claimed in one transaction.
const CLAIM_BATCH: i64 = 100;

/// Fires due schedules until shut down. Run as many as you like, in as many
/// processes: each tick fires once across all of them.
pub struct Scheduler {
    config: Config,
    pool: Pool,
    declared: Vec<Schedule>,
    stats: Arc<SchedulerStats>,
    /// The process's notifier; `None`: the scheduler runs one of its own.
    notifier: Option<crate::notifier::Notifier>,
}

impl Scheduler {
    pub fn new(config: &Config, pool: Pool) -> Scheduler {
        Scheduler {
            config: config.clone(),
            pool,
            declared: Vec::new(),
            stats: Arc::new(SchedulerStats::default()),
            notifier: None,
        }
    }

    /// Declare a schedule in code; it is saved (source `api`: created or
    /// updated, never removed automatically) when the scheduler starts.
    pub fn schedule(mut self, schedule: Schedule) -> Scheduler {
        self.declared.push(schedule);
        self
    }

    /// Hear `herald_schedules` through the process's `notifier` (which the
    /// caller runs) instead of a LISTEN session of the scheduler's own.
    pub fn with_notifier(mut self, notifier: crate::notifier::Notifier) -> Scheduler {
        self.notifier = Some(notifier);
        self
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// Sync `[[schedules]]` and the schedules declared in code, then fire
    /// due ticks until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if self.notifier.is_none() {
            // Before any statement (`Herald::builder` checks for its services).
            crate::notifier::check(&self.config).await?;
        }
        self.save_declared().await?;
        let (wake_tx, wake) = watch::channel(0u64);
        let own = self.notifier.is_none();
        let notifier = self.notifier.clone().unwrap_or_else(|| {
            crate::notifier::Notifier::new(&self.config, super::LISTEN_APPLICATION_NAME)
        });
        // Notifications that cannot reach the LISTEN session stop it.
        let (shutdown, notifier_failure) = notifier.stop_on_failure(&shutdown);
        let stop_notifier = shutdown.child_token();
        let own_notifier = own.then(|| tokio::spawn(notifier.clone().run(stop_notifier.clone())));
        let listener = tokio::spawn(listener::listen(
            notifier.subscribe(&[super::CHANNEL]),
            Arc::new(wake_tx),
            self.stats.clone(),
            shutdown.clone(),
        ));
        tracing::info!(
            configured = self.config.schedules.len(),
            "scheduler started"
        );
        self.fire_until(wake, &shutdown).await;
        listener.abort();
        let _ = listener.await;
        stop_notifier.cancel();
        if let Some(task) = own_notifier {
            let _ = task.await;
        }
        if let Ok(Some(error)) = notifier_failure.await {
            return Err(error);
        }
        tracing::info!(
            fired = self.stats.fired.load(Ordering::Relaxed),
            "scheduler stopped"
        );
        Ok(())
    }

    /// The configuration's schedules (synced: created, updated, removed) and
    /// those declared in code (created or updated), on one dedicated session.
    async fn save_declared(&self) -> Result<()> {
        for s in &self.declared {
            s.validate()?;
        }
        let mut client = crate::db::connect(&self.config, "herald-scheduler").await?;
        crate::migrate::check_schema(&client).await?;
        check_schedules_table(&client).await?;
        let report = sync_config(&mut client, &self.config.schedules).await?;
        if report != SyncReport::default() {
            tracing::info!(
                created = ?report.created,
                updated = ?report.updated,
                removed = ?report.removed,
                "schedules synced from the configuration"
            );
        }
        for s in &self.declared {
            upsert(&client, s).await?;
        }
        Ok(())
    }

    /// Fire due ticks, then sleep until the next tick by the database's
    /// clock, the safety poll, or a bump of `wake` (schedules changed, or
    /// the listener reconnected), until `shutdown`.
    async fn fire_until(&self, mut wake: watch::Receiver<u64>, shutdown: &CancellationToken) {
        let rules = MisfireRules::from_config(&self.config.scheduler);
        let poll = self.config.scheduler.poll_interval;
        let mut backoff =
            crate::relay::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut busy = Duration::from_millis(20);
        while !shutdown.is_cancelled() {
            wake.borrow_and_update();
            let pause = match self.cycle(rules).await {
                Ok(Some(secs)) if secs > 0.0 => {
                    backoff.reset();
                    busy = Duration::from_millis(20);
                    Duration::from_secs_f64(secs).min(poll)
                }
                Ok(Some(_)) => {
                    // Due rows we could not lock: another scheduler is firing
                    // them. Its commit notifies; poll gently meanwhile.
                    backoff.reset();
                    let p = busy;
                    busy = (busy * 2).min(poll);
                    p
                }
                Ok(None) => {
                    backoff.reset();
                    poll
                }
                Err(error) => {
                    tracing::warn!(%error, "scheduler cycle failed; backing off");
                    backoff.next()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = wake.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Fire everything due; return the seconds until the next tick by the
    /// database's clock (`<= 0`: due rows are held by another scheduler), or
    /// `None` when no enabled schedule has one.
    async fn cycle(&self, rules: MisfireRules) -> Result<Option<f64>> {
        self.stats.cycles.fetch_add(1, Ordering::Relaxed);
        loop {
            let claimed = self.claim_and_fire(rules).await?;
            if claimed < CLAIM_BATCH as usize {
                break;
            }
        }
        let client = self.pool.get().await?;
        let next = store::next_wake(&**client).await?;
        if next.pending {
            return Ok(Some(0.0));
        }
        Ok(next.secs)
    }

    /// One transaction: lock due rows (skipping those another scheduler
    /// holds), insert their ticks' tasks, advance next_run_at, commit.
    async fn claim_and_fire(&self, rules: MisfireRules) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .context("beginning a schedule claim")?;
        let due = store::claim_due(&tx, CLAIM_BATCH).await?;
        if due.is_empty() {
            tx.commit()
                .await
                .context("ending an empty schedule claim")?;
            return Ok(0);
        }
        let span = tracing::info_span!(
            "herald.schedule.fire",
            otel.kind = "producer",
            herald.schedule.count = due.len() as i64,
            herald.schedule.fired = tracing::field::Empty,
        );
        // The fired tasks continue this span's trace.
        let traceparent = crate::telemetry::traceparent_of(&span);
        let mut tasks = TickTasks::default();
        let mut advance = store::Advance::default();
        let mut outcomes = Vec::with_capacity(due.len());
        for schedule in &due {
            let plan = self.plan_one(schedule, rules, &span);
            let zone = parse_tz(&schedule.tz).ok();
            for fire in &plan.fires {
                tasks.push(schedule, zone, fire, traceparent.as_deref());
            }
            advance.id.push(schedule.id);
            advance.next_run_at.push(plan.next_run_at);
            advance.last_run_at.push(plan.fires.last().map(|f| f.tick));
            advance.last_error.push(plan.last_error.clone());
            outcomes.push((schedule, plan));
        }
        let inserted = insert_tick_tasks(&tx, &tasks).await?;
        store::advance(&*tx, &advance).await?;
        tx.commit().await.context("committing fired schedules")?;
        self.stats.fired.fetch_add(inserted, Ordering::Relaxed);
        self.stats.claims.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(schedules = due.len(), tasks = inserted, "schedules fired");
        span.record("herald.schedule.fired", inserted as i64);
        record_committed(&span, &outcomes);
        Ok(due.len())
    }

    /// The plan of one claimed row; an unusable row is logged and counted.
    fn plan_one(&self, s: &DueSchedule, rules: MisfireRules, span: &tracing::Span) -> Plan {
        let plan = match s.misfire.parse::<Misfire>() {
            Ok(misfire) => plan(&s.cron, &s.tz, misfire, s.next_run_at, s.now, rules),
            Err(e) => Plan {
                fires: Vec::new(),
                dropped: 0,
                next_run_at: None,
                last_error: Some(inner(e)),
            },
        };
        if let Some(error) = &plan.last_error {
            self.stats.invalid.fetch_add(1, Ordering::Relaxed);
            tracing::error!(schedule = %s.name, %error, "schedule cannot fire; marked with last_error and skipped until it changes");
        }
        if plan.dropped > 0 || plan.fires.iter().any(|f| f.backfilled || f.misfire_once) {
            tracing::warn!(
                parent: span,
                event = crate::telemetry::names::event::SCHEDULE_MISFIRED,
                dropped = plan.dropped as u64,
                schedule = %s.name,
                policy = %s.misfire,
                fired = plan.fires.len(),
                missed_since = ?s.next_run_at,
                "ticks were missed while no scheduler ran"
            );
        }
        plan
    }
}

/// The tasks of the ticks one claim fires, one entry per task in each
/// column (the shape of `insert_tick_tasks`'s `unnest`).
#[derive(Default)]
struct TickTasks {
    queue: Vec<String>,
    kind: Vec<String>,
    payload: Vec<String>,
    headers: Vec<String>,
    priority: Vec<i32>,
    max_attempts: Vec<i32>,
    unique_key: Vec<String>,
}

impl TickTasks {
    fn push(&mut self, s: &DueSchedule, zone: Option<Tz>, fire: &Fire, traceparent: Option<&str>) {
        self.queue.push(s.queue.clone());
        self.kind.push(s.kind.clone());
        self.payload.push(s.payload.clone());
        self.headers
            .push(Value::Object(tick_headers(s, zone, fire, traceparent)).to_string());
        self.priority.push(s.priority);
        self.max_attempts.push(s.max_attempts);
        self.unique_key.push(unique_key(&s.name, fire.tick));
    }
}

/// The headers a tick's task carries: its schedule, its tick (UTC and
/// local), how it was fired, and the trace it continues.
fn tick_headers(
    s: &DueSchedule,
    zone: Option<Tz>,
    fire: &Fire,
    traceparent: Option<&str>,
) -> Map<String, Value> {
    let mut headers = Map::new();
    if let Some(tp) = traceparent {
        headers.insert(crate::outbox::headers::TRACEPARENT.into(), Value::from(tp));
    }
    headers.insert("herald_schedule".into(), Value::from(s.name.as_str()));
    headers.insert("herald_tick".into(), Value::from(rfc3339(fire.tick)));
    if let Some(zone) = zone {
        headers.insert(
            "herald_tick_local".into(),
            Value::from(
                fire.tick
                    .with_timezone(&zone)
                    .to_rfc3339_opts(SecondsFormat::AutoSi, false),
            ),
        );
    }
    if fire.backfilled {
        headers.insert("herald_backfilled".into(), Value::Bool(true));
    }
    if fire.misfire_once {
        headers.insert("herald_misfire".into(), Value::from("once"));
    }
    headers
}

/// The ticks' tasks, skipped for a tick whose unique key already has an
/// unfinished task (the arbiter must match the `tasks_unique_key` index).
/// The scheduler's one write to `herald.tasks`, in the claim's transaction
/// so a tick's task and its schedule's advance commit together. Returns the
/// number of tasks inserted.
async fn insert_tick_tasks(tx: &deadpool_postgres::Transaction<'_>, t: &TickTasks) -> Result<u64> {
    if t.unique_key.is_empty() {
        return Ok(0);
    }
    let inserted = crate::store::tasks::insert_ticks(
        &**tx,
        crate::store::tasks::Ticks {
            queue: &t.queue,
            kind: &t.kind,
            payload: &t.payload,
            headers: &t.headers,
            priority: &t.priority,
            max_attempts: &t.max_attempts,
            unique_key: &t.unique_key,
        },
    )
    .await?;
    if inserted < t.unique_key.len() as u64 {
        tracing::warn!(
            planned = t.unique_key.len(),
            inserted,
            "some ticks already had an unfinished task with their unique key"
        );
    }
    Ok(inserted)
}

/// Events and metrics of a committed claim: each fired tick with its
/// lateness, and the ticks dropped by misfire policies.
fn record_committed(span: &tracing::Span, outcomes: &[(&DueSchedule, Plan)]) {
    use crate::telemetry::names::{event, metric};
    for (s, plan) in outcomes {
        for fire in &plan.fires {
            let lateness = (s.now - fire.tick).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            tracing::debug!(parent: span, event = event::SCHEDULE_FIRED,
                schedule = s.name.as_str(), tick = %rfc3339(fire.tick), lateness,
                "schedule fired");
            metrics::counter!(metric::SCHEDULE_FIRED, "schedule" => s.name.clone()).increment(1);
            metrics::histogram!(metric::SCHEDULE_LATENESS, "schedule" => s.name.clone())
                .record(lateness.max(0.0));
        }
    }
    for (s, plan) in outcomes {
        if plan.dropped > 0 {
            metrics::counter!(metric::SCHEDULE_MISFIRED, "schedule" => s.name.clone())
                .increment(plan.dropped as u64);
        }
    }
}

/// The unique key of a tick's task: `cron:<name>:<tick in RFC 3339, UTC>`.
pub fn unique_key(name: &str, tick: DateTime<Utc>) -> String {
    format!("cron:{name}:{}", rfc3339(tick))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn unique_keys_are_utc_rfc3339() {
        let tick = chrono_tz::Europe::Berlin
            .with_ymd_and_hms(2026, 10, 25, 2, 0, 0)
            .earliest()
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(unique_key("n", tick), "cron:n:2026-10-25T00:00:00Z");
    }
}
