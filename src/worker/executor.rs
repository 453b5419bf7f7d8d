//! The executor: runs one claimed task's handler, with its timeout (the
//! task's, its kind's, or `worker.task_timeout`), panic capture,
//! cancellation, and the local lease deadline, and hands what came of it to
//! the completer.
//!
//! It must never write to the database, and never let a handler run past
//! its lease's local deadline: a handler whose lease was not renewed in
//! time is stopped before any other worker may rescue its task.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::completer::Completion;
use super::lease::{Lease, Limit};
use super::registry::{Outcome, Permanent, TaskContext};
use super::retry::retry_policy;
use super::shared::{Running, Shared, StopReason};
use crate::store::tasks::ClaimedTask;
use crate::telemetry::names::event;

/// What an attempt came to, as the completer will write it.
#[derive(Debug)]
pub(super) enum AttemptResult {
    Done,
    Failed {
        error: String,
        permanent: bool,
        retry_in: Duration,
    },
    /// Snoozed by the handler.
    Requeue(Duration),
    /// Handed back at shutdown, to run at once elsewhere.
    Released,
    Cancelled(String),
    /// Nothing to write: the lease is gone.
    Abandoned,
}

impl AttemptResult {
    /// Texts made writable (see `clean_text`).
    pub(super) fn cleaned(self) -> AttemptResult {
        match self {
            AttemptResult::Failed {
                error,
                permanent,
                retry_in,
            } => AttemptResult::Failed {
                error: clean_text(error),
                permanent,
                retry_in,
            },
            AttemptResult::Cancelled(reason) => AttemptResult::Cancelled(clean_text(reason)),
            other => other,
        }
    }
}

/// Longest error text or cancellation reason written to a task, in bytes.
pub(super) const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Text a `text` column accepts, of bounded length: Postgres refuses NUL
/// bytes, and a handler's error (a response body, say) may be any size.
pub(super) fn clean_text(mut text: String) -> String {
    if text.contains('\0') {
        text = text.replace('\0', "");
    }
    if text.len() > MAX_ERROR_BYTES {
        let total = text.len();
        let mut cut = MAX_ERROR_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… ({} of {total} bytes cut)", total - cut));
    }
    text
}

/// Spawn the executor of one claimed task.
pub(super) fn start(
    shared: Arc<Shared>,
    queue: &Arc<str>,
    pickup: &metrics::Histogram,
    task: ClaimedTask,
    claim_sent: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
    done: mpsc::UnboundedSender<Completion>,
) {
    let ClaimedTask {
        id,
        kind,
        payload,
        headers,
        attempt,
        max_attempts,
        timeout_secs: task_timeout,
        waited_secs: waited,
        ..
    } = task;
    pickup.record(waited.unwrap_or(0.0).max(0.0));
    let token = CancellationToken::new();
    let lease = Arc::new(Lease::new(&shared, claim_sent));
    shared
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            (id, attempt),
            Running {
                token: token.clone(),
                reason: None,
                lease: lease.clone(),
                queue: queue.clone(),
                started: Instant::now(),
            },
        );
    let headers = match serde_json::from_str::<Value>(&headers) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let span = tracing::info_span!(
        "herald.task.run",
        otel.kind = "consumer",
        herald.queue = &**queue,
        herald.task.kind = kind.as_str(),
        herald.task.id = id,
        herald.task.attempt = attempt,
        herald.task.max_attempts = max_attempts,
        herald.task.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // The producer's trace context, stored at enqueue (or copied from the
    // event by the relay's fan-out), makes this span its child.
    crate::telemetry::set_parent_from_headers(&span, &headers);
    let ctx = TaskContext {
        id,
        kind: kind.clone(),
        queue: queue.to_string(),
        attempt,
        max_attempts,
        headers,
        cancel: token.clone(),
        pool: shared.pool.clone(),
        worker_id: shared.id.clone(),
        retain_completed: shared.config.worker.retain_completed.is_some(),
    };
    let queue = queue.clone();
    let task_span = span.clone();
    tokio::spawn(
        async move {
            tracing::debug!(event = event::TASK_STARTED, "task started");
            let t0 = Instant::now();
            let result = execute(&shared, ctx, &kind, &payload, task_timeout, &token, &lease)
                .await
                .cleaned();
            let _ = done.send(Completion {
                id,
                attempt,
                result,
                lease,
                queue,
                kind,
                run: t0.elapsed(),
                span: task_span,
            });
            drop(permit);
        }
        .instrument(span),
    );
}

