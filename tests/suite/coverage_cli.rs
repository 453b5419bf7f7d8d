//! The `herald` command line at its edges, run as the binary: `migrate`,
//! `enqueue`, `publish`, `config`, `tail`, the services' start-up failures
//! and `tasks`/`dlq`/`stats` on what real workers and relays left behind.
//! Each test checks what is printed, what is stored and what is refused
//! (with its message), and that a secret in a URL never reaches the output.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{
    herald_fails as fails, herald_ok as ok, herald_output, redis_publish, scalar, wait_for_count,
    RedisServer, Run, TestDb,
};
use herald::events::EventType;
use herald::{Config, Event, Registry, Task, TaskContext, Worker};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// `herald <args…>` as [`herald_output`] runs it, plus `env`, with its
/// output piped.
fn command(config: &Config, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = common::herald_command(config, args, env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Run to its end with `env` (bounded: a start-up failure must not hang).
async fn run_env(config: &Config, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(30), command(config, args, env).output())
        .await
        .unwrap_or_else(|_| panic!("herald {} did not end within 30 s", args.join(" ")))
        .unwrap_or_else(|e| panic!("running herald {}: {e}", args.join(" ")));
    Run::from(out)
}

fn spawn(config: &Config, args: &[&str], env: &[(&str, &str)]) -> Child {
    command(config, args, env)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning herald {}: {e}", args.join(" ")))
}

/// SIGTERM and wait; the exit status.
async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().expect("the process is running");
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the process exits within 15 s of SIGTERM")
        .expect("waiting for the process")
}

/// The lines a child writes to one pipe, read on a task of their own so
/// that the child never blocks on a full pipe.
struct Lines {
    rx: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn read(pipe: impl AsyncRead + Unpin + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Receive until `pred` holds over every line so far; fail naming `what`.
    async fn until(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pred(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) | Err(_) => panic!(
                    "{what}: not seen within 20 s; the lines were:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The first line containing `needle`, waiting for it.
    async fn line(&mut self, needle: &str) -> String {
        self.until(&format!("a line with {needle:?}"), |lines| {
            lines.iter().any(|l| l.contains(needle))
        })
        .await;
        self.seen
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
            .expect("found above")
    }
}

/// A configuration whose database no command may reach.
fn config_without_database() -> Config {
    Config {
        database_url: format!("postgres://nobody@127.0.0.1:{}/none", common::free_port()),
        ..Config::default()
    }
}

fn fast(c: &mut Config) {
    c.worker.queues = vec!["default".into()];
    c.worker.retry_base = Duration::from_millis(10);
    c.worker.shutdown_grace = Duration::from_secs(2);
    c.postgres.pool_size = 3;
}

/// A Herald envelope as a relay would put it on Redis.
fn envelope(topic: &str, payload: Value) -> String {
    json!({
        "id": uuid::Uuid::now_v7(),
        "topic": topic,
        "key": null,
        "payload": payload,
        "headers": {},
        "created_at": "2026-01-01T00:00:00Z",
    })
    .to_string()
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("the test's Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connecting to Redis")
}

/// PUBLISH `msg` until a subscriber receives it (so it arrives exactly
/// once): the way to know that `herald tail` has subscribed.
async fn publish_once_subscribed(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    msg: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_publish(conn, channel, msg).await == 0 {
        assert!(
            Instant::now() < deadline,
            "nobody subscribed to {channel} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run in-process workers with `registry` until `sql` counts `n`.
async fn work_until(db: &TestDb, registry: Registry, sql: &str, n: i64, what: &str) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(Worker::new(&db.config, db.pool(), registry).run(token.clone()));
    wait_for_count(&db.client().await, sql, n, what).await;
    token.cancel();
    handle
        .await
        .expect("worker task")
        .expect("worker ends cleanly");
}

// ---------------------------------------------------------------- migrate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_lists_what_it_applied_then_says_the_schema_is_current() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("DROP SCHEMA herald CASCADE")
        .await
        .expect("emptying the database");
    // Every migration in sql/, in version order.
    let mut migrations: Vec<(i32, String)> =
        std::fs::read_dir(crate::common::repo_root().join("sql"))
            .expect("sql/")
            .map(|e| {
                let name = e.expect("a directory entry").file_name();
                let name = name.to_string_lossy();
                let stem = name.strip_suffix(".sql").expect("a .sql file").to_string();
                let version = stem[1..stem.find("__").expect("V<n>__name")]
                    .parse()
                    .expect("a version number");
                (version, stem)
            })
            .collect();
    migrations.sort();

    let out = ok(&db.config, &["migrate"]).await;
    let want: Vec<String> = migrations
        .iter()
        .map(|(_, name)| format!("applied {name}"))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "{out}");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.schema_history").await,
        migrations.len() as i64
    );
    // The schema works again.
    herald::publish(&client, &Event::new("order.placed", &json!({})).unwrap())
        .await
        .expect("publishing after migrating");

    let out = ok(&db.config, &["migrate"]).await;
    let latest = migrations.last().expect("migrations").0;
    assert_eq!(out, format!("schema is current (version {latest})\n"));
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.schema_history").await,
        migrations.len() as i64,
        "nothing applied twice"
    );
}

// ----------------------------------------------------------------- worker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_a_bad_concurrency_or_queue_before_connecting() {
    let cfg = config_without_database();
    let err = fails(&cfg, &["worker", "--concurrency", "0"]).await;
    assert!(err.contains("--concurrency must be at least 1"), "{err}");
    let err = fails(&cfg, &["worker", "--queues", "default,mail=0"]).await;
    assert!(
        err.contains(
            "worker.queues: \"mail=0\": the concurrency after '=' must be a whole number of at least 1"
        ),
        "{err}"
    );
    let err = fails(&cfg, &["worker", "--queues", "default,bad name"]).await;
    assert!(
        err.contains("worker.queues") && err.contains("queue \"bad name\""),
        "{err}"
    );
    // Refused before any connection was tried.
    assert!(!err.contains("connecting"), "{err}");
}

