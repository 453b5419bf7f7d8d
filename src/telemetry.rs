//! Logging, tracing and metrics set-up, and the trace-context helpers the
//! library uses to carry a producer's `traceparent` to its consumers.
//!
//! The binary calls [`init`] once: a `tracing` subscriber printing pretty or
//! JSON lines to stderr (filtered by `RUST_LOG`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, an OpenTelemetry layer exporting spans over OTLP (http/protobuf);
//! [`shutdown`] flushes it. [`init_metrics`] installs the Prometheus
//! recorder that the library's `metrics::counter!` / `histogram!` calls feed
//! and that `/metrics` renders. The library itself never installs a
//! subscriber or recorder: without one its spans, events and metrics cost
//! next to nothing.
//!
//! Every name (span, event, attribute, metric) is listed in
//! `docs/telemetry.md`; the constants in [`names`] are the source of truth.

use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The W3C trace-context header, in event and task headers
/// (`herald::outbox::headers::TRACEPARENT`).
pub const TRACEPARENT: &str = "traceparent";

/// Stable names: metrics, spans and the values of the `event` field that
/// lifecycle events carry. `docs/telemetry.md` documents each one.
pub mod names {
    /// Prometheus metric names.
    pub mod metric {
        pub const TASKS_ENQUEUED: &str = "herald_tasks_enqueued_total";
        pub const TASKS_COMPLETED: &str = "herald_tasks_completed_total";
        pub const TASK_RESCUED: &str = "herald_task_rescued_total";
        pub const TASK_PICKUP: &str = "herald_task_pickup_seconds";
        pub const TASK_RUN: &str = "herald_task_run_seconds";
        pub const TASK_OLDEST_RUNNING: &str = "herald_task_oldest_running_seconds";
        pub const RELAY_PUBLISHED: &str = "herald_relay_published_total";
        pub const RELAY_BATCH_SIZE: &str = "herald_relay_batch_size";
        pub const RELAY_FAILED_BATCHES: &str = "herald_relay_failed_batches_total";
        pub const RELAY_FANNED_OUT: &str = "herald_relay_fanned_out_total";
        pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
        pub const SCHEDULE_FIRED: &str = "herald_schedule_fired_total";
        pub const SCHEDULE_MISFIRED: &str = "herald_schedule_misfired_total";
        pub const SCHEDULE_LATENESS: &str = "herald_schedule_lateness_seconds";
        pub const RECONNECTS: &str = "herald_reconnects_total";
        pub const POOL_MAX_SIZE: &str = "herald_pool_max_size";
        pub const POOL_SIZE: &str = "herald_pool_size";
        pub const POOL_AVAILABLE: &str = "herald_pool_available";
        pub const POOL_WAITING: &str = "herald_pool_waiting";
        pub const MAINTENANCE_LEADER: &str = "herald_maintenance_leader";

        /// Every name above.
        pub const ALL: &[&str] = &[
            TASKS_ENQUEUED,
            TASKS_COMPLETED,
            TASK_RESCUED,
            TASK_PICKUP,
            TASK_RUN,
            TASK_OLDEST_RUNNING,
            RELAY_PUBLISHED,
            RELAY_BATCH_SIZE,
            RELAY_FAILED_BATCHES,
            RELAY_FANNED_OUT,
            DEAD_LETTERS,
            SCHEDULE_FIRED,
            SCHEDULE_MISFIRED,
            SCHEDULE_LATENESS,
            RECONNECTS,
            POOL_MAX_SIZE,
            POOL_SIZE,
            POOL_AVAILABLE,
            POOL_WAITING,
            MAINTENANCE_LEADER,
        ];
    }

    /// Span names.
    pub mod span {
        pub const TASK_RUN: &str = "herald.task.run";
        pub const RELAY_BATCH: &str = "herald.relay.batch";
        pub const SCHEDULE_FIRE: &str = "herald.schedule.fire";

