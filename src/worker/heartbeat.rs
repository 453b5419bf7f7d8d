//! The heartbeat: extends the leases of the attempts this worker runs
//! (fenced by attempt), pushes their local deadlines on, and stops the ones
//! whose lease is gone or whose cancellation a NOTIFY missed; it also keeps
//! the oldest-running gauges.
//!
//! It must never extend an earlier attempt's lease over a later one's, and
//! never push a local deadline on without a renewal the server confirmed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::shared::{checkout, discard, AttemptKey, Running, Shared, StopReason};
use crate::error::Error;
use crate::store::tasks;
use crate::telemetry::names::metric;

/// Extend the leases of running tasks; stop the ones whose lease is gone or
/// whose cancellation was requested. Runs on the worker's own pool, each
/// round bounded by the interval, so a starved handlers' pool or a dead
/// connection cannot hold it; a round that fails leaves the local deadlines
/// where they were, and the executors stop their handlers at them.
pub(super) async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let lease = shared.config.worker.lease;
    let every = shared.config.worker.heartbeat_every();
    let mut oldest = OldestGauges::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Only the newest attempt of a task can hold its lease.
        let mut held: Vec<(i64, i32)> = {
            let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
            oldest.update(&running);
            running.keys().copied().collect()
        };
        if held.is_empty() {
            continue;
        }
        held.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        held.dedup_by_key(|(id, _)| *id);
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
        let deadline = tokio::time::Instant::now() + every;
        let result = async {
            let client = checkout(&shared.internal, deadline, every, "a heartbeat").await?;
            let sent = Instant::now();
            let renewed = tokio::time::timeout_at(
                deadline,
                tasks::heartbeat(&client, &ids, &attempts, &shared.id, lease.as_secs_f64()),
            )
            .await;
            match renewed {
                Ok(renewed) => Ok((sent, renewed?)),
                Err(_) => {
                    discard(client);
                    Err(Error::Timeout(every, "extending task leases".into()))
                }
            }
        }
        .await;
        match result {
            Ok((sent, renewed)) => {
                let renewed: HashMap<(i64, i32), bool> = renewed
                    .iter()
                    .map(|r| ((r.id, r.attempt), r.cancel_requested))
                    .collect();
                let mut lost = Vec::new();
                {
                    let running = shared.running.lock().unwrap_or_else(|e| e.into_inner());
                    for key in &held {
                        let Some(r) = running.get(key) else { continue };
                        match renewed.get(key) {
                            Some(cancel) => {
                                r.lease.renew(&shared, sent);
                                if *cancel {
                                    lost.push((*key, StopReason::Cancelled));
                                }
                            }
                            // Completed meanwhile, or the lease is someone
                            // else's.
                            None => lost.push((*key, StopReason::LeaseLost)),
                        }
                    }
                }
                for (key, reason) in lost {
                    shared.stop_attempt(key, reason);
                }
            }
            Err(error) => tracing::warn!(%error, tasks = ids.len(), "heartbeat failed"),
        }
    }
}

/// `herald_task_oldest_running_seconds` per queue this worker has run:
/// how long its longest-running task has been at it (0 when none runs).
#[derive(Default)]
pub(super) struct OldestGauges {
    pub(super) by_queue: HashMap<Arc<str>, metrics::Gauge>,
}

impl OldestGauges {
    pub(super) fn update(&mut self, running: &HashMap<AttemptKey, Running>) {
        let mut ages: HashMap<&Arc<str>, f64> = HashMap::new();
        for r in running.values() {
            let age = r.started.elapsed().as_secs_f64();
            let e = ages.entry(&r.queue).or_insert(0.0);
            *e = e.max(age);
        }
        for queue in ages.keys() {
            if !self.by_queue.contains_key(*queue) {
                let g = metrics::gauge!(metric::TASK_OLDEST_RUNNING, "queue" => queue.to_string());
                self.by_queue.insert((*queue).clone(), g);
            }
        }
        for (queue, gauge) in &self.by_queue {
            gauge.set(ages.get(queue).copied().unwrap_or(0.0));
        }
    }
}
