//! Test harness: every test gets its own database (cloned from a migrated
//! template and dropped here) and its own Redis channel prefix, so tests run in parallel
//! against the real Postgres and Redis without seeing each other.
#![allow(dead_code)]

pub mod admin_server;
pub mod pg_server;
pub mod pgbouncer;
pub mod proxy;
pub mod redis_cluster;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use herald::{Config, Delivery, Envelope, Relay, Subscriber};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Admin URL of the Postgres server the tests create databases on.
pub fn admin_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

static TRACING: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();

/// The process's one tracing subscriber and metrics recorder, shared by
/// every test of the binary (both are process-wide and can be installed
/// once): log lines as `herald` prints them (`RUST_LOG`, default info),
/// captured per test where the test's thread logs, and every `info` span
/// recorded in memory for the span assertions of `telemetry`. Every test
/// calls this (through `TestDb`) before anything logs, so no other
/// subscriber gets there first.
pub fn init_tracing() {
    span_exporter();
}

/// The in-memory exporter of [`init_tracing`]'s subscriber. It holds the
/// spans of all tests: look spans up by an attribute of your own test.
pub fn span_exporter() -> InMemorySpanExporter {
    TRACING
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let logs_filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,refinery_core=warn"));
            let logs = tracing_subscriber::fmt::layer()
                .compact()
                .with_target(false)
                .with_test_writer()
                .with_filter(logs_filter);
            let spans = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("herald-test"))
                .with_filter(tracing_subscriber::EnvFilter::new("info"));
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(logs).with(spans),
            )
            .expect("the tests' subscriber is the first");
            herald::telemetry::init_metrics().expect("the metrics recorder");
            (provider, exporter)
        })
        .1
        .clone()
}

pub struct TestDb {
    pub config: Config,
    pub name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::with(|_| {}).await
    }

    /// A fresh, migrated database; `tweak` adjusts the configuration first.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestDb {
        init_tracing();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!(
            "herald_test_{}_{}_{}",
            std::process::id(),
            n,
            uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
        );
        let template = template_database();
        let admin = admin_client().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .expect("creating the test database");
        let mut url = url::Url::parse(&admin_url()).expect("HERALD_TEST_DATABASE_URL");
        url.set_path(&format!("/{name}"));
        let mut config = Config {
            database_url: url.to_string(),
            redis_url: redis_url(),
            channel_prefix: format!("herald:{name}:"),
            ..Config::default()
        };
        config.relay.poll_interval = Duration::from_secs(5);
        tweak(&mut config);
        // The clone has every migration already: this writes the test's
        // settings (partitions, payload limit) as `herald migrate` would.
        herald::migrate::migrate(&config)
            .await
            .expect("migrating the test database");
        TestDb { config, name }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        herald::db::connect(&self.config, "herald-test")
            .await
            .expect("connecting")
    }

    pub fn pool(&self) -> deadpool_postgres::Pool {
        herald::db::pool(&self.config, "herald-test").expect("pool")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect(sql)
            .get(0)
    }

    /// Start an in-process relay.
    pub fn relay(&self) -> RelayTask {
        RelayTask::start(&self.config)
    }

    /// A subscriber on every topic of this test's prefix, collecting envelopes.
    pub async fn collector(&self) -> Collector {
        let sub = Subscriber::from_config(&self.config).unwrap().pattern("*");
        Collector::start(&self.config, sub).await
    }
}

/// The repository's root (sql/, docs/), wherever the test's package sits:
/// this crate's directory, or its parent when the suite is built from a
/// workspace member.
pub fn repo_root() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if dir.join("sql").is_dir() {
        return dir;
    }
    dir.parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(dir)
}

static TEMPLATE: OnceLock<String> = OnceLock::new();

/// Advisory lock (on the admin database) held while a template is built, so
/// that test processes started together build it once.
const TEMPLATE_LOCK: i64 = 0x6865_7261_6c64_7470;

/// The migrated database every `TestDb` is cloned from: one per content of
/// sql/, named after its hash, built once on the server and reused by every
/// later run until a migration changes. Built under a new name and renamed
/// when complete, so one that exists is whole.
fn template_database() -> String {
    TEMPLATE
        .get_or_init(|| {
            // Tests run on different runtimes: build on a runtime of its own.
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(build_template())
            })
            .join()
            .expect("building the template database")
        })
        .clone()
}

async fn build_template() -> String {
    let name = format!("herald_tpl_{:016x}", sql_hash());
    let admin = admin_client().await;
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("taking the template lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("looking for the template database")
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin.batch_execute(&sql).await.expect(&sql);
        }
        let mut url = url::Url::parse(&admin_url()).expect("HERALD_TEST_DATABASE_URL");
        url.set_path(&format!("/{building}"));
        let config = Config {
            database_url: url.to_string(),
            ..Config::default()
        };
        herald::migrate::migrate(&config)
            .await
            .expect("migrating the template database");
        // The migration's session may still be closing: end it, so that the
        // rename (which needs the database to itself) goes through.
        for sql in [
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{building}'"
            ),
            format!("ALTER DATABASE {building} RENAME TO {name}"),
            format!("ALTER DATABASE {name} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"),
        ] {
            admin.batch_execute(&sql).await.expect(&sql);
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("releasing the template lock");
    name
}

