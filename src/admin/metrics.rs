//! `/metrics`: the Prometheus text exposition. Two parts:
//!
//! - figures read from the database at each scrape (tasks by queue and
//!   state, outbox backlog, dead letters, schedules, live nodes) plus this
//!   process's LISTEN connections and Redis reachability, rendered here as
//!   gauges. They are computed fresh on every scrape, so a queue or schedule
//!   that disappears leaves no stale series, and when Postgres does not
//!   answer they are left out, `herald_postgres_up` is 0 and
//!   `herald_admin_scrape_errors_total{source="postgres"}` counts it: the
//!   response still carries everything else;
//! - the process's own counters and histograms (the `metrics` recorder that
//!   `telemetry` installs), with the pool gauges set just before rendering.
//!
//! Every database read is one aggregate statement, in a READ ONLY
//! transaction with a `statement_timeout`, and the whole database part has
//! a time budget, so a scrape stays cheap and never hangs.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{AdminState, SharedState};
use crate::error::{Context, Result};
use crate::nodes::{NodeRow, Role};
use crate::stats::Gauges;

/// The whole database part of one scrape.
pub const DB_BUDGET: Duration = Duration::from_secs(5);
/// `statement_timeout` of each scrape statement.
const STATEMENT_TIMEOUT: &str = "4s";
/// The Redis PING of one scrape.
const REDIS_BUDGET: Duration = Duration::from_secs(1);
/// Counter of scrapes whose database (or Redis) part failed, by source.
pub const SCRAPE_ERRORS: &str = "herald_admin_scrape_errors_total";

/// `GET /metrics`.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state).await,
    )
        .into_response()
}

/// The whole exposition for one scrape.
pub async fn render(state: &AdminState) -> String {
    let started = Instant::now();
    // The counters below need the recorder (a no-op when already installed).
    crate::telemetry::init_metrics();
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_counter!(
            SCRAPE_ERRORS,
            "Scrapes of /metrics whose database or Redis part failed, by source"
        )
    });
    let db = async {
        match tokio::time::timeout(DB_BUDGET, read_database(&state.pool)).await {
            Ok(result) => result,
            Err(_) => Err(crate::Error::Other(format!(
                "the database part of the scrape took longer than {}s",
                DB_BUDGET.as_secs()
            ))),
        }
    };
    let (db, redis_up) = tokio::join!(db, super::health::redis_up(&state.redis, REDIS_BUDGET));
    let (db, nodes) = split(db);
    metrics::counter!(SCRAPE_ERRORS, "source" => "postgres").increment(0);
    metrics::counter!(SCRAPE_ERRORS, "source" => "redis").increment(0);
    let mut out = Exposition::default();
    out.family(
        "herald_postgres_up",
        "Whether this scrape could read the database figures (1) or not (0)",
    );
    out.sample("herald_postgres_up", &[], f64::from(u8::from(db.is_ok())));
    out.family(
        "herald_redis_up",
        "Whether Redis answered a PING during this scrape",
    );
    out.sample("herald_redis_up", &[], f64::from(u8::from(redis_up)));
    if !redis_up {
        metrics::counter!(SCRAPE_ERRORS, "source" => "redis").increment(1);
    }
    match &db {
        Ok(gauges) => {
            write_gauges(&mut out, state, gauges);
            write_postgres(&mut out, gauges);
        }
        Err(error) => {
            metrics::counter!(SCRAPE_ERRORS, "source" => "postgres").increment(1);
            tracing::warn!(%error, "/metrics: reading the database figures failed");
        }
    }
    match &nodes {
        Ok(nodes) => write_nodes(&mut out, nodes),
        Err(error) if db.is_ok() => {
            metrics::counter!(SCRAPE_ERRORS, "source" => "postgres").increment(1);
            tracing::warn!(%error, "/metrics: reading herald.nodes failed");
        }
        Err(_) => {}
    }
    out.family(
        "herald_listen_up",
        "Whether this process's LISTEN connection is up, by listener",
    );
    for (name, up) in state.readiness.listeners() {
        out.sample(
            "herald_listen_up",
            &[("listener", &name)],
            f64::from(u8::from(up)),
        );
    }
    out.family("herald_build_info", "Herald's version; the value is 1");
    out.sample(
        "herald_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    out.family(
        "herald_process_start_time_seconds",
        "When this process's admin server started, in Unix seconds",
    );
    out.sample(
        "herald_process_start_time_seconds",
        &[],
        state.started_at.timestamp_millis() as f64 / 1000.0,
    );
    out.family(
        "herald_scrape_duration_seconds",
        "How long this scrape's database and Redis reads took",
    );
    out.sample(
        "herald_scrape_duration_seconds",
        &[],
        started.elapsed().as_secs_f64(),
    );
    crate::telemetry::record_pool_status("postgres", &state.pool);
    crate::telemetry::record_redis_pool_status("redis", &state.redis);
    let mut text = out.text;
    text.push_str(&crate::telemetry::render_metrics());
    text
}

