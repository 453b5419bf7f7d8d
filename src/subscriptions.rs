//! Durable subscriptions: `herald.subscriptions` rows (from the
//! configuration, the Rust API or the CLI) that the relay turns into one task
//! per matching event, and the handler side: `Registry::subscribe_durable`,
//! whose handlers get the envelope and can apply it exactly once inside the
//! database through `herald.processed_events`.
//!
//! It owns the subscription rows and the idempotency records; it never
//! inserts the per-event tasks itself (the relay does, in the transaction
//! that removes the event from the outbox).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio_postgres::{GenericClient, Transaction};

pub use crate::config::Subscription;
use crate::error::{Context, Error, Result};
use crate::outbox::Envelope;
use crate::store::subscriptions as store;
use crate::worker::{Registry, TaskContext};

pub use crate::worker::webhook::{HEADER_SUBSCRIPTION, WEBHOOK_KIND};
/// Task header the relay sets on a subscription's task: the event's id.
pub const HEADER_EVENT_ID: &str = "herald_event_id";

/// The task kind `Registry::subscribe_durable` uses for subscription `name`.
pub fn handler_kind(name: &str) -> String {
    format!("sub:{name}")
}

impl Subscription {
    /// A subscription whose events run the handler registered for
    /// `sub:<name>` (see [`Registry::subscribe_durable`]).
    pub fn new(name: impl Into<String>, pattern: impl Into<String>) -> Subscription {
        Subscription {
            name: name.into(),
            pattern: pattern.into(),
            kind: None,
            webhook: None,
            secret: None,
            queue: crate::config::DEFAULT_QUEUE.into(),
            max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
            timeout: None,
            enabled: true,
        }
    }

    /// A subscription that POSTs each event to `url`, signed with `secret`.
    pub fn webhook(
        name: impl Into<String>,
        pattern: impl Into<String>,
        url: impl Into<String>,
        secret: impl Into<String>,
    ) -> Subscription {
        Subscription {
            webhook: Some(url.into()),
            secret: Some(secret.into()),
            ..Subscription::new(name, pattern)
        }
    }

