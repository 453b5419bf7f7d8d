//! O4's load, shared by O4 (60 s) and S1 (the soak): one `herald run`
//! process, 1,000 events/s and 1,000 tasks/s offered together, open loop.
//! It runs the load and collects the raw stamps (commit returns, receives,
//! claims, completions, RSS); each workload turns them into its own figures.
//! It must never judge a figure itself.
//!
//! Events are timed as in O3 (a Redis subscriber in this process).
//! `herald run` only has the built-in kinds, so a task's handler cannot
//! stamp its start: bench-only row triggers on `herald.tasks` record, on the
//! database's clock, when the claim statement takes the task (before the
//! handler starts) and when the completion deletes it (after the handler
//! ended). The handler's start lies between the two.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{epoch_secs, seq_task, signed_ms, subscribe_all, HeraldProcess};
use herald::config::Config;

/// `worker.concurrency` of the load's `herald run`.
pub(super) const WORKER_CONCURRENCY: usize = 100;
/// Events per second, and tasks per second, offered.
pub(super) const RATE: u64 = 1000;
/// Per stream: producers on their own connections, each at RATE/PRODUCERS,
/// so one slow commit does not hold the whole stream back.
const PRODUCERS: u64 = 8;

/// What one run of the load left behind.
pub(super) struct MixedLoad {
    /// When the producers started, on this process's monotonic clock and on
    /// the wall clock (the database's stamps are wall-clock seconds).
    pub start: Instant,
    pub start_epoch: f64,
    /// (seq, instant the event's COMMIT returned).
    pub events: Vec<(i64, Instant)>,
    /// seq → instant the subscriber received it.
    pub received: HashMap<i64, Instant>,
    /// (seq, wall-clock seconds the task's enqueue returned).
    pub tasks: Vec<(i64, f64)>,
    /// seq → database wall-clock seconds of the first claim / of the delete.
    pub claimed: HashMap<i64, f64>,
    pub done: HashMap<i64, f64>,
    /// Seconds from the producers' start to the last one's end.
    pub produced_in: f64,
    /// Backlog the moment the producers were done.
    pub outbox_left: i64,
    pub tasks_left: i64,
    /// Seqs of the events still in the outbox, and of the tasks still in
    /// `herald.tasks`, once the drain ended.
    pub outbox_after_drain: Vec<i64>,
    pub tasks_after_drain: Vec<i64>,
    /// Dead letters by source once the drain ended.
    pub event_dead_letters: i64,
    pub task_dead_letters: i64,
    /// `Gap` deliveries the bench subscriber saw.
    pub gaps: u64,
    /// Peak resident set of `herald run` (VmHWM), MiB.
    pub peak_rss: Option<f64>,
    /// Resident set (VmRSS, MiB) at the end of each minute of the load, the
    /// last one at its end when the duration is not whole minutes.
    pub rss_per_minute: Vec<Option<f64>>,
}

impl MixedLoad {
    /// Receive − commit return (ms) of the received events that `keep`
    /// selects, negative samples included.
    pub fn event_latencies(&self, keep: impl Fn(&(i64, Instant)) -> bool) -> Vec<f64> {
        self.events
            .iter()
            .filter(|e| keep(e))
            .filter_map(|(seq, c)| Some(signed_ms(*self.received.get(seq)?, *c)))
            .collect()
    }

    /// Database stamp − enqueue return (ms) of the stamped tasks that `keep`
    /// selects, negative samples included.
    pub fn task_latencies(
        &self,
        stamps: &HashMap<i64, f64>,
        keep: impl Fn(&(i64, f64)) -> bool,
    ) -> Vec<f64> {
        self.tasks
            .iter()
            .filter(|t| keep(t))
            .filter_map(|(seq, c)| Some((stamps.get(seq)? - c) * 1000.0))
            .collect()
    }

    /// The minute of the load (from 0) an event committed in.
    pub fn event_minute(&self, committed: Instant) -> usize {
        (committed.saturating_duration_since(self.start).as_secs() / 60) as usize
    }

