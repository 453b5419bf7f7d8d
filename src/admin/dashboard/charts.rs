//! The last hour of throughput and latency, sampled in process, and drawn as
//! small server-side SVG line charts.
//!
//! Every `interval` (10 s by default) the sampler reads the operator views
//! through [`crate::stats::snapshot`] and [`crate::dlq::count`], plus the
//! last ids handed out by the `herald.tasks` and `herald.outbox` identity
//! sequences. Rates come from the difference of two samples:
//!
//! - enqueued/s: task ids handed out;
//! - finished/s: tasks that left the queue (done, cancelled or dead-lettered)
//!   = ids handed out − growth of the open (ready + running) tasks;
//! - published/s: outbox ids handed out − growth of the unpublished backlog.
//!
//! Latency is the age of the oldest due ready task (how long work waits for a
//! worker) and the relay lag (age of the oldest unpublished event). The
//! history lives only in this process: it starts empty when the server starts,
//! and the charts span the last hour or, until then, the history's age.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use maud::{html, Markup};
use tokio_util::sync::CancellationToken;

use crate::error::{Context, Result};

/// How far back the charts look.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One reading of the counters.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub task_ids: i64,
    pub open_tasks: i64,
    /// Per queue: ready + running tasks.
    pub open_by_queue: Vec<(String, i64)>,
    pub outbox_ids: i64,
    pub unpublished: i64,
    pub dead_letters: i64,
    pub oldest_ready_secs: f64,
    pub relay_lag_secs: f64,
}

/// A ring buffer of the last hour of samples.
pub struct History {
    pub interval: Duration,
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn new(interval: Duration) -> History {
        History {
            interval,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    fn capacity(&self) -> usize {
        (WINDOW.as_secs_f64() / self.interval.as_secs_f64().max(0.1)).ceil() as usize + 1
    }

    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap();
        samples.push_back(sample);
        while samples.len() > self.capacity() {
            samples.pop_front();
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().iter().cloned().collect()
    }

    /// Read the counters once and record them.
    pub async fn sample(&self, pool: &Pool) -> Result<()> {
        let client = pool.get().await?;
        let snapshot = crate::stats::snapshot(&**client).await?;
        let dead_letters = crate::dlq::count(&**client, &crate::dlq::Filter::default()).await?;
        // The identity sequences count every id handed out; NULL before the
        // first insert.
        let row = client
            .query_one(
                "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('herald.tasks', 'id')::regclass), 0),
                        coalesce(pg_sequence_last_value(pg_get_serial_sequence('herald.outbox', 'id')::regclass), 0)",
                &[],
            )
            .await
            .context("admin sampler: reading the task and outbox id sequences")?;
        let open_tasks = snapshot
            .queues
            .iter()
            .filter(|q| q.state == "ready" || q.state == "running")
            .map(|q| q.count)
            .sum();
        let mut open_by_queue: Vec<(String, i64)> = Vec::new();
        for q in snapshot
            .queues
            .iter()
            .filter(|q| q.state == "ready" || q.state == "running")
        {
            match open_by_queue.iter_mut().find(|(name, _)| *name == q.queue) {
                Some((_, n)) => *n += q.count,
                None => open_by_queue.push((q.queue.clone(), q.count)),
            }
        }
        let oldest_ready_secs = snapshot
            .queues
            .iter()
            .filter_map(|q| q.oldest_ready_secs)
            .fold(0.0, f64::max);
        self.push(Sample {
            at: snapshot.taken_at,
            task_ids: row.get(0),
            open_tasks,
            open_by_queue,
            outbox_ids: row.get(1),
            unpublished: snapshot.outbox.unpublished,
            dead_letters,
            oldest_ready_secs,
            relay_lag_secs: snapshot.outbox.oldest_age_secs,
        });
        Ok(())
    }

    /// Sample every `interval` until `shutdown`; a failed reading is logged
    /// and the next one tried on time.
    pub async fn run(&self, pool: Pool, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.sample(&pool).await {
                tracing::warn!(%error, "admin dashboard: sampling the counters failed");
            }
        }
    }

    /// Per-second rates between consecutive samples, stamped at the later one.
    pub fn rates(&self) -> Rates {
        let samples = self.samples();
        let mut rates = Rates::default();
        for pair in samples.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let dt = (b.at - a.at).num_milliseconds() as f64 / 1000.0;
            if dt <= 0.0 {
                continue;
            }
            let enqueued = (b.task_ids - a.task_ids).max(0) as f64;
            let finished = (enqueued - (b.open_tasks - a.open_tasks) as f64).max(0.0);
            let published = ((b.outbox_ids - a.outbox_ids).max(0) as f64
                - (b.unpublished - a.unpublished) as f64)
                .max(0.0);
            rates.enqueued.push((b.at, enqueued / dt));
            rates.finished.push((b.at, finished / dt));
            rates.published.push((b.at, published / dt));
        }
        for s in &samples {
            rates.oldest_ready.push((s.at, s.oldest_ready_secs));
            rates.relay_lag.push((s.at, s.relay_lag_secs));
        }
        rates
    }
}

