//! The admin dashboard: server-rendered HTML (maud), no JavaScript build.
//!
//! Pages: `/` (overview and charts), `/queues`, `/tasks/{id}`,
//! `/dead-letters` (filter, replay one, many or all matching, purge),
//! `/dead-letters/{id}` (error history and payload), `/schedules` (next fire
//! times in their zone, pause, resume, trigger).
//!
//! Actions are POSTed forms. Each carries a CSRF token (see [`csrf`]); a
//! request from another origin, without a valid token, or to a read-only
//! server gets 403. A done action answers 303 back to the page it came from
//! with a flash message in the query string (`?flash=` or `?error=`).
//!
//! Everything is read and changed through the library (`stats`, `dlq`,
//! `queue`, `cron`); the only SQL of its own is the sampler's read of two
//! sequence positions for the throughput chart.

pub mod charts;
pub mod csrf;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, RawForm, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{AdminState, SharedState};
use crate::{cron, dlq, queue, stats};

/// The dashboard's own state in [`AdminState`]: the CSRF key and the
/// sampled history behind the charts.
pub struct Dashboard {
    pub csrf: csrf::Csrf,
    pub history: Arc<charts::History>,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard::new(Duration::from_secs(10))
    }
}

impl Dashboard {
    /// A fresh CSRF key and an empty history sampled every `sample_every`.
    pub fn new(sample_every: Duration) -> Dashboard {
        Dashboard {
            csrf: csrf::Csrf::new(),
            history: Arc::new(charts::History::new(sample_every)),
        }
    }
}

/// Start the chart sampler for `state` until `shutdown`.
pub fn start_sampler(state: &SharedState, shutdown: CancellationToken) {
    let history = state.dashboard.history.clone();
    let pool = state.pool.clone();
    tokio::spawn(async move { history.run(pool, shutdown).await });
}

/// The dashboard's routes; `super::router` puts them behind the token check.
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(overview))
        .route("/queues", get(queues))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/replay", post(replay_many))
        .route("/dead-letters/purge", post(purge))
        .route("/dead-letters/{id}", get(dead_letter))
        .route("/dead-letters/{id}/replay", post(replay_one))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}/{action}", post(schedule_action))
        .layer(axum::middleware::map_response(security_headers))
}

/// No framing (clickjacking of the action buttons), no scripts but the
/// inline confirm() handlers, forms post only here, nothing cached.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, axum::http::HeaderValue::from_static(value));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
         img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "cache-control", "no-store");
    response
}

// ---------------------------------------------------------------------------
// Errors and small formatting helpers

/// An error page.
pub struct PageError(StatusCode, String);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html { head { meta charset="utf-8"; title { "Herald — error" } style { (PreEscaped(CSS)) } }
                body { main {
                    h1 { (self.0.as_u16()) " " (self.0.canonical_reason().unwrap_or("")) }
                    p.flash.error { (self.1) }
                    p { a href="/" { "Back to the overview" } }
                } } }
        };
        (self.0, body).into_response()
    }
}