        /// Every name above.
        pub const ALL: &[&str] = &[TASK_RUN, RELAY_BATCH, SCHEDULE_FIRE];
    }

    /// Values of the `event` field of lifecycle events.
    pub mod event {
        pub const TASK_ENQUEUED: &str = "herald.task.enqueued";
        pub const TASK_CLAIMED: &str = "herald.task.claimed";
        pub const TASK_STARTED: &str = "herald.task.started";
        pub const TASK_SUCCEEDED: &str = "herald.task.succeeded";
        pub const TASK_FAILED: &str = "herald.task.failed";
        pub const TASK_RETRIED: &str = "herald.task.retried";
        pub const TASK_DEAD_LETTERED: &str = "herald.task.dead_lettered";
        pub const TASK_CANCELLED: &str = "herald.task.cancelled";
        pub const TASK_CANCEL_REQUESTED: &str = "herald.task.cancel_requested";
        pub const TASK_SNOOZED: &str = "herald.task.snoozed";
        pub const TASK_RELEASED: &str = "herald.task.released";
        pub const TASK_ABANDONED: &str = "herald.task.abandoned";
        pub const TASK_RESCUED: &str = "herald.task.rescued";
        pub const EVENT_PUBLISHED: &str = "herald.event.published";
        pub const RELAY_BATCH_CLAIMED: &str = "herald.relay.batch.claimed";
        pub const RELAY_BATCH_PUBLISHED: &str = "herald.relay.batch.published";
        pub const RELAY_BATCH_FAILED: &str = "herald.relay.batch.failed";
        pub const RELAY_PARTITION_ACQUIRED: &str = "herald.relay.partition.acquired";
        pub const RELAY_PARTITION_RELEASED: &str = "herald.relay.partition.released";
        pub const RELAY_EVENT_REFUSED: &str = "herald.relay.event.refused";
        pub const RELAY_DEAD_LETTERED: &str = "herald.relay.dead_lettered";
        pub const SCHEDULE_FIRED: &str = "herald.schedule.fired";
        pub const SCHEDULE_MISFIRED: &str = "herald.schedule.misfired";
        pub const POSTGRES_CONNECTION_LOST: &str = "herald.postgres.connection_lost";
        pub const POSTGRES_RECONNECTED: &str = "herald.postgres.reconnected";
        pub const REDIS_CONNECTION_LOST: &str = "herald.redis.connection_lost";
        pub const REDIS_RECONNECTED: &str = "herald.redis.reconnected";

        /// Every name above.
        pub const ALL: &[&str] = &[
            TASK_ENQUEUED,
            TASK_CLAIMED,
            TASK_STARTED,
            TASK_SUCCEEDED,
            TASK_FAILED,
            TASK_RETRIED,
            TASK_DEAD_LETTERED,
            TASK_CANCELLED,
            TASK_CANCEL_REQUESTED,
            TASK_SNOOZED,
            TASK_RELEASED,
            TASK_ABANDONED,
            TASK_RESCUED,
            EVENT_PUBLISHED,
            RELAY_BATCH_CLAIMED,
            RELAY_BATCH_PUBLISHED,
            RELAY_BATCH_FAILED,
            RELAY_PARTITION_ACQUIRED,
            RELAY_PARTITION_RELEASED,
            RELAY_EVENT_REFUSED,
            RELAY_DEAD_LETTERED,
            SCHEDULE_FIRED,
            SCHEDULE_MISFIRED,
            POSTGRES_CONNECTION_LOST,
            POSTGRES_RECONNECTED,
            REDIS_CONNECTION_LOST,
            REDIS_RECONNECTED,
        ];
    }
}