impl History {
    /// One queue's open (ready + running) tasks at every sample; 0 where
    /// the queue had none.
    pub fn backlog(&self, queue: &str) -> Vec<(DateTime<Utc>, f64)> {
        self.samples()
            .iter()
            .map(|s| {
                let n = s
                    .open_by_queue
                    .iter()
                    .find(|(q, _)| q == queue)
                    .map_or(0, |(_, n)| *n);
                (s.at, n as f64)
            })
            .collect()
    }
}

/// A tiny line without axes for a table cell, scaled to its own maximum.
pub fn sparkline(points: &[(DateTime<Utc>, f64)], label: &str) -> Markup {
    const SW: f64 = 120.0;
    const SH: f64 = 22.0;
    if points.len() < 2 {
        return html! { span.muted { "—" } };
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = ((t1 - t0).num_milliseconds() as f64).max(1.0);
    let max = points.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1.0);
    let line = points
        .iter()
        .map(|(t, v)| {
            let x = SW * (t.signed_duration_since(t0).num_milliseconds() as f64) / span;
            let y = 1.0 + (SH - 2.0) * (1.0 - v / max);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        svg.spark width=(SW) height=(SH) viewBox={ "0 0 " (SW) " " (SH) } role="img" aria-label=(label) {
            title { (label) }
            polyline points=(line) fill="none" stroke="#2563eb" stroke-width="1.5" {}
        }
    }
}

/// Time series for the charts.
#[derive(Debug, Default)]
pub struct Rates {
    pub enqueued: Vec<(DateTime<Utc>, f64)>,
    pub finished: Vec<(DateTime<Utc>, f64)>,
    pub published: Vec<(DateTime<Utc>, f64)>,
    pub oldest_ready: Vec<(DateTime<Utc>, f64)>,
    pub relay_lag: Vec<(DateTime<Utc>, f64)>,
}

/// One line of a chart.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: &'a [(DateTime<Utc>, f64)],
}

const W: f64 = 560.0;
const H: f64 = 170.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn tick_label(v: f64, unit: &str) -> String {
    let n = if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{n}{unit}")
}

/// "−60m", "−45s", "now".
fn ago_label(secs: f64) -> String {
    if secs < 0.5 {
        "now".into()
    } else if secs < 120.0 {
        format!("−{secs:.0}s")
    } else {
        format!("−{:.0}m", secs / 60.0)
    }
}

/// How much time the chart spans: the last hour, or less while the history
/// is younger than that (at least a minute), so a fresh server's samples
/// are not squeezed against the right edge.
fn span(now: DateTime<Utc>, series: &[Series]) -> f64 {
    let oldest = series
        .iter()
        .filter_map(|s| s.points.first())
        .map(|(t, _)| (now - *t).num_milliseconds() as f64 / 1000.0)
        .fold(0.0, f64::max);
    oldest.clamp(60.0, WINDOW.as_secs_f64())
}

