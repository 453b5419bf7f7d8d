//! The completer: writes what came of each attempt (successes in batches
//! in a transaction of their own, every other outcome on its own: retry or
//! dead letter through `herald.fail_task`, snooze, release, cancel), and
//! retries a batch while its leases hold.
//!
//! It must never write an outcome whose lease it no longer holds: every
//! write is fenced by task id, attempt and worker id, and an outcome whose
//! local lease deadline has passed is given up (the rescuer returns its
//! task to the queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::executor::AttemptResult;
use super::lease::Lease;
use super::outcomes::{report, Ended, Meters};
use super::retry::retryable;
use super::shared::{checkout, discard, Shared};
use crate::error::{Error, Result};
use crate::store::tasks::{self, Failed};
use crate::telemetry::names::event;

/// What the executor hands the completer: one attempt's result to write.
pub(super) struct Completion {
    pub(super) id: i64,
    pub(super) attempt: i32,
    pub(super) result: AttemptResult,
    /// Written only while this is not past: after it, fencing would refuse
    /// the write anyway.
    pub(super) lease: Arc<Lease>,
    pub(super) queue: Arc<str>,
    pub(super) kind: String,
    /// How long the handler ran.
    pub(super) run: Duration,
    /// The task's `herald.task.run` span: it ends once the outcome is written.
    pub(super) span: tracing::Span,
}

