//! Postgres connections: the bounded `deadpool-postgres` pool every component
//! shares, and dedicated connections (LISTEN, migration lock) that must not
//! come from the pool. Owns connection settings (application name, TCP
//! keepalives, time zone); it never runs Herald's own queries.

use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, NoTls};

use crate::config::{mask_url, Config};
use crate::error::{Context, Error, Result};

/// `SET LOCAL`s that plan a transaction's statements once per connection
/// (a generic plan, not one per execution) and only on indexes, for the
/// claim and completion statements that run thousands of times a second.
/// Without sequential scans, a plan made while a table held few rows cannot
/// scan all of it later, under a backlog; JIT is off because the cost that
/// disables sequential scans would otherwise make every execution
/// JIT-compile (0.7 s each). A macro, so that `concat!` can put it into the
/// callers' BEGIN strings.
macro_rules! plan_on_indexes {
    () => {
        "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; \
         SET LOCAL jit = off"
    };
}
pub(crate) use plan_on_indexes;

/// Parse `DATABASE_URL` and apply Herald's connection settings.
pub fn pg_config(config: &Config, application_name: &str) -> Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config = config.database_url.parse().map_err(|e| Error::Url {
        setting: "database_url (DATABASE_URL)",
        reason: format!("{e}: {}", mask_url(&config.database_url)),
    })?;
    if pg.get_application_name().is_none() {
        pg.application_name(application_name);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(config.postgres.connect_timeout);
    }
    // Keepalives notice a dead peer (server crash, network cut) on an idle
    // connection, which matters most for the LISTEN connection.
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    // Envelopes render created_at through Postgres; make it UTC everywhere.
    // A pooler may drop `options` (PgBouncer refuses it unless told to
    // ignore it): `SESSION_SETTINGS` sets the time zone again.
    pg.options("-c TimeZone=UTC -c client_min_messages=warning");
    Ok(pg)
}

/// Run on every new connection: the time zone of `pg_config`'s `options`,
/// for when a pooler dropped them. PgBouncer tracks a SET of TimeZone and
/// applies it on whichever server connection serves the client next, in
/// every pool mode.
const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'";

/// Apply [`SESSION_SETTINGS`] to a new connection.
async fn session_settings(client: &Client) -> std::result::Result<(), tokio_postgres::Error> {
    client.batch_execute(SESSION_SETTINGS).await
}

/// The shared, bounded pool (`postgres.pool_size`).
pub fn pool(config: &Config, application_name: &str) -> Result<Pool> {
    let pg = pg_config(config, application_name)?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.postgres.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.postgres.connect_timeout * 2))
        .create_timeout(Some(config.postgres.connect_timeout))
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move { session_settings(client).await.map_err(HookError::Backend) })
        }))
        .build()
        .map_err(|e| Error::Other(format!("building the Postgres pool: {e}")))
}

/// A dedicated connection whose driver runs on its own task; for work that
/// must hold one session (advisory locks) and short-lived tools.
pub async fn connect(config: &Config, application_name: &str) -> Result<Client> {
    let pg = pg_config(config, application_name)?;
    let (client, connection) = pg
        .connect(NoTls)
        .await
        .context(format!("connecting to {}", mask_url(&config.database_url)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection closed");
        }
    });
    session_settings(&client)
        .await
        .context(format!("setting up {}", mask_url(&config.database_url)))?;
    Ok(client)
}

/// A Postgres interval literal for `d`, exact to the microsecond; bind it as
/// text and cast (`$1::text::interval`).
pub fn interval_literal(d: std::time::Duration) -> String {
    format!("{} microseconds", d.as_micros())
}