    pub fn kind(mut self, kind: impl Into<String>) -> Subscription {
        self.kind = Some(kind.into());
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Subscription {
        self.queue = queue.into();
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Subscription {
        self.max_attempts = n;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Subscription {
        self.timeout = Some(timeout);
        self
    }

    /// The task kind its events become.
    pub fn task_kind(&self) -> String {
        match (&self.kind, &self.webhook) {
            (Some(k), _) => k.clone(),
            (None, Some(_)) => WEBHOOK_KIND.into(),
            (None, None) => handler_kind(&self.name),
        }
    }

    /// Every field checked, with an error naming the subscription and what
    /// is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Error::Config(format!("subscription {:?}: {what}", self.name));
        crate::queue::validate_name("subscription name", &self.name, 128)
            .map_err(|e| bad(e.to_string()))?;
        if self.pattern.is_empty()
            || self.pattern.len() > 255
            || !self.pattern.chars().all(|c| {
                c == '*' || c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
            })
        {
            return Err(bad(format!(
                "pattern {:?} is not a topic or a glob (letters, digits, '.', '_', '-', ':' and '*')",
                self.pattern
            )));
        }
        crate::queue::validate_name("task kind", &self.task_kind(), 255)
            .map_err(|e| bad(e.to_string()))?;
        crate::queue::validate_name("queue", &self.queue, 128).map_err(|e| bad(e.to_string()))?;
        if self.max_attempts < 1 {
            return Err(bad(format!(
                "max_attempts is {}; it must be at least 1",
                self.max_attempts
            )));
        }
        match (&self.webhook, self.task_kind() == WEBHOOK_KIND) {
            (Some(url), _) => {
                // Unparsable, so masked whole: its user info may hold a credential.
                let parsed = url::Url::parse(url).map_err(|e| {
                    bad(format!(
                        "webhook {:?} is not a URL: {e}",
                        crate::config::mask_url(url)
                    ))
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(bad(format!(
                        "webhook {:?}: the scheme must be http or https",
                        crate::config::mask_url(url)
                    )));
                }
                if self.secret.as_deref().unwrap_or("").is_empty() {
                    return Err(bad(
                        "a webhook needs a secret to sign its requests with".into()
                    ));
                }
            }
            (None, true) => return Err(bad("kind herald.webhook needs a webhook URL".into())),
            (None, false) => {}
        }
        Ok(())
    }
}

/// A subscription as stored, with its bookkeeping.
#[derive(Debug, Clone, Serialize)]
pub struct StoredSubscription {
    pub name: String,
    pub pattern: String,
    pub kind: String,
    pub queue: String,
    pub max_attempts: i32,
    pub timeout_secs: Option<f64>,
    pub webhook_url: Option<String>,
    pub enabled: bool,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Create or update a subscription; `source` is `api` or `config`.
pub async fn upsert<C: GenericClient + Sync>(
    client: &C,
    sub: &Subscription,
    source: &str,
) -> Result<()> {
    sub.validate()?;
    store::upsert(client, &sub.row(), source).await
}

impl Subscription {
    /// The row `herald.subscriptions` keeps for it (kind resolved).
    pub(crate) fn row(&self) -> store::SubscriptionRow {
        store::SubscriptionRow {
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            kind: self.task_kind(),
            queue: self.queue.clone(),
            max_attempts: self.max_attempts,
            timeout: self.timeout.map(crate::db::interval_literal),
            webhook: self.webhook.clone(),
            secret: self.secret.clone(),
            enabled: self.enabled,
        }
    }
}

/// Make the `config` subscriptions match `subs`: create and update those,
/// delete `config` ones no longer listed. API subscriptions are left alone.
pub async fn sync_config(client: &mut tokio_postgres::Client, subs: &[Subscription]) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .context("beginning the subscription sync")?;
    for sub in subs {
        upsert(&tx, sub, "config").await?;
    }
    let names: Vec<&str> = subs.iter().map(|s| s.name.as_str()).collect();
    let removed = store::delete_config_except(&tx, &names).await?;
    tx.commit()
        .await
        .context("committing the subscription sync")?;
    if removed > 0 {
        tracing::info!(
            removed,
            "subscriptions removed from the configuration were deleted"
        );
    }
    Ok(())
}

pub async fn list<C: GenericClient + Sync>(client: &C) -> Result<Vec<StoredSubscription>> {
    let rows = client
        .query(
            "SELECT name, pattern, kind, queue, max_attempts,
                    extract(epoch FROM timeout)::float8 AS timeout_secs, webhook_url, enabled,
                    source, created_at, updated_at
             FROM herald.subscriptions ORDER BY name",
            &[],
        )
        .await
        .context("listing herald.subscriptions")?;
    Ok(rows
        .iter()
        .map(|r| StoredSubscription {
            name: r.get("name"),
            pattern: r.get("pattern"),
            kind: r.get("kind"),
            queue: r.get("queue"),
            max_attempts: r.get("max_attempts"),
            timeout_secs: r.get("timeout_secs"),
            webhook_url: r.get("webhook_url"),
            enabled: r.get("enabled"),
            source: r.get("source"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
        })
        .collect())
}

/// Delete a subscription; `false` when there was none. Its tasks already
/// queued still run.
pub async fn remove<C: GenericClient + Sync>(client: &C, name: &str) -> Result<bool> {
    store::delete(client, name).await
}

/// Pause (`false`) or resume (`true`); `false` when there is no such
/// subscription. A paused subscription gets no tasks for events relayed
/// meanwhile: they are not queued up for it.
pub async fn set_enabled<C: GenericClient + Sync>(
    client: &C,
    name: &str,
    enabled: bool,
) -> Result<bool> {
    store::set_enabled(client, name, enabled).await
}

/// What a durable subscriber's handler gets besides the envelope.
#[derive(Clone)]
pub struct EventContext {
    pub subscription: String,
    task: TaskContext,
}

/// Whether [`EventContext::apply_once`] ran the closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The closure's writes, the processed record and the task's completion
    /// committed together.
    Now,
    /// This subscription had processed the event before: nothing ran.
    Before,
}

impl EventContext {
    /// The task carrying the event (id, attempt, cancellation, progress).
    pub fn task(&self) -> &TaskContext {
        &self.task
    }

    /// Run `apply` in one transaction with the record that this subscription
    /// processed `event` and the completion of the task, so that the effects
    /// inside this database happen exactly once however often the event is
    /// delivered. Returns [`Applied::Before`] without running `apply` when the
    /// event was already processed.
    ///
    /// ```no_run
    /// # async fn demo(ctx: herald::subscriptions::EventContext, env: herald::Envelope) -> anyhow::Result<()> {
    /// ctx.apply_once(&env, |tx| Box::pin(async move {
    ///     tx.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 7", &[]).await?;
    ///     Ok(())
    /// })).await?;
    /// # Ok(()) }
    /// ```
    pub async fn apply_once<F>(&self, event: &Envelope, apply: F) -> anyhow::Result<Applied>
    where
        F: for<'a> FnOnce(&'a Transaction<'a>) -> BoxFuture<'a, anyhow::Result<()>>,
    {
        let mut pooled = self.task.pool().get().await?;
        let client: &mut tokio_postgres::Client = &mut pooled;
        let tx = client
            .transaction()
            .await
            .context("beginning a durable subscriber's transaction")?;
        // Taken first: a second delivery running at the same time waits here
        // for the first to commit, then sees its record.
        let fresh =
            crate::store::processed_events::record(&tx, &self.subscription, event.id).await?;
        if !fresh {
            tx.rollback().await.ok();
            return Ok(Applied::Before);
        }
        apply(&tx).await?;
        if !self.task.complete_in(&tx).await? {
            tx.rollback().await.ok();
            anyhow::bail!(
                "task {} attempt {} lost its lease before committing event {}; nothing was applied",
                self.task.id,
                self.task.attempt,
                event.id
            );
        }
        tx.commit()
            .await
            .context("committing a durable subscriber's transaction")?;
        Ok(Applied::Now)
    }
}

impl Registry {
    /// Register `handler` for the durable subscription `name` on `pattern`:
    /// every event committed to the outbox whose topic matches becomes a
    /// task of kind `sub:<name>` that runs `handler` with the envelope. The
    /// subscription row itself is written by [`Worker::run`] at start
    /// (source `api`), or by [`upsert`].
    ///
    /// [`Worker::run`]: crate::worker::Worker::run
    pub fn subscribe_durable<F, Fut>(
        &mut self,
        name: &str,
        pattern: &str,
        handler: F,
    ) -> Result<&mut Registry>
    where
        F: Fn(EventContext, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.subscribe_durable_with(Subscription::new(name, pattern), handler)
    }

    /// [`Registry::subscribe_durable`] with queue, attempts and timeout.
    pub fn subscribe_durable_with<F, Fut>(
        &mut self,
        subscription: Subscription,
        handler: F,
    ) -> Result<&mut Registry>
    where
        F: Fn(EventContext, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        subscription.validate()?;
        let name = subscription.name.clone();
        let kind = subscription.task_kind();
        let handler = std::sync::Arc::new(handler);
        self.register(&kind, move |task: TaskContext, envelope: Envelope| {
            let ctx = EventContext {
                subscription: name.clone(),
                task,
            };
            let handler = handler.clone();
            async move { handler(ctx, envelope).await }
        });
        self.durable.push(subscription.row());
        Ok(self)
    }
}
