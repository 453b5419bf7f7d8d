//! The admin HTTP server: `/metrics` (Prometheus text, [`metrics`]),
//! `/healthz` and `/readyz` ([`health`]) and the server-rendered dashboard.
//! It owns the listener, the bearer-token check and the routes; it reads and
//! repairs through the library modules (`stats`, `nodes`, `migrate`, `dlq`,
//! `queue`, `cron`) and never writes SQL of its own for them.
//!
//! It must never start on a non-loopback address without a token, never
//! answer (without a token) a request whose `Host` is not its loopback
//! address ([`guard`]), and never run an action in read-only mode. The
//! token guards every route but the two probes, which orchestrators call
//! without credentials.

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
pub mod guard;
pub mod health;
pub mod metrics;

pub use health::Readiness;

use crate::config::Config;
use crate::error::{Error, Result};

/// What every handler can reach.
pub struct AdminState {
    pub config: Config,
    pub pool: Pool,
    pub redis: crate::RedisPool,
    /// `admin.read_only`: actions answer 403.
    pub read_only: bool,
    /// When the process started, for `/healthz` and the dashboard.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// The dashboard's CSRF key and chart history.
    pub dashboard: dashboard::Dashboard,
    /// This process's LISTEN connections, for `/readyz`.
    pub readiness: Readiness,
    /// `admin.trusted_proxies`, parsed.
    pub proxies: guard::Proxies,
    /// Wrong tokens per client address (`admin.login_max_failures`).
    pub sign_in_limit: guard::SignInLimit,
}

impl AdminState {
    /// The state for `config`, with no LISTEN connection registered yet
    /// (see [`Readiness::listener`]).
    pub fn new(config: Config, pool: Pool, redis: impl Into<crate::RedisPool>) -> AdminState {
        AdminState {
            read_only: config.admin.read_only,
            pool,
            redis: redis.into(),
            started_at: chrono::Utc::now(),
            dashboard: dashboard::Dashboard::default(),
            readiness: Readiness::default(),
            proxies: guard::Proxies::new(&config.admin),
            sign_in_limit: guard::SignInLimit::new(&config.admin),
            config,
        }
    }
}

pub type SharedState = Arc<AdminState>;

/// Every route, behind the `Host` check when no token is set and the token
/// check when one is. Serve it with [`app`] so that the checks know the
/// connection; without it the `Host` is compared with `admin.bind`.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics::metrics))
        .route("/healthz", axum::routing::get(health::healthz))
        .route("/readyz", axum::routing::get(health::readyz))
        .route("/login", axum::routing::get(login_page).post(login))
        .merge(dashboard::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(state.clone(), check_request))
        .with_state(state)
}

/// [`router`] as a service that records each request's [`guard::Connection`].
pub fn app(
    state: SharedState,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, guard::Connection> {
    router(state).into_make_service_with_connect_info::<guard::Connection>()
}

/// The `Host` check (no token), then who the client is for the handlers.
async fn check_request(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let connection = request
        .extensions()
        .get::<axum::extract::ConnectInfo<guard::Connection>>()
        .map(|c| c.0);
    if state.config.admin.active_token().is_none() {
        let local = connection
            .and_then(|c| c.local)
            .or_else(|| state.config.admin.bind.parse().ok());
        let checked = match local {
            Some(local) => guard::check_host(request.headers(), local),
            None => Err("the admin server does not know the address it is bound to".into()),
        };
        if let Err(message) = checked {
            tracing::debug!(%message, "admin request refused");
            return (StatusCode::MISDIRECTED_REQUEST, message).into_response();
        }
    }
    let client = state
        .proxies
        .client(connection.map(|c| c.peer), request.headers());
    request.extensions_mut().insert(client);
    next.run(request).await
}

/// `Authorization: Bearer <token>` on every request when `admin.token` is
/// set, except the probes `/healthz` and `/readyz`: orchestrators cannot
/// send a secret header, and they reveal only up/down.
async fn require_token(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let open = matches!(request.uri().path(), "/healthz" | "/readyz" | "/login");
    if let Some(token) = state.config.admin.active_token().filter(|_| !open) {
        let cookie = session_cookie(request.headers())
            .is_some_and(|c| constant_time_eq(c.as_bytes(), session_value(token).as_bytes()));
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let mut bearer = false;
        if let (Some(given), false) = (given, cookie) {
            // A bearer token is a sign-in too: guessing it here must not
            // bypass the limit on /login.
            let client = client_ip(&request);
            if let Some(wait) = state.sign_in_limit.retry_after(client) {
                return guard::too_many(wait);
            }
            bearer = constant_time_eq(given.as_bytes(), token.as_bytes());
            if !bearer {
                state.sign_in_limit.failed(client);
            }
        }
        if !bearer && !cookie {
            // A browser goes to the login form; anything else gets a 401.
            let wants_html = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/html"));
            if wants_html && request.method() == axum::http::Method::GET {
                return axum::response::Redirect::to("/login").into_response();
            }
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

const SESSION_COOKIE: &str = "herald_admin";

fn client_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<guard::Client>()
        .and_then(|c| c.ip)
}

/// What the session cookie holds: a MAC of a fixed label under the token,
/// so the token itself never sits in the browser, and changing the token
/// ends every session.
fn session_value(token: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(b"herald admin session v1");
    hex::encode(mac.finalize().into_bytes())
}

fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

async fn login_page(State(state): State<SharedState>) -> Response {
    let body = maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Herald admin: sign in" } }
            body style="font-family: system-ui, sans-serif; max-width: 24rem; margin: 4rem auto;" {
                h1 { "Herald admin" }
                @if state.config.admin.active_token().is_none() {
                    p { "No token is configured: the dashboard is open on this address. " a href="/" { "Go to the dashboard" } }
                } @else {
                    form method="post" action="/login" {
                        label for="token" { "Admin token (admin.token / HERALD_ADMIN_TOKEN)" }
                        br;
                        input id="token" name="token" type="password" autocomplete="current-password" required;
                        " "
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    };
    body.into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// Past `admin.login_max_failures` wrong tokens from one address, even the
/// right one is refused until the window lets an attempt through: a
/// guesser must not learn that a guess was right.
async fn login(
    State(state): State<SharedState>,
    client: Option<axum::Extension<guard::Client>>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let Some(token) = state.config.admin.active_token() else {
        return axum::response::Redirect::to("/").into_response();
    };
    let client = client.map(|c| c.0);
    let ip = client.and_then(|c| c.ip);
    if let Some(wait) = state.sign_in_limit.retry_after(ip) {
        return guard::too_many(wait);
    }
    if !constant_time_eq(form.token.as_bytes(), token.as_bytes()) {
        state.sign_in_limit.failed(ip);
        return (StatusCode::UNAUTHORIZED, "wrong token").into_response();
    }
    // SameSite=Strict: the browser never sends it on a cross-site request,
    // on top of the dashboard's own CSRF tokens. Secure when a trusted
    // proxy says the browser spoke HTTPS to it: the cookie then never
    // travels in clear.
    let secure = if client.is_some_and(|c| c.https) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200{secure}",
        session_value(token)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
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
    if !addr.ip().is_loopback() && config.admin.active_token().is_none() {
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
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Other(format!("admin server on {addr}: {e}")))
}