/// A line chart ending at `now` over the last hour (or the history's age):
/// axes, three horizontal grid lines, a polyline per series and a legend.
pub fn line_chart(title: &str, unit: &str, now: DateTime<Utc>, series: &[Series]) -> Markup {
    let window = span(now, series);
    let start = now - chrono::Duration::milliseconds((window * 1000.0) as i64);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(t, _)| *t >= start)
        .map(|(_, v)| *v)
        .fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x = |t: DateTime<Utc>| {
        let secs = (t - start).num_milliseconds() as f64 / 1000.0;
        LEFT + plot_w * (secs / window).clamp(0.0, 1.0)
    };
    let y = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    let points = |s: &Series| -> String {
        s.points
            .iter()
            .filter(|(t, _)| *t >= start)
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let enough = series.iter().any(|s| s.points.len() >= 2);
    html! {
        figure.chart {
            figcaption {
                (title) " "
                span.muted {
                    @if window >= WINDOW.as_secs_f64() { "· last hour" }
                    @else { "· last " (ago_label(window).trim_start_matches('−')) " (since the server started)" }
                }
            }
            svg viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(title) {
                @for frac in [0.0, 0.5, 1.0] {
                    @let gy = y(top * frac);
                    line.grid x1=(LEFT) x2=(W - RIGHT) y1=(gy) y2=(gy) {}
                    text.tick x=(LEFT - 6.0) y=(gy + 4.0) text-anchor="end" { (tick_label(top * frac, unit)) }
                }
                @for quarter in 0..=4 {
                    @let frac = f64::from(quarter) / 4.0;
                    @let gx = LEFT + plot_w * frac;
                    line.axis x1=(gx) x2=(gx) y1=(H - BOTTOM) y2=(H - BOTTOM + 4.0) {}
                    text.tick x=(gx) y=(H - 6.0) text-anchor="middle" { (ago_label(window * (1.0 - frac))) }
                }
                line.axis x1=(LEFT) x2=(W - RIGHT) y1=(H - BOTTOM) y2=(H - BOTTOM) {}
                line.axis x1=(LEFT) x2=(LEFT) y1=(TOP) y2=(H - BOTTOM) {}
                @for s in series {
                    polyline points=(points(s)) fill="none" stroke=(s.color) stroke-width="1.8" stroke-linejoin="round" {}
                }
                @if !enough {
                    text.tick x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) text-anchor="middle" {
                        "collecting samples…"
                    }
                }
            }
            ul.legend {
                @for s in series {
                    li {
                        span.swatch style={ "background:" (s.color) } {}
                        (s.label)
                        @if let Some((_, v)) = s.points.last() {
                            " " span.muted { (tick_label(*v, unit)) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
    }

    fn sample(secs: i64, task_ids: i64, open_tasks: i64) -> Sample {
        Sample {
            at: DateTime::from_timestamp(secs, 0).unwrap(),
            task_ids,
            open_tasks,
            open_by_queue: Vec::new(),
            outbox_ids: 0,
            unpublished: 0,
            dead_letters: 0,
            oldest_ready_secs: 0.0,
            relay_lag_secs: 0.0,
        }
    }

    #[test]
    fn rates_from_consecutive_samples() {
        let h = History::new(Duration::from_secs(10));
        h.push(sample(0, 100, 10));
        // 50 enqueued in 10 s, open grew by 20: 30 finished.
        h.push(sample(10, 150, 30));
        let r = h.rates();
        assert_eq!(r.enqueued[0].1, 5.0);
        assert_eq!(r.finished[0].1, 3.0);
    }

    #[test]
    fn the_ring_keeps_one_hour() {
        let h = History::new(Duration::from_secs(60));
        for i in 0..200 {
            h.push(sample(i * 60, i, 0));
        }
        assert_eq!(h.samples().len(), 61);
        assert_eq!(h.samples()[0].task_ids, 139);
    }

    #[test]
    fn a_chart_is_svg_with_one_polyline_per_series() {
        let now = DateTime::from_timestamp(3600, 0).unwrap();
        let pts = [
            (DateTime::from_timestamp(1800, 0).unwrap(), 2.0),
            (now, 4.0),
        ];
        let svg = line_chart(
            "Throughput",
            "/s",
            now,
            &[Series {
                label: "enqueued",
                color: "#2563eb",
                points: &pts,
            }],
        )
        .into_string();
        assert!(svg.contains("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("enqueued"));
        // Half an hour of history spans half an hour.
        assert!(svg.contains("−30m"));
        assert!(!svg.contains("−60m"));
    }

    #[test]
    fn labels() {
        assert_eq!(ago_label(0.0), "now");
        assert_eq!(ago_label(45.0), "−45s");
        assert_eq!(ago_label(3600.0), "−60m");
    }
}
