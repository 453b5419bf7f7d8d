//! The admin HTTP server: `/metrics` (Prometheus text, [`metrics`]),
//! `/healthz` and `/readyz` ([`health`]) and the server-rendered dashboard.
//! It owns the listener, the bearer-token check and the routes; it reads and
//! repairs through the library modules (`stats`, `nodes`, `migrate`, `dlq`,
//! `queue`, `cron`) and never writes SQL of its own for them.
//!
//! It must never start on a non-loopback address without a token, and never
//! run an action in read-only mode. The token guards every route but the
//! two probes, which orchestrators call without credentials.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

pub mod dashboard;
pub mod health;
pub mod metrics;

pub use health::Readiness;

use crate::config::Config;
use crate::error::{Error, Result};

/// What every handler can reach.
pub struct AdminState {
    pub config: Config,
    pub pool: Pool,
    pub redis: deadpool_redis::Pool,
    /// `admin.read_only`: actions answer 403.
    pub read_only: bool,
    /// When the process started, for `/healthz` and the dashboard.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The dashboard's CSRF key and chart history.
    pub dashboard: dashboard::Dashboard,
    /// This process's LISTEN connections, for `/readyz`.
    pub readiness: Readiness,
}

impl AdminState {
    /// The state for `config`, with no LISTEN connection registered yet
    /// (see [`Readiness::listener`]).
    pub fn new(config: Config, pool: Pool, redis: deadpool_redis::Pool) -> AdminState {
        AdminState {
            read_only: config.admin.read_only,
            config,
            pool,
            redis,
            started_at: chrono::Utc::now(),
            dashboard: dashboard::Dashboard::default(),
            readiness: Readiness::default(),
        }
    }
}

pub type SharedState = Arc<AdminState>;

/// Every route, behind the token check when a token is set.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics::metrics))
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .merge(dashboard::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// `Authorization: Bearer <token>` on every request when `admin.token` is
/// set, except the probes `/healthz` and `/readyz`: orchestrators cannot
/// send a secret header, and they reveal only up/down.
async fn require_token(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    if let Some(token) = state.config.admin.token.as_ref().filter(|_| !probe) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token (admin.token / HERALD_ADMIN_TOKEN)",
            )
                .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuse a non-loopback address without a token; otherwise the address.
pub fn check_bind(config: &Config) -> Result<SocketAddr> {
    let addr: SocketAddr = config.admin.bind.parse().map_err(|e| {
        Error::Config(format!(
            "admin.bind {:?} is not an address:port: {e}",
            config.admin.bind
        ))
    })?;
    check_addr(config, addr)?;
    Ok(addr)
}

/// Refuse to serve on `addr` when it is not loopback and no token is set.
pub fn check_addr(config: &Config, addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() && config.admin.token.as_deref().unwrap_or("").is_empty() {
        return Err(Error::Config(format!(
            "admin.bind {addr} is not a loopback address: set admin.token (HERALD_ADMIN_TOKEN) \
             so the dashboard and its actions are not open to the network"
        )));
    }
    Ok(())
}

/// Bind `admin.bind` (refusing a non-loopback address without a token) and
/// serve until `shutdown`.
pub async fn serve(state: AdminState, shutdown: CancellationToken) -> Result<()> {
    let addr = check_bind(&state.config)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Other(format!("admin server: binding {addr}: {e}")))?;
    serve_on(listener, state, shutdown).await
}

/// Serve on a listener the caller bound (tests bind 127.0.0.1:0) until
/// `shutdown`. The loopback-or-token rule applies to its address too.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("admin server: reading the bound address: {e}")))?;
    check_addr(&state.config, addr)?;
    let state = Arc::new(state);
    dashboard::start_sampler(&state, shutdown.clone());
    tracing::info!(%addr, read_only = state.read_only, "admin server listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Other(format!("admin server on {addr}: {e}")))
}