// ---------------------------------------------------------------- enqueue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_stores_every_option_and_a_held_unique_key_returns_the_holder() {
    let db = TestDb::new().await;
    let cfg = &db.config;
    let client = db.client().await;
    let out = ok(
        cfg,
        &[
            "enqueue",
            "report.build",
            r#"{"n": 1}"#,
            "--queue",
            "reports",
            "--delay",
            "1h",
            "--priority",
            "3",
            "--max-attempts",
            "2",
            "--unique-key",
            "report:1",
            "--timeout",
            "30s",
        ],
    )
    .await;
    let id: i64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no id in {out:?}"));
    let row = client
        .query_one(
            "SELECT queue, kind, payload::text, priority, max_attempts, unique_key,
                    extract(epoch FROM timeout)::float8,
                    extract(epoch FROM run_at - now())::float8, state
             FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .expect("the enqueued task");
    assert_eq!(row.get::<_, String>(0), "reports");
    assert_eq!(row.get::<_, String>(1), "report.build");
    let payload: Value = serde_json::from_str(&row.get::<_, String>(2)).unwrap();
    assert_eq!(payload, json!({"n": 1}));
    assert_eq!(row.get::<_, i32>(3), 3);
    assert_eq!(row.get::<_, i32>(4), 2);
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("report:1"));
    assert_eq!(row.get::<_, Option<f64>>(6), Some(30.0));
    let due_in = row.get::<_, f64>(7);
    assert!((3500.0..=3600.0).contains(&due_in), "due in {due_in} s");
    assert_eq!(row.get::<_, String>(8), "ready");

    // The key is held: the holder's id, and no second task.
    let again = ok(
        cfg,
        &["enqueue", "report.build", "{}", "--unique-key", "report:1"],
    )
    .await;
    assert_eq!(again.trim(), id.to_string());
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.tasks").await,
        1
    );

    // Refused: nothing stored.
    let err = fails(cfg, &["enqueue", "report.build", "{}", "--delay", "-5s"]).await;
    assert!(err.contains("\"-5s\" is negative"), "{err}");
    let err = fails(cfg, &["enqueue", "report.build", "{not json"]).await;
    assert!(
        err.contains("payload of task kind \"report.build\""),
        "{err}"
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.tasks").await,
        1
    );
}

