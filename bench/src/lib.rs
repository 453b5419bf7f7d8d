//! `herald bench`: the workloads of docs/benchmarks.md#workloads against the real
//! Postgres and Redis of the configuration, each run on a fresh database that
//! the bench creates and drops. It measures and reports; it must never be
//! called from the test suite with a time assertion.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::sync::mpsc;

use herald::config::Config;
use herald::outbox::{Event, Outbox};
use herald::pubsub::{Delivery, Subscriber};

mod charts;
mod mixed;
mod soak;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workloads: O1, O1c, O2, O3, O4, Q1, Q1b, Q2, Q2-scale, Q3, C1, or all;
    /// and S1 (the soak), which `all` leaves out because it takes 10 minutes.
    #[arg(required = true)]
    pub workloads: Vec<String>,
    /// Runs per workload; the median is reported with min–max. Default: 3,
    /// but 1 for S1.
    #[arg(long)]
    pub runs: Option<usize>,
    /// S1: how long the load runs (e.g. 60s, 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Also run O2 with 1,000,000 events.
    #[arg(long)]
    pub large: bool,
    /// Q2 and Q2-scale: tasks each worker process runs at once.
    #[arg(long, default_value_t = 1000)]
    pub q2_concurrency: usize,
    /// Q2 and Q2-scale: most tasks one claim takes (worker.batch_size).
    #[arg(long, default_value_t = 1000)]
    pub q2_batch: usize,
    /// Q2 and Q2-scale: worker processes. Two on two cores: each process
    /// has one claim in flight per queue, and two claims run in parallel
    /// (docs/benchmarks.md has the figures for one and two).
    #[arg(long, default_value_t = 2)]
    pub q2_workers: usize,
    /// Write the results as markdown to this file (e.g. docs/benchmarks.md).
    /// An existing file keeps everything outside its generated block.
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Draw SVG charts into this directory (default: the directory of
    /// --write, when it is given).
    #[arg(long, value_name = "DIR")]
    pub charts: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The workloads of docs/benchmarks.md#workloads, in the order `all` runs them.
const WORKLOADS: [&str; 11] = [
    "O1", "O1C", "O2", "O3", "O4", "Q1", "Q1B", "Q2", "Q2-SCALE", "Q3", "C1",
];
/// Workloads run only when named: S1 alone takes 10 minutes.
const ON_REQUEST: [&str; 1] = ["S1"];

/// First and last line of the part of the markdown file `--write` rewrites.
const BEGIN_MARK: &str = "<!-- herald bench: generated block, rewritten by --write -->";
const END_MARK: &str = "<!-- herald bench: end of generated block -->";

/// One figure of one workload over several runs.
#[derive(Debug, Clone)]
struct Figure {
    workload: String,
    metric: String,
    unit: &'static str,
    runs: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Results of one run: metric name → value, plus notes.
type RunResult = Vec<(String, &'static str, f64)>;

/// Raw latency samples (ms) by series name, pooled over the runs, for the
/// charts.
type Samples = Vec<(String, Vec<f64>)>;

fn add_samples(samples: &mut Samples, name: &str, values: &[f64]) {
    match samples.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => v.extend_from_slice(values),
        None => samples.push((name.to_string(), values.to_vec())),
    }
}

fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    // Draws nothing when stderr is not a terminal.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} runs  {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    if args.runs == Some(0) {
        bail!("--runs must be at least 1");
    }
    let soak_secs = args.duration.as_secs();
    if soak_secs == 0 {
        bail!("--duration must be at least 1s");
    }
    let mut wanted: Vec<String> = Vec::new();
    for w in &args.workloads {
        match w.to_ascii_uppercase().as_str() {
            "ALL" => wanted.extend(WORKLOADS.map(String::from)),
            w if WORKLOADS.contains(&w) || ON_REQUEST.contains(&w) => wanted.push(w.to_string()),
            other => bail!(
                "unknown workload {other:?}: this build implements {}, {} (or all, \
                 which leaves out {}); see docs/benchmarks.md#workloads",
                WORKLOADS.join(", "),
                ON_REQUEST.join(", "),
                ON_REQUEST.join(", ")
            ),
        }
    }
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|w| seen.insert(w.clone()));
    let started = chrono::Utc::now();
    // Read before the runs: the tree may change while they take minutes.
    let commit = git_commit();
    let runs_of = |workload: &str| {
        args.runs
            .unwrap_or(if ON_REQUEST.contains(&workload) { 1 } else { 3 })
    };
    let total: usize = wanted.iter().map(|w| runs_of(w)).sum();
    let bar = progress_bar(total as u64, args.quiet);
    let mut figures: Vec<Figure> = Vec::new();
    let mut soak: Vec<Figure> = Vec::new();
    let mut samples: Samples = Vec::new();
    for workload in &wanted {
        let mut per_metric: Vec<Figure> = Vec::new();
        let runs = runs_of(workload);
        for run in 0..runs {
            let label = format!("{workload}: run {}/{runs}", run + 1);
            bar.set_message(label.clone());
            if bar.is_hidden() && !args.quiet {
                eprintln!("bench {label}");
            }
            let db = BenchDb::create(config, workload, run).await?;
            let result = match workload.as_str() {
                "O1" => o1(&db.config).await,
                "O1C" => o1c(&db.config).await,
                "O2" => o2(&db.config, args.large).await,
                "O3" => o3(&db.config, &mut samples).await,
                "O4" => o4(&db.config, &mut samples).await,
                "Q1" => q1(&db.config).await,
                "Q1B" => q1b(&db.config).await,
                "Q2" => q2(&db.config, &args).await,
                "Q2-SCALE" => q2_scale(&db.config, &args).await,
                "Q3" => q3(&db.config, &mut samples).await,
                "C1" => c1(&db.config).await,
                "S1" => soak::s1(&db.config, soak_secs).await,
                _ => unreachable!("workloads were checked above"),
            };
            db.drop_db().await?;
            bar.inc(1);
            for (metric, unit, value) in result? {
                match per_metric.iter_mut().find(|f| f.metric == metric) {
                    Some(f) => f.runs.push(value),
                    None => per_metric.push(Figure {
                        workload: workload.clone(),
                        metric,
                        unit,
                        runs: vec![value],
                    }),
                }
            }
        }
        let mut line = serde_json::Map::new();
        line.insert("workload".into(), json!(workload));
        line.insert("runs".into(), json!(runs));
        for f in &per_metric {
            line.insert(f.metric.clone(), json!(round2(f.median())));
        }
        bar.suspend(|| println!("{}", serde_json::Value::Object(line)));
        if workload == "S1" {
            soak.extend(per_metric);
        } else {
            figures.extend(per_metric);
        }
    }
    bar.finish_and_clear();
    let table = table(&figures);
    if !figures.is_empty() {
        println!("{table}");
    }
    if !soak.is_empty() {
        println!("{}", soak::minute_table(&soak));
        println!("{}", self::table(&soak::end_figures(&soak)));
    }
    let charts_dir = args.charts.clone().or_else(|| {
        args.write.as_ref().map(|w| match w.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
    });
    let mut drawn: Vec<(String, PathBuf)> = Vec::new();
    if let Some(dir) = &charts_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        drawn = charts::draw_all(dir, &figures, &samples)?;
        for (_, path) in &drawn {
            eprintln!("wrote {}", path.display());
        }
    }
    if let Some(path) = &args.write {
        let header = run_header(config, started, commit).await;
        let mut doc = std::fs::read_to_string(path).unwrap_or_else(|_| {
            "# Benchmarks\n\nFigures from `herald bench`; the workloads are defined under Workloads below.\n"
                .to_string()
        });
        // Each part rewrites only its own block: `bench S1` keeps the latest
        // `bench all`, and the other way round.
        if !figures.is_empty() {
            let runs = args.runs.unwrap_or(3);
            let block = markdown_block(runs, &header, &table, &drawn, path);
            doc = splice_block(&doc, &block);
        }
        if !soak.is_empty() {
            let section = soak::section(&header, runs_of("S1"), soak_secs, &soak);
            doc = soak::splice_section(&doc, &section);
        }
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `old` with its generated block replaced by `block`; without one, the
/// block goes right after the title.
fn splice_block(old: &str, block: &str) -> String {
    if let Some(doc) = splice_between(old, BEGIN_MARK, END_MARK, block) {
        return doc;
    }
    match old.find('\n') {
        Some(i) if old.starts_with("# ") => {
            format!("{}\n\n{block}\n{}", &old[..i], old[i + 1..].trim_start())
        }
        _ => format!("{block}\n{old}"),
    }
}

/// `old` with the text from `begin` through `end` (and its newline) replaced
/// by `block`; None when the marks are not there in that order.
fn splice_between(old: &str, begin: &str, end: &str, block: &str) -> Option<String> {
    let b = old.find(begin)?;
    let e = old.find(end)?;
    if b >= e {
        return None;
    }
    let after = e + end.len();
    let rest = old[after..].strip_prefix('\n').unwrap_or(&old[after..]);
    Some(format!("{}{block}{rest}", &old[..b]))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn table(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| workload | figure | median | min | max | unit |\n|---|---|---:|---:|---:|---|\n",
    );
    for f in figures {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            f.workload,
            f.metric,
            f.median(),
            f.min(),
            f.max(),
            f.unit
        );
    }
    out
}

