//! Telemetry: lifecycle spans reach an OpenTelemetry exporter, the
//! producer's trace context crosses the queue and the outbox (relay fan-out)
//! to the worker's task span, and the Prometheus metrics move. Real Postgres
//! and Redis; the spans go to the SDK's in-memory exporter.

use crate::common;

use std::time::Duration;

use crate::common::{TestDb, WorkerTask};
use herald::{Config, Event, Registry, Task};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Spans are recorded by the suite's one subscriber (common::init_tracing).
fn exporter() -> InMemorySpanExporter {
    common::span_exporter()
}

fn tweak(c: &mut Config) {
    c.worker.poll_interval = Duration::from_millis(200);
    c.worker.retry_base = Duration::from_millis(20);
    c.worker.retry_max = Duration::from_millis(50);
    c.worker.shutdown_grace = Duration::from_secs(2);
    c.relay.poll_interval = Duration::from_millis(200);
    c.postgres.pool_size = 4;
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// The finished spans named `name` whose `key` attribute is `value`,
/// waiting up to 10 s for at least one.
async fn spans_where(
    exporter: &InMemorySpanExporter,
    name: &str,
    key: &str,
    value: Value,
) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<SpanData> = exporter
            .get_finished_spans()
            .expect("finished spans")
            .into_iter()
            .filter(|s| s.name == name && attr(s, key) == Some(&value))
            .collect();
        if !found.is_empty() || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ids_of(span: &tracing::Span) -> (TraceId, SpanId) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    assert!(
        sc.is_valid(),
        "the producer span has an OpenTelemetry context"
    );
    (sc.trace_id(), sc.span_id())
}

