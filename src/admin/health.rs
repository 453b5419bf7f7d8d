//! The probes: `/healthz` (the process is alive and serving) and `/readyz`
//! (Postgres answers, Redis answers, this process's LISTEN connections are
//! up, the schema carries every migration this binary embeds), and the
//! [`Readiness`] registry the LISTEN connections report to.
//!
//! Both answer JSON and neither needs the bearer token (orchestrators cannot
//! send one); `/readyz` names each failed check with the error. Each check
//! has its own short timeout so a probe answers within a few seconds even
//! when a server hangs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::SharedState;

/// How long one readiness check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type UpFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// The LISTEN connections of this process, each with a function that says
/// whether it is up now (the relay, worker and scheduler keep an atomic
/// `listening` flag in their stats that their listener sets and clears).
#[derive(Clone, Default)]
pub struct Readiness {
    listeners: Arc<Mutex<Vec<(String, UpFn)>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.listeners()).finish()
    }
}

impl Readiness {
    /// Register a LISTEN connection named `name` (e.g. "relay").
    pub fn listener(&self, name: impl Into<String>, up: impl Fn() -> bool + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.into(), Arc::new(up)));
    }

    /// Each registered connection and whether it is up now.
    pub fn listeners(&self) -> Vec<(String, bool)> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, up)| (name.clone(), up()))
            .collect()
    }
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    started_at: chrono::DateTime<chrono::Utc>,
    uptime_secs: i64,
}

/// `GET /healthz`: 200 while the process serves HTTP. It checks nothing
/// else on purpose: a liveness probe that failed on a database outage would
/// have the orchestrator restart every process at once.
pub async fn healthz(State(state): State<SharedState>) -> Json<impl Serialize> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        started_at: state.started_at,
        uptime_secs: (chrono::Utc::now() - state.started_at).num_seconds(),
    })
}

/// `GET /readyz`: 200 `{"status": "ready", "checks": {...}}` when every
/// check passes, else 503 with `"status": "unavailable"` and each failed
/// check's `error`.
pub async fn readyz(State(state): State<SharedState>) -> Response {
    let (postgres, redis) = tokio::join!(check_postgres(&state), check_redis(&state));
    let (postgres, migrations) = postgres;
    let listeners = state.readiness.listeners();
    let listen_ok = listeners.iter().all(|(_, up)| *up);
    let mut listen = json!({
        "ok": listen_ok,
        "connections": listeners.iter().map(|(n, up)| (n.clone(), Value::Bool(*up)))
            .collect::<serde_json::Map<_, _>>(),
    });
    if !listen_ok {
        let down: Vec<&str> = listeners
            .iter()
            .filter(|(_, up)| !up)
            .map(|(n, _)| n.as_str())
            .collect();
        listen["error"] = Value::String(format!(
            "LISTEN connection down: {} (reconnecting)",
            down.join(", ")
        ));
    }
    let ok = [&postgres, &migrations, &redis, &listen]
        .iter()
        .all(|c| c["ok"] == Value::Bool(true));
    let body = json!({
        "status": if ok { "ready" } else { "unavailable" },
        "checks": {
            "postgres": postgres,
            "migrations": migrations,
            "redis": redis,
            "listen": listen,
        },
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

fn failed(error: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": error.to_string()})
}

/// The Postgres check and the migrations check (which needs Postgres).
async fn check_postgres(state: &SharedState) -> (Value, Value) {
    let started = Instant::now();
    let attempt = async {
        let client = state.pool.get().await?;
        crate::migrate::schema_version(&**client).await
    };
    let version = match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(version)) => version,
        Ok(Err(e)) => {
            return (
                failed(format!("Postgres: {e}")),
                failed("not checked: Postgres does not answer"),
            )
        }
        Err(_) => {
            return (
                failed(format!(
                    "Postgres did not answer within {}s",
                    CHECK_TIMEOUT.as_secs()
                )),
                failed("not checked: Postgres does not answer"),
            )
        }
    };
    let postgres = json!({"ok": true, "latency_ms": millis(started)});
    let expected = crate::migrate::latest_version();
    let migrations = match version {
        Some(v) if v >= expected => json!({"ok": true, "schema_version": v, "expected": expected}),
        other => json!({
            "ok": false,
            "schema_version": other,
            "expected": expected,
            "error": format!(
                "the schema is at version {}, this binary needs {expected}: run `herald migrate`",
                other.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
            ),
        }),
    };
    (postgres, migrations)
}

async fn check_redis(state: &SharedState) -> Value {
    let started = Instant::now();
    let attempt = async {
        let mut conn = state.redis.get().await.map_err(|e| format!("Redis: {e}"))?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| format!("Redis PING: {e}"))
    };
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(_)) => json!({"ok": true, "latency_ms": millis(started)}),
        Ok(Err(e)) => failed(e),
        Err(_) => failed(format!(
            "Redis did not answer within {}s",
            CHECK_TIMEOUT.as_secs()
        )),
    }
}

fn millis(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// Ping Redis through the pool within `timeout`: used by `/metrics`.
pub(crate) async fn redis_up(redis: &crate::RedisPool, timeout: Duration) -> bool {
    let attempt = async {
        let mut conn = redis.get().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(_)))
}