/// The git commit of the working directory, if it is a checkout, marked when
/// the sources the binary is built from differ from it.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let dirty = std::process::Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "src",
            "sql",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Some(if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    })
}

/// The command, date, machine and build lines of a written run.
async fn run_header(
    config: &Config,
    started: chrono::DateTime<chrono::Utc>,
    commit: Option<String>,
) -> String {
    let machine = machine_description(config).await;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    let commit = commit
        .map(|c| format!(", commit {c} when the run started"))
        .unwrap_or_default();
    format!(
        "- Command: `{command}`\n\
         - Date: {date} (finished {end})\n\
         - Machine: {machine}\n\
         - Herald: {version} ({build}{commit})\n",
        date = started.format("%Y-%m-%d %H:%M UTC"),
        end = chrono::Utc::now().format("%H:%M UTC"),
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn markdown_block(
    runs: usize,
    header: &str,
    table: &str,
    charts: &[(String, PathBuf)],
    doc: &std::path::Path,
) -> String {
    let runs = if runs == 1 {
        "one run per workload (median = min = max)".to_string()
    } else {
        format!("medians of {runs} runs with min–max")
    };
    let mut images = String::new();
    for (title, path) in charts {
        // Relative to the markdown file when the chart sits beside it.
        let shown = match (path.parent(), doc.parent()) {
            (Some(a), Some(b))
                if a == b || (b.as_os_str().is_empty() && a == std::path::Path::new(".")) =>
            {
                path.file_name()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| path.clone())
            }
            _ => path.clone(),
        };
        let _ = writeln!(images, "\n![{title}]({})", shown.display());
    }
    format!(
        "{BEGIN_MARK}\n\
         ## Latest run\n\n\
         Each run on a fresh, migrated database; {runs}. \
         Latencies are receive (or start) time minus the time the producer's COMMIT \
         returned, on one machine.\n\n\
         {header}\n\
         {table}{images}\n{END_MARK}\n"
    )
}

async fn machine_description(config: &Config) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".into());
    let pg = match herald::db::connect(config, "herald-bench").await {
        Ok(c) => c
            .query_one("SHOW server_version", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default(),
        Err(_) => "unknown".into(),
    };
    let redis = async {
        let client = redis::Client::open(config.redis_url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
    }
    .await
    .unwrap_or_else(|| "unknown".into());
    format!(
        "{cores} cores, {mem}, PostgreSQL {pg}, Redis {redis}, {}",
        std::env::consts::ARCH
    )
}

/// A database created for one run and dropped after it.
struct BenchDb {
    config: Config,
    admin_url: String,
    name: String,
}

impl BenchDb {
    async fn create(base: &Config, workload: &str, run: usize) -> anyhow::Result<BenchDb> {
        let mut url = url::Url::parse(&base.database_url).context("parsing DATABASE_URL")?;
        let name = format!(
            "herald_bench_{}_{}_{}",
            workload.to_ascii_lowercase().replace('-', "_"),
            std::process::id(),
            run
        );
        url.set_path("/postgres");
        let admin_url = url.to_string();
        let admin = admin_client(base, &admin_url).await?;
        // Two statements: DROP/CREATE DATABASE refuse an implicit transaction.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping leftover database {name}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        url.set_path(&format!("/{name}"));
        let mut config = base.clone();
        config.database_url = url.to_string();
        config.channel_prefix = format!("{}bench:{}:", base.channel_prefix, name);
        herald::migrate::migrate(&config).await?;
        Ok(BenchDb {
            config,
            admin_url,
            name,
        })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        let admin = admin_client(&self.config, &self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        Ok(())
    }
}

async fn admin_client(base: &Config, admin_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = base.clone();
    config.database_url = admin_url.to_string();
    Ok(herald::db::connect(&config, "herald-bench").await?)
}

/// A `herald relay` or `herald worker` child process against the bench
/// database.
struct HeraldProcess(tokio::process::Child);

impl HeraldProcess {
    fn relay(config: &Config) -> anyhow::Result<HeraldProcess> {
        HeraldProcess::spawn(config, &["relay"], &[])
    }

    fn spawn(
        config: &Config,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<HeraldProcess> {
        let exe = std::env::current_exe().context("locating the herald binary")?;
        let child = tokio::process::Command::new(exe)
            .args(args)
            .env("DATABASE_URL", &config.database_url)
            .env("REDIS_URL", &config.redis_url)
            .env("HERALD_CHANNEL_PREFIX", &config.channel_prefix)
            .env("HERALD_MIGRATE_ON_START", "false")
            .env("RUST_LOG", "warn")
            .env_remove("HERALD_CONFIG")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting `herald {}`", args.join(" ")))?;
        Ok(HeraldProcess(child))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.0.id() {
            // SIGTERM for a clean stop; kill_on_drop covers the rest.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.0.wait()).await;
    }
}

/// A subscriber on every topic of the bench prefix, forwarding
/// (sequence number, receive instant) for each event, and counting the
/// `Gap`s it sees.
async fn subscribe_all(
    config: &Config,
) -> anyhow::Result<(mpsc::UnboundedReceiver<(i64, Instant)>, Arc<AtomicU64>)> {
    let mut sub = Subscriber::from_config(config)?.pattern("*");
    sub.connect().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let gaps = Arc::new(AtomicU64::new(0));
    let seen_gaps = gaps.clone();
    tokio::spawn(async move {
        loop {
            match sub.next().await {
                Ok(Delivery::Event { envelope, .. }) => {
                    let now = Instant::now();
                    let seq = envelope
                        .payload
                        .get("seq")
                        .and_then(|s| s.as_i64())
                        .unwrap_or(-1);
                    if tx.send((seq, now)).is_err() {
                        return;
                    }
                }
                Ok(Delivery::Gap(gap)) => {
                    seen_gaps.fetch_add(1, Ordering::Relaxed);
                    eprintln!("bench subscriber gap: {}", gap.reason)
                }
                Ok(Delivery::Undecodable { error, .. }) => eprintln!("bench: undecodable: {error}"),
                Err(e) => {
                    eprintln!("bench subscriber failed: {e}");
                    return;
                }
            }
        }
    });
    Ok((rx, gaps))
}

/// O1: 10,000 one-event transactions through the Rust API, then through SQL.
async fn o1(config: &Config) -> anyhow::Result<RunResult> {
    const N: usize = 10_000;
    let mut client = herald::db::connect(config, "herald-bench").await?;
    let outbox = Outbox::from_config(config);
    let started = Instant::now();
    for i in 0..N {
        let tx = client.transaction().await?;
        let event = Event::new("bench.o1", &json!({"seq": i}))?.key(format!("k{}", i % 100));
        outbox.publish(&tx, &event).await?;
        tx.commit().await?;
    }
    let rust_rate = N as f64 / started.elapsed().as_secs_f64();
    let publish_sql = client
        .prepare("SELECT herald.publish($1, $2::text::jsonb, $3)")
        .await?;
    let started = Instant::now();
    for i in 0..N {
        let tx = client.transaction().await?;
        let payload = format!("{{\"seq\": {i}}}");
        let key = format!("k{}", i % 100);
        tx.query_one(&publish_sql, &[&"bench.o1", &payload, &key])
            .await?;
        tx.commit().await?;
    }
    let sql_rate = N as f64 / started.elapsed().as_secs_f64();
    Ok(vec![
        ("rust_events_per_s".into(), "events/s", rust_rate),
        ("sql_events_per_s".into(), "events/s", sql_rate),
    ])
}

/// O2: a backlog of events, then a relay; events/s until a subscriber has all.
async fn o2(config: &Config, large: bool) -> anyhow::Result<RunResult> {
    let mut out = Vec::new();
    let sizes: &[usize] = if large {
        &[100_000, 1_000_000]
    } else {
        &[100_000]
    };
    for &n in sizes {
        let client = herald::db::connect(config, "herald-bench").await?;
        client.batch_execute("TRUNCATE herald.outbox").await?;
        let outbox = Outbox::from_config(config);
        let mut batch = Vec::with_capacity(1000);
        for i in 0..n {
            batch.push(Event::new("bench.o2", &json!({"seq": i}))?.key(format!("k{}", i % 1000)));
            if batch.len() == 1000 {
                outbox.publish_batch(&client, &batch).await?;
                batch.clear();
            }
        }
        outbox.publish_batch(&client, &batch).await?;
        settle(&client, "herald.outbox").await?;
        let (mut rx, _gaps) = subscribe_all(config).await?;
        let started = Instant::now();
        let relay = HeraldProcess::relay(config)?;
        let mut received = 0usize;
        let deadline = Duration::from_secs(30 + n as u64 / 2000);
        while received < n {
            match tokio::time::timeout(deadline, rx.recv()).await {
                Ok(Some(_)) => received += 1,
                _ => {
                    relay.stop().await;
                    bail!("O2: only {received} of {n} events arrived");
                }
            }
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        relay.stop().await;
        let metric = if n == 100_000 {
            "events_per_s".to_string()
        } else {
            format!("events_per_s_at_{n}")
        };
        out.push((metric, "events/s", rate));
    }
    Ok(out)
}

/// O3: an idle relay; one event every 5 ms for 10 s, then every 1 ms for
/// 10 s; latency from COMMIT returned to received by a Redis subscriber.
async fn o3(config: &Config, samples: &mut Samples) -> anyhow::Result<RunResult> {
    let (mut rx, _gaps) = subscribe_all(config).await?;
    let relay = HeraldProcess::relay(config)?;
    // Let the relay connect and park on LISTEN.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = herald::db::connect(config, "herald-bench").await?;
    let insert = client
        .prepare(
            "INSERT INTO herald.outbox (event_id, topic, key, partition, payload) \
             VALUES ($1, 'bench.o3', NULL, herald.partition_for(NULL), $2::text::jsonb)",
        )
        .await?;
    let mut out = Vec::new();
    let mut seq: i64 = 0;
    for (rate, label) in [(200u64, "200"), (1000u64, "1000")] {
        let mut committed: HashMap<i64, Instant> = HashMap::new();
        let period = Duration::from_micros(1_000_000 / rate);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let count = rate * 10;
        let first = seq;
        for _ in 0..count {
            ticker.tick().await;
            let payload = format!("{{\"seq\": {seq}}}");
            // Autocommit: the statement's return is the COMMIT's return.
            client
                .execute(&insert, &[&uuid::Uuid::now_v7(), &payload])
                .await?;
            committed.insert(seq, Instant::now());
            seq += 1;
        }
        let mut latencies: Vec<f64> = Vec::with_capacity(count as usize);
        let deadline = Instant::now() + Duration::from_secs(10);
        while latencies.len() < count as usize && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some((s, at))) if s >= first && s < seq => {
                    if let Some(c) = committed.get(&s) {
                        latencies.push(signed_ms(at, *c));
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if latencies.len() < count as usize {
            relay.stop().await;
            bail!(
                "O3 at {rate}/s: only {} of {count} events arrived",
                latencies.len()
            );
        }
        add_samples(samples, &format!("O3 at {label}/s"), &latencies);
        let negative = count_negative(&latencies);
        out.extend(latency_figures(
            &mut latencies,
            negative,
            "",
            &format!("_at_{label}"),
        ));
    }
    relay.stop().await;
    Ok(out)
}

/// O1c: 8 producers commit one-event transactions for 10 s into
/// `herald.outbox` (its trigger installed, no relay asleep: the trigger
/// takes the wake lock shared and does not notify, as while a relay drains),
/// then again while a session holds the wake lock as a sleeping relay does
/// (every commit notifies: the worst case, and what every commit cost before
/// V6), then into an identical table without the trigger; commits/s of each
/// and the ratios. Each transaction is one autocommit INSERT, the statement
/// O3 uses.
async fn o1c(config: &Config) -> anyhow::Result<RunResult> {
    const PRODUCERS: usize = 8;
    const SECS: u64 = 10;
    let client = herald::db::connect(config, "herald-bench").await?;
    client
        .batch_execute("CREATE TABLE public.bench_outbox_plain (LIKE herald.outbox INCLUDING ALL)")
        .await?;
    let reloptions: Option<String> = client
        .query_one(
            "SELECT array_to_string(reloptions, ', ') FROM pg_class \
             WHERE oid = 'herald.outbox'::regclass",
            &[],
        )
        .await?
        .get(0);
    if let Some(opts) = reloptions.filter(|o| !o.is_empty()) {
        client
            .batch_execute(&format!(
                "ALTER TABLE public.bench_outbox_plain SET ({opts})"
            ))
            .await?;
    }
    let mut out = Vec::new();
    let mut rates = Vec::new();
    for (table, label) in [
        ("herald.outbox", "with_trigger"),
        ("herald.outbox", "with_trigger_relay_asleep"),
        ("public.bench_outbox_plain", "without_trigger"),
    ] {
        // A LISTENing session holding the wake lock: a relay that sleeps
        // through the whole phase.
        let sleeper = if label == "with_trigger_relay_asleep" {
            let c = herald::db::connect(config, "herald-bench").await?;
            c.execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&herald::relay::WAKE_LOCK.0, &herald::relay::WAKE_LOCK.1],
            )
            .await?;
            c.batch_execute(&format!("LISTEN {}", herald::relay::CHANNEL))
                .await?;
            Some(c)
        } else {
            None
        };
        let sql = format!(
            "INSERT INTO {table} (event_id, topic, key, partition, payload) \
             VALUES ($1, 'bench.o1c', $2, herald.partition_for($2), $3::text::jsonb)"
        );
        let mut clients = Vec::new();
        for _ in 0..PRODUCERS {
            let c = herald::db::connect(config, "herald-bench").await?;
            let stmt = c.prepare(&sql).await?;
            clients.push((c, stmt));
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(SECS);
        let mut producers = tokio::task::JoinSet::new();
        for (p, (c, stmt)) in clients.into_iter().enumerate() {
            producers.spawn(async move {
                let mut commits = 0u64;
                while Instant::now() < deadline {
                    let payload = format!("{{\"seq\": {commits}, \"producer\": {p}}}");
                    let key = format!("k{}", commits % 100);
                    c.execute(&stmt, &[&uuid::Uuid::now_v7(), &key, &payload])
                        .await?;
                    commits += 1;
                }
                anyhow::Ok(commits)
            });
        }
        let mut total = 0u64;
        while let Some(done) = producers.join_next().await {
            total += done.context("an O1c producer panicked")??;
        }
        let rate = total as f64 / start.elapsed().as_secs_f64();
        drop(sleeper);
        rates.push(rate);
        out.push((format!("commits_per_s_{label}"), "commits/s", rate));
    }
    out.push(("ratio".into(), "with/without", rates[0] / rates[2]));
    out.push((
        "ratio_relay_asleep".into(),
        "with/without",
        rates[1] / rates[2],
    ));
    out.push(("producers".into(), "count", PRODUCERS as f64));
    Ok(out)
}

/// Seconds since the Unix epoch, on the wall clock Postgres also reads.
fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// O4: O4's load (see `mixed`) for 60 s; O3's and Q3's latencies under
/// it, the backlog at the end, the peak RSS of `herald run`.
async fn o4(config: &Config, samples: &mut Samples) -> anyhow::Result<RunResult> {
    let load = mixed::run(config, 60, Duration::from_secs(30)).await?;
    let mut out: RunResult = Vec::new();
    // Events: receive − commit return, as in O3.
    let mut event_ms = load.event_latencies(|_| true);
    let negative = count_negative(&event_ms);
    let events_missing = load.events.len() - event_ms.len();
    add_samples(samples, "O4 events", &event_ms);
    out.extend(latency_figures(&mut event_ms, negative, "event_", ""));
    out.push(("events_missing".into(), "events", events_missing as f64));
    // Tasks: claim and completion, database clock − commit return.
    for (name, stamps) in [("claim", &load.claimed), ("done", &load.done)] {
        let mut ms = load.task_latencies(stamps, |_| true);
        let negative = count_negative(&ms);
        if name == "claim" {
            out.push((
                "tasks_missing".into(),
                "tasks",
                (load.tasks.len() - ms.len()) as f64,
            ));
        }
        add_samples(samples, &format!("O4 tasks, {name}"), &ms);
        out.extend(latency_figures(
            &mut ms,
            negative,
            &format!("task_{name}_"),
            "",
        ));
    }
    out.push((
        "events_per_s_produced".into(),
        "events/s",
        load.events.len() as f64 / load.produced_in,
    ));
    out.push((
        "tasks_per_s_produced".into(),
        "tasks/s",
        load.tasks.len() as f64 / load.produced_in,
    ));
    out.push((
        "outbox_backlog_at_end".into(),
        "events",
        load.outbox_left as f64,
    ));
    out.push((
        "task_backlog_at_end".into(),
        "tasks",
        load.tasks_left as f64,
    ));
    if let Some(rss) = load.peak_rss {
        out.push(("peak_rss_mib".into(), "MiB", rss));
    }
    Ok(out)
}

/// A no-op task carrying its sequence number.
fn seq_task(seq: i64) -> anyhow::Result<herald::queue::Task> {
    Ok(herald::queue::Task::new(
        "herald.noop",
        &json!({"seq": seq}),
    )?)
}

/// Q1: 10,000 tasks, one enqueue transaction each, from one client.
async fn q1(config: &Config) -> anyhow::Result<RunResult> {
    const N: i64 = 10_000;
    let mut client = herald::db::connect(config, "herald-bench").await?;
    let queue = herald::queue::Queue::from_config(config);
    let started = Instant::now();
    for seq in 0..N {
        let tx = client.transaction().await?;
        queue.enqueue(&tx, &seq_task(seq)?).await?;
        tx.commit().await?;
    }
    Ok(vec![(
        "tasks_per_s".into(),
        "tasks/s",
        N as f64 / started.elapsed().as_secs_f64(),
    )])
}

/// Q1b: 20,000 tasks through the bulk API, 1,000 per call.
async fn q1b(config: &Config) -> anyhow::Result<RunResult> {
    const N: i64 = 20_000;
    let client = herald::db::connect(config, "herald-bench").await?;
    let queue = herald::queue::Queue::from_config(config);
    let batches: Vec<Vec<herald::queue::Task>> = (0..N / 1000)
        .map(|b| (b * 1000..(b + 1) * 1000).map(seq_task).collect())
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    for batch in &batches {
        queue.enqueue_batch(&client, batch).await?;
    }
    Ok(vec![(
        "tasks_per_s".into(),
        "tasks/s",
        N as f64 / started.elapsed().as_secs_f64(),
    )])
}

/// After a backlog is written and before the clock starts: VACUUM ANALYZE
/// (the state a backlog at rest has), then CHECKPOINT, so that the
/// checkpoints inside the run, and their full-page writes, are those the
/// run's own WAL brings (a 1,000,000-task drain writes 650 MB, one
/// checkpoint with max_wal_size at 1 GB), not the backlog's writing.
/// CHECKPOINT needs superuser or pg_checkpoint; without them the run goes
/// on and says so.
async fn settle(client: &tokio_postgres::Client, table: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await?;
    if let Err(e) = client.batch_execute("CHECKPOINT").await {
        tracing::warn!(error = %herald::error::describe_pg(&e), "bench: CHECKPOINT before the run failed; a checkpoint may fall inside it");
    }
    Ok(())
}

/// Q2: 20,000 no-op tasks waiting; start `herald worker` process(es); time
/// until the database holds none.
async fn q2(config: &Config, args: &BenchArgs) -> anyhow::Result<RunResult> {
    const N: i64 = 20_000;
    let client = herald::db::connect(config, "herald-bench").await?;
    let queue = herald::queue::Queue::from_config(config);
    for b in 0..N / 1000 {
        let batch: Vec<_> = (b * 1000..(b + 1) * 1000)
            .map(seq_task)
            .collect::<anyhow::Result<_>>()?;
        queue.enqueue_batch(&client, &batch).await?;
    }
    settle(&client, "herald.tasks").await?;
    let rate = drain_tasks(config, args, &client, N).await?;
    Ok(vec![
        ("tasks_per_s".into(), "tasks/s", rate),
        ("worker_processes".into(), "count", args.q2_workers as f64),
        (
            "concurrency_per_worker".into(),
            "tasks",
            args.q2_concurrency as f64,
        ),
        ("claim_batch".into(), "tasks", args.q2_batch as f64),
    ])
}

/// Start the Q2 worker process(es) on `n` waiting tasks; tasks/s until
/// `herald.tasks` is empty, counted from the database.
async fn drain_tasks(
    config: &Config,
    args: &BenchArgs,
    client: &tokio_postgres::Client,
    n: i64,
) -> anyhow::Result<f64> {
    let concurrency = args.q2_concurrency.to_string();
    let limit = Duration::from_secs(120 + n as u64 / 2000);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.q2_workers {
        workers.push(HeraldProcess::spawn(
            config,
            &["worker", "--concurrency", &concurrency],
            &[("HERALD_WORKER_BATCH_SIZE", args.q2_batch.to_string())],
        )?);
    }
    // Polling must not take a core from the workers: count(*) of the table
    // every 5 ms did (a scan of up to 20,000 rows each time). Instead, the
    // lowest id left, from the primary key onward from the last one seen:
    // the workers take tasks in id order, so each look passes only the
    // entries completed since the previous one. NULL: the table is empty.
    let lowest = client
        .prepare("SELECT min(id) FROM herald.tasks WHERE id >= $1")
        .await?;
    let mut from = 0i64;
    loop {
        let Some(min) = client
            .query_one(&lowest, &[&from])
            .await?
            .get::<_, Option<i64>>(0)
        else {
            break;
        };
        from = min;
        if started.elapsed() > limit {
            for w in workers {
                w.stop().await;
            }
            let left: i64 = client
                .query_one("SELECT count(*) FROM herald.tasks", &[])
                .await?
                .get(0);
            bail!("{left} of {n} tasks still in herald.tasks after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    for w in workers {
        w.stop().await;
    }
    Ok(rate)
}

/// Q2-scale: Q2 with 200,000 and then 1,000,000 tasks waiting. The backlog
/// is written by one server-side `INSERT … SELECT` per 100,000 rows, the
/// rows the bulk API writes for `seq_task` (no trace context: empty headers).
async fn q2_scale(config: &Config, args: &BenchArgs) -> anyhow::Result<RunResult> {
    let client = herald::db::connect(config, "herald-bench").await?;
    let fill = client
        .prepare(
            "INSERT INTO herald.tasks (queue, kind, payload) \
             SELECT 'default', 'herald.noop', jsonb_build_object('seq', g) \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await?;
    let mut out = Vec::new();
    for n in [200_000i64, 1_000_000] {
        client.batch_execute("TRUNCATE herald.tasks").await?;
        let mut from = 0i64;
        while from < n {
            let to = (from + 100_000).min(n) - 1;
            client.execute(&fill, &[&from, &to]).await?;
            from = to + 1;
        }
        settle(&client, "herald.tasks").await?;
        let rate = drain_tasks(config, args, &client, n)
            .await
            .with_context(|| format!("Q2-scale at {n}"))?;
        out.push((format!("tasks_per_s_at_{n}"), "tasks/s", rate));
    }
    out.push(("worker_processes".into(), "count", args.q2_workers as f64));
    out.push((
        "concurrency_per_worker".into(),
        "tasks",
        args.q2_concurrency as f64,
    ));
    out.push(("claim_batch".into(), "tasks", args.q2_batch as f64));
    Ok(out)
}

/// Q3: idle workers; one enqueue every 5 ms for 10 s; latency from the
/// enqueue's COMMIT returned to the handler's start.
async fn q3(config: &Config, samples: &mut Samples) -> anyhow::Result<RunResult> {
    use std::sync::{Arc, Mutex};
    const N: i64 = 2000;
    let started_at: Arc<Mutex<HashMap<i64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    // The worker runs on its own runtime and threads, as it would in its
    // own process, so the producer's timer does not share its scheduler.
    let stop = tokio_util::sync::CancellationToken::new();
    let worker_thread = {
        let config = config.clone();
        let started_at = started_at.clone();
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut registry = herald::worker::Registry::new();
                registry.register("bench.q3", move |_ctx, p: serde_json::Value| {
                    let now = Instant::now();
                    let started_at = started_at.clone();
                    async move {
                        if let Some(seq) = p.get("seq").and_then(|s| s.as_i64()) {
                            if let Ok(mut m) = started_at.lock() {
                                m.insert(seq, now);
                            }
                        }
                        Ok(())
                    }
                });
                let pool = herald::db::pool(&config, "herald-bench-worker")?;
                let worker = herald::worker::Worker::new(&config, pool, registry);
                worker.run(stop).await?;
                Ok(())
            })
        })
    };
    // Let the worker connect and park on LISTEN.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = herald::db::connect(config, "herald-bench").await?;
    let queue = herald::queue::Queue::from_config(config);
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..N {
        ticker.tick().await;
        let task = herald::queue::Task::new("bench.q3", &json!({"seq": seq}))?;
        // Autocommit: the statement's return is the COMMIT's return.
        queue.enqueue(&client, &task).await?;
        committed.insert(seq, Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while started_at.lock().map(|m| m.len()).unwrap_or(0) < N as usize {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let _ = tokio::task::spawn_blocking(move || worker_thread.join()).await;
    let started = started_at.lock().map(|m| m.clone()).unwrap_or_default();
    if started.len() < N as usize {
        bail!("Q3: only {} of {N} tasks started", started.len());
    }
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(seq, c)| Some(signed_ms(*started.get(seq)?, *c)))
        .collect();
    let negative = count_negative(&latencies);
    add_samples(samples, "Q3 at 200/s", &latencies);
    Ok(latency_figures(&mut latencies, negative, "", ""))
}

/// `at − since` in milliseconds, negative when `at` came first (the spec
/// keeps such samples).
fn signed_ms(at: Instant, since: Instant) -> f64 {
    if at >= since {
        (at - since).as_secs_f64() * 1000.0
    } else {
        -((since - at).as_secs_f64() * 1000.0)
    }
}

fn count_negative(ms: &[f64]) -> usize {
    ms.iter().filter(|v| **v < 0.0).count()
}

/// The nearest-rank `p` percentile of sorted, non-empty `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1)]
}

/// p50, p95, p99, max (ms) and the count of negative samples, named
/// `{prefix}p50_ms{suffix}` and so on.
fn latency_figures(
    latencies: &mut [f64],
    negative: usize,
    prefix: &str,
    suffix: &str,
) -> RunResult {
    latencies.sort_by(f64::total_cmp);
    if latencies.is_empty() {
        return Vec::new();
    }
    let pct = |p: f64| percentile(latencies, p);
    vec![
        (format!("{prefix}p50_ms{suffix}"), "ms", pct(0.50)),
        (format!("{prefix}p95_ms{suffix}"), "ms", pct(0.95)),
        (format!("{prefix}p99_ms{suffix}"), "ms", pct(0.99)),
        (
            format!("{prefix}max_ms{suffix}"),
            "ms",
            latencies[latencies.len() - 1],
        ),
        (
            format!("{prefix}negative_samples{suffix}"),
            "count",
            negative as f64,
        ),
    ]
}

/// C1: three `herald scheduler` processes and one schedule firing every
/// second, for 60 s. Tasks are counted from the database over the 60 ticks
/// from the first one the schedulers computed; lateness is the task's
/// `created_at` (the firing transaction's start, on the database clock)
/// minus its nominal tick.
async fn c1(config: &Config) -> anyhow::Result<RunResult> {
    const TICKS: i64 = 60;
    let client = herald::db::connect(config, "herald-bench").await?;
    let mut schedulers = Vec::new();
    for _ in 0..3 {
        schedulers.push(HeraldProcess::spawn(config, &["scheduler"], &[])?);
    }
    // Let the schedulers connect and park on LISTEN.
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .execute(
            "SELECT herald.upsert_schedule('bench.c1', '* * * * * *', 'herald.noop', '{}')",
            &[],
        )
        .await?;
    let started = Instant::now();
    let first: chrono::DateTime<chrono::Utc> = loop {
        let row = client
            .query_one(
                "SELECT next_run_at FROM herald.schedules WHERE name = 'bench.c1'",
                &[],
            )
            .await?;
        if let Some(t) = row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(0) {
            break t;
        }
        if started.elapsed() > Duration::from_secs(10) {
            for s in schedulers {
                s.stop().await;
            }
            bail!("C1: no scheduler computed the first tick within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let end = first + chrono::Duration::seconds(TICKS);
    // Sleep on the database's clock until two seconds past the window.
    let left: f64 = client
        .query_one(
            "SELECT extract(epoch FROM $1::timestamptz - clock_timestamp())::float8",
            &[&end],
        )
        .await?
        .get(0);
    tokio::time::sleep(Duration::from_secs_f64(left.max(0.0) + 2.0)).await;
    for s in schedulers {
        s.stop().await;
    }
    let tick = "(headers->>'herald_tick')::timestamptz";
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT {tick}), \
                        coalesce(array_agg(extract(epoch FROM created_at - {tick})::float8 * 1000.0), '{{}}') \
                 FROM herald.tasks WHERE {tick} >= $1 AND {tick} < $2"
            ),
            &[&first, &end],
        )
        .await?;
    let created: i64 = row.get(0);
    let distinct: i64 = row.get(1);
    let mut lateness: Vec<f64> = row.get(2);
    let duplicates: i64 = client
        .query_one(
            &format!("SELECT count(*) - count(DISTINCT {tick}) FROM herald.tasks"),
            &[],
        )
        .await?
        .get(0);
    if lateness.is_empty() {
        bail!("C1: no task was created");
    }
    lateness.sort_by(f64::total_cmp);
    let pct = |p: f64| lateness[((lateness.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    let negative = count_negative(&lateness);
    if created != TICKS || distinct != TICKS || duplicates != 0 {
        eprintln!(
            "C1: {created} tasks ({distinct} distinct ticks, {duplicates} duplicates) for {TICKS} ticks"
        );
    }
    Ok(vec![
        ("tasks_created".into(), "tasks", created as f64),
        ("duplicate_ticks".into(), "tasks", duplicates as f64),
        ("lateness_p50_ms".into(), "ms", pct(0.50)),
        ("lateness_p99_ms".into(), "ms", pct(0.99)),
        (
            "lateness_max_ms".into(),
            "ms",
            *lateness.last().unwrap_or(&0.0),
        ),
        ("negative_samples".into(), "count", negative as f64),
        ("scheduler_processes".into(), "count", 3.0),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_generated_block() {
        let old = format!(
            "# Benchmarks\n\nintro\n\n{BEGIN_MARK}\nold table\n{END_MARK}\n\n## Notes\nkept\n"
        );
        let new = splice_block(&old, &format!("{BEGIN_MARK}\nnew table\n{END_MARK}\n"));
        assert_eq!(
            new,
            format!(
                "# Benchmarks\n\nintro\n\n{BEGIN_MARK}\nnew table\n{END_MARK}\n\n## Notes\nkept\n"
            )
        );
    }

    #[test]
    fn splice_without_a_block_inserts_it_after_the_title() {
        let new = splice_block("# Benchmarks\n\n## Notes\nkept\n", "BLOCK\n");
        assert_eq!(new, "# Benchmarks\n\nBLOCK\n\n## Notes\nkept\n");
    }

    #[test]
    fn latency_figures_are_nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let f = latency_figures(&mut v, 0, "x_", "_y");
        let get = |name: &str| f.iter().find(|(n, _, _)| n == name).map(|(_, _, v)| *v);
        assert_eq!(get("x_p50_ms_y"), Some(50.0));
        assert_eq!(get("x_p99_ms_y"), Some(99.0));
        assert_eq!(get("x_max_ms_y"), Some(100.0));
        assert!(latency_figures(&mut [], 0, "", "").is_empty());
    }
}