/// FNV-1a over sql/'s file names and contents, in name order: a stable name
/// for the schema they build.
fn sql_hash() -> u64 {
    let dir = repo_root().join("sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("an entry of sql/").path())
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for path in files {
        let name = path
            .file_name()
            .unwrap_or_default()
            .as_encoded_bytes()
            .to_vec();
        let text =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for byte in name.iter().chain(&text) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .expect(
            "connecting to HERALD_TEST_DATABASE_URL (is Postgres running? `make test` starts it)",
        );
    tokio::spawn(conn);
    client
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async: use a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub struct RelayTask {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<herald::Result<()>>,
    pub stats: std::sync::Arc<herald::relay::RelayStats>,
}

impl RelayTask {
    pub fn start(config: &Config) -> RelayTask {
        let pool = herald::db::pool(config, "herald-relay").unwrap();
        let redis = herald::RedisPool::from_config(config).unwrap();
        let relay = Relay::new(config, pool, redis);
        let stats = relay.stats();
        let token = CancellationToken::new();
        let handle = tokio::spawn(relay.run(token.clone()));
        RelayTask {
            token,
            handle,
            stats,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("relay stops within 15 s")
            .expect("relay task")
            .expect("relay ends without error");
    }
}

/// An in-process `Worker` on its own pool, stopped through its token.
pub struct WorkerTask {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<herald::Result<()>>,
    pub stats: std::sync::Arc<herald::worker::WorkerStats>,
    pub id: String,
}

impl WorkerTask {
    pub fn start(config: &Config, registry: herald::Registry) -> WorkerTask {
        let pool = herald::db::pool(config, "herald-worker").expect("worker pool");
        let worker = herald::Worker::new(config, pool, registry);
        let stats = worker.stats();
        let id = worker.id().to_string();
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run(token.clone()));
        WorkerTask {
            token,
            handle,
            stats,
            id,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle)
            .await
            .expect("worker stops within 15 s")
            .expect("worker task")
            .expect("worker ends without error");
    }

    /// Stop without waiting for handlers that may never end.
    pub fn abort(self) {
        self.token.cancel();
        self.handle.abort();
    }
}

/// A `herald` child process (relay or worker) against a test database.
pub struct HeraldProcess {
    pub child: tokio::process::Child,
}

/// The relay is the usual child; see [`HeraldProcess::spawn`] for others.
pub type RelayProcess = HeraldProcess;

impl HeraldProcess {
    /// `herald relay` with `extra_env`.
    pub fn spawn(config: &Config, extra_env: &[(&str, &str)]) -> HeraldProcess {
        HeraldProcess::command(config, &["relay"], extra_env)
    }

    /// `herald <args…>` with the test database, Redis and prefix, and a
    /// small pool so that many processes fit in Postgres's connection limit.
    pub fn command(config: &Config, args: &[&str], extra_env: &[(&str, &str)]) -> HeraldProcess {
        let mut cmd = herald_command(config, args, &[]);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        HeraldProcess {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawning herald {}: {e}", args.join(" "))),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.pid() as i32, signal);
        }
    }

    pub async fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait; returns the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the process exits within 15 s of SIGTERM")
            .expect("waiting for the process")
    }
}

/// Collects what a Subscriber receives, on its own task.
pub struct Collector {
    rx: mpsc::UnboundedReceiver<Delivery>,
    pub events: Vec<Envelope>,
    pub gaps: usize,
}

impl Collector {
    pub async fn start(_config: &Config, subscriber: Subscriber) -> Collector {
        let mut sub = subscriber;
        sub.connect().await.expect("subscribing on Redis");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(d) = sub.next().await {
                if tx.send(d).is_err() {
                    return;
                }
            }
        });
        Collector {
            rx,
            events: Vec::new(),
            gaps: 0,
        }
    }

    /// Receive until `pred(self)` holds or `timeout` passes; returns whether it held.
    pub async fn until(&mut self, timeout: Duration, pred: impl Fn(&Collector) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Delivery::Event { envelope, .. })) => self.events.push(envelope),
                Ok(Some(Delivery::Gap(_))) => self.gaps += 1,
                Ok(Some(Delivery::Undecodable { channel, error })) => {
                    panic!("undecodable message on {channel}: {error}")
                }
                Ok(None) | Err(_) => return pred(self),
            }
        }
        true
    }

    /// Receive until `n` distinct event ids have arrived.
    pub async fn distinct(&mut self, n: usize, timeout: Duration) -> bool {
        self.until(timeout, |c| c.distinct_ids() >= n).await
    }

    pub fn distinct_ids(&self) -> usize {
        self.events
            .iter()
            .map(|e| e.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Keep receiving for `quiet` and return how many more events came.
    pub async fn drain_for(&mut self, quiet: Duration) -> usize {
        let before = self.events.len();
        self.until(quiet, |_| false).await;
        self.events.len() - before
    }

    /// Sequence numbers (`payload.seq`) per key, in arrival order.
    pub fn seqs_by_key(&self) -> HashMap<String, Vec<i64>> {
        let mut map: HashMap<String, Vec<i64>> = HashMap::new();
        for e in &self.events {
            map.entry(e.key.clone().unwrap_or_default())
                .or_default()
                .push(e.payload["seq"].as_i64().expect("seq"));
        }
        map
    }
}

/// Insert `n` events per key, in batches, `seq` counting up per key.
pub async fn insert_events(config: &Config, keys: usize, per_key: usize) {
    let client = herald::db::connect(config, "herald-test").await.unwrap();
    let mut batch = Vec::new();
    for seq in 0..per_key {
        for k in 0..keys {
            batch.push(
                herald::Event::new("test.order", &serde_json::json!({"seq": seq}))
                    .unwrap()
                    .key(format!("key-{k}")),
            );
            if batch.len() == 500 {
                herald::publish_batch(&client, &batch).await.unwrap();
                batch.clear();
            }
        }
    }
    herald::publish_batch(&client, &batch).await.unwrap();
}

/// Every key's sequence must be non-decreasing when duplicates are allowed
/// (a redelivered batch repeats a run of numbers) and must cover 0..per_key.
pub fn assert_per_key_order(collector: &Collector, keys: usize, per_key: usize) {
    let by_key = collector.seqs_by_key();
    assert_eq!(by_key.len(), keys, "every key arrived");
    for (key, seqs) in by_key {
        // Redelivery after a crash restarts at the first unacknowledged
        // event, so dedup consecutive replays before checking order.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<i64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
        let expected: Vec<i64> = (0..per_key as i64).collect();
        assert_eq!(
            firsts, expected,
            "first deliveries of {key} are in insertion order"
        );
    }
}

/// A private redis-server on a free port, for tests that stop Redis.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)start on the same port and wait until it answers.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// (Re)start with extra `redis-server` arguments (config directives).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(extra)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (the tests that restart Redis run their own)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `herald <args…>` against the test database, Redis and prefix, with a
/// small pool (so that many processes fit in Postgres's connection limit),
/// `RUST_LOG=warn`, no stdin, killed when dropped, then `env` on top.
pub fn herald_command(
    config: &Config,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args)
        .env("DATABASE_URL", &config.database_url)
        .env("REDIS_URL", &config.redis_url)
        .env("HERALD_CHANNEL_PREFIX", &config.channel_prefix)
        .env("HERALD_PARTITIONS", config.partitions.to_string())
        .env("HERALD_MIGRATE_ON_START", "false")
        .env("HERALD_POSTGRES_POOL_SIZE", "4")
        .env("RUST_LOG", "warn")
        .env_remove("HERALD_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A file of the calling test's own (a fresh directory under the temporary
/// directory) holding `text`.
pub fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "herald-test-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a temporary file");
    path
}