/// The gauges, then the live nodes; each in its own READ ONLY transaction
/// (a database that predates `herald.nodes` still reports the gauges).
async fn read_database(pool: &deadpool_postgres::Pool) -> Result<(Gauges, Result<Vec<NodeRow>>)> {
    let mut client = pool.get().await?;
    let gauges = {
        let tx = read_only(&mut client).await?;
        let gauges = crate::stats::gauges(&*tx).await?;
        tx.commit().await.context("ending the scrape transaction")?;
        gauges
    };
    let nodes = async {
        let tx = read_only(&mut client).await?;
        let nodes = crate::nodes::list(&*tx).await?;
        tx.commit().await.context("ending the scrape transaction")?;
        Ok(nodes)
    }
    .await;
    Ok((gauges, nodes))
}

async fn read_only(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .context("starting the scrape transaction")?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'; SET LOCAL lock_timeout = '1s'"
    ))
    .await
    .context("limiting the scrape's statements")?;
    Ok(tx)
}

/// Unzip the database result into the gauges' and the nodes' outcomes.
fn split(result: Result<(Gauges, Result<Vec<NodeRow>>)>) -> (Result<Gauges>, Result<Vec<NodeRow>>) {
    match result {
        Ok((g, n)) => (Ok(g), n),
        Err(e) => {
            let text = e.to_string();
            (Err(e), Err(crate::Error::Other(text)))
        }
    }
}

const TASK_STATES: [&str; 4] = ["ready", "running", "succeeded", "cancelled"];

fn write_gauges(out: &mut Exposition, state: &AdminState, g: &Gauges) {
    // Every queue with tasks, plus the configured worker queues, in every
    // state: a state that empties shows 0 rather than vanishing.
    let mut queues: std::collections::BTreeSet<String> =
        g.tasks.iter().map(|t| t.queue.clone()).collect();
    for (q, _) in state.config.worker.queue_concurrency() {
        queues.insert(q);
    }
    out.family("herald_tasks", "Tasks in herald.tasks, by queue and state");
    for q in &queues {
        for s in TASK_STATES {
            let n = g
                .tasks
                .iter()
                .find(|t| &t.queue == q && t.state == s)
                .map_or(0, |t| t.count);
            out.sample("herald_tasks", &[("queue", q), ("state", s)], n as f64);
        }
    }
    let ready = |q: &str| g.tasks.iter().find(|t| t.queue == q && t.state == "ready");
    let running = |q: &str| {
        g.tasks
            .iter()
            .find(|t| t.queue == q && t.state == "running")
    };
    out.family(
        "herald_tasks_scheduled",
        "Ready tasks whose run_at is in the future (included in state=\"ready\"), by queue",
    );
    for q in &queues {
        let n = ready(q).map_or(0, |t| t.scheduled);
        out.sample("herald_tasks_scheduled", &[("queue", q)], n as f64);
    }
    out.family(
        "herald_tasks_oldest_ready_seconds",
        "Age of the oldest due ready task (now - run_at), by queue; 0 when none waits",
    );
    for q in &queues {
        let secs = ready(q).map_or(0.0, |t| t.oldest_ready_secs);
        out.sample("herald_tasks_oldest_ready_seconds", &[("queue", q)], secs);
    }
    out.family(
        "herald_tasks_expired_leases",
        "Running tasks whose lease expired (their worker is gone), waiting for a rescuer, by queue",
    );
    for q in &queues {
        let n = running(q).map_or(0, |t| t.expired_leases);
        out.sample("herald_tasks_expired_leases", &[("queue", q)], n as f64);
    }

    out.family(
        "herald_outbox_unpublished",
        "Events in herald.outbox not yet relayed",
    );
    out.sample(
        "herald_outbox_unpublished",
        &[],
        g.outbox.unpublished as f64,
    );
    out.family(
        "herald_outbox_oldest_unpublished_seconds",
        "Age of the oldest event still in herald.outbox; 0 when empty",
    );
    out.sample(
        "herald_outbox_oldest_unpublished_seconds",
        &[],
        g.outbox.oldest_age_secs,
    );
    out.family(
        "herald_outbox_failing",
        "Events in herald.outbox whose delivery has failed at least once",
    );
    out.sample("herald_outbox_failing", &[], g.outbox.failing as f64);

    out.family(
        "herald_dead_letters",
        "Rows in herald.dead_letters, by source (task, outbox), queue and kind (or topic)",
    );
    for d in &g.dead_letters {
        out.sample(
            "herald_dead_letters",
            &[
                ("source", &d.source),
                ("queue", &d.queue),
                ("kind", &d.kind),
            ],
            d.count as f64,
        );
    }

    out.family(
        "herald_schedule_next_run_seconds",
        "Seconds until the schedule's next tick; negative when overdue (no scheduler fired it)",
    );
    for s in &g.schedules {
        if let Some(secs) = s.next_run_in_secs {
            out.sample(
                "herald_schedule_next_run_seconds",
                &[("schedule", &s.name)],
                secs,
            );
        }
    }
    out.family(
        "herald_schedule_enabled",
        "Whether the schedule is enabled (1) or paused (0)",
    );
    for s in &g.schedules {
        out.sample(
            "herald_schedule_enabled",
            &[("schedule", &s.name)],
            f64::from(u8::from(s.enabled)),
        );
    }
    out.family(
        "herald_schedule_error",
        "Whether the scheduler marked the schedule unusable (last_error set)",
    );
    for s in &g.schedules {
        out.sample(
            "herald_schedule_error",
            &[("schedule", &s.name)],
            f64::from(u8::from(s.has_error)),
        );
    }
}