async fn stop(token: CancellationToken, handle: tokio::task::JoinHandle<herald::Result<()>>) {
    token.cancel();
    tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("stops within 15 s")
        .expect("task")
        .expect("ends without error");
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_span_is_a_child_of_the_enqueuing_span() {
    let exporter = exporter();
    let db = TestDb::with(|c| {
        tweak(c);
        c.worker.queues = vec!["traced".into()];
    })
    .await;
    let client = db.client().await;

    let producer = tracing::info_span!("test.producer");
    let (trace_id, producer_span_id) = ids_of(&producer);
    let task = Task::new("herald.noop", &serde_json::json!({}))
        .unwrap()
        .queue("traced");
    let id = herald::enqueue(&client, &task)
        .instrument(producer.clone())
        .await
        .unwrap();
    drop(producer);

    // The producer's trace context is stored with the task.
    let stored = herald::queue::get_task(&client, id).await.unwrap().unwrap();
    let traceparent = stored.headers["traceparent"].as_str().unwrap().to_string();
    assert_eq!(
        traceparent,
        format!("00-{trace_id}-{producer_span_id}-01"),
        "headers: {}",
        stored.headers
    );

    let worker = WorkerTask::start(&db.config, Registry::new());
    let spans = spans_where(
        &exporter,
        "herald.task.run",
        "herald.queue",
        Value::from("traced"),
    )
    .await;
    worker.stop().await;

    assert_eq!(spans.len(), 1, "one run span in queue traced");
    assert_eq!(attr(&spans[0], "herald.task.id"), Some(&Value::I64(id)));
    let run = &spans[0];
    assert_eq!(
        run.span_context.trace_id(),
        trace_id,
        "same trace as the producer"
    );
    assert_eq!(
        run.parent_span_id, producer_span_id,
        "child of the producer's span"
    );
    assert_eq!(run.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(attr(run, "herald.queue"), Some(&Value::from("traced")));
    assert_eq!(
        attr(run, "herald.task.kind"),
        Some(&Value::from("herald.noop"))
    );
    assert_eq!(attr(run, "herald.task.attempt"), Some(&Value::I64(1)));
    assert_eq!(
        attr(run, "herald.task.outcome"),
        Some(&Value::from("succeeded"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_trace_context_crosses_the_relay_to_the_durable_subscriber() {
    let exporter = exporter();
    let db = TestDb::with(tweak).await;
    let client = db.client().await;

    let mut registry = Registry::new();
    registry
        .subscribe_durable("telemetry-sub", "telemetry.*", |_ctx, _env| async {
            Ok(())
        })
        .unwrap();
    let worker = WorkerTask::start(&db.config, registry);
    // The worker writes the subscription when it starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.count("SELECT count(*) FROM herald.subscriptions").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let producer = tracing::info_span!("test.publisher");
    let (trace_id, producer_span_id) = ids_of(&producer);
    let event = Event::new("telemetry.ping", &serde_json::json!({"n": 1})).unwrap();
    herald::publish(&client, &event)
        .instrument(producer.clone())
        .await
        .unwrap();
    drop(producer);

    let relay = db.relay();
    let spans = spans_where(
        &exporter,
        "herald.task.run",
        "herald.task.kind",
        Value::from(herald::subscriptions::handler_kind("telemetry-sub")),
    )
    .await;
    let batches: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "herald.relay.batch")
        .collect();
    relay.stop().await;
    worker.stop().await;

    let run = spans
        .iter()
        .find(|s| s.span_context.trace_id() == trace_id)
        .unwrap_or_else(|| panic!("a subscriber task span in trace {trace_id}: {spans:#?}"));
    assert_eq!(run.parent_span_id, producer_span_id);
    assert_eq!(
        attr(run, "herald.task.outcome"),
        Some(&Value::from("succeeded"))
    );

    // The relay's batch span reports what it held and published.
    // Other tests' relays share the exporter: look for this test's batch by
    // what it held, one event fanned out once.
    let batch = batches
        .iter()
        .find(|b| {
            attr(b, "herald.relay.fanned_out") == Some(&Value::I64(1))
                && attr(b, "herald.relay.events") == Some(&Value::I64(1))
        })
        .unwrap_or_else(|| {
            let attrs: Vec<_> = batches.iter().map(|b| &b.attributes).collect();
            panic!("a relay batch span that fanned out the event: {attrs:?}")
        });
    assert_eq!(attr(batch, "herald.relay.events"), Some(&Value::I64(1)));
    assert_eq!(attr(batch, "herald.relay.published"), Some(&Value::I64(1)));
    let partitions = attr(batch, "herald.relay.partitions").expect("partitions attribute");
    assert!(
        !partitions.as_str().is_empty(),
        "partitions held: {partitions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_task_lifecycle() {
    exporter();
    let db = TestDb::with(|c| {
        tweak(c);
        c.worker.queues = vec!["metered".into()];
    })
    .await;
    let client = db.client().await;
    let mut tasks: Vec<Task> = (0..3)
        .map(|_| {
            Task::new("herald.noop", &serde_json::json!({}))
                .unwrap()
                .queue("metered")
        })
        .collect();
    tasks.push(
        Task::new("herald.fail", &serde_json::json!({"message": "boom"}))
            .unwrap()
            .queue("metered")
            .max_attempts(2),
    );
    herald::enqueue_batch(&client, &tasks).await.unwrap();

    let worker = WorkerTask::start(&db.config, Registry::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = herald::telemetry::render_metrics();
        let dead = metric(
            &text,
            "herald_tasks_completed_total",
            &[("queue", "metered"), ("outcome", "dead")],
        );
        let ok = metric(
            &text,
            "herald_tasks_completed_total",
            &[("queue", "metered"), ("outcome", "succeeded")],
        );
        if dead >= 1.0 && ok >= 3.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outcomes counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;

    let text = herald::telemetry::render_metrics();
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        m("herald_tasks_enqueued_total", &[("queue", "metered")]),
        4.0
    );
    assert_eq!(
        m(
            "herald_tasks_completed_total",
            &[
                ("queue", "metered"),
                ("kind", "herald.noop"),
                ("outcome", "succeeded")
            ]
        ),
        3.0
    );
    assert_eq!(
        m(
            "herald_tasks_completed_total",
            &[
                ("queue", "metered"),
                ("kind", "herald.fail"),
                ("outcome", "retried")
            ]
        ),
        1.0
    );
    assert_eq!(
        m(
            "herald_tasks_completed_total",
            &[
                ("queue", "metered"),
                ("kind", "herald.fail"),
                ("outcome", "dead")
            ]
        ),
        1.0
    );
    assert!(m("herald_dead_letters_total", &[("source", "task")]) >= 1.0);
    // Histograms have buckets: 5 attempts picked up, 5 handler runs.
    assert_eq!(
        m("herald_task_pickup_seconds_count", &[("queue", "metered")]),
        5.0
    );
    assert!(
        text.contains("herald_task_pickup_seconds_bucket{queue=\"metered\",le=\"0.5\"}"),
        "{text}"
    );
    assert_eq!(
        m(
            "herald_task_run_seconds_count",
            &[("queue", "metered"), ("kind", "herald.noop")]
        ),
        3.0
    );
    assert!(
        text.contains("# HELP herald_tasks_completed_total"),
        "{text}"
    );

    // Pool gauges, as the admin server records them at scrape time.
    let pool = db.pool();
    let _conn = pool.get().await.unwrap();
    herald::telemetry::record_pool_status("telemetry-test", &pool);
    let text = herald::telemetry::render_metrics();
    assert_eq!(
        metric(&text, "herald_pool_size", &[("pool", "telemetry-test")]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "herald_pool_available",
            &[("pool", "telemetry-test")]
        ),
        0.0
    );
    assert_eq!(
        metric(&text, "herald_pool_max_size", &[("pool", "telemetry-test")]),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_metrics_count_published_events() {
    exporter();
    let db = TestDb::with(tweak).await;
    let client = db.client().await;
    let before = metric(
        &herald::telemetry::render_metrics(),
        "herald_relay_published_total",
        &[],
    );
    let events: Vec<Event> = (0..5)
        .map(|n| Event::new("telemetry.count", &n).unwrap())
        .collect();
    herald::publish_batch(&client, &events).await.unwrap();
    let relay = db.relay();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.count("SELECT count(*) FROM herald.outbox").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay drained the outbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
    let text = herald::telemetry::render_metrics();
    // Other tests in this binary may publish too: at least ours.
    assert!(
        metric(&text, "herald_relay_published_total", &[]) >= before + 5.0,
        "{text}"
    );
    assert!(
        metric(&text, "herald_relay_batch_size_count", &[]) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("herald_relay_batch_size_bucket{le=\"10\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tasks_continue_the_fire_span_and_lateness_is_measured() {
    let exporter = exporter();
    let db = TestDb::with(tweak).await;
    let client = db.client().await;
    let schedule = herald::cron::Schedule::new(
        "telemetry-tick",
        "* * * * * *",
        "herald.noop",
        &serde_json::json!({}),
    )
    .unwrap()
    .queue("ticks");
    herald::cron::upsert(&client, &schedule).await.unwrap();
    let token = CancellationToken::new();
    let handle =
        tokio::spawn(herald::cron::Scheduler::new(&db.config, db.pool()).run(token.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db
        .count("SELECT count(*) FROM herald.tasks WHERE queue = 'ticks'")
        .await
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "a tick fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(token, handle).await;

    let row = client
        .query_one(
            "SELECT headers->>'traceparent' FROM herald.tasks WHERE queue = 'ticks' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let traceparent: String = row.get(0);
    let fires: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "herald.schedule.fire")
        .collect();
    assert!(
        fires.iter().any(|s| traceparent
            == format!(
                "00-{}-{}-01",
                s.span_context.trace_id(),
                s.span_context.span_id()
            )),
        "the fired task's traceparent {traceparent} names a herald.schedule.fire span"
    );

    let text = herald::telemetry::render_metrics();
    let labels = [("schedule", "telemetry-tick")];
    assert!(
        metric(&text, "herald_schedule_fired_total", &labels) >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "herald_schedule_lateness_seconds_count", &labels) >= 1.0,
        "{text}"
    );
}

/// The binary's own set-up: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a
/// `herald worker` exports its task spans over OTLP/HTTP (protobuf) to a
/// real HTTP receiver, in the trace named by the task's `traceparent`, and
/// flushes them when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_worker_exports_task_spans_over_otlp_http() {
    use std::sync::{Arc, Mutex};
    exporter();
    let db = TestDb::with(tweak).await;
    let client = db.client().await;

    // (content type, body) of every request.
    type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let received: Requests = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let ctype = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    sink.lock().unwrap().push((ctype, body.to_vec()));
                    ""
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let task = Task::new("herald.noop", &serde_json::json!({}))
        .unwrap()
        .traceparent(format!("00-{trace_id}-00f067aa0ba902b7-01"));
    herald::enqueue(&client, &task).await.unwrap();

    let worker = common::HeraldProcess::command(
        &db.config,
        &["worker"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "herald-otlp-test"),
            ("RUST_LOG", "info"),
        ],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while db.count("SELECT count(*) FROM herald.tasks").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker ran the task"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Spans are batched; stopping the process flushes them.
    assert!(worker.terminate().await.success());
    server.abort();

    let received = received.lock().unwrap();
    let raw_trace_id = hex::decode(trace_id).unwrap();
    let has = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let span = received
        .iter()
        .find(|(_, body)| has(body, b"herald.task.run"));
    let (ctype, body) = span.unwrap_or_else(|| {
        panic!(
            "a herald.task.run span among {} OTLP requests",
            received.len()
        )
    });
    assert_eq!(ctype, "application/x-protobuf");
    assert!(
        has(body, b"herald-otlp-test"),
        "service.name from OTEL_SERVICE_NAME"
    );
    assert!(
        has(body, &raw_trace_id),
        "the span is in the producer's trace"
    );
}