    /// The minute of the load (from 0) a task's enqueue returned in.
    pub fn task_minute(&self, committed_epoch: f64) -> usize {
        ((committed_epoch - self.start_epoch).max(0.0) / 60.0) as usize
    }
}

/// Runs the load for `secs`, then waits at most `drain` for the backlog to
/// empty (counted from the database and the subscriber).
pub(super) async fn run(config: &Config, secs: u64, drain: Duration) -> anyhow::Result<MixedLoad> {
    let client = herald::db::connect(config, "herald-bench").await?;
    client
        .batch_execute(
            "CREATE UNLOGGED TABLE public.bench_task_stamps (seq bigint, what text, at float8);
             CREATE FUNCTION public.bench_stamp_task() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF TG_OP = 'DELETE' THEN
                     INSERT INTO public.bench_task_stamps
                     VALUES ((OLD.payload->>'seq')::bigint, 'done',
                             extract(epoch FROM clock_timestamp())::float8);
                 ELSE
                     INSERT INTO public.bench_task_stamps
                     VALUES ((NEW.payload->>'seq')::bigint, 'claimed',
                             extract(epoch FROM clock_timestamp())::float8);
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER bench_claimed AFTER UPDATE ON herald.tasks FOR EACH ROW
                 WHEN (OLD.state = 'ready' AND NEW.state = 'running')
                 EXECUTE FUNCTION public.bench_stamp_task();
             CREATE TRIGGER bench_done AFTER DELETE ON herald.tasks FOR EACH ROW
                 EXECUTE FUNCTION public.bench_stamp_task();",
        )
        .await?;
    let (mut rx, gaps) = subscribe_all(config).await?;
    let run = HeraldProcess::spawn(
        config,
        &["run"],
        &[
            ("HERALD_ADMIN_ENABLED", "true".into()),
            ("HERALD_ADMIN_BIND", "127.0.0.1:0".into()),
            ("HERALD_SCHEDULER_ENABLED", "true".into()),
            // 1,000 tasks/s: the default 10 at once claims 10 per round
            // trip and fell behind on two loaded cores.
            ("HERALD_WORKER_CONCURRENCY", WORKER_CONCURRENCY.to_string()),
        ],
    )?;
    let pid = run.0.id().context("herald run has no pid")?;
    // Let it connect and park on LISTEN.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A receiver that keeps up while the producers run.
    let received: std::sync::Arc<std::sync::Mutex<HashMap<i64, Instant>>> = Default::default();
    let receiver = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some((seq, t)) = rx.recv().await {
                if let Ok(mut m) = received.lock() {
                    m.insert(seq, t);
                }
            }
        })
    };
    let insert_event = "INSERT INTO herald.outbox (event_id, topic, key, partition, payload) \
         VALUES ($1, 'bench.o4', NULL, herald.partition_for(NULL), $2::text::jsonb)";
    let period = Duration::from_micros(1_000_000 * PRODUCERS / RATE);
    let count = RATE * secs / PRODUCERS;
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let start_epoch = epoch_secs() + (start - tokio::time::Instant::now()).as_secs_f64();
    // Open loop: a producer that falls behind bursts to catch up, and stops
    // at the end of the run whatever it managed; the rates reached are
    // reported beside the latencies.
    let end = start + Duration::from_secs(secs);
    // RSS at each minute's end: a soak shows growth there, not in the peak.
    let rss_sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut at = start;
        while at < end {
            at = (at + Duration::from_secs(60)).min(end);
            tokio::time::sleep_until(at).await;
            samples.push(rss_mib(pid, "VmRSS:"));
        }
        samples
    });
    let mut event_producers = tokio::task::JoinSet::new();
    let mut task_producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let offset = Duration::from_micros(1_000_000 * p / RATE);
        let c = herald::db::connect(config, "herald-bench").await?;
        let stmt = c.prepare(insert_event).await?;
        event_producers.spawn(async move {
            let mut ticker = tokio::time::interval_at(start + offset, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut committed = Vec::with_capacity(count as usize);
            for i in 0..count {
                ticker.tick().await;
                if tokio::time::Instant::now() >= end {
                    break;
                }
                let seq = (i * PRODUCERS + p) as i64;
                let payload = format!("{{\"seq\": {seq}}}");
                c.execute(&stmt, &[&uuid::Uuid::now_v7(), &payload]).await?;
                committed.push((seq, Instant::now()));
            }
            anyhow::Ok(committed)
        });
        let c = herald::db::connect(config, "herald-bench").await?;
        let queue = herald::queue::Queue::from_config(config);
        task_producers.spawn(async move {
            let mut ticker = tokio::time::interval_at(start + offset, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut committed = Vec::with_capacity(count as usize);
            for i in 0..count {
                ticker.tick().await;
                if tokio::time::Instant::now() >= end {
                    break;
                }
                let seq = (i * PRODUCERS + p) as i64;
                // Autocommit: the statement's return is the COMMIT's return.
                queue.enqueue(&c, &seq_task(seq)?).await?;
                committed.push((seq, epoch_secs()));
            }
            anyhow::Ok(committed)
        });
    }
    let mut events: Vec<(i64, Instant)> = Vec::new();
    while let Some(done) = event_producers.join_next().await {
        events.extend(done.context("a load producer panicked")??);
    }
    let mut tasks: Vec<(i64, f64)> = Vec::new();
    while let Some(done) = task_producers.join_next().await {
        tasks.extend(done.context("a load producer panicked")??);
    }
    let produced_in = (tokio::time::Instant::now() - start).as_secs_f64();
    // The backlog the moment the producers are done.
    let outbox_left = herald::stats::outbox_backlog(&client).await?.unpublished;
    let tasks_left: i64 = client
        .query_one("SELECT count(*) FROM herald.tasks", &[])
        .await?
        .get(0);
    let rss_per_minute = rss_sampler.await.context("the RSS sampler panicked")?;
    // Then let everything arrive.
    let deadline = Instant::now() + drain;
    loop {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM public.bench_task_stamps WHERE what = 'done'",
                &[],
            )
            .await?
            .get(0);
        let outbox: i64 = herald::stats::outbox_backlog(&client).await?.unpublished;
        if (done >= tasks.len() as i64 && outbox == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak_rss = rss_mib(pid, "VmHWM:");
    run.stop().await;
    receiver.abort();
    let received = received.lock().map(|m| m.clone()).unwrap_or_default();
    let seqs = |rows: Vec<tokio_postgres::Row>| -> Vec<i64> {
        rows.iter()
            .filter_map(|r| r.get::<_, Option<i64>>(0))
            .collect()
    };
    let outbox_after_drain = seqs(
        client
            .query("SELECT (payload->>'seq')::bigint FROM herald.outbox", &[])
            .await?,
    );
    let tasks_after_drain = seqs(
        client
            .query("SELECT (payload->>'seq')::bigint FROM herald.tasks", &[])
            .await?,
    );
    let dead = client
        .query_one(
            "SELECT count(*) FILTER (WHERE source = 'task'), count(*) FILTER (WHERE source <> 'task') \
             FROM herald.dead_letters",
            &[],
        )
        .await?;
    let stamps = client
        .query("SELECT seq, what, at FROM public.bench_task_stamps", &[])
        .await?;
    let mut claimed: HashMap<i64, f64> = HashMap::new();
    let mut done: HashMap<i64, f64> = HashMap::new();
    for row in stamps {
        let seq: Option<i64> = row.get(0);
        let what: String = row.get(1);
        let at: f64 = row.get(2);
        if let Some(seq) = seq {
            // The first claim of a task counts (a retry would claim it again).
            match what.as_str() {
                "claimed" => {
                    claimed.entry(seq).or_insert(at);
                }
                _ => {
                    done.insert(seq, at);
                }
            }
        }
    }
    Ok(MixedLoad {
        start: start.into_std(),
        start_epoch,
        events,
        received,
        tasks,
        claimed,
        done,
        produced_in,
        outbox_left,
        tasks_left,
        outbox_after_drain,
        tasks_after_drain,
        task_dead_letters: dead.get(0),
        event_dead_letters: dead.get(1),
        gaps: gaps.load(Ordering::Relaxed),
        peak_rss,
        rss_per_minute,
    })
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in MiB.
pub(super) fn rss_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