// ---------------------------------------------------------------- publish

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_a_nameless_header_and_sends_fire_and_forget_topics_straight_to_redis() {
    let db = TestDb::new().await;
    let cfg = &db.config;
    let client = db.client().await;
    let err = fails(cfg, &["publish", "order.placed", "{}", "--header", "=v"]).await;
    assert!(err.contains("--header \"=v\": the name is empty"), "{err}");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.outbox").await,
        0
    );

    let file = common::temp_file(
        "herald.toml",
        "[[events]]\nname = \"presence.ping\"\ndelivery = \"fire_and_forget\"\n",
    );
    let mut collector = db.collector().await;
    let out = ok(
        cfg,
        &[
            "--config",
            file.to_str().unwrap(),
            "publish",
            "presence.ping",
            r#"{"user": "ann"}"#,
            "--key",
            "ann",
            "--header",
            "source=cli",
        ],
    )
    .await;
    let id: uuid::Uuid = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no event id in {out:?}"));
    assert!(
        collector
            .until(Duration::from_secs(10), |c| !c.events.is_empty())
            .await,
        "the fire-and-forget event reached Redis"
    );
    let e = &collector.events[0];
    assert_eq!(e.id, id);
    assert_eq!(e.topic, "presence.ping");
    assert_eq!(e.key.as_deref(), Some("ann"));
    assert_eq!(e.payload, json!({"user": "ann"}));
    assert_eq!(e.header("source"), Some("cli"));
    // Straight to Redis: the outbox never held it.
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.outbox").await,
        0
    );
}

