//! What the worker runs: the [`Registry`] of handlers by task kind (with
//! each kind's [`KindOptions`]), the [`TaskContext`] a handler gets, and
//! the [`Outcome`] or [`Permanent`] error it answers with.
//!
//! It must never touch a task itself except through the fenced writes of
//! `store::tasks` (`complete_in`, `progress`): a handler's write names its
//! task's id, attempt and worker, and changes nothing once the lease is
//! gone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::retry::RetryPolicy;
use crate::error::{Error, Result};
use crate::store::tasks;

/// What a handler asks for besides plain success (`Ok(())`).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: the task is completed.
    Done,
    /// Run again after this long without spending an attempt.
    Snooze(Duration),
    /// Stop for good: the task ends `cancelled` with this reason.
    Cancel(String),
}

impl From<()> for Outcome {
    fn from(_: ()) -> Outcome {
        Outcome::Done
    }
}

/// Marks a handler error as permanent: the task becomes a dead letter at
/// once instead of being retried. Build one with [`permanent`].
#[derive(Debug)]
pub struct Permanent(pub String);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}

/// An error that no retry can fix (bad input, say).
pub fn permanent(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Permanent(message.into()))
}

/// What a handler gets besides its payload.
#[derive(Clone)]
pub struct TaskContext {
    pub id: i64,
    pub kind: String,
    pub queue: String,
    /// 1 on the first run.
    pub attempt: i32,
    pub max_attempts: i32,
    pub headers: Map<String, Value>,
    pub(super) cancel: CancellationToken,
    pub(super) pool: Pool,
    pub(super) worker_id: Arc<str>,
    pub(super) retain_completed: bool,
}

impl TaskContext {
    /// Fires when the task is cancelled, times out, loses its lease or the
    /// worker shuts down: stop soon after.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }

    /// The worker's Postgres pool, for handlers that write in their own
    /// transaction.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Complete this task through `client` (typically inside the handler's
    /// own transaction, so the task's completion commits with its effects).
    /// Fenced like every worker write: `false` when this attempt no longer
    /// holds the lease, and then nothing was changed. The completer's later
    /// write for the task finds no running row and does nothing.
    pub async fn complete_in<C: tokio_postgres::GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<bool> {
        tasks::complete_one(
            client,
            self.id,
            self.attempt,
            &self.worker_id,
            self.retain_completed,
        )
        .await
    }

    /// Record progress in `herald.tasks.progress` (any JSON).
    pub async fn progress(&self, progress: impl serde::Serialize) -> Result<()> {
        let value = serde_json::to_string(&progress).map_err(|error| Error::Json {
            what: format!("progress of task {}", self.id),
            error,
        })?;
        let client = self.pool.get().await?;
        tasks::record_progress(&**client, self.id, self.attempt, &self.worker_id, &value).await?;
        Ok(())
    }
}

pub(super) type HandlerFn =
    Arc<dyn Fn(TaskContext, Value) -> BoxFuture<'static, anyhow::Result<Outcome>> + Send + Sync>;

/// Per-kind settings next to the handler.
#[derive(Debug, Clone, Default)]
pub struct KindOptions {
    pub retry: Option<RetryPolicy>,
    pub timeout: Option<Duration>,
}

#[derive(Clone)]
pub(super) struct Entry {
    pub(super) handler: HandlerFn,
    pub(super) options: KindOptions,
}

/// Handlers by task kind.
#[derive(Clone)]
pub struct Registry {
    pub(super) entries: HashMap<String, Entry>,
    /// Durable subscriptions declared with `subscribe_durable`; written to
    /// `herald.subscriptions` when the worker starts.
    pub(crate) durable: Vec<crate::store::subscriptions::SubscriptionRow>,
}

impl Registry {
    /// A registry without even the built-in kinds; [`Registry::new`] adds them.
    pub(super) fn empty() -> Registry {
        Registry {
            entries: HashMap::new(),
            durable: Vec::new(),
        }
    }

    /// Register `handler` for `kind`; its payload is decoded into `P` (a
    /// payload that does not decode is a permanent failure).
    pub fn register<P, F, Fut, O>(&mut self, kind: &str, handler: F) -> &mut Registry
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
        O: Into<Outcome>,
    {
        self.register_with(kind, KindOptions::default(), handler)
    }

    /// [`Registry::register`] with a retry policy and timeout for the kind.
    pub fn register_with<P, F, Fut, O>(
        &mut self,
        kind: &str,
        options: KindOptions,
        handler: F,
    ) -> &mut Registry
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(TaskContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<O>> + Send + 'static,
        O: Into<Outcome>,
    {
        let handler = Arc::new(handler);
        let kind_name = kind.to_string();
        let erased: HandlerFn = Arc::new(move |ctx, value| {
            let handler = handler.clone();
            let kind_name = kind_name.clone();
            async move {
                let payload: P = serde_json::from_value(value).map_err(|e| {
                    permanent(format!(
                        "payload of task kind {kind_name:?} does not decode as {}: {e}",
                        std::any::type_name::<P>()
                    ))
                })?;
                handler(ctx, payload).await.map(Into::into)
            }
            .boxed()
        });
        self.entries.insert(
            kind.to_string(),
            Entry {
                handler: erased,
                options,
            },
        );
        self
    }

    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }
}