pub(super) async fn execute(
    shared: &Shared,
    ctx: TaskContext,
    kind: &str,
    payload: &str,
    task_timeout: Option<f64>,
    token: &CancellationToken,
    lease: &Lease,
) -> AttemptResult {
    let id = ctx.id;
    let attempt = ctx.attempt;
    let Some(entry) = shared.registry.entries.get(kind) else {
        return AttemptResult::Failed {
            error: format!(
                "no handler for task kind {kind:?} on worker {} (it handles: {})",
                shared.id,
                shared.registry.kinds().join(", ")
            ),
            permanent: false,
            retry_in: retry_policy(shared, None).delay(attempt),
        };
    };
    let retry = retry_policy(shared, Some(entry));
    let value: Value = match serde_json::from_str(payload) {
        Ok(v) => v,
        Err(e) => {
            return AttemptResult::Failed {
                error: format!("payload is not JSON: {e}"),
                permanent: true,
                retry_in: Duration::ZERO,
            }
        }
    };
    // The task's own timeout, else its kind's, else the worker's default:
    // a hung handler must not hold its slot (and renew its lease) forever.
    let timeout = task_timeout
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(1e9)))
        .or(entry.options.timeout)
        .unwrap_or(shared.config.worker.task_timeout);
    // The `herald.task.run` span is kept out of the log output (see
    // telemetry::init); this one is not, so the lines a handler logs name
    // its task and attempt.
    let log_span = tracing::info_span!("task", task = id, attempt);
    let run = AssertUnwindSafe((entry.handler)(ctx, value).instrument(log_span)).catch_unwind();
    let timeout_at = Instant::now() + timeout;
    let outcome = tokio::select! {
        r = run => Some(r),
        _ = token.cancelled() => None,
        // One timer for both limits.
        limit = lease.expired_or(shared, timeout_at) => match limit {
            Limit::Timeout => {
                token.cancel();
                tracing::warn!(task = id, attempt, ?timeout, "task timed out; its handler was stopped");
                return AttemptResult::Failed {
                    error: format!("timed out after {timeout:?}"),
                    permanent: false,
                    retry_in: retry.delay(attempt),
                };
            }
            // Dropping the handler's future here stops it before the
            // server's lease can end, and the outcome is not written.
            Limit::Lease => {
                shared.stop_attempt((id, attempt), StopReason::LeaseLost);
                tracing::warn!(task = id, attempt, worker = &*shared.id,
                    "lease not renewed in time; handler stopped before another worker can take the task");
                return AttemptResult::Abandoned;
            }
        },
    };
    let stop_reason = || {
        shared
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id, attempt))
            .and_then(|r| r.reason)
    };
    // A handler that noticed the token may return Ok: why the token fired
    // decides the outcome, not what the handler returned.
    let outcome = if token.is_cancelled() { None } else { outcome };
    match outcome {
        None => match stop_reason() {
            Some(StopReason::Cancelled) => AttemptResult::Cancelled("cancelled on request".into()),
            Some(StopReason::Shutdown) => AttemptResult::Released,
            _ => AttemptResult::Abandoned,
        },
        Some(Err(panic)) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            AttemptResult::Failed {
                error: format!("handler panicked: {msg}"),
                permanent: false,
                retry_in: retry.delay(attempt),
            }
        }
        Some(Ok(Ok(Outcome::Done))) => AttemptResult::Done,
        Some(Ok(Ok(Outcome::Snooze(d)))) => AttemptResult::Requeue(d),
        Some(Ok(Ok(Outcome::Cancel(reason)))) => AttemptResult::Cancelled(reason),
        Some(Ok(Err(error))) => {
            let permanent = error.downcast_ref::<Permanent>().is_some();
            AttemptResult::Failed {
                error: format!("{error:#}"),
                permanent,
                retry_in: retry.delay(attempt),
            }
        }
    }
}