/// Write outcomes: successes in batches, the rest one by one.
///
/// A batch is retried until every outcome in it is written or its lease
/// (renewed by the heartbeat meanwhile) has passed: dropping it earlier
/// would make tasks that ran run again. Each outcome is written on its own,
/// so one the server refuses does not hold back the others.
pub(super) async fn complete(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    const MAX_BATCH: usize = 1000;
    const MAX_YIELDS: usize = 8;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut outcomes: Vec<Option<Ended>> = Vec::with_capacity(MAX_BATCH);
    let mut meters = Meters::default();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // A claimed batch's executors finish together, but each is its own
        // task: the first to send wakes us before the others have run, and
        // writing it alone would cost a commit for one task. Yielding lets
        // the ones already running send too; a yield that brings nothing
        // ends the wait.
        for _ in 0..MAX_YIELDS {
            let before = batch.len();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            if (batch.len() == before && before > 1) || batch.len() >= MAX_BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
        let t0 = Instant::now();
        outcomes.clear();
        // Nothing to write for an attempt whose lease is gone.
        outcomes.extend(
            batch
                .iter()
                .map(|c| matches!(c.result, AttemptResult::Abandoned).then_some(Ended::Lost)),
        );
        let mut pause = Duration::from_millis(50);
        loop {
            let bound = shared.claim_timeout();
            let deadline = tokio::time::Instant::now() + bound;
            if outcomes.iter().all(Option::is_some) {
                break;
            }
            let written = match checkout(&shared.internal, deadline, bound, "completions").await {
                Ok(client) => {
                    let w = tokio::time::timeout_at(
                        deadline,
                        write_completions(&shared, &client, &batch, &mut outcomes),
                    )
                    .await;
                    match w {
                        Ok(w) => w,
                        Err(_) => {
                            discard(client);
                            Err(Error::Timeout(bound, "recording task outcomes".into()))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            let Err(error) = written else { break };
            // Outcomes whose lease has passed are given up: fencing would
            // refuse them, and the rescuer returns their tasks to the queue.
            let now = Instant::now();
            let mut pending = 0;
            for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
                if o.is_none() {
                    if c.lease.deadline(&shared) <= now {
                        tracing::error!(parent: &c.span, task = c.id, attempt = c.attempt, %error,
                            "could not record the task's outcome before its lease ended; it will run again");
                        *o = Some(Ended::Lost);
                    } else {
                        pending += 1;
                    }
                }
            }
            if pending == 0 {
                break;
            }
            tracing::warn!(%error, tasks = pending, "recording task outcomes failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        let outcomes_now: Vec<Ended> = outcomes.iter().map(|o| o.unwrap_or(Ended::Lost)).collect();
        report(&shared, &mut meters, &batch, &outcomes_now);
        tracing::debug!(tasks = batch.len(), elapsed = ?t0.elapsed(), "outcomes recorded");
        let mut running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
        for c in batch.drain(..) {
            running.remove(&(c.id, c.attempt));
        }
    }
}

/// Write the outcomes of `batch` not yet written (`None` in `outcomes`),
/// filling in what became of each. Returns an error, with the rest left
/// `None`, when the connection fails; an outcome the server refuses is
/// logged and given up on its own.
pub(super) async fn write_completions(
    shared: &Shared,
    client: &deadpool_postgres::Object,
    batch: &[Completion],
    outcomes: &mut [Option<Ended>],
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    // Sorted and unique by id, as tasks::complete looks attempts up by
    // binary search.
    let mut done: Vec<(i64, i32)> = batch
        .iter()
        .zip(outcomes.iter())
        .filter(|(c, o)| o.is_none() && matches!(c.result, AttemptResult::Done))
        .map(|(c, _)| (c.id, c.attempt))
        .collect();
    done.sort_unstable();
    done.dedup_by_key(|(id, _)| *id);
    let (ids, attempts): (Vec<i64>, Vec<i32>) = done.into_iter().unzip();
    if !ids.is_empty() {
        let retain = shared.config.worker.retain_completed.is_some();
        let completed = tasks::complete(client, &ids, &attempts, &shared.id, retain).await?;
        // Fewer rows than ids: those leases had passed to someone else (or
        // the handler completed the task itself with `complete_in`).
        shared.stats.succeeded.fetch_add(completed, Relaxed);
        // Rare: find which were refused, so that each is reported (a task
        // still unfinished was rescued or taken by another worker).
        let refused: Vec<i64> = if (completed as usize) < ids.len() {
            tasks::still_unfinished(client, &ids).await?
        } else {
            Vec::new()
        };
        for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
            if o.is_none() && matches!(c.result, AttemptResult::Done) {
                *o = Some(if refused.contains(&c.id) {
                    Ended::Lost
                } else {
                    Ended::Succeeded
                });
            }
        }
    }
    for (c, o) in batch.iter().zip(outcomes.iter_mut()) {
        if o.is_some() {
            continue;
        }
        let written = write_one(shared, client, c).await;
        *o = Some(match written {
            Ok(ended) => ended,
            Err(error) if retryable(&error) => return Err(error),
            Err(error) => {
                tracing::error!(parent: &c.span, task = c.id, attempt = c.attempt, %error,
                    "the task's outcome was refused; its lease will expire and it runs again");
                Ended::Lost
            }
        });
    }
    Ok(())
}

/// Write one outcome other than success.
pub(super) async fn write_one(
    shared: &Shared,
    client: &deadpool_postgres::Object,
    c: &Completion,
) -> Result<Ended> {
    use std::sync::atomic::Ordering::Relaxed;
    Ok(match &c.result {
        AttemptResult::Done => Ended::Succeeded,
        AttemptResult::Abandoned => Ended::Lost,
        AttemptResult::Failed {
            error,
            permanent,
            retry_in,
        } => {
            let what = tasks::fail(
                client,
                c.id,
                c.attempt,
                &shared.id,
                error,
                interval_secs(*retry_in),
                *permanent,
            )
            .await?;
            shared.stats.failed.fetch_add(1, Relaxed);
            tracing::info!(parent: &c.span, event = event::TASK_FAILED, task = c.id,
                attempt = c.attempt, outcome = what.as_str(), %error, "task failed");
            match what {
                Failed::Retry => Ended::Retried,
                Failed::Dead => Ended::Dead,
                Failed::Cancelled => Ended::Cancelled,
                Failed::NotHeld => Ended::Lost,
            }
        }
        AttemptResult::Requeue(after) => {
            if requeue(client, shared, c, interval_secs(*after)).await? {
                Ended::Snoozed
            } else {
                Ended::Lost
            }
        }
        AttemptResult::Released => {
            if requeue(client, shared, c, 0.0).await? {
                Ended::Released
            } else {
                Ended::Lost
            }
        }
        AttemptResult::Cancelled(reason) => {
            if tasks::cancel_running(client, c.id, c.attempt, &shared.id, reason).await? {
                Ended::Cancelled
            } else {
                Ended::Lost
            }
        }
    })
}

/// Longest delay a snooze or retry is written with: `now() + interval`
/// must stay a valid timestamp (a `Duration` may hold far more).
pub(super) const MAX_DELAY_SECS: f64 = 100.0 * 365.25 * 86400.0;

pub(super) fn interval_secs(d: Duration) -> f64 {
    d.as_secs_f64().min(MAX_DELAY_SECS)
}

/// Give the attempt back and put its task back to `ready` after
/// `after_secs`; `false` when its lease had passed on.
pub(super) async fn requeue(
    client: &deadpool_postgres::Object,
    shared: &Shared,
    c: &Completion,
    after_secs: f64,
) -> Result<bool> {
    tasks::requeue(client, c.id, c.attempt, &shared.id, after_secs).await
}