// ----------------------------------------------------------------- config

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_prints_the_effective_settings_with_every_secret_masked() {
    let cfg = Config {
        database_url: "postgres://app:pg-s3cret@127.0.0.1:1/app".into(),
        redis_url: "redis://:r3dis-s3cret@127.0.0.1:1".into(),
        partitions: 32,
        ..Config::default()
    };
    let file = common::temp_file(
        "herald.toml",
        r#"
[relay]
batch_size = 77

[[subscriptions]]
name = "billing"
pattern = "payment.*"
webhook = "https://hooks.example/in?sig=h00k-s3cret&v=1"
secret = "hm4c-s3cret"
"#,
    );
    let run = run_env(
        &cfg,
        &["--config", file.to_str().unwrap(), "config"],
        &[("HERALD_ADMIN_TOKEN", "adm1n-s3cret")],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    let shown = run.stdout;
    for secret in [
        "pg-s3cret",
        "r3dis-s3cret",
        "h00k-s3cret",
        "hm4c-s3cret",
        "adm1n-s3cret",
    ] {
        assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
    }
    assert!(
        shown.contains("postgres://app:****@127.0.0.1:1/app")
            && shown.contains("redis://:****@127.0.0.1:1")
            && shown.contains("https://hooks.example/in?sig=****&v=1"),
        "{shown}"
    );
    // What it prints is a configuration file: file and environment merged.
    let back: Config = toml::from_str(&shown).expect("the printed configuration parses");
    assert_eq!(back.partitions, 32, "from the environment");
    assert_eq!(back.relay.batch_size, 77, "from the file");
    assert_eq!(back.admin.token.as_deref(), Some("****"));
    assert_eq!(back.subscriptions.len(), 1);
    assert_eq!(back.subscriptions[0].name, "billing");
    assert_eq!(back.subscriptions[0].secret.as_deref(), Some("****"));
}

// ------------------------------------------------------ starting services

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_the_start_naming_it_masked() {
    let port = common::free_port();
    let cfg = Config {
        database_url: format!("postgres://herald:pg-s3cret@127.0.0.1:{port}/herald"),
        ..Config::default()
    };
    // Migrating at start: the error says how to turn that off.
    let run = run_env(&cfg, &["relay"], &[("HERALD_MIGRATE_ON_START", "true")]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains(
            "migrating the database at start (disable with HERALD_MIGRATE_ON_START=false)"
        ),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("pg-s3cret"), "{}", run.stderr);

    // Not migrating: the first connection fails, naming the URL masked.
    let run = run_env(&cfg, &["relay"], &[]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains(&format!(
            "connecting to postgres://herald:****@127.0.0.1:{port}/herald"
        )),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("pg-s3cret"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_starts_while_redis_is_down_and_delivers_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.stop();
    let port = redis.port;
    let url = format!("redis://:r3dis-s3cret@127.0.0.1:{port}");
    let db = TestDb::with(|c| c.redis_url = url.clone()).await;
    let client = db.client().await;
    let mut relay = spawn(
        &db.config,
        &["relay"],
        &[
            ("HERALD_RELAY_BACKOFF_MIN", "50ms"),
            ("HERALD_RELAY_BACKOFF_MAX", "300ms"),
        ],
    );
    let mut stderr = Lines::read(relay.stderr.take().unwrap());
    let warning = stderr
        .line("Redis does not answer yet; the relay keeps events in the outbox and retries")
        .await;
    assert!(
        warning.contains(&format!("redis://:****@127.0.0.1:{port}")),
        "{warning}"
    );

    let id = herald::publish(
        &client,
        &Event::new("order.placed", &json!({"n": 1})).unwrap(),
    )
    .await
    .unwrap();
    // Tried, failed, kept (not an attempt: the outage is Redis's).
    wait_for_count(
        &client,
        "SELECT count(*) FROM herald.outbox WHERE last_error IS NOT NULL AND attempts = 0",
        1,
        "the relay tries and keeps the event",
    )
    .await;
    let last_error: String = client
        .query_one("SELECT last_error FROM herald.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!last_error.contains("r3dis-s3cret"), "{last_error}");

    redis.restart_with(&["--requirepass", "r3dis-s3cret"]);
    wait_for_count(
        &client,
        "SELECT count(*) FROM herald.outbox",
        0,
        "the relay publishes the kept event once Redis is back",
    )
    .await;
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
    // And it carries on: an event published now reaches a subscriber.
    let mut collector = db.collector().await;
    let id2 = herald::publish(
        &client,
        &Event::new("order.placed", &json!({"n": 2})).unwrap(),
    )
    .await
    .unwrap();
    assert!(
        collector
            .until(Duration::from_secs(20), |c| c
                .events
                .iter()
                .any(|e| e.id == id2))
            .await,
        "the second event arrives"
    );
    assert!(collector.events.iter().all(|e| e.id == id || e.id == id2));
    let status = terminate(&mut relay).await;
    assert!(status.success(), "{status:?}");
    assert!(
        stderr.seen.iter().all(|l| !l.contains("r3dis-s3cret")),
        "{}",
        stderr.seen.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_failing_stops_the_others_and_the_process_with_its_error() {
    let db = TestDb::new().await;
    // The admin address is taken: the admin server fails once started.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let child = spawn(
        &db.config,
        &["relay", "--admin"],
        &[("HERALD_ADMIN_BIND", addr.as_str())],
    );
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the process ends by itself")
        .expect("waiting for herald");
    let run = Run::from(out);
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains(&format!("herald: error: admin server: binding {addr}")),
        "{}",
        run.stderr
    );
    // The relay beside it stopped too, and the node deregistered.
    assert_eq!(
        scalar(&db.client().await, "SELECT count(*) FROM herald.nodes").await,
        0
    );
}

// ------------------------------------------------------------------- tail

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_each_envelope_as_a_json_line_and_reports_what_it_cannot_read() {
    let db = TestDb::new().await;
    let cfg = &db.config;
    let mut tail = spawn(cfg, &["tail", "order.*"], &[]);
    let mut stdout = Lines::read(tail.stdout.take().unwrap());
    let mut stderr = Lines::read(tail.stderr.take().unwrap());
    let mut conn = redis_conn(&cfg.redis_url).await;

    // Not an envelope: named on stderr, nothing on stdout.
    let garbage = format!("{}order.garbage", cfg.channel_prefix);
    publish_once_subscribed(&mut conn, &garbage, "not json").await;
    let line = stderr.line("not a Herald envelope").await;
    assert!(
        line.starts_with(&format!(
            "herald tail: not a Herald envelope on {garbage}: "
        )),
        "{line}"
    );

    // A topic outside the pattern is not even subscribed.
    let other = format!("{}invoice.sent", cfg.channel_prefix);
    assert_eq!(
        redis_publish(&mut conn, &other, &envelope("invoice.sent", json!({}))).await,
        0
    );

    // An event through the outbox and a relay: one JSON line.
    let relay = db.relay();
    let out = ok(
        cfg,
        &["publish", "order.placed", r#"{"n": 1}"#, "--key", "k1"],
    )
    .await;
    let id = out.trim().to_string();
    let line = stdout.line(&id).await;
    let printed: Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(printed["id"], id.as_str());
    assert_eq!(printed["topic"], "order.placed");
    assert_eq!(printed["key"], "k1");
    assert_eq!(printed["payload"], json!({"n": 1}));
    relay.stop().await;

    let status = terminate(&mut tail).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout.seen.len(), 1, "{:?}", stdout.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reports_a_lost_connection_as_a_gap_and_subscribes_again() {
    let server = RedisServer::start();
    let db = TestDb::with(|c| c.redis_url = server.url()).await;
    let cfg = &db.config;
    let mut tail = spawn(cfg, &["tail", "*"], &[]);
    let mut stdout = Lines::read(tail.stdout.take().unwrap());
    let mut stderr = Lines::read(tail.stderr.take().unwrap());
    let mut conn = redis_conn(&server.url()).await;
    let channel = format!("{}order.placed", cfg.channel_prefix);
    publish_once_subscribed(
        &mut conn,
        &channel,
        &envelope("order.placed", json!({"n": 1})),
    )
    .await;
    stdout.line(r#""n":1"#).await;

    // Redis drops the subscriber's connection.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let gap = stderr.line("herald tail: disconnected from Redis").await;
    assert!(gap.ends_with("events published then were missed"), "{gap}");
    // Subscribed again: later events print.
    publish_once_subscribed(
        &mut conn,
        &channel,
        &envelope("order.placed", json!({"n": 2})),
    )
    .await;
    stdout.line(r#""n":2"#).await;
    let status = terminate(&mut tail).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_counts_every_message_it_drops_when_its_output_falls_behind() {
    let db = TestDb::new().await;
    let cfg = &db.config;
    let mut tail = spawn(
        cfg,
        &["tail", "bulk.*"],
        &[("HERALD_REDIS_SUBSCRIBER_BUFFER", "1")],
    );
    // stdout is not read yet: tail blocks writing once the pipe is full.
    let stdout_pipe = tail.stdout.take().unwrap();
    let mut stderr = Lines::read(tail.stderr.take().unwrap());
    let mut conn = redis_conn(&cfg.redis_url).await;
    let channel = format!("{}bulk.item", cfg.channel_prefix);
    publish_once_subscribed(&mut conn, &channel, "probe").await;
    stderr.line("not a Herald envelope").await;

    // Far more than a pipe holds (64 KiB): most cannot be printed in time.
    let total = 40;
    let pad = "x".repeat(32 * 1024);
    for n in 0..total {
        let msg = envelope("bulk.item", json!({"n": n, "pad": pad}));
        assert_eq!(redis_publish(&mut conn, &channel, &msg).await, 1);
    }
    let mut stdout = Lines::read(stdout_pipe);
    // Every message is printed or counted as dropped; none vanishes.
    let dropped = |lines: &[String]| -> usize {
        lines
            .iter()
            .filter_map(|l| {
                l.strip_prefix("herald tail: ")?
                    .split_once(" events dropped ")?
                    .0
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let printed = stdout.seen.len();
        let gone = dropped(&stderr.seen);
        if printed + gone == total {
            assert!(gone > 0, "the buffer of 1 overflowed");
            break;
        }
        assert!(
            printed + gone < total && Instant::now() < deadline,
            "{printed} printed and {gone} dropped of {total}:\n{}",
            stderr.seen.join("\n")
        );
        tokio::select! {
            Some(l) = stdout.rx.recv() => stdout.seen.push(l),
            Some(l) = stderr.rx.recv() => stderr.seen.push(l),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let numbers: Vec<i64> = stdout
        .seen
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "printed in order: {numbers:?}"
    );
    let status = terminate(&mut tail).await;
    assert!(status.success(), "{status:?}");
}

// ------------------------------------------------------ tasks, dlq, stats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_database_lists_nothing_and_a_limit_below_one_is_refused() {
    let db = TestDb::new().await;
    let cfg = &db.config;
    assert_eq!(ok(cfg, &["tasks", "list"]).await, "no tasks match\n");
    assert_eq!(ok(cfg, &["tasks", "list", "--json"]).await, "");
    assert_eq!(ok(cfg, &["dlq", "list"]).await, "no dead letters match\n");
    let stats = ok(cfg, &["stats"]).await;
    assert!(stats.starts_with("tasks\n  no tasks\n"), "{stats}");
    assert!(
        stats.contains("outbox: 0 unpublished, oldest 0s, 0 failing"),
        "{stats}"
    );
    assert!(stats.ends_with("dead letters\n  none\n"), "{stats}");
    for what in ["tasks", "dlq"] {
        let err = fails(cfg, &[what, "list", "--limit", "0"]).await;
        assert!(err.contains("--limit must be at least 1"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_shows_its_progress_and_lease_and_is_cancelled_through_its_worker() {
    let db = TestDb::with(fast).await;
    let cfg = &db.config;
    let client = db.client().await;
    let id = herald::enqueue(
        &client,
        &Task::new("report.build", &json!({"n": 7}))
            .unwrap()
            .unique_key("report:7"),
    )
    .await
    .unwrap();
    let ids = id.to_string();
    // A handler that reports progress, then runs until it is cancelled.
    let mut registry = Registry::new();
    registry.register("report.build", |ctx: TaskContext, _p: Value| async move {
        ctx.progress(json!({"done": 3, "of": 10})).await?;
        ctx.cancellation().cancelled().await;
        Ok::<(), anyhow::Error>(())
    });
    let token = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(cfg, db.pool(), registry).run(token.clone()));
    wait_for_count(
        &client,
        "SELECT count(*) FROM herald.tasks WHERE state = 'running' AND progress IS NOT NULL",
        1,
        "the task runs and reports progress",
    )
    .await;
    let leased_by: String = client
        .query_one("SELECT leased_by FROM herald.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);

    let shown = ok(cfg, &["tasks", "show", &ids]).await;
    for want in [
        format!("task {id}\n"),
        "  state:        running\n".to_string(),
        format!("  leased by:    {leased_by}\n"),
        "  progress:     {".to_string(),
        "\"done\": 3".to_string(),
        "  unique key:   report:7\n".to_string(),
        "  errors:       none\n".to_string(),
    ] {
        assert!(shown.contains(&want), "{want:?} not in:\n{shown}");
    }
    assert!(!shown.contains("cancel asked"), "{shown}");
    let lease_until = shown
        .lines()
        .find(|l| l.starts_with("  lease until:"))
        .unwrap();
    assert!(lease_until.contains("(in "), "{lease_until}");

    let json: Value = serde_json::from_str(&ok(cfg, &["tasks", "show", &ids, "--json"]).await)
        .expect("one JSON object");
    assert_eq!(json["id"], id);
    assert_eq!(json["state"], "running");
    assert_eq!(json["progress"], json!({"done": 3, "of": 10}));
    assert_eq!(json["leased_by"], leased_by.as_str());

    let out = ok(cfg, &["tasks", "cancel", &ids]).await;
    assert_eq!(
        out,
        format!("task {id} is running: its worker was asked to stop; it ends as cancelled\n")
    );
    wait_for_count(
        &client,
        &format!("SELECT count(*) FROM herald.tasks WHERE id = {id} AND state = 'cancelled'"),
        1,
        "the worker stops the handler and the task ends cancelled",
    )
    .await;
    let shown = ok(cfg, &["tasks", "show", &ids]).await;
    assert!(shown.contains("  state:        cancelled\n"), "{shown}");
    let asked = shown
        .lines()
        .find(|l| l.starts_with("  cancel asked: "))
        .unwrap_or_else(|| panic!("no cancel time in:\n{shown}"));
    assert!(asked.contains("20"), "a time: {asked}");
    assert!(
        !shown.contains("  finished:     -"),
        "it has finished:\n{shown}"
    );
    token.cancel();
    worker
        .await
        .expect("worker task")
        .expect("worker ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_dead_letter_is_shown_with_its_event_and_summed_up_by_stats() {
    let order: EventType = serde_json::from_value(json!({
        "name": "order.placed",
        "schema": {"type": "object", "required": ["id"]},
    }))
    .unwrap();
    let db = TestDb::with(|c| c.events = vec![order]).await;
    let cfg = &db.config;
    let client = db.client().await;
    // Written past the catalog (the plain outbox API checks no schema):
    // the relay refuses it and keeps it as a dead letter.
    let event_id = herald::publish(
        &client,
        &Event::new("order.placed", &json!({"total": 5}))
            .unwrap()
            .key("customer-1"),
    )
    .await
    .unwrap();
    let relay = db.relay();
    wait_for_count(
        &client,
        "SELECT count(*) FROM herald.dead_letters",
        1,
        "the relay dead-letters the invalid event",
    )
    .await;
    relay.stop().await;
    let row = client
        .query_one(
            "UPDATE herald.dead_letters SET failed_at = now() - interval '2 hours'
             RETURNING id, original_id, last_error",
            &[],
        )
        .await
        .unwrap();
    let (dl, outbox_id, last_error): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
    let dls = dl.to_string();

    let shown = ok(cfg, &["dlq", "show", &dls]).await;
    for want in [
        format!("dead letter {dl} (outbox)\n"),
        format!("  outbox id:    {outbox_id}\n"),
        format!("  event id:     {event_id}\n"),
        "  topic:        order.placed\n".to_string(),
        "  key:          customer-1\n".to_string(),
        "  attempts:     0\n".to_string(),
        "  \"total\": 5".to_string(),
        // The relay's errors name no worker.
        format!(" on -: {}", last_error.lines().next().unwrap()),
        format!("replay it with: herald dlq replay {dl}\n"),
    ] {
        assert!(shown.contains(&want), "{want:?} not in:\n{shown}");
    }
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("  failed:") && l.contains("2h") && l.ends_with(" ago)")),
        "{shown}"
    );
    let json: Value = serde_json::from_str(&ok(cfg, &["dlq", "show", &dls, "--json"]).await)
        .expect("one JSON object");
    assert_eq!(json["id"], dl);
    assert_eq!(json["source"], "outbox");
    assert_eq!(json["topic"], "order.placed");
    assert_eq!(json["event_id"], event_id.to_string());
    assert_eq!(json["key"], "customer-1");

    let table = ok(cfg, &["dlq", "list"]).await;
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{dl} ")))
        .unwrap_or_else(|| panic!("{dl} not listed:\n{table}"));
    assert!(
        row.contains("outbox") && row.contains("order.placed") && row.contains("2h"),
        "{row}"
    );

    let stats = ok(cfg, &["stats"]).await;
    let (_, dead) = stats
        .split_once("dead letters\n")
        .expect("a dead letters section");
    let header = dead
        .lines()
        .find(|l| l.contains("SOURCE"))
        .unwrap_or_else(|| panic!("no header:\n{stats}"));
    for column in ["SOURCE", "QUEUE", "KIND/TOPIC", "COUNT", "LAST", "ERROR"] {
        assert!(header.contains(column), "{header}");
    }
    let line = dead
        .lines()
        .find(|l| l.contains("order.placed"))
        .unwrap_or_else(|| panic!("no order.placed row:\n{stats}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cells[0], "outbox", "{line}");
    assert!(cells.contains(&"1"), "count 1: {line}");
    assert!(line.contains("2h") && line.contains("ago"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_all_leaves_a_dead_letter_whose_unique_key_a_live_task_holds() {
    let db = TestDb::with(fast).await;
    let cfg = &db.config;
    let client = db.client().await;
    herald::enqueue(
        &client,
        &Task::new("herald.fail", &json!({"message": "boom"}))
            .unwrap()
            .unique_key("nightly:1")
            .max_attempts(1),
    )
    .await
    .unwrap();
    work_until(
        &db,
        Registry::new(),
        "SELECT count(*) FROM herald.dead_letters",
        1,
        "the task fails into a dead letter",
    )
    .await;
    let dl: i64 = client
        .query_one("SELECT id FROM herald.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    // A new task takes the key meanwhile.
    let holder = herald::enqueue(
        &client,
        &Task::new("herald.noop", &json!({}))
            .unwrap()
            .unique_key("nightly:1"),
    )
    .await
    .unwrap();

    let out = ok(cfg, &["dlq", "replay", "--all"]).await;
    assert_eq!(
        out,
        "replayed 0 dead letters\n1 matching dead letters were left: a live task holds their \
         unique key (herald dlq replay ID names it)\n"
    );
    let run = Run::from(herald_output(cfg, &["dlq", "replay", &dl.to_string()]).await);
    assert!(!run.ok);
    assert!(
        run.stderr.contains(&format!(
            "dead letter {dl}: cannot replay dead letter {dl}: task {holder} (ready) holds its unique key \"nightly:1\""
        )),
        "{}",
        run.stderr
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.dead_letters").await,
        1,
        "the dead letter stays"
    );

    // Once the holder is gone, the same command replays it.
    let out = ok(cfg, &["tasks", "cancel", &holder.to_string()]).await;
    assert_eq!(out, format!("task {holder} cancelled\n"));
    let out = ok(cfg, &["dlq", "replay", "--all"]).await;
    assert_eq!(out, "replayed 1 dead letters\n");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM herald.tasks
             WHERE unique_key = 'nightly:1' AND state = 'ready' AND kind = 'herald.fail'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_watch_prints_a_stamped_snapshot_every_interval_until_sigterm() {
    let db = TestDb::new().await;
    let mut child = spawn(&db.config, &["stats", "--watch", "300ms"], &[]);
    let mut stdout = Lines::read(child.stdout.take().unwrap());
    let stamps = |lines: &[String]| -> Vec<chrono::DateTime<chrono::FixedOffset>> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("--- "))
            .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("an RFC 3339 time"))
            .collect()
    };
    stdout
        .until("three snapshots", |lines| stamps(lines).len() >= 3)
        .await;
    let times = stamps(&stdout.seen);
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= chrono::Duration::milliseconds(300),
            "snapshots {gap} apart"
        );
    }
    // Each stamp heads a full snapshot.
    let first = stdout
        .seen
        .iter()
        .position(|l| l.starts_with("--- "))
        .unwrap();
    assert_eq!(stdout.seen[first + 1], "tasks");
    assert_eq!(stdout.seen[first + 2], "  no tasks");
    let status = terminate(&mut child).await;
    assert!(status.success(), "{status:?}");
}