static TRACER_PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Whether spans go to an OTLP collector: an OTLP endpoint is set and the
/// SDK is not disabled (`OTEL_SDK_DISABLED=true`).
pub fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Install the global subscriber once; later calls are ignored. Logs go to
/// stderr as pretty or JSON lines; spans also go over OTLP when
/// [`otlp_configured`].
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,refinery_core=warn"));
    type Base = tracing_subscriber::layer::Layered<EnvFilter, tracing_subscriber::Registry>;
    // Herald's own spans (one per task attempt, per relay batch, per
    // scheduler claim) are for trace backends: the log lines carry their own
    // ids, and formatting span fields for the logs would cost about a
    // microsecond per task.
    let not_herald_span = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.name().starts_with("herald."))
    });
    let fmt: Box<dyn Layer<Base> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(not_herald_span)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(not_herald_span)
            .boxed(),
    };
    let (otel, otel_error) = if otlp_configured() {
        match otlp_provider() {
            Ok(provider) => {
                use opentelemetry::trace::TracerProvider as _;
                let tracer = provider.tracer("herald");
                let mut slot = TRACER_PROVIDER.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_some() {
                    // A subscriber is already installed; keep the first.
                    let _ = provider.shutdown();
                    (None, None)
                } else {
                    *slot = Some(provider);
                    (
                        Some(
                            tracing_opentelemetry::layer()
                                .with_tracked_inactivity(false)
                                .with_tracer(tracer)
                                .with_filter(not_exporter_internals()),
                        ),
                        None,
                    )
                }
            }
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(error) = otel_error {
        tracing::warn!(%error, "OTLP trace export not started; logging only");
    } else if installed && TRACER_PROVIDER.lock().is_ok_and(|p| p.is_some()) {
        tracing::info!("exporting traces over OTLP (http/protobuf)");
    }
}

/// Leaves out the spans of the HTTP stack the exporter itself uses (seen at
/// `RUST_LOG=debug`): exporting them would make more of them, forever.
fn not_exporter_internals(
) -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    const INTERNALS: [&str; 7] = [
        "hyper",
        "reqwest",
        "h2",
        "tower",
        "tonic",
        "rustls",
        "opentelemetry",
    ];
    tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        !INTERNALS.iter().any(|p| {
            target.strip_prefix(p).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with(':') || rest.starts_with('_')
            })
        })
    })
}

#[cfg(not(feature = "otlp"))]
fn otlp_provider() -> std::result::Result<SdkTracerProvider, String> {
    Err("this build of Herald has no OTLP exporter (cargo feature `otlp`)".into())
}

#[cfg(feature = "otlp")]
fn otlp_provider() -> std::result::Result<SdkTracerProvider, String> {
    if let Ok(protocol) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
    {
        if protocol.trim() != "http/protobuf" {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?}: Herald exports over http/protobuf only"
            ));
        }
    }
    // The builder reads OTEL_EXPORTER_OTLP_{,TRACES_}{ENDPOINT,HEADERS,TIMEOUT}.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("building the OTLP span exporter: {e}"))?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("herald");
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // The batch processor exports from its own thread (OTEL_BSP_* apply);
    // the sampler follows OTEL_TRACES_SAMPLER (parent-based always-on).
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Flush and stop the OTLP exporter (a no-op without one). Call once, at
/// the end of the process.
pub fn shutdown() {
    let provider = TRACER_PROVIDER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(provider) = provider {
        if let Err(e) = provider.shutdown() {
            eprintln!("herald: flushing traces at exit failed: {e}");
        }
    }
}

/// Calls [`shutdown`] when dropped: hold one for the life of `main`.
pub struct ShutdownOnDrop;

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        shutdown();
    }
}

// ---------------------------------------------------------------- trace context

/// The W3C `traceparent` of the current span, when an OpenTelemetry layer
/// is installed and the span is recorded: what producers store in event and
/// task headers.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`, when it is recorded by an OpenTelemetry
/// layer.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    if !sc.is_valid() {
        return None;
    }
    Some(format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
}

