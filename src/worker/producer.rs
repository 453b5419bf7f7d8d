//! The producer: one per queue, it claims due tasks in batches with
//! `FOR UPDATE SKIP LOCKED` into `running` under a lease, bounded by the
//! queue's concurrency, hands each to an executor, and sleeps until the
//! next `run_at`, a wake-up or the poll interval when idle.
//!
//! It must never claim more tasks than it has permits for, and never leave
//! a task leased to this worker that no executor runs: after a claim whose
//! reply was lost it hands such tasks back before claiming again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::executor::start;
use super::shared::{checkout, discard, Shared};
use crate::error::{Error, Result};
use crate::store::tasks::{self, ClaimedTask, ResumePoint};
use crate::telemetry::names::{event, metric};

/// Where a claim that filled its batch ended, to start the next claim
/// there.
///
/// A claim moves tasks out of the claim index's predicate, but their old
/// entries stay in the index, dead, until VACUUM; they sit at its front,
/// where every claim from the start walks them. Autovacuum visits a table
/// at most once per `autovacuum_naptime` (a minute by default), and while
/// a large backlog drains, passing those entries becomes most of a claim's
/// time and the drain slows down as it goes. So while claims come back full
/// (a backlog), the next one starts after the last task claimed, within its
/// priority. Tasks that become ready before that point meanwhile (a higher
/// priority, a run_at in the past, a rescued lease) are found by the next
/// claim from the start: one at least every `RESUME_FOR`, and after any
/// claim that comes back short.
#[derive(Debug, Clone)]
pub(super) struct Resume {
    pub(super) point: ResumePoint,
    /// When the last claim from the start ran.
    pub(super) since: Instant,
}

/// Longest a worker claims from a resume point before it claims from the
/// start of the index again.
pub(super) const RESUME_FOR: Duration = Duration::from_millis(200);

impl Resume {
    /// The last task of `claimed` in claim order (priority descending, then
    /// run_at, then id).
    pub(super) fn after(claimed: &[ClaimedTask], since: Instant) -> Option<Resume> {
        claimed
            .iter()
            .min_by(|a, b| {
                a.priority
                    .cmp(&b.priority)
                    .then(b.run_at.cmp(&a.run_at))
                    .then(b.id.cmp(&a.id))
            })
            .map(|t| Resume {
                point: ResumePoint {
                    priority: t.priority,
                    run_at: t.run_at,
                    id: t.id,
                },
                since,
            })
    }
}

impl Shared {
    /// Claim up to `limit` ready tasks of `queue` in claim order, from
    /// the start of the claim index or, with `after`, from where the last
    /// claim ended.
    pub(super) async fn claim(
        &self,
        queue: &str,
        limit: usize,
        after: Option<&Resume>,
    ) -> Result<Vec<ClaimedTask>> {
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "a claim").await?;
        let lease = self.config.worker.lease.as_secs_f64();
        let claimed = tokio::time::timeout_at(
            deadline,
            tasks::claim(
                &client,
                queue,
                limit,
                &self.id,
                lease,
                after.map(|r| &r.point),
            ),
        )
        .await;
        match claimed {
            Ok(rows) => rows,
            Err(_) => {
                discard(client);
                Err(Error::Timeout(
                    bound,
                    format!("claiming tasks from queue {queue:?}"),
                ))
            }
        }
    }

    /// Hand back what a failed claim may have leased to this worker in
    /// `queue`: the tasks leased to it there that none of its executors
    /// runs. Returns how many.
    pub(super) async fn hand_back(&self, queue: &str) -> Result<i64> {
        let known: Vec<i64> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| &*r.queue == queue)
            .map(|((id, _), _)| *id)
            .collect();
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "a hand-back").await?;
        let handed_back =
            tokio::time::timeout_at(deadline, tasks::hand_back(&client, &self.id, queue, &known))
                .await;
        match handed_back {
            Ok(n) => n,
            Err(_) => {
                discard(client);
                Err(Error::Timeout(bound, "handing back unknown leases".into()))
            }
        }
    }

    /// Seconds until the queue's earliest ready task is due.
    pub(super) async fn next_due(&self, queue: &str) -> Result<Option<f64>> {
        let bound = self.claim_timeout();
        let deadline = tokio::time::Instant::now() + bound;
        let client = checkout(&self.internal, deadline, bound, "next-due").await?;
        let due = tokio::time::timeout_at(deadline, tasks::next_due(&client, queue)).await;
        match due {
            Ok(due) => due,
            Err(_) => {
                discard(client);
                Err(Error::Timeout(bound, "finding the next due task".into()))
            }
        }
    }
}

