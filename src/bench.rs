//! `herald bench`: the workloads of `shared/bench-spec.md` against the real
//! Postgres and Redis of the configuration, each run on a fresh database that
//! the bench creates and drops. It measures and reports; it must never be
//! called from the test suite with a time assertion.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::outbox::{Event, Outbox};
use crate::pubsub::{Delivery, Subscriber};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workloads: O1, O2, O3, or all.
    #[arg(required = true)]
    pub workloads: Vec<String>,
    /// Runs per workload; the median is reported with min–max.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also run O2 with 1,000,000 events.
    #[arg(long)]
    pub large: bool,
    /// Write the results as markdown to this file (e.g. docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
}

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

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut wanted: Vec<String> = Vec::new();
    for w in &args.workloads {
        match w.to_ascii_uppercase().as_str() {
            "ALL" => wanted.extend(["O1", "O2", "O3"].map(String::from)),
            "O1" | "O2" | "O3" => wanted.push(w.to_ascii_uppercase()),
            other => bail!(
                "unknown workload {other:?}: this build implements O1, O2, O3 (or all); \
                 see shared/bench-spec.md"
            ),
        }
    }
    wanted.dedup();
    let mut figures: Vec<Figure> = Vec::new();
    for workload in &wanted {
        let mut per_metric: Vec<Figure> = Vec::new();
        for run in 0..args.runs {
            eprintln!("bench {workload}: run {}/{}", run + 1, args.runs);
            let db = BenchDb::create(config, workload, run).await?;
            let result = match workload.as_str() {
                "O1" => o1(&db.config).await,
                "O2" => o2(&db.config, args.large).await,
                "O3" => o3(&db.config).await,
                _ => unreachable!("workloads were checked above"),
            };
            db.drop_db().await?;
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
        line.insert("runs".into(), json!(args.runs));
        for f in &per_metric {
            line.insert(f.metric.clone(), json!(round2(f.median())));
        }
        println!("{}", serde_json::Value::Object(line));
        figures.extend(per_metric);
    }
    let table = table(&figures);
    println!("{table}");
    if let Some(path) = &args.write {
        let doc = markdown(config, &args, &table).await;
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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

async fn markdown(config: &Config, args: &BenchArgs, table: &str) -> String {
    let machine = machine_description(config).await;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    format!(
        "# Benchmarks\n\n\
         Figures from `herald bench`, following `shared/bench-spec.md`: each run on a fresh, \
         migrated database; medians of {runs} runs with min–max. Latencies are receive (or \
         start) time minus the time the producer's COMMIT returned, on one machine.\n\n\
         - Command: `{command}`\n\
         - Date: {date}\n\
         - Machine: {machine}\n\
         - Herald: {version} (release build)\n\n\
         {table}\n",
        runs = args.runs,
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        version = env!("CARGO_PKG_VERSION"),
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
    let pg = match crate::db::connect(config, "herald-bench").await {
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
            workload.to_ascii_lowercase(),
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
        crate::migrate::migrate(&config).await?;
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
    Ok(crate::db::connect(&config, "herald-bench").await?)
}

/// A `herald relay` child process against the bench database.
struct RelayProcess(tokio::process::Child);

impl RelayProcess {
    fn spawn(config: &Config) -> anyhow::Result<RelayProcess> {
        let exe = std::env::current_exe().context("locating the herald binary")?;
        let child = tokio::process::Command::new(exe)
            .arg("relay")
            .env("DATABASE_URL", &config.database_url)
            .env("REDIS_URL", &config.redis_url)
            .env("HERALD_CHANNEL_PREFIX", &config.channel_prefix)
            .env("HERALD_MIGRATE_ON_START", "false")
            .env("RUST_LOG", "warn")
            .env_remove("HERALD_CONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting `herald relay`")?;
        Ok(RelayProcess(child))
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
/// (sequence number, receive instant) for each event, or a count.
async fn subscribe_all(config: &Config) -> anyhow::Result<mpsc::UnboundedReceiver<(i64, Instant)>> {
    let mut sub = Subscriber::from_config(config)?.pattern("*");
    sub.connect().await?;
    let (tx, rx) = mpsc::unbounded_channel();
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
                Ok(Delivery::Gap(gap)) => eprintln!("bench subscriber gap: {}", gap.reason),
                Ok(Delivery::Undecodable { error, .. }) => eprintln!("bench: undecodable: {error}"),
                Err(e) => {
                    eprintln!("bench subscriber failed: {e}");
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// O1: 10,000 one-event transactions through the Rust API, then through SQL.
async fn o1(config: &Config) -> anyhow::Result<RunResult> {
    const N: usize = 10_000;
    let mut client = crate::db::connect(config, "herald-bench").await?;
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
        let client = crate::db::connect(config, "herald-bench").await?;
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
        client.batch_execute("VACUUM ANALYZE herald.outbox").await?;
        let mut rx = subscribe_all(config).await?;
        let started = Instant::now();
        let relay = RelayProcess::spawn(config)?;
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
async fn o3(config: &Config) -> anyhow::Result<RunResult> {
    let mut rx = subscribe_all(config).await?;
    let relay = RelayProcess::spawn(config)?;
    // Let the relay connect and park on LISTEN.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = crate::db::connect(config, "herald-bench").await?;
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
        let mut negative = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while latencies.len() < count as usize && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some((s, at))) if s >= first && s < seq => {
                    if let Some(c) = committed.get(&s) {
                        let ms = if at >= *c {
                            (at - *c).as_secs_f64() * 1000.0
                        } else {
                            negative += 1;
                            -((*c - at).as_secs_f64() * 1000.0)
                        };
                        latencies.push(ms);
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
        latencies.sort_by(f64::total_cmp);
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)];
        out.push((format!("p50_ms_at_{label}"), "ms", pct(0.50)));
        out.push((format!("p95_ms_at_{label}"), "ms", pct(0.95)));
        out.push((format!("p99_ms_at_{label}"), "ms", pct(0.99)));
        out.push((
            format!("max_ms_at_{label}"),
            "ms",
            *latencies.last().unwrap_or(&0.0),
        ));
        out.push((
            format!("negative_samples_at_{label}"),
            "count",
            negative as f64,
        ));
    }
    relay.stop().await;
    Ok(out)
}