struct OneHeader<'a>(&'a str);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The remote context a `traceparent` header names; `None` when it does
/// not parse.
pub fn context_from_traceparent(traceparent: &str) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(&OneHeader(traceparent.trim()));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Make `span` (created, not yet entered) a child of the producer whose
/// `traceparent` is in `headers`. A no-op without the header or without an
/// OpenTelemetry layer. Consumers of live Redis deliveries call it with the
/// envelope's headers.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &Map<String, Value>) {
    if let Some(tp) = headers.get(TRACEPARENT).and_then(Value::as_str) {
        set_parent_from_traceparent(span, tp);
    }
}

/// [`set_parent_from_headers`] for one `traceparent` value.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = context_from_traceparent(traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// `headers` as JSON text, with `traceparent` added when it has none and
/// `traceparent` is given.
pub(crate) fn headers_json_with(headers: &Map<String, Value>, traceparent: Option<&str>) -> String {
    match traceparent {
        Some(tp) if !headers.contains_key(TRACEPARENT) => {
            let mut h = headers.clone();
            h.insert(TRACEPARENT.into(), Value::String(tp.to_string()));
            Value::Object(h).to_string()
        }
        _ => Value::Object(headers.clone()).to_string(),
    }
}

// ---------------------------------------------------------------- metrics

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Install the process-wide Prometheus recorder (once) that the library's
/// `metrics::counter!` / `histogram!` calls feed. Histograms are rendered
/// with buckets (seconds, or events for the batch size).
pub fn init_metrics() -> Option<&'static PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::metric::RELAY_BATCH_SIZE.into()),
                        BATCH_BUCKETS,
                    )
                });
            let installed = builder
                .map_err(|e| e.to_string())
                .and_then(|b| b.install_recorder().map_err(|e| e.to_string()));
            match installed {
                Ok(handle) => {
                    describe_metrics();
                    // Histogram samples are kept until drained, which only a
                    // scrape or an upkeep does: with nobody scraping
                    // `/metrics`, every task and batch grew the process.
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new()
                        .name("herald-metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(METRICS_UPKEEP_EVERY);
                            upkeep.run_upkeep();
                        });
                    if let Err(error) = spawned {
                        tracing::warn!(%error, "metrics upkeep thread not started");
                    }
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The current metrics in Prometheus text format.
pub fn render_metrics() -> String {
    init_metrics().map(|h| h.render()).unwrap_or_default()
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::metric::*;
    describe_counter!(
        TASKS_ENQUEUED,
        "Tasks handed to enqueue/enqueue_batch (Rust API), by queue"
    );
    describe_counter!(
        TASKS_COMPLETED,
        "Task attempts ended, by queue, kind and outcome (succeeded, retried, dead, cancelled, snoozed, released, lost)"
    );
    describe_counter!(
        TASK_RESCUED,
        "Running tasks whose lease expired, returned to the queue (or the dead letters) by a rescuer"
    );
    describe_histogram!(
        TASK_PICKUP,
        Unit::Seconds,
        "Time from a task being due (run_at) to a worker claiming it, by queue"
    );
    describe_histogram!(
        TASK_RUN,
        Unit::Seconds,
        "Handler run time, by queue and kind"
    );
    describe_gauge!(
        TASK_OLDEST_RUNNING,
        Unit::Seconds,
        "How long the longest-running task of this worker has run, by queue"
    );
    describe_counter!(RELAY_PUBLISHED, "Events published to Redis by the relay");
    describe_histogram!(
        RELAY_BATCH_SIZE,
        Unit::Count,
        "Events per claimed relay batch"
    );
    describe_counter!(
        RELAY_FAILED_BATCHES,
        "Relay batches that failed (rolled back, retried with backoff)"
    );
    describe_counter!(
        RELAY_FANNED_OUT,
        "Tasks inserted by the relay for durable subscriptions"
    );
    describe_counter!(
        DEAD_LETTERS,
        "Rows moved to herald.dead_letters, by source (task, outbox)"
    );
    describe_counter!(SCHEDULE_FIRED, "Schedule ticks fired, by schedule");
    describe_counter!(
        SCHEDULE_MISFIRED,
        "Schedule ticks skipped by the misfire policy, by schedule"
    );
    describe_histogram!(
        SCHEDULE_LATENESS,
        Unit::Seconds,
        "How late a schedule tick fired after its due time, by schedule"
    );
    describe_counter!(
        RECONNECTS,
        "Connections re-established after a loss, by target (postgres, redis) and component"
    );
    describe_gauge!(POOL_MAX_SIZE, "Connection pool maximum size, by pool");
    describe_gauge!(POOL_SIZE, "Connections currently open in the pool, by pool");
    describe_gauge!(POOL_AVAILABLE, "Idle connections in the pool, by pool");
    describe_gauge!(
        POOL_WAITING,
        "Callers waiting for a pool connection, by pool"
    );
    describe_gauge!(
        MAINTENANCE_LEADER,
        "1 while this process is the database's maintenance leader, else 0"
    );
}

fn record_pool(name: &str, max_size: usize, size: usize, available: usize, waiting: usize) {
    let pool = name.to_string();
    metrics::gauge!(names::metric::POOL_MAX_SIZE, "pool" => pool.clone()).set(max_size as f64);
    metrics::gauge!(names::metric::POOL_SIZE, "pool" => pool.clone()).set(size as f64);
    metrics::gauge!(names::metric::POOL_AVAILABLE, "pool" => pool.clone()).set(available as f64);
    metrics::gauge!(names::metric::POOL_WAITING, "pool" => pool).set(waiting as f64);
}

/// Set the `herald_pool_*{pool=name}` gauges from a Postgres pool's status;
/// call it at scrape time.
pub fn record_pool_status(name: &str, pool: &deadpool_postgres::Pool) {
    let s = pool.status();
    record_pool(name, s.max_size, s.size, s.available, s.waiting);
}

/// [`record_pool_status`] for a Redis pool (a `&deadpool_redis::Pool` or
/// a `&RedisPool`).
pub fn record_redis_pool_status(name: &str, pool: impl Into<crate::RedisPool>) {
    let s = pool.into().status();
    record_pool(name, s.max_size, s.size, s.available, s.waiting);
}

/// Count a connection re-established after a loss, and say so.
pub(crate) fn reconnected(target: &'static str, component: &'static str) {
    metrics::counter!(names::metric::RECONNECTS, "target" => target, "component" => component)
        .increment(1);
    let event = if target == "redis" {
        names::event::REDIS_RECONNECTED
    } else {
        names::event::POSTGRES_RECONNECTED
    };
    tracing::info!(
        event,
        system = target,
        component,
        "{target} connection re-established"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from_traceparent(tp).expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        assert!(context_from_traceparent("nonsense").is_none());
        assert!(context_from_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        )
        .is_none());
    }

    #[test]
    fn headers_get_a_traceparent_only_when_missing() {
        let mut h = Map::new();
        assert_eq!(headers_json_with(&h, None), "{}");
        assert_eq!(
            headers_json_with(&h, Some("00-a-b-01")),
            r#"{"traceparent":"00-a-b-01"}"#
        );
        h.insert(TRACEPARENT.into(), "mine".into());
        assert_eq!(
            headers_json_with(&h, Some("00-a-b-01")),
            r#"{"traceparent":"mine"}"#
        );
    }

    #[test]
    fn every_name_is_documented() {
        let doc = include_str!("../docs/telemetry.md");
        let all = names::metric::ALL
            .iter()
            .chain(names::span::ALL)
            .chain(names::event::ALL);
        for name in all {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is missing from docs/telemetry.md"
            );
        }
    }

    #[test]
    fn no_traceparent_without_an_otel_layer() {
        let span = tracing::info_span!("x");
        let _g = span.enter();
        assert_eq!(current_traceparent(), None);
    }
}
