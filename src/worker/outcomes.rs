//! What became of each attempt ([`Ended`]), counted in metrics by queue
//! and kind and recorded on each task's span once its outcome is written.
//!
//! It only reports: it must never write a task, and never make a metric
//! series per kind this worker does not handle.

use std::collections::HashMap;
use std::sync::Arc;

use super::completer::Completion;
use super::executor::AttemptResult;
use super::shared::Shared;
use crate::telemetry::names::{event, metric};

/// What became of each attempt, in batch order, for metrics and spans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Ended {
    Succeeded,
    Retried,
    Dead,
    Cancelled,
    Snoozed,
    Released,
    /// Nothing was written: the lease had passed on (the rescuer or another
    /// worker owns the task now).
    Lost,
}

impl Ended {
    const ALL: [Ended; 7] = [
        Ended::Succeeded,
        Ended::Retried,
        Ended::Dead,
        Ended::Cancelled,
        Ended::Snoozed,
        Ended::Released,
        Ended::Lost,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Ended::Succeeded => "succeeded",
            Ended::Retried => "retried",
            Ended::Dead => "dead",
            Ended::Cancelled => "cancelled",
            Ended::Snoozed => "snoozed",
            Ended::Released => "released",
            Ended::Lost => "lost",
        }
    }
}

/// The `kind` label of tasks of kinds this worker has no handler for.
pub(super) const UNKNOWN_KIND: &str = "unknown";

/// Metric handles by queue and kind, made once: the completer records
/// thousands of outcomes a second.
#[derive(Default)]
pub(super) struct Meters {
    pub(super) by_queue: HashMap<Arc<str>, HashMap<String, KindMeters>>,
}

pub(super) struct KindMeters {
    pub(super) run: metrics::Histogram,
    pub(super) ended: [Option<metrics::Counter>; 7],
}

impl Meters {
    pub(super) fn kind(&mut self, queue: &Arc<str>, kind: &str) -> &mut KindMeters {
        let kinds = self.by_queue.entry(queue.clone()).or_default();
        if !kinds.contains_key(kind) {
            let run = metrics::histogram!(metric::TASK_RUN,
                "queue" => queue.to_string(), "kind" => kind.to_string());
            kinds.insert(
                kind.to_string(),
                KindMeters {
                    run,
                    ended: Default::default(),
                },
            );
        }
        kinds.get_mut(kind).expect("inserted above")
    }
}

/// Count the outcomes just written and close each task's span with its own.
pub(super) fn report(
    shared: &Shared,
    meters: &mut Meters,
    batch: &[Completion],
    outcomes: &[Ended],
) {
    for (c, &ended) in batch.iter().zip(outcomes) {
        // Series only for kinds this worker handles: a producer may write
        // any kind, and each label pair is a series kept forever.
        let kind = if shared.registry.entries.contains_key(&c.kind) {
            c.kind.as_str()
        } else {
            UNKNOWN_KIND
        };
        let m = meters.kind(&c.queue, kind);
        if !matches!(c.result, AttemptResult::Abandoned | AttemptResult::Released) {
            m.run.record(c.run.as_secs_f64());
        }
        let i = Ended::ALL.iter().position(|e| *e == ended).unwrap_or(0);
        m.ended[i]
            .get_or_insert_with(|| {
                metrics::counter!(metric::TASKS_COMPLETED,
                    "queue" => c.queue.to_string(), "kind" => kind.to_string(),
                    "outcome" => ended.as_str())
            })
            .increment(1);
        let span = &c.span;
        span.record("herald.task.outcome", ended.as_str());
        match ended {
            Ended::Succeeded => {
                tracing::debug!(parent: span, event = event::TASK_SUCCEEDED, "task succeeded")
            }
            Ended::Retried => {
                span.record("otel.status_code", "ERROR");
                let retry_in = match &c.result {
                    AttemptResult::Failed { retry_in, .. } => retry_in.as_secs_f64(),
                    _ => 0.0,
                };
                tracing::debug!(parent: span, event = event::TASK_RETRIED, retry_in, "task will be retried")
            }
            Ended::Dead => {
                span.record("otel.status_code", "ERROR");
                metrics::counter!(metric::DEAD_LETTERS, "source" => "task").increment(1);
                tracing::warn!(parent: span, event = event::TASK_DEAD_LETTERED, task = c.id,
                    queue = &*c.queue, kind = c.kind.as_str(), "task moved to herald.dead_letters")
            }
            Ended::Cancelled => {
                tracing::info!(parent: span, event = event::TASK_CANCELLED, task = c.id, "task cancelled")
            }
            Ended::Snoozed => {
                tracing::debug!(parent: span, event = event::TASK_SNOOZED, "task snoozed")
            }
            Ended::Released => {
                tracing::debug!(parent: span, event = event::TASK_RELEASED, "task released at shutdown")
            }
            Ended::Lost => {
                tracing::info!(parent: span, event = event::TASK_ABANDONED, task = c.id,
                    attempt = c.attempt, worker = &*shared.id,
                    "task's lease had passed on; outcome not written")
            }
        }
    }
}