fn write_postgres(out: &mut Exposition, g: &Gauges) {
    out.family(
        "herald_postgres_dead_tuples",
        "Dead tuples of a herald table (pg_stat_user_tables.n_dead_tup), by table",
    );
    for t in &g.tables {
        out.sample(
            "herald_postgres_dead_tuples",
            &[("table", &t.table)],
            t.dead_tuples as f64,
        );
    }
    out.family(
        "herald_postgres_live_tuples",
        "Live tuples of a herald table (pg_stat_user_tables.n_live_tup), by table",
    );
    for t in &g.tables {
        out.sample(
            "herald_postgres_live_tuples",
            &[("table", &t.table)],
            t.live_tuples as f64,
        );
    }
    out.family(
        "herald_postgres_seconds_since_vacuum",
        "Seconds since a herald table was last vacuumed (manual or auto), by table",
    );
    for t in &g.tables {
        if let Some(secs) = t.since_vacuum_secs {
            out.sample(
                "herald_postgres_seconds_since_vacuum",
                &[("table", &t.table)],
                secs,
            );
        }
    }
    out.family(
        "herald_postgres_oldest_transaction_seconds",
        "Age of the oldest open transaction of any client session in the cluster (0 when none is visible)",
    );
    out.sample(
        "herald_postgres_oldest_transaction_seconds",
        &[],
        g.oldest_transaction_secs.unwrap_or(0.0),
    );
}

fn write_nodes(out: &mut Exposition, nodes: &[NodeRow]) {
    out.family(
        "herald_nodes",
        "Live Herald processes in herald.nodes, by role (a process may have several)",
    );
    for role in Role::ALL {
        let n = nodes
            .iter()
            .filter(|n| n.roles.iter().any(|r| r == role.as_str()))
            .count();
        out.sample("herald_nodes", &[("role", role.as_str())], n as f64);
    }
}

/// Prometheus text format (0.0.4) for gauges.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} gauge");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_labels_and_formats_values() {
        let mut out = Exposition::default();
        out.family("m", "help with \\ and\nnewline");
        out.sample("m", &[("a", "x\"y\\z\nw"), ("b", "2")], 3.0);
        out.sample("m", &[], 0.25);
        out.sample("m", &[], f64::INFINITY);
        assert_eq!(
            out.text,
            "# HELP m help with \\\\ and\\nnewline\n# TYPE m gauge\n\
             m{a=\"x\\\"y\\\\z\\nw\",b=\"2\"} 3\nm 0.25\nm +Inf\n"
        );
    }
}
