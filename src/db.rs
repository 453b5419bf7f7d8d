//! Postgres connections: the bounded `deadpool-postgres` pool every component
//! shares, and dedicated connections (LISTEN, migration lock) that must not
//! come from the pool. Owns connection settings (application name, TCP
//! keepalives, time zone, TLS through [`tls`]); every session Herald opens
//! comes from here. It never runs Herald's own queries.

pub mod tls;

use std::time::Duration;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, Socket};

use crate::config::{mask_url, Config};
use crate::error::{Context, Error, Result};

/// The connection half of a dedicated session, for callers that drive it
/// themselves (to read notifications or notice its end).
pub type Connection = tokio_postgres::Connection<Socket, tls::TlsStream>;

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

/// Parse `DATABASE_URL` and apply Herald's connection settings. The TLS
/// parameters (`sslmode`, `sslrootcert`) are read by [`tls`]; the result
/// carries only the negotiation mode, so connect it with [`tls_connector`].
pub fn pg_config(config: &Config, application_name: &str) -> Result<tokio_postgres::Config> {
    Ok(settings(config, application_name)?.0)
}

/// The TLS connector for `database_url`'s `sslmode` and `sslrootcert`.
pub fn tls_connector(config: &Config) -> Result<tls::MakeTls> {
    tls::split(&config.database_url)?.1.connector()
}

fn settings(
    config: &Config,
    application_name: &str,
) -> Result<(tokio_postgres::Config, tls::TlsSettings)> {
    let (url, tls) = tls::split(&config.database_url)?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| Error::Url {
        setting: tls::SETTING,
        reason: format!("{e}: {}", mask_url(&config.database_url)),
    })?;
    pg.ssl_mode(tls.pg_mode());
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
    Ok((pg, tls))
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
    let (pg, tls) = settings(config, application_name)?;
    let manager = Manager::from_config(
        pg,
        tls.connector()?,
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
    let what = format!("connecting to {}", mask_url(&config.database_url));
    let (client, connection) = connect_session(config, application_name, &what).await?;
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

/// A dedicated session whose connection the caller drives; `what` names the
/// session in errors. A TLS failure is reported as [`Error::Tls`], naming
/// the setting.
pub async fn connect_session(
    config: &Config,
    application_name: &str,
    what: &str,
) -> Result<(Client, Connection)> {
    let (pg, tls) = settings(config, application_name)?;
    pg.connect(tls.connector()?)
        .await
        .map_err(|error| match tls.explain(&error) {
            Some(reason) => Error::Tls {
                setting: tls::SETTING,
                reason,
            },
            None => Error::Postgres {
                context: what.to_string(),
                error,
            },
        })
}

/// A failure to get a pooled connection, with a TLS cause said in terms of
/// the setting ([`Error::Tls`]); `None` when TLS is not why.
pub(crate) fn explain_pool_error(
    config: &Config,
    error: &deadpool_postgres::PoolError,
) -> Option<Error> {
    let (_, tls) = tls::split(&config.database_url).ok()?;
    tls.explain(error).map(|reason| Error::Tls {
        setting: tls::SETTING,
        reason,
    })
}

/// A Postgres interval literal for `d`, exact to the microsecond; bind it as
/// text and cast (`$1::text::interval`).
pub fn interval_literal(d: std::time::Duration) -> String {
    format!("{} microseconds", d.as_micros())
}