/// What wakes a producer: `wake` when its queue may have work, `up` when
/// the LISTEN session (re)connected (see `listener::Signals`).
pub(super) struct Wakeups {
    pub(super) wake: watch::Receiver<u64>,
    pub(super) up: watch::Receiver<u64>,
}

/// Claim and start tasks of one queue while permits are free.
pub(super) async fn produce(
    shared: Arc<Shared>,
    queue: String,
    sem: Arc<Semaphore>,
    wakeups: Wakeups,
    idle: Arc<crate::wake::Idle>,
    done: mpsc::UnboundedSender<Completion>,
    shutdown: CancellationToken,
) {
    let Wakeups { mut wake, mut up } = wakeups;
    let cfg = &shared.config.worker;
    let mut backoff = Duration::from_millis(100);
    let queue_label: Arc<str> = queue.as_str().into();
    let pickup = metrics::histogram!(metric::TASK_PICKUP, "queue" => queue.clone());
    // Free permits worth a claim while the queue is busy.
    let low_water = (sem.available_permits() / 4).clamp(1, cfg.batch_size);
    // Set while claims come back full; see `Resume`.
    let mut resume: Option<Resume> = None;
    // Set after a failed claim: it may have committed with its reply lost,
    // leaving tasks leased to this worker that no executor runs.
    let mut unsure = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        wake.borrow_and_update();
        if sem.available_permits() < low_water {
            // Busy: claiming one task per freed permit would cost a round
            // trip per task. Wait for a permit, then briefly for a batch.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                p = sem.acquire() => drop(p),
            }
            let _ = tokio::time::timeout(Duration::from_millis(2), async {
                drop(sem.acquire_many(low_water as u32).await)
            })
            .await;
        }
        if unsure {
            match shared.hand_back(&queue).await {
                Ok(n) => {
                    unsure = false;
                    if n > 0 {
                        tracing::warn!(%queue, tasks = n,
                            "handed back tasks a failed claim had leased to this worker");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, %queue, "handing back unknown leases failed; backing off");
                    up.borrow_and_update();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                        // Postgres answers the LISTEN session again.
                        Ok(()) = up.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let want = sem.available_permits().min(cfg.batch_size);
        let t0 = Instant::now();
        let after = resume.take().filter(|r| r.since.elapsed() < RESUME_FOR);
        let claimed_rows = shared.claim(&queue, want, after.as_ref()).await;
        tracing::debug!(%queue, want, resumed = after.is_some(), elapsed = ?t0.elapsed(), "claimed");
        let rows = match claimed_rows {
            Ok(rows) => {
                backoff = Duration::from_millis(100);
                if rows.len() >= want {
                    let since = after.map_or(t0, |r| r.since);
                    resume = Resume::after(&rows, since);
                }
                rows
            }
            Err(error) => {
                unsure = true;
                tracing::warn!(%error, %queue, "claiming tasks failed; backing off");
                up.borrow_and_update();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                    // Postgres answers the LISTEN session again.
                    Ok(()) = up.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let claimed = rows.len();
        if claimed > 0 {
            tracing::debug!(
                event = event::TASK_CLAIMED,
                herald.queue = queue.as_str(),
                herald.task.count = claimed as i64,
                "tasks claimed"
            );
        }
        shared
            .stats
            .claimed
            .fetch_add(claimed as u64, std::sync::atomic::Ordering::Relaxed);
        for task in rows {
            // Only this producer takes permits, so the ones counted above
            // are still free.
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                tracing::error!("no permit for a claimed task; it will be rescued after its lease");
                continue;
            };
            start(
                shared.clone(),
                &queue_label,
                &pickup,
                task,
                t0,
                permit,
                done.clone(),
            );
        }
        if claimed >= want {
            continue;
        }
        // Idle: sleep until the next task is due, a NOTIFY, or the poll.
        let mut pause = cfg.poll_interval;
        match shared.next_due(&queue).await {
            Ok(Some(secs)) if secs <= 0.0 => continue,
            Ok(Some(secs)) => pause = pause.min(Duration::from_secs_f64(secs)),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "finding the next due task failed"),
        }
        idle.idle();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.changed() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        idle.busy();
    }
}
