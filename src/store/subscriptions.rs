//! `herald.subscriptions`: every statement that writes it. Durable
//! subscriptions are declared in the configuration (source `config`), by
//! the Rust API (`api`, written when a worker starts) or the CLI; the relay
//! reads them to fan events out.
//!
//! It must never validate or interpret a subscription (that is
//! `crate::subscriptions`); it writes rows already checked.

use tokio_postgres::GenericClient;

use crate::error::{Context, Result};

/// A subscription as its row holds it, kind resolved and timeout as an
/// interval literal.
#[derive(Debug, Clone)]
pub(crate) struct SubscriptionRow {
    pub name: String,
    pub pattern: String,
    pub kind: String,
    pub queue: String,
    pub max_attempts: i32,
    pub timeout: Option<String>,
    pub webhook: Option<String>,
    pub secret: Option<String>,
    pub enabled: bool,
}

// An unchanged subscription is not rewritten (no new row version, no
// updated_at bump), so a restart that syncs the same configuration is quiet.
const UPSERT: &str = "
INSERT INTO herald.subscriptions
    (name, pattern, kind, queue, max_attempts, timeout, webhook_url, webhook_secret, enabled, source)
VALUES ($1, $2, $3, $4, $5, $6::text::interval, $7, $8, $9, $10)
ON CONFLICT (name) DO UPDATE
SET pattern = EXCLUDED.pattern, kind = EXCLUDED.kind, queue = EXCLUDED.queue,
    max_attempts = EXCLUDED.max_attempts, timeout = EXCLUDED.timeout,
    webhook_url = EXCLUDED.webhook_url, webhook_secret = EXCLUDED.webhook_secret,
    enabled = EXCLUDED.enabled, source = EXCLUDED.source, updated_at = now()
WHERE (herald.subscriptions.pattern, herald.subscriptions.kind, herald.subscriptions.queue,
       herald.subscriptions.max_attempts, herald.subscriptions.timeout,
       herald.subscriptions.webhook_url, herald.subscriptions.webhook_secret,
       herald.subscriptions.enabled, herald.subscriptions.source)
      IS DISTINCT FROM
      (EXCLUDED.pattern, EXCLUDED.kind, EXCLUDED.queue, EXCLUDED.max_attempts, EXCLUDED.timeout,
       EXCLUDED.webhook_url, EXCLUDED.webhook_secret, EXCLUDED.enabled, EXCLUDED.source)";

/// Create or update; `source` is `api` or `config`.
pub(crate) async fn upsert<C: GenericClient + Sync>(
    client: &C,
    row: &SubscriptionRow,
    source: &str,
) -> Result<()> {
    client
        .execute(
            UPSERT,
            &[
                &row.name,
                &row.pattern,
                &row.kind,
                &row.queue,
                &row.max_attempts,
                &row.timeout,
                &row.webhook,
                &row.secret,
                &row.enabled,
                &source,
            ],
        )
        .await
        .context(format!("saving subscription {:?}", row.name))?;
    Ok(())
}

const DELETE_CONFIG_EXCEPT: &str =
    "DELETE FROM herald.subscriptions WHERE source = 'config' AND NOT (name = ANY($1))";

/// Delete the `config` subscriptions not named in `keep`; how many went.
pub(crate) async fn delete_config_except<C: GenericClient + Sync>(
    client: &C,
    keep: &[&str],
) -> Result<u64> {
    client
        .execute(DELETE_CONFIG_EXCEPT, &[&keep])
        .await
        .context("removing subscriptions no longer in the configuration")
}

const DELETE: &str = "DELETE FROM herald.subscriptions WHERE name = $1";

/// Delete one; `false` when there was none.
pub(crate) async fn delete<C: GenericClient + Sync>(client: &C, name: &str) -> Result<bool> {
    let n = client
        .execute(DELETE, &[&name])
        .await
        .context(format!("removing subscription {name:?}"))?;
    Ok(n == 1)
}

const SET_ENABLED: &str =
    "UPDATE herald.subscriptions SET enabled = $2, updated_at = now() WHERE name = $1";

/// Pause or resume one; `false` when there is none.
pub(crate) async fn set_enabled<C: GenericClient + Sync>(
    client: &C,
    name: &str,
    enabled: bool,
) -> Result<bool> {
    let n = client
        .execute(SET_ENABLED, &[&name, &enabled])
        .await
        .context(format!("pausing or resuming subscription {name:?}"))?;
    Ok(n == 1)
}