impl From<crate::error::Error> for PageError {
    fn from(e: crate::error::Error) -> Self {
        PageError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type PageResult = std::result::Result<Markup, PageError>;

async fn client(state: &AdminState) -> std::result::Result<deadpool_postgres::Client, PageError> {
    state.pool.get().await.map_err(|e| {
        PageError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no Postgres connection: {e}"),
        )
    })
}

fn some(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// "42 s", "3 m 5 s", "2 h 10 m", "4 d 3 h".
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} m", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An error entry's `at` (RFC 3339 from Postgres) like every other time.
fn error_time(at: &str) -> String {
    DateTime::parse_from_rfc3339(at)
        .map(|t| ts(&t.with_timezone(&Utc)))
        .unwrap_or_else(|_| at.to_owned())
}

fn ts_opt(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map(ts).unwrap_or_else(|| "—".into())
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `?a=1&b=2` from the set pairs, or "".
fn query_string(pairs: &[(&str, &Option<String>)]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs {
        if let Some(v) = some(v) {
            ser.append_pair(k, &v);
            any = true;
        }
    }
    if any {
        format!("?{}", ser.finish())
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------
// Layout

const CSS: &str = r#"
:root { --fg:#1f2933; --muted:#6b7785; --line:#e3e8ee; --bg:#f6f8fa; --card:#fff;
        --accent:#2563eb; --ok:#15803d; --warn:#b45309; --bad:#b91c1c; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
header { background:#111827; color:#fff; padding:0 24px; display:flex; align-items:center; gap:24px; height:48px; }
header .brand { font-weight:700; letter-spacing:.02em; }
header nav a { color:#cbd5e1; text-decoration:none; margin-right:16px; padding:14px 0; }
header nav a.active, header nav a:hover { color:#fff; border-bottom:2px solid #60a5fa; }
header .meta { margin-left:auto; color:#9ca3af; font-size:12px; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600; background:#e5e7eb; color:#374151; }
.badge.ro { background:#fde68a; color:#78350f; }
.badge.on { background:#dcfce7; color:#166534; }
.badge.off { background:#fee2e2; color:#991b1b; }
main { padding:20px 24px 40px; max-width:1200px; }
h1 { font-size:20px; margin:4px 0 16px; } h2 { font-size:15px; margin:24px 0 8px; }
a { color:var(--accent); }
.cards { display:grid; grid-template-columns:repeat(auto-fill,minmax(140px,1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:22px; font-weight:650; margin-top:2px; }
.card .sub { color:var(--muted); font-size:12px; }
.card.bad .value { color:var(--bad); } .card.warn .value { color:var(--warn); }
.charts { display:grid; grid-template-columns:repeat(auto-fit,minmax(420px,1fr)); gap:12px; margin-top:12px; }
figure.chart { margin:0; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 12px; }
figure.chart figcaption { font-weight:600; margin-bottom:4px; }
figure.chart svg { width:100%; height:auto; display:block; }
svg.spark { display:block; } svg .grid { stroke:#eef1f4; } svg .axis { stroke:#9aa5b1; } svg .tick { fill:var(--muted); font-size:10px; }
ul.legend { list-style:none; padding:0; margin:4px 0 0; display:flex; gap:16px; font-size:12px; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px; vertical-align:-1px; }
table { border-collapse:collapse; width:100%; background:var(--card); border:1px solid var(--line); border-radius:8px; overflow:hidden; }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#f9fafb; font-size:12px; color:var(--muted); font-weight:600; text-transform:uppercase; letter-spacing:.03em; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr:last-child td { border-bottom:none; }
.muted { color:var(--muted); } .err { color:var(--bad); }
code, pre { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; }
pre { background:#0f172a; color:#e2e8f0; padding:12px; border-radius:8px; overflow:auto; max-height:420px; }
.flash { padding:10px 14px; border-radius:8px; background:#ecfdf5; border:1px solid #a7f3d0; color:#065f46; margin-bottom:16px; }
.flash.error { background:#fef2f2; border-color:#fecaca; color:#991b1b; }
form.inline { display:inline; margin:0; }
form.filters { display:flex; gap:8px; align-items:end; flex-wrap:wrap; margin-bottom:12px; }
form.filters label { display:flex; flex-direction:column; font-size:12px; color:var(--muted); }
input[type=text], select { padding:5px 8px; border:1px solid #cbd2d9; border-radius:6px; font:inherit; background:#fff; }
button { padding:5px 12px; border-radius:6px; border:1px solid #cbd2d9; background:#fff; font:inherit; cursor:pointer; }
button:hover { background:#f3f4f6; }
button.primary { background:var(--accent); border-color:var(--accent); color:#fff; }
button.primary:hover { background:#1d4ed8; }
button.danger { color:var(--bad); border-color:#fca5a5; }
.toolbar { display:flex; gap:8px; align-items:center; margin:8px 0; flex-wrap:wrap; }
dl.kv { display:grid; grid-template-columns:160px 1fr; gap:4px 12px; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; }
.empty { padding:16px; text-align:center; color:var(--muted); background:var(--card); border:1px dashed var(--line); border-radius:8px; }
"#;

#[derive(Debug, Default, Deserialize)]
struct Flash {
    flash: Option<String>,
    error: Option<String>,
}

fn layout(state: &AdminState, title: &str, active: &str, flash: &Flash, body: Markup) -> Markup {
    let nav = [
        ("/", "Overview"),
        ("/queues", "Queues"),
        ("/dead-letters", "Dead letters"),
        ("/schedules", "Schedules"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Herald" }
                @if active == "/" { meta http-equiv="refresh" content="15"; }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    span.brand { "Herald" }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) class=[(href == active).then_some("active")] { (label) }
                        }
                    }
                    span.meta {
                        @if state.read_only { span.badge.ro { "read-only" } " " }
                        "up since " (ts(&state.started_at))
                    }
                }
                main {
                    @if let Some(msg) = some(&flash.flash) { p.flash role="status" { (msg) } }
                    @if let Some(msg) = some(&flash.error) { p.flash.error role="alert" { (msg) } }
                    (body)
                }
            }
        }
    }
}

/// A one-button POST form for `action` (hidden in read-only mode).
fn action_button(
    state: &AdminState,
    url: &str,
    action: &str,
    label: &str,
    class: &str,
    back: &str,
) -> Markup {
    if state.read_only {
        return html! {};
    }
    html! {
        form.inline method="post" action=(url) {
            input type="hidden" name="csrf" value=(state.dashboard.csrf.token(action));
            input type="hidden" name="back" value=(back);
            button type="submit" class=(class) { (label) }
        }
    }
}

fn card(label: &str, value: impl std::fmt::Display, sub: &str, class: &str) -> Markup {
    html! {
        div class={ "card " (class) } {
            div.label { (label) }
            div.value { (value) }
            @if !sub.is_empty() { div.sub { (sub) } }
        }
    }
}

fn errors_table(errors: &Value) -> Markup {
    let list = errors.as_array().cloned().unwrap_or_default();
    html! {
        @if list.is_empty() {
            p.empty { "No recorded errors." }
        } @else {
            table {
                thead { tr { th.num { "Attempt" } th { "At" } th { "Worker" } th { "Error" } } }
                tbody {
                    @for e in &list {
                        tr {
                            td.num { (e.get("attempt").map(|v| v.to_string()).unwrap_or_default()) }
                            td { (e.get("at").and_then(Value::as_str).map(error_time).unwrap_or_default()) }
                            td { code { (e.get("worker").and_then(Value::as_str).unwrap_or("")) } }
                            td.err { (e.get("error").and_then(Value::as_str).map(str::to_owned)
                                        .unwrap_or_else(|| e.get("error").map(|v| v.to_string()).unwrap_or_default())) }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Overview

/// Per-queue totals folded from the per-state rows of `herald.queue_stats`.
#[derive(Default)]
struct QueueRow {
    queue: String,
    ready: i64,
    scheduled: i64,
    running: i64,
    succeeded: i64,
    cancelled: i64,
    expired_leases: i64,
    failed_last_hour: i64,
    oldest_ready_secs: Option<f64>,
}

fn fold_queues(stats: &[stats::QueueStat]) -> Vec<QueueRow> {
    let mut rows: Vec<QueueRow> = Vec::new();
    for s in stats {
        if rows.last().is_none_or(|r| r.queue != s.queue) {
            rows.push(QueueRow {
                queue: s.queue.clone(),
                ..QueueRow::default()
            });
        }
        let r = rows.last_mut().expect("just pushed");
        match s.state.as_str() {
            "ready" => {
                r.ready += s.count - s.scheduled;
                r.scheduled += s.scheduled;
            }
            "running" => r.running += s.count,
            "succeeded" => r.succeeded += s.count,
            "cancelled" => r.cancelled += s.count,
            _ => {}
        }
        r.expired_leases += s.expired_leases;
        r.failed_last_hour += s.failed_attempts_last_hour;
        if let Some(age) = s.oldest_ready_secs {
            r.oldest_ready_secs = Some(r.oldest_ready_secs.unwrap_or(0.0).max(age));
        }
    }
    rows
}

fn queues_table(
    rows: &[QueueRow],
    dead: &[stats::DeadLetterGroup],
    history: &charts::History,
) -> Markup {
    // Queues that are empty now but had tasks in the charts' window or have
    // dead letters still get a row.
    let mut rows: Vec<&QueueRow> = rows.iter().collect();
    let mut idle: Vec<QueueRow> = Vec::new();
    let seen = history
        .samples()
        .into_iter()
        .flat_map(|s| s.open_by_queue.into_iter().map(|(q, _)| q));
    let dead_queues = dead
        .iter()
        .filter(|d| d.source == "task" && !d.queue.is_empty())
        .map(|d| d.queue.clone());
    for queue in seen.chain(dead_queues) {
        if !rows.iter().any(|r| r.queue == queue) && !idle.iter().any(|r| r.queue == queue) {
            idle.push(QueueRow {
                queue,
                ..QueueRow::default()
            });
        }
    }
    rows.extend(idle.iter());
    rows.sort_by(|a, b| a.queue.cmp(&b.queue));
    html! {
        @if rows.is_empty() {
            p.empty { "No tasks in any queue." }
        } @else {
            table #queues {
                thead { tr {
                    th { "Queue" } th.num { "Ready" } th.num { "Scheduled" } th.num { "Running" }
                    th.num { "Succeeded" } th.num { "Cancelled" } th.num { "Expired leases" }
                    th.num { "Failed attempts (1 h)" } th.num { "Dead letters" } th.num { "Oldest ready" } th { "Backlog" }
                } }
                tbody {
                    @for r in &rows {
                        @let dl: i64 = dead.iter().filter(|d| d.source == "task" && d.queue == r.queue).map(|d| d.count).sum();
                        tr {
                            td { a href={ "/queues?queue=" (encode(&r.queue)) } { (r.queue) } }
                            td.num { (r.ready) } td.num { (r.scheduled) } td.num { (r.running) }
                            td.num { (r.succeeded) } td.num { (r.cancelled) }
                            td.num class=[(r.expired_leases > 0).then_some("err")] { (r.expired_leases) }
                            td.num { (r.failed_last_hour) }
                            td.num {
                                @if dl > 0 { a.err href={ "/dead-letters?queue=" (encode(&r.queue)) } { (dl) } } @else { "0" }
                            }
                            td.num { (r.oldest_ready_secs.map(age).unwrap_or_else(|| "—".into())) }
                            td { (charts::sparkline(&history.backlog(&r.queue), &format!("ready and running tasks in {} over the charts' window", r.queue))) }
                        }
                    }
                }
            }
        }
    }
}

async fn overview(State(state): State<SharedState>, Query(flash): Query<Flash>) -> PageResult {
    let client = client(&state).await?;
    let snap = stats::snapshot(&**client).await?;
    let dead_total = dlq::count(&**client, &dlq::Filter::default()).await?;
    let nodes = crate::nodes::list(&**client).await?;
    let rows = fold_queues(&snap.queues);
    let ready: i64 = rows.iter().map(|r| r.ready).sum();
    let running: i64 = rows.iter().map(|r| r.running).sum();
    let scheduled: i64 = rows.iter().map(|r| r.scheduled).sum();
    let oldest = rows
        .iter()
        .filter_map(|r| r.oldest_ready_secs)
        .fold(None, |m: Option<f64>, a| Some(m.unwrap_or(0.0).max(a)));
    let rates = state.dashboard.history.rates();
    let now = Utc::now();
    let body = html! {
           h1 { "Overview" }
           div.cards {
               (card("Ready tasks", ready, &format!("{scheduled} scheduled for later"), ""))
               (card("Running", running, "", ""))
               (card("Oldest ready", oldest.map(age).unwrap_or_else(|| "—".into()), "wait for a worker", if oldest.unwrap_or(0.0) > 60.0 { "warn" } else { "" }))
               (card("Outbox backlog", snap.outbox.unpublished, &format!("{} failing", snap.outbox.failing), if snap.outbox.failing > 0 { "warn" } else { "" }))
               (card("Relay lag", age(snap.outbox.oldest_age_secs), "oldest unpublished event", if snap.outbox.oldest_age_secs > 60.0 { "warn" } else { "" }))
               (card("Dead letters", dead_total, "", if dead_total > 0 { "bad" } else { "" }))
               (card("Live nodes", nodes.len(), &node_roles(&nodes), if nodes.is_empty() { "warn" } else { "" }))
           }
           div.charts {
               (charts::line_chart("Throughput", "/s", now, &[
                   charts::Series { label: "enqueued", color: "#2563eb", points: &rates.enqueued },
                   charts::Series { label: "finished", color: "#16a34a", points: &rates.finished },
                   charts::Series { label: "events published", color: "#9333ea", points: &rates.published },
               ]))
               (charts::line_chart("Latency", " s", now, &[
                   charts::Series { label: "oldest ready task", color: "#ea580c", points: &rates.oldest_ready },
                   charts::Series { label: "relay lag", color: "#0891b2", points: &rates.relay_lag },
               ]))
           }
           h2 { "Queues" }
           (queues_table(&rows, &snap.dead_letters, &state.dashboard.history))
           h2 { "Dead letters by error" }
           @if snap.dead_letters.is_empty() {
               p.empty { "No dead letters." }
           } @else {
               table {
                   thead { tr { th { "Source" } th { "Queue" } th { "Kind / topic" } th { "Error" } th.num { "Count" } th { "Last failed" } } }
                   tbody {
                       @for d in snap.dead_letters.iter().take(10) {
                           tr {
                               td { (d.source) } td { (d.queue) }
                               td { a href=(format!("/dead-letters{}", query_string(&[("source", &Some(d.source.clone())), ("queue", &Some(d.queue.clone())), ("kind", &Some(d.kind.clone()))]))) { (d.kind) } }
                               td.err { (truncate(&d.error, 120)) }
                               td.num { (d.count) }
                               td { (ts(&d.last_failed_at)) }
                           }
                       }
                   }
               }
           }
    h2 { "Live nodes" }
           (nodes_table(&nodes))
           p.muted { "Figures as of " (ts(&snap.taken_at)) "; charts sampled every " (state.dashboard.history.interval.as_secs()) " s by this process." }
       };
    Ok(layout(&state, "Overview", "/", &flash, body))
}

/// "2 worker, 1 relay".
fn node_roles(nodes: &[crate::nodes::NodeRow]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for role in nodes.iter().flat_map(|n| n.roles.iter()) {
        match counts.iter_mut().find(|(r, _)| r == role) {
            Some((_, n)) => *n += 1,
            None => counts.push((role.clone(), 1)),
        }
    }
    counts
        .iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nodes_table(nodes: &[crate::nodes::NodeRow]) -> Markup {
    html! {
        @if nodes.is_empty() {
            p.empty { "No live nodes: no relay, worker, scheduler or admin process is heartbeating into herald.nodes." }
        } @else {
            table #nodes {
                thead { tr { th { "Host" } th.num { "Pid" } th { "Roles" } th { "Version" } th { "Started" } th.num { "Last seen" } } }
                tbody {
                    @for n in nodes {
                        tr {
                            td { (n.host) } td.num { (n.pid) } td { (n.roles.join(", ")) }
                            td { code { (n.version) } } td { (ts(&n.started_at)) }
                            td.num { (age(n.since_last_seen_secs)) " ago" }
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Queues and tasks

#[derive(Debug, Default, Deserialize)]
struct TaskQuery {
    queue: Option<String>,
    kind: Option<String>,
    state: Option<String>,
}

/// The ten tasks running longest (a hung handler shows here until its
/// timeout stops it).
const LONGEST_RUNNING: &str = "
SELECT id, queue, kind, attempts, leased_by, extract(epoch FROM now() - started_at)::float8
FROM herald.tasks WHERE state = 'running' AND started_at IS NOT NULL
ORDER BY started_at LIMIT 10";

async fn queues(
    State(state): State<SharedState>,
    Query(flash): Query<Flash>,
    Query(q): Query<TaskQuery>,
) -> PageResult {
    let client = client(&state).await?;
    let snap = stats::snapshot(&**client).await?;
    let rows = fold_queues(&snap.queues);
    let filter = queue::TaskFilter {
        queue: some(&q.queue),
        kind: some(&q.kind),
        state: some(&q.state),
    };
    let tasks = queue::list_tasks(&**client, &filter, 100).await;
    let long = client.query(LONGEST_RUNNING, &[]).await;
    let back = format!(
        "/queues{}",
        query_string(&[("queue", &q.queue), ("kind", &q.kind), ("state", &q.state)])
    );
    let body = html! {
        h1 { "Queues" }
        (queues_table(&rows, &snap.dead_letters, &state.dashboard.history))
        h2 { "Longest-running tasks" }
        @match long {
            Err(e) => p.flash.error { (e) },
            Ok(rows) if rows.is_empty() => p.empty { "No task is running." },
            Ok(rows) => table #long-running {
                thead { tr { th.num { "Id" } th { "Queue" } th { "Kind" } th.num { "Attempt" } th { "Worker" } th.num { "Running for" } } }
                tbody {
                    @for r in &rows {
                        tr {
                            td.num { a href={ "/tasks/" (r.get::<_, i64>(0)) } { (r.get::<_, i64>(0)) } }
                            td { (r.get::<_, String>(1)) } td { code { (r.get::<_, String>(2)) } }
                            td.num { (r.get::<_, i32>(3)) }
                            td { (r.get::<_, Option<String>>(4).unwrap_or_default()) }
                            td.num { (age(r.get::<_, f64>(5))) }
                        }
                    }
                }
            },
        }
        h2 { "Tasks" }
        form.filters method="get" action="/queues" {
            label { "Queue" input type="text" name="queue" value=[some(&q.queue)]; }
            label { "Kind" input type="text" name="kind" value=[some(&q.kind)]; }
            label { "State" select name="state" {
                option value="" { "any" }
                @for s in queue::TASK_STATES {
                    option value=(s) selected[some(&q.state).as_deref() == Some(s)] { (s) }
                }
            } }
            button type="submit" { "Filter" }
        }
        @match tasks {
            Err(e) => p.flash.error { (e) },
            Ok(tasks) if tasks.is_empty() => p.empty { "No tasks match." },
            Ok(tasks) => table #tasks {
                thead { tr { th.num { "Id" } th { "Queue" } th { "Kind" } th { "State" } th.num { "Priority" } th { "Run at" } th.num { "Attempts" } th { "Last error" } th {} } }
                tbody {
                    @for t in &tasks {
                        tr {
                            td.num { a href={ "/tasks/" (t.id) } { (t.id) } }
                            td { (t.queue) } td { code { (t.kind) } } td { (t.state) }
                            td.num { (t.priority) } td { (ts(&t.run_at)) }
                            td.num { (t.attempts) "/" (t.max_attempts) }
                            td.err { (t.last_error.as_deref().map(|e| truncate(e, 80)).unwrap_or_default()) }
                            td {
                                @if t.state == "ready" || t.state == "running" {
                                    (action_button(&state, &format!("/tasks/{}/cancel", t.id), "cancel", "Cancel", "danger", &back))
                                }
                            }
                        }
                    }
                }
            },
        }
    };
    Ok(layout(&state, "Queues", "/queues", &flash, body))
}

async fn task(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    Query(flash): Query<Flash>,
) -> PageResult {
    let client = client(&state).await?;
    let Some(t) = queue::get_task(&**client, id).await? else {
        return Err(PageError(
            StatusCode::NOT_FOUND,
            format!(
                "no task {id}: it finished and was removed, became a dead letter, or never existed"
            ),
        ));
    };
    let back = format!("/tasks/{id}");
    let body = html! {
        h1 { "Task " (t.id) " " span.badge { (t.state) } }
        div.toolbar {
            @if t.state == "ready" || t.state == "running" {
                (action_button(&state, &format!("/tasks/{id}/cancel"), "cancel", "Cancel task", "danger", &back))
            }
        }
        dl.kv {
            dt { "Queue" } dd { a href={ "/queues?queue=" (encode(&t.queue)) } { (t.queue) } }
            dt { "Kind" } dd { code { (t.kind) } }
            dt { "Priority" } dd { (t.priority) }
            dt { "Attempts" } dd { (t.attempts) " of " (t.max_attempts) }
            dt { "Run at" } dd { (ts(&t.run_at)) }
            dt { "Created" } dd { (ts(&t.created_at)) }
            dt { "Started" } dd { (ts_opt(&t.started_at)) }
            dt { "Finished" } dd { (ts_opt(&t.finished_at)) }
            dt { "Leased by" } dd { (t.leased_by.as_deref().unwrap_or("—")) " until " (ts_opt(&t.lease_expires_at)) }
            dt { "Unique key" } dd { (t.unique_key.as_deref().unwrap_or("—")) }
            dt { "Cancel requested" } dd { (ts_opt(&t.cancel_requested_at)) }
        }
        h2 { "Error history" }
        (errors_table(&t.errors))
        h2 { "Payload" }
        pre { (pretty(&t.payload)) }
        h2 { "Headers" }
        pre { (pretty(&t.headers)) }
        @if let Some(p) = &t.progress { h2 { "Progress" } pre { (pretty(p)) } }
    };
    Ok(layout(
        &state,
        &format!("Task {id}"),
        "/queues",
        &flash,
        body,
    ))
}

// ---------------------------------------------------------------------------
// Dead letters

#[derive(Debug, Default, Deserialize)]
struct DlqQuery {
    queue: Option<String>,
    kind: Option<String>,
    source: Option<String>,
    error: Option<String>,
}

impl DlqQuery {
    fn filter(&self) -> dlq::Filter {
        dlq::Filter {
            queue: some(&self.queue),
            kind: some(&self.kind),
            source: some(&self.source),
            since: None,
            error: some(&self.error),
        }
    }

    fn query_string(&self) -> String {
        query_string(&[
            ("queue", &self.queue),
            ("kind", &self.kind),
            ("source", &self.source),
            ("error", &self.error),
        ])
    }
}

const DLQ_PAGE: i64 = 200;
const REPLAY_ALL_LIMIT: i64 = 10_000;

async fn dead_letters(State(state): State<SharedState>, RawQuery(raw): RawQuery) -> PageResult {
    // `error` is both a filter and the flash channel's error message; the
    // flash error travels as `failed`.
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let q = DlqQuery {
        queue: get("queue"),
        kind: get("kind"),
        source: get("source"),
        error: get("error"),
    };
    let flash = Flash {
        flash: get("flash"),
        error: get("failed"),
    };
    let client = client(&state).await?;
    let filter = q.filter();
    let (total, list) = match dlq::count(&**client, &filter).await {
        Ok(total) => (total, dlq::list(&**client, &filter, DLQ_PAGE).await?),
        Err(e) => return Err(PageError(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let back = format!("/dead-letters{}", q.query_string());
    let csrf = |a: &str| state.dashboard.csrf.token(a);
    let body = html! {
        h1 { "Dead letters" }
        form.filters method="get" action="/dead-letters" {
            label { "Queue" input type="text" name="queue" value=[some(&q.queue)]; }
            label { "Kind or topic" input type="text" name="kind" value=[some(&q.kind)]; }
            label { "Source" select name="source" {
                option value="" { "any" }
                @for s in ["task", "outbox"] { option value=(s) selected[some(&q.source).as_deref() == Some(s)] { (s) } }
            } }
            label { "Error contains" input type="text" name="error" value=[some(&q.error)]; }
            button type="submit" { "Filter" }
            @if !q.query_string().is_empty() { a href="/dead-letters" { "clear" } }
        }
        p.muted { (total) " dead letters match" @if total > DLQ_PAGE { "; the newest " (DLQ_PAGE) " are shown" } "." }
        @if list.is_empty() {
            p.empty { "No dead letters match." }
        } @else {
            // Row checkboxes and buttons join this form through their
            // `form` attribute; in read-only mode there is no form at all.
            @if !state.read_only {
                form #replay-form method="post" action="/dead-letters/replay" {
                    input type="hidden" name="csrf" value=(csrf("replay-many"));
                    input type="hidden" name="back" value=(back);
                    @for (k, v) in [("queue", &q.queue), ("kind", &q.kind), ("source", &q.source), ("error", &q.error)] {
                        @if let Some(v) = some(v) { input type="hidden" name={ "filter_" (k) } value=(v); }
                    }
                    div.toolbar {
                        button.primary type="submit" name="selected" value="1" { "Replay selected" }
                        button type="submit" name="all" value="1"
                            onclick={ "return confirm('Replay all " (total) " matching dead letters?')" } {
                            "Replay all " (total) " matching"
                        }
                    }
                }
            }
            table #dead-letters {
                thead { tr {
                    @if !state.read_only { th {} }
                    th.num { "Id" } th { "Source" } th { "Queue" } th { "Kind / topic" } th.num { "Attempts" } th { "Last error" } th { "Failed at" } th {}
                } }
                tbody {
                    @for d in &list {
                        tr {
                            @if !state.read_only { td { input type="checkbox" form="replay-form" name="id" value=(d.id) aria-label={ "select " (d.id) }; } }
                            td.num { a href={ "/dead-letters/" (d.id) } { (d.id) } }
                            td { (d.source) } td { (d.queue.as_deref().unwrap_or("—")) }
                            td { code { (d.name()) } }
                            td.num { (d.attempts) }
                            td.err { (truncate(d.last_error.as_deref().unwrap_or(""), 100)) }
                            td { (ts(&d.failed_at)) }
                            td { @if !state.read_only { button type="submit" form="replay-form" name="one" value=(d.id) { "Replay" } } }
                        }
                    }
                }
            }
        }
        @if !state.read_only {
            h2 { "Purge" }
            form.filters #purge-form method="post" action="/dead-letters/purge"
                onsubmit="return confirm('Delete these dead letters for good?')" {
                input type="hidden" name="csrf" value=(csrf("purge"));
                input type="hidden" name="back" value=(back);
                label { "Failed more than … ago" input type="text" name="older_than" value="30d" size="8"; }
                button.danger type="submit" { "Purge (all queues)" }
            }
        }
    };
    Ok(layout(
        &state,
        "Dead letters",
        "/dead-letters",
        &flash,
        body,
    ))
}

async fn dead_letter(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    Query(flash): Query<Flash>,
) -> PageResult {
    let client = client(&state).await?;
    let Some(d) = dlq::get(&**client, id).await? else {
        return Err(PageError(
            StatusCode::NOT_FOUND,
            format!("no dead letter {id}: it was replayed or purged, or never existed"),
        ));
    };
    let body = html! {
        h1 { "Dead letter " (d.id) " " span.badge { (d.source) } }
        div.toolbar {
            (action_button(&state, &format!("/dead-letters/{id}/replay"), "replay", "Replay", "primary", "/dead-letters"))
            a href="/dead-letters" { "All dead letters" }
        }
        dl.kv {
            dt { @if d.source == "task" { "Kind" } @else { "Topic" } } dd { code { (d.name()) } }
            dt { "Queue" } dd { (d.queue.as_deref().unwrap_or("—")) }
            dt { "Key" } dd { (d.key.as_deref().unwrap_or("—")) }
            dt { "Original id" } dd { (d.original_id.map(|i| i.to_string()).unwrap_or_else(|| "—".into())) }
            @if let Some(e) = d.event_id { dt { "Event id" } dd { code { (e) } } }
            dt { "Attempts" } dd { (d.attempts) }
            dt { "Created" } dd { (ts_opt(&d.created_at)) }
            dt { "Failed" } dd { (ts(&d.failed_at)) }
            dt { "Last error" } dd.err { (d.last_error.as_deref().unwrap_or("—")) }
        }
        h2 { "Error history" }
        (errors_table(&d.errors))
        h2 { "Payload" }
        pre #payload { (pretty(&d.payload)) }
        h2 { "Headers" }
        pre { (pretty(&d.headers)) }
    };
    Ok(layout(
        &state,
        &format!("Dead letter {id}"),
        "/dead-letters",
        &flash,
        body,
    ))
}

// ---------------------------------------------------------------------------
// Schedules

async fn schedules(State(state): State<SharedState>, Query(flash): Query<Flash>) -> PageResult {
    let client = client(&state).await?;
    let list = cron::list(&**client).await?;
    let body = html! {
        h1 { "Schedules" }
        @if list.is_empty() {
            p.empty { "No schedules. Declare them under [[schedules]] in the configuration or with herald schedules add." }
        } @else {
            table #schedules {
                thead { tr {
                    th { "Name" } th { "When" } th { "Task" } th { "State" } th { "Next fire times (in its zone)" } th { "Last run" } th {}
                } }
                tbody {
                    @for s in &list {
                        tr id={ "schedule-" (s.name) } {
                            td { strong { (s.name) } br; span.muted { (s.source) } }
                            td { code { (s.cron) } br; span.muted { (s.tz) } }
                            td { code { (s.kind) } br; span.muted { "queue " (s.queue) } }
                            td {
                                @if s.enabled { span.badge.on { "active" } } @else { span.badge.off { "paused" } }
                                br; span.muted { "misfire: " (s.misfire) }
                            }
                            td {
                                @match s.upcoming(3) {
                                    Ok(times) => {
                                        @for (i, t) in times.iter().enumerate() {
                                            @if i > 0 { br; }
                                            span class=[(i > 0).then_some("muted")] { (t.format("%a %Y-%m-%d %H:%M:%S %Z")) }
                                        }
                                    }
                                    Err(e) => span.err { (e) },
                                }
                            }
                            td {
                                (ts_opt(&s.last_run_at))
                                @if let Some(e) = &s.last_error { br; span.err { (truncate(e, 80)) } }
                            }
                            td {
                                @if s.enabled {
                                    (action_button(&state, &format!("/schedules/{}/pause", s.name), "pause", "Pause", "", "/schedules"))
                                } @else {
                                    (action_button(&state, &format!("/schedules/{}/resume", s.name), "resume", "Resume", "", "/schedules"))
                                }
                                " "
                                (action_button(&state, &format!("/schedules/{}/trigger", s.name), "trigger", "Trigger now", "", "/schedules"))
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout(&state, "Schedules", "/schedules", &flash, body))
}

// ---------------------------------------------------------------------------
// Actions

use axum::extract::RawQuery;

/// A POSTed form's fields, repeated names kept.
struct FormFields(Vec<(String, String)>);

impl FormFields {
    fn parse(RawForm(body): RawForm) -> FormFields {
        FormFields(url::form_urlencoded::parse(&body).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.trim().is_empty())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Where to go back to: a path on this server, else `default`.
    fn back(&self, default: &str) -> String {
        match self.get("back") {
            Some(b) if b.starts_with('/') && !b.starts_with("//") && !b.contains('\\') => {
                b.to_owned()
            }
            _ => default.to_owned(),
        }
    }
}

fn forbidden(msg: impl Into<String>) -> PageError {
    PageError(StatusCode::FORBIDDEN, msg.into())
}

/// Read-only mode, then origin, then token.
fn authorize(
    state: &AdminState,
    headers: &HeaderMap,
    action: &str,
    form: &FormFields,
) -> Result<(), PageError> {
    if state.read_only {
        return Err(forbidden(
            "the admin server is read-only (admin.read_only): actions are disabled",
        ));
    }
    csrf::check_origin(headers).map_err(forbidden)?;
    let ok = form
        .get("csrf")
        .is_some_and(|t| state.dashboard.csrf.verify(action, t));
    if !ok {
        return Err(forbidden(
            "missing or invalid CSRF token: reload the page and try again",
        ));
    }
    Ok(())
}

/// 303 back with a message; `key` is `flash` or the page's error key.
fn done(back: &str, key: &str, msg: &str) -> Response {
    let sep = if back.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{back}{sep}{key}={}", encode(msg))).into_response()
}

/// The query key a page shows errors under (`/dead-letters` uses `error` as a filter).
fn error_key(back: &str) -> &'static str {
    if back.starts_with("/dead-letters") {
        "failed"
    } else {
        "error"
    }
}

fn outcome(back: &str, result: std::result::Result<String, String>) -> Response {
    match result {
        Ok(msg) => done(back, "flash", &msg),
        Err(msg) => done(back, error_key(back), &msg),
    }
}

async fn replay_one(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    form: RawForm,
) -> Response {
    let form = FormFields::parse(form);
    if let Err(r) = authorize(&state, &headers, "replay", &form) {
        return r.into_response();
    }
    let back = form.back("/dead-letters");
    let client = match client(&state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    // The source says what the new id names: a task or an outbox row.
    let what = match dlq::get(&**client, id).await {
        Ok(Some(d)) if d.source == "outbox" => "outbox event",
        _ => "task",
    };
    let result = dlq::replay(&**client, id).await;
    outcome(
        &back,
        result
            .map(|new| format!("Dead letter {id} replayed as {what} {new}."))
            .map_err(|e| e.to_string()),
    )
}

async fn replay_many(
    State(state): State<SharedState>,
    headers: HeaderMap,
    form: RawForm,
) -> Response {
    let form = FormFields::parse(form);
    if let Err(r) = authorize(&state, &headers, "replay-many", &form) {
        return r.into_response();
    }
    let back = form.back("/dead-letters");
    let client = match client(&state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if form.get("all").is_some() {
        let filter = dlq::Filter {
            queue: form.get("filter_queue").map(str::to_owned),
            kind: form.get("filter_kind").map(str::to_owned),
            source: form.get("filter_source").map(str::to_owned),
            since: None,
            error: form.get("filter_error").map(str::to_owned),
        };
        let result = dlq::replay_matching(&**client, &filter, REPLAY_ALL_LIMIT).await;
        return outcome(
            &back,
            result
                .map(|r| format!("Replayed {} dead letters.", r.len()))
                .map_err(|e| e.to_string()),
        );
    }
    let ids: Vec<&str> = match form.get("one") {
        Some(one) => vec![one],
        None => form.all("id").collect(),
    };
    if ids.is_empty() {
        return done(
            &back,
            error_key(&back),
            "Select at least one dead letter to replay.",
        );
    }
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for id in ids {
        match id.parse::<i64>() {
            Ok(n) => match dlq::replay(&**client, n).await {
                Ok(new) => replayed.push(format!("{n} → {new}")),
                Err(e) => failed.push(e.to_string()),
            },
            Err(_) => failed.push(format!("{id:?} is not a dead-letter id")),
        }
    }
    let mut msg = format!(
        "Replayed {} dead letter{}",
        replayed.len(),
        if replayed.len() == 1 { "" } else { "s" }
    );
    if !replayed.is_empty() {
        msg.push_str(&format!(" ({})", replayed.join(", ")));
    }
    msg.push('.');
    if failed.is_empty() {
        done(&back, "flash", &msg)
    } else {
        done(
            &back,
            error_key(&back),
            &format!("{msg} Failed: {}", failed.join("; ")),
        )
    }
}

async fn purge(State(state): State<SharedState>, headers: HeaderMap, form: RawForm) -> Response {
    let form = FormFields::parse(form);
    if let Err(r) = authorize(&state, &headers, "purge", &form) {
        return r.into_response();
    }
    let back = form.back("/dead-letters");
    let Some(older) = form.get("older_than") else {
        return done(
            &back,
            error_key(&back),
            "Say how old the dead letters to purge must be (e.g. 30d).",
        );
    };
    let older_than = match humantime::parse_duration(older.trim()) {
        Ok(d) => d,
        Err(e) => {
            return done(
                &back,
                error_key(&back),
                &format!("older_than {older:?}: {e} (e.g. 12h, 30d)"),
            )
        }
    };
    let client = match client(&state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = dlq::purge(&**client, older_than).await;
    outcome(
        &back,
        result
            .map(|n| format!("Purged {n} dead letters that failed more than {older} ago."))
            .map_err(|e| e.to_string()),
    )
}

async fn cancel_task(
    State(state): State<SharedState>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    form: RawForm,
) -> Response {
    let form = FormFields::parse(form);
    if let Err(r) = authorize(&state, &headers, "cancel", &form) {
        return r.into_response();
    }
    let back = form.back(&format!("/tasks/{id}"));
    let client = match client(&state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = match queue::cancel(&**client, id).await {
        Ok(Some(how)) => Ok(format!("Task {id}: {how}.")),
        Ok(None) => Err(format!("Task {id} is not ready or running.")),
        Err(e) => Err(e.to_string()),
    };
    outcome(&back, result)
}

async fn schedule_action(
    State(state): State<SharedState>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    form: RawForm,
) -> Response {
    let form = FormFields::parse(form);
    if !matches!(action.as_str(), "pause" | "resume" | "trigger") {
        return PageError(
            StatusCode::NOT_FOUND,
            format!("no schedule action {action:?}"),
        )
        .into_response();
    }
    if let Err(r) = authorize(&state, &headers, &action, &form) {
        return r.into_response();
    }
    let back = form.back("/schedules");
    let client = match client(&state).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = match action.as_str() {
        "pause" => cron::pause(&**client, &name)
            .await
            .map(|()| format!("Schedule {name} paused.")),
        "resume" => cron::resume(&**client, &name)
            .await
            .map(|()| format!("Schedule {name} resumed.")),
        _ => cron::trigger(&**client, &name)
            .await
            .map(|id| format!("Schedule {name} triggered: task {id}.")),
    };
    outcome(&back, result.map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(age(0.4), "0 s");
        assert_eq!(age(61.0), "1 m 1 s");
        assert_eq!(age(7260.0), "2 h 1 m");
        assert_eq!(age(90000.0), "1 d 1 h");
    }

    #[test]
    fn back_stays_on_this_server() {
        let f = |b: &str| FormFields(vec![("back".into(), b.into())]).back("/x");
        assert_eq!(f("/schedules"), "/schedules");
        assert_eq!(f("//evil.example/"), "/x");
        assert_eq!(f("https://evil.example/"), "/x");
        assert_eq!(f("/\\evil"), "/x");
    }
}
