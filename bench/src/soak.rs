//! S1, the soak of docs/benchmarks.md#workloads: O4's load (`mixed`) for 10
//! minutes (or `--duration`); per minute RSS and the event and task-start
//! p99s, at the end the backlog and what was lost. It owns S1's figures and
//! its own section of the `--write` file; it must never fail a run because a
//! figure is bad (a loss is a figure to report, not an error).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::mixed::{self, MixedLoad};
use super::{count_negative, latency_figures, percentile, Figure, RunResult};
use herald::config::Config;

/// First and last line of S1's section of the `--write` file, apart from the
/// main generated block so that `bench S1` and `bench all` do not overwrite
/// each other.
const BEGIN_MARK: &str = "<!-- herald bench S1: generated section, rewritten by --write -->";
const END_MARK: &str = "<!-- herald bench S1: end of generated section -->";

/// Prefix of the per-minute figures: `m01_`, `m02_`, …
const MINUTE_PREFIX: char = 'm';

/// One S1 run of `secs` seconds.
pub(super) async fn s1(config: &Config, secs: u64) -> anyhow::Result<RunResult> {
    // A minute of drain at most: the backlog left after it is reported.
    let load = mixed::run(config, secs, Duration::from_secs(60)).await?;
    Ok(figures(&load, secs))
}

fn figures(load: &MixedLoad, secs: u64) -> RunResult {
    let minutes = (secs.div_ceil(60) as usize).max(1);
    let event_minute = |e: &(i64, Instant)| load.event_minute(e.1).min(minutes - 1);
    let task_minute = |t: &(i64, f64)| load.task_minute(t.1).min(minutes - 1);
    let mut out: RunResult = Vec::new();
    for m in 0..minutes {
        let tag = format!("{MINUTE_PREFIX}{:02}_", m + 1);
        if let Some(Some(rss)) = load.rss_per_minute.get(m) {
            out.push((format!("{tag}rss_mib"), "MiB", *rss));
        }
        let events = load.events.iter().filter(|e| event_minute(e) == m).count();
        out.push((format!("{tag}events"), "events", events as f64));
        let ms = load.event_latencies(|e| event_minute(e) == m);
        out.extend(p99_and_negative(ms, &format!("{tag}event_")));
        let tasks = load.tasks.iter().filter(|t| task_minute(t) == m).count();
        out.push((format!("{tag}tasks"), "tasks", tasks as f64));
        for (name, stamps) in [("claim", &load.claimed), ("done", &load.done)] {
            let ms = load.task_latencies(stamps, |t| task_minute(t) == m);
            out.extend(p99_and_negative(ms, &format!("{tag}task_{name}_")));
        }
    }
    // Whole run.
    let mut ms = load.event_latencies(|_| true);
    let negative = count_negative(&ms);
    out.extend(latency_figures(&mut ms, negative, "event_", ""));
    for (name, stamps) in [("claim", &load.claimed), ("done", &load.done)] {
        let mut ms = load.task_latencies(stamps, |_| true);
        let negative = count_negative(&ms);
        out.extend(latency_figures(
            &mut ms,
            negative,
            &format!("task_{name}_"),
            "",
        ));
    }
    // At the end: a committed event is lost when the subscriber never got it
    // and it is no longer in the outbox; a committed task when it was never
    // deleted (completed, or moved to the dead letters, counted apart) and
    // is no longer in herald.tasks.
    let outbox: HashSet<i64> = load.outbox_after_drain.iter().copied().collect();
    let events_lost = load
        .events
        .iter()
        .filter(|(seq, _)| !load.received.contains_key(seq) && !outbox.contains(seq))
        .count();
    let waiting: HashSet<i64> = load.tasks_after_drain.iter().copied().collect();
    let tasks_lost = load
        .tasks
        .iter()
        .filter(|(seq, _)| !load.done.contains_key(seq) && !waiting.contains(seq))
        .count();
    let produced = |n: usize| n as f64 / load.produced_in;
    out.extend([
        ("duration_s".to_string(), "s", secs as f64),
        (
            "events_committed".into(),
            "events",
            load.events.len() as f64,
        ),
        ("tasks_committed".into(), "tasks", load.tasks.len() as f64),
        (
            "events_per_s_produced".into(),
            "events/s",
            produced(load.events.len()),
        ),
        (
            "tasks_per_s_produced".into(),
            "tasks/s",
            produced(load.tasks.len()),
        ),
        (
            "outbox_backlog_at_end".into(),
            "events",
            load.outbox_left as f64,
        ),
        (
            "task_backlog_at_end".into(),
            "tasks",
            load.tasks_left as f64,
        ),
        (
            "outbox_backlog_after_drain".into(),
            "events",
            load.outbox_after_drain.len() as f64,
        ),
        (
            "task_backlog_after_drain".into(),
            "tasks",
            load.tasks_after_drain.len() as f64,
        ),
        ("events_lost".into(), "events", events_lost as f64),
        ("tasks_lost".into(), "tasks", tasks_lost as f64),
        (
            "event_dead_letters".into(),
            "events",
            load.event_dead_letters as f64,
        ),
        (
            "task_dead_letters".into(),
            "tasks",
            load.task_dead_letters as f64,
        ),
        ("subscriber_gaps".into(), "count", load.gaps as f64),
    ]);
    if let Some(rss) = load.peak_rss {
        out.push(("peak_rss_mib".into(), "MiB", rss));
    }
    out
}