/// Run `herald <args…>` against the test database to its end, capturing
/// stdout and stderr (same environment as [`HeraldProcess::command`]).
pub async fn herald_output(config: &Config, args: &[&str]) -> std::process::Output {
    herald_command(config, args, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running herald {}: {e}", args.join(" ")))
}

/// The single bigint `sql` returns.
pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Poll `sql` (one bigint) until it equals `want`; fail after 20 s naming `what`.
pub async fn wait_for_count(client: &tokio_postgres::Client, sql: &str, want: i64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = scalar(client, sql).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {sql} is {n}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a finished `herald` run printed, and whether it succeeded.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `herald <args…>` run to its end (see [`herald_output`]).
pub async fn herald_run(config: &Config, args: &[&str]) -> Run {
    Run::from(herald_output(config, args).await)
}

/// `herald <args…>` that must succeed; its stdout.
pub async fn herald_ok(config: &Config, args: &[&str]) -> String {
    let run = herald_run(config, args).await;
    assert!(
        run.ok,
        "herald {} failed: {}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run.stdout
}

/// `herald <args…>` that must fail; its stderr.
pub async fn herald_fails(config: &Config, args: &[&str]) -> String {
    let run = herald_run(config, args).await;
    assert!(
        !run.ok,
        "herald {} should have failed: {}",
        args.join(" "),
        run.stdout
    );
    run.stderr
}

/// Poll `check` until it holds; fail the test after `timeout`, naming `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Poll `cond` until it holds or `within` passes; whether it held.
pub async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}

/// A configuration on `redis_url` alone (no database) with a channel prefix,
/// hence a cache namespace, of the calling test's own and a short connect
/// timeout.
pub fn config_on(redis_url: &str, response_timeout: Duration) -> Config {
    init_tracing();
    let mut config = Config {
        redis_url: redis_url.to_string(),
        channel_prefix: format!("herald:redistest:{}:", uuid::Uuid::now_v7().simple()),
        ..Config::default()
    };
    config.redis.connect_timeout = Duration::from_millis(500);
    config.redis.response_timeout = response_timeout;
    config
}

/// A multiplexed connection to the Redis at `url`.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to Redis")
}

/// PUBLISH one message; how many subscribers received it.
pub async fn redis_publish(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    msg: &str,
) -> i64 {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(msg)
        .query_async(conn)
        .await
        .expect("PUBLISH")
}