/// `{prefix}p99_ms` and `{prefix}negative_samples` of `ms`; nothing when it
/// is empty.
fn p99_and_negative(mut ms: Vec<f64>, prefix: &str) -> RunResult {
    if ms.is_empty() {
        return Vec::new();
    }
    let negative = count_negative(&ms);
    ms.sort_by(f64::total_cmp);
    vec![
        (format!("{prefix}p99_ms"), "ms", percentile(&ms, 0.99)),
        (
            format!("{prefix}negative_samples"),
            "count",
            negative as f64,
        ),
    ]
}

/// The minute (from 1) and figure name of a per-minute figure.
fn per_minute(metric: &str) -> Option<(usize, &str)> {
    let rest = metric.strip_prefix(MINUTE_PREFIX)?;
    let (minute, name) = rest.split_once('_')?;
    Some((minute.parse().ok()?, name))
}

/// Figures that are not per-minute (S1's whole-run and end figures).
pub(super) fn end_figures(figures: &[Figure]) -> Vec<Figure> {
    figures
        .iter()
        .filter(|f| per_minute(&f.metric).is_none())
        .cloned()
        .collect()
}

/// The per-minute table: one row per minute, medians over the runs.
pub(super) fn minute_table(figures: &[Figure]) -> String {
    const COLUMNS: [(&str, &str); 9] = [
        ("rss_mib", "RSS (MiB)"),
        ("events", "events committed"),
        ("event_p99_ms", "event p99 (ms)"),
        ("event_negative_samples", "negative event samples"),
        ("tasks", "tasks committed"),
        ("task_claim_p99_ms", "task claim p99 (ms)"),
        ("task_done_p99_ms", "task done p99 (ms)"),
        ("task_claim_negative_samples", "negative claim samples"),
        ("task_done_negative_samples", "negative done samples"),
    ];
    let last = figures
        .iter()
        .filter_map(|f| per_minute(&f.metric).map(|(m, _)| m))
        .max()
        .unwrap_or(0);
    let mut out = String::from("| minute |");
    for (_, title) in COLUMNS {
        let _ = write!(out, " {title} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(COLUMNS.len()));
    out.push('\n');
    for m in 1..=last {
        let _ = write!(out, "| {m} |");
        for (name, _) in COLUMNS {
            let cell = figures
                .iter()
                .find(|f| per_minute(&f.metric) == Some((m, name)))
                .map(|f| format!("{:.2}", f.median()))
                .unwrap_or_else(|| "–".into());
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// S1's section of the `--write` file, between its own marks.
pub(super) fn section(header: &str, runs: usize, secs: u64, figures: &[Figure]) -> String {
    let runs = if runs == 1 {
        "one run".to_string()
    } else {
        format!("{runs} runs; each cell is the median of the runs (min–max at the end)")
    };
    format!(
        "{BEGIN_MARK}\n\
         ## S1: soak, O4's load for {duration}\n\n\
         One `herald run` (relay, workers with concurrency {concurrency}, scheduler, admin \
         server) offered {rate} events/s and {rate} tasks/s together, open loop, on a fresh \
         database; {runs}. Per minute of the load (by when the COMMIT returned): the RSS of \
         `herald run` at the minute's end, the event latency (Redis receive − COMMIT return) \
         and the task latency (claim or completion, stamped by triggers on the database's \
         clock, − enqueue return; the handler starts between the two), negative samples kept \
         and counted. At the end: the backlog when the producers stopped and after at most a \
         minute of drain; an event is lost when the subscriber never received it and it is no \
         longer in the outbox, a task when it was never completed nor dead-lettered and is no \
         longer in `herald.tasks` (counted from the database and the subscriber, never from \
         logs). Both must be 0.\n\n\
         {header}\n\
         ### Per minute\n\n\
         {minutes}\n\
         ### At the end, and over the whole run\n\n\
         {end}\n\
         {END_MARK}\n",
        duration = humantime::format_duration(Duration::from_secs(secs)),
        concurrency = mixed::WORKER_CONCURRENCY,
        rate = mixed::RATE,
        minutes = minute_table(figures),
        end = super::table(&end_figures(figures)),
    )
}

/// `old` with S1's section replaced by `section`; without one, the section
/// goes right after the main generated block, or at the end.
pub(super) fn splice_section(old: &str, section: &str) -> String {
    if let Some(doc) = super::splice_between(old, BEGIN_MARK, END_MARK, section) {
        return doc;
    }
    if let Some(e) = old.find(super::END_MARK) {
        let end = e + super::END_MARK.len();
        let rest = old[end..].strip_prefix('\n').unwrap_or(&old[end..]);
        return format!("{}\n\n{section}{rest}", &old[..end]);
    }
    format!("{}\n\n{section}", old.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(metric: &str, runs: &[f64]) -> Figure {
        Figure {
            workload: "S1".into(),
            metric: metric.into(),
            unit: "ms",
            runs: runs.to_vec(),
        }
    }

    #[test]
    fn per_minute_figures_become_rows_and_the_rest_the_end_table() {
        let figures = vec![
            fig("m01_rss_mib", &[20.0]),
            fig("m01_event_p99_ms", &[5.0]),
            fig("m02_rss_mib", &[21.0]),
            fig("events_lost", &[0.0]),
        ];
        let table = minute_table(&figures);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4, "{table}");
        assert!(rows[2].starts_with("| 1 | 20.00 | – | 5.00 |"), "{table}");
        assert!(rows[3].starts_with("| 2 | 21.00 | – | – |"), "{table}");
        let end = end_figures(&figures);
        assert_eq!(end.len(), 1);
        assert_eq!(end[0].metric, "events_lost");
    }

    #[test]
    fn the_section_replaces_its_own_marks_only() {
        let main = format!(
            "{}\nmain\n{}\n",
            super::super::BEGIN_MARK,
            super::super::END_MARK
        );
        let old = format!("# Benchmarks\n\n{main}\n## History\nkept\n");
        let first = splice_section(&old, &format!("{BEGIN_MARK}\none\n{END_MARK}\n"));
        assert_eq!(
            first,
            format!("# Benchmarks\n\n{main}\n{BEGIN_MARK}\none\n{END_MARK}\n\n## History\nkept\n")
        );
        let second = splice_section(&first, &format!("{BEGIN_MARK}\ntwo\n{END_MARK}\n"));
        assert_eq!(second, first.replace("one", "two"));
        // The main block's splice leaves S1's section alone.
        let third = super::super::splice_block(
            &second,
            &format!(
                "{}\nnew\n{}\n",
                super::super::BEGIN_MARK,
                super::super::END_MARK
            ),
        );
        assert!(
            third.contains("\nnew\n") && third.contains("\ntwo\n"),
            "{third}"
        );
    }

    #[test]
    fn per_minute_names_parse() {
        assert_eq!(
            per_minute("m03_task_claim_p99_ms"),
            Some((3, "task_claim_p99_ms"))
        );
        assert_eq!(per_minute("max_ms"), None);
        assert_eq!(per_minute("events_lost"), None);
    }
}
