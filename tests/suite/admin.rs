//! The admin server's probes and metrics, and `herald.nodes`, against the
//! real Postgres and Redis: a router served on 127.0.0.1:0 and queried over
//! HTTP, in-process services and `herald` child processes.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::{HeraldProcess, RedisServer, TestDb};
use herald::admin::{AdminState, Readiness};
use herald::nodes::{Node, Role};
use herald::Config;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// An admin server on 127.0.0.1:<free port>, stopped on drop.
struct Served {
    base: String,
    token: CancellationToken,
    http: reqwest::Client,
}

impl Served {
    async fn start(config: &Config, readiness: Readiness) -> Served {
        let pool = herald::db::pool(config, "herald-admin-test").unwrap();
        let redis = herald::pubsub::redis_pool(config).unwrap();
        let mut state = AdminState::new(config.clone(), pool, redis);
        state.readiness = readiness;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        tokio::spawn(herald::admin::serve_on(listener, state, token.clone()));
        Served {
            base,
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    async fn json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, json)
    }

    async fn metrics(&self) -> String {
        let response = self.get("/metrics").await;
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        response.text().await.unwrap()
    }

    /// Poll `path` until `pred(status, body)` holds.
    async fn until(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(u16, &Value) -> bool,
    ) -> (u16, Value) {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.json(path).await;
            if pred(status, &body) {
                return (status, body);
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not reach the expected state in {timeout:?}: {status} {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The value of the sample `series` (name with labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn expect_sample(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn healthz_says_the_process_is_alive() {
    let db = TestDb::new().await;
    let served = Served::start(&db.config, Readiness::default()).await;
    let (status, body) = served.json("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["started_at"].clone()).unwrap();
    assert!((chrono::Utc::now() - started).num_seconds() < 60);
}

#[tokio::test]
async fn readyz_is_ready_when_postgres_redis_and_listen_are_up() {
    let db = TestDb::new().await;
    let relay = db.relay();
    let readiness = Readiness::default();
    let stats = relay.stats.clone();
    readiness.listener("relay", move || stats.listening.load(Ordering::Relaxed));
    let served = Served::start(&db.config, readiness).await;
    let (_, body) = served
        .until("/readyz", Duration::from_secs(10), |s, _| s == 200)
        .await;
    assert_eq!(body["status"], "ready");
    let checks = &body["checks"];
    for check in ["postgres", "migrations", "redis", "listen"] {
        assert_eq!(checks[check]["ok"], true, "{check}: {body:#}");
    }
    assert_eq!(checks["listen"]["connections"]["relay"], true);
    assert_eq!(
        checks["migrations"]["schema_version"],
        herald::migrate::latest_version()
    );
    relay.stop().await;
}

#[tokio::test]
async fn readyz_names_redis_when_it_is_down() {
    let mut redis = RedisServer::start();
    let db = TestDb::with(|c| c.redis_url = redis.url()).await;
    let served = Served::start(&db.config, Readiness::default()).await;
    served
        .until("/readyz", Duration::from_secs(10), |s, _| s == 200)
        .await;

    redis.stop();
    let (status, body) = served
        .until("/readyz", Duration::from_secs(10), |s, _| s != 200)
        .await;
    assert_eq!(status, 503, "{body:#}");
    assert_eq!(body["status"], "unavailable");
    let checks = &body["checks"];
    assert_eq!(checks["redis"]["ok"], false, "{body:#}");
    assert!(
        checks["redis"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Redis")),
        "{body:#}"
    );
    assert_eq!(checks["postgres"]["ok"], true, "{body:#}");
    assert_eq!(checks["migrations"]["ok"], true, "{body:#}");

    redis.restart();
    served
        .until("/readyz", Duration::from_secs(15), |s, _| s == 200)
        .await;
}

/// A binary newer than the schema (its newest migration not applied) is
/// not ready, and says what to run.
#[tokio::test]
async fn readyz_says_when_migrations_are_missing() {
    let db = TestDb::new().await;
    let latest = herald::migrate::latest_version();
    let client = db.client().await;
    client
        .execute(
            "DELETE FROM herald.schema_history WHERE version = $1",
            &[&latest],
        )
        .await
        .unwrap();
    // Migration numbers may have gaps: the one before the newest.
    let previous: i32 = client
        .query_one("SELECT max(version) FROM herald.schema_history", &[])
        .await
        .unwrap()
        .get(0);
    let served = Served::start(&db.config, Readiness::default()).await;
    let (status, body) = served.json("/readyz").await;
    assert_eq!(status, 503, "{body:#}");
    let migrations = &body["checks"]["migrations"];
    assert_eq!(migrations["ok"], false, "{body:#}");
    assert_eq!(migrations["schema_version"], previous);
    assert_eq!(migrations["expected"], latest);
    assert!(
        migrations["error"]
            .as_str()
            .is_some_and(|e| e.contains("herald migrate")),
        "{body:#}"
    );
    assert_eq!(body["checks"]["postgres"]["ok"], true, "{body:#}");
}

/// A LISTEN connection that cannot come back (the database refuses new
/// connections) makes the process unready, naming the listener.
#[tokio::test]
async fn readyz_names_a_listen_connection_that_is_down() {
    let db = TestDb::new().await;
    let relay = db.relay();
    let readiness = Readiness::default();
    let stats = relay.stats.clone();
    readiness.listener("relay", move || stats.listening.load(Ordering::Relaxed));
    let served = Served::start(&db.config, readiness).await;
    served
        .until("/readyz", Duration::from_secs(10), |s, _| s == 200)
        .await;

    let (admin, conn) = tokio_postgres::connect(&common::admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&db.name, &herald::relay::LISTEN_APPLICATION_NAME],
        )
        .await
        .unwrap();
    let (status, body) = served
        .until("/readyz", Duration::from_secs(10), |s, _| s != 200)
        .await;
    assert_eq!(status, 503);
    let listen = &body["checks"]["listen"];
    assert_eq!(listen["ok"], false, "{body:#}");
    assert_eq!(listen["connections"]["relay"], false, "{body:#}");
    assert!(
        listen["error"]
            .as_str()
            .is_some_and(|e| e.contains("relay")),
        "{body:#}"
    );
    assert_eq!(
        expect_sample(
            &served.metrics().await,
            "herald_listen_up{listener=\"relay\"}"
        ),
        0.0
    );

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    served
        .until("/readyz", Duration::from_secs(15), |s, _| s == 200)
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn metrics_report_tasks_outbox_and_dead_letters_from_the_database() {
    let db = TestDb::with(|c| c.worker.queues = vec!["default".into(), "idle".into()]).await;
    let client = db.client().await;
    let queue = herald::Queue::from_config(&db.config);
    for n in 0..3 {
        let task = herald::Task::new("mail.send", &serde_json::json!({ "n": n }))
            .unwrap()
            .queue("mail");
        queue.enqueue(&client, &task).await.unwrap();
    }
    let later = herald::Task::new("mail.send", &serde_json::json!({}))
        .unwrap()
        .queue("mail")
        .delay(Duration::from_secs(3600));
    queue.enqueue(&client, &later).await.unwrap();
    // Age the oldest ready task by two minutes.
    client
        .execute(
            "UPDATE herald.tasks SET run_at = now() - interval '120 seconds'
             WHERE id = (SELECT min(id) FROM herald.tasks)",
            &[],
        )
        .await
        .unwrap();
    for n in 0..2 {
        let event = herald::Event::new("order.placed", &serde_json::json!({ "n": n })).unwrap();
        herald::publish(&client, &event).await.unwrap();
    }
    client
        .execute(
            "UPDATE herald.outbox SET created_at = now() - interval '90 seconds'
             WHERE id = (SELECT min(id) FROM herald.outbox)",
            &[],
        )
        .await
        .unwrap();

    let served = Served::start(&db.config, Readiness::default()).await;
    let text = served.metrics().await;
    assert_eq!(expect_sample(&text, "herald_postgres_up"), 1.0);
    assert_eq!(expect_sample(&text, "herald_redis_up"), 1.0);
    assert_eq!(
        expect_sample(&text, "herald_tasks{queue=\"mail\",state=\"ready\"}"),
        4.0
    );
    assert_eq!(
        expect_sample(&text, "herald_tasks{queue=\"mail\",state=\"running\"}"),
        0.0
    );
    assert_eq!(
        expect_sample(&text, "herald_tasks_scheduled{queue=\"mail\"}"),
        1.0
    );
    // A configured queue without tasks is reported as empty.
    assert_eq!(
        expect_sample(&text, "herald_tasks{queue=\"idle\",state=\"ready\"}"),
        0.0
    );
    let oldest = expect_sample(&text, "herald_tasks_oldest_ready_seconds{queue=\"mail\"}");
    assert!((119.0..200.0).contains(&oldest), "oldest ready {oldest}");
    assert_eq!(expect_sample(&text, "herald_outbox_unpublished"), 2.0);
    let age = expect_sample(&text, "herald_outbox_oldest_unpublished_seconds");
    assert!((89.0..170.0).contains(&age), "oldest unpublished {age}");
    assert!(text.contains("# TYPE herald_tasks gauge"), "{text}");
    assert!(
        text.contains("herald_pool_max_size{pool=\"postgres\"}"),
        "{text}"
    );

    // The relay publishes the events: the backlog drains to zero.
    let relay = db.relay();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = served.metrics().await;
        if sample(&text, "herald_outbox_unpublished") == Some(0.0) {
            assert_eq!(
                expect_sample(&text, "herald_outbox_oldest_unpublished_seconds"),
                0.0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;

    // A task that fails its only attempt becomes a dead letter.
    let fail = herald::Task::new("herald.fail", &serde_json::json!({"message": "boom"}))
        .unwrap()
        .max_attempts(1);
    queue.enqueue(&client, &fail).await.unwrap();
    let worker = herald::Worker::new(&db.config, db.pool(), herald::Registry::new());
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let series = "herald_dead_letters{source=\"task\",queue=\"default\",kind=\"herald.fail\"}";
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = served.metrics().await;
        if sample(&text, series) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter reported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn metrics_report_schedules_nodes_and_postgres_health() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let schedule = herald::cron::Schedule::new(
        "nightly",
        "0 3 * * *",
        "report.build",
        &serde_json::json!({}),
    )
    .unwrap()
    .tz("Europe/Paris");
    herald::cron::upsert(&client, &schedule).await.unwrap();
    // The scheduler computes next_run_at; set one an hour ahead here.
    client
        .execute(
            "UPDATE herald.schedules SET next_run_at = now() + interval '1 hour' WHERE name = 'nightly'",
            &[],
        )
        .await
        .unwrap();
    let node = Node::new(&db.config, &[Role::Worker, Role::Scheduler]);
    node.heartbeat(&client).await.unwrap();
    // A session left idle in a transaction for a while.
    let idle = db.client().await;
    idle.batch_execute("BEGIN; SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let served = Served::start(&db.config, Readiness::default()).await;
    let text = served.metrics().await;
    let oldest = expect_sample(&text, "herald_postgres_oldest_transaction_seconds");
    assert!(oldest >= 1.4, "oldest transaction {oldest}");
    assert!(
        sample(&text, "herald_postgres_dead_tuples{table=\"tasks\"}").is_some(),
        "{text}"
    );
    assert!(
        sample(&text, "herald_postgres_dead_tuples{table=\"outbox\"}").is_some(),
        "{text}"
    );
    let next = expect_sample(
        &text,
        "herald_schedule_next_run_seconds{schedule=\"nightly\"}",
    );
    assert!((3500.0..=3600.0).contains(&next), "next run in {next}");
    assert_eq!(
        expect_sample(&text, "herald_schedule_enabled{schedule=\"nightly\"}"),
        1.0
    );
    assert_eq!(expect_sample(&text, "herald_nodes{role=\"worker\"}"), 1.0);
    assert_eq!(
        expect_sample(&text, "herald_nodes{role=\"scheduler\"}"),
        1.0
    );
    assert_eq!(expect_sample(&text, "herald_nodes{role=\"relay\"}"), 0.0);
}

/// With Postgres unreachable the scrape still answers: the process's own
/// metrics, herald_postgres_up 0 and the error counter.
#[tokio::test]
async fn metrics_answer_when_postgres_is_down() {
    let port = common::free_port();
    let config = Config {
        database_url: format!("postgres://postgres@127.0.0.1:{port}/nowhere"),
        redis_url: common::redis_url(),
        ..Config::default()
    };
    let served = Served::start(&config, Readiness::default()).await;
    let text = served.metrics().await;
    assert_eq!(expect_sample(&text, "herald_postgres_up"), 0.0);
    assert!(
        expect_sample(
            &text,
            "herald_admin_scrape_errors_total{source=\"postgres\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("# HELP herald_admin_scrape_errors_total"),
        "{text}"
    );
    assert!(!text.contains("herald_tasks{"), "{text}");
    assert!(text.contains("herald_build_info{version="), "{text}");

    let (status, body) = served.json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["postgres"]["ok"], false, "{body:#}");
    assert_eq!(body["checks"]["migrations"]["ok"], false, "{body:#}");
    assert_eq!(body["checks"]["redis"]["ok"], true, "{body:#}");
}

#[tokio::test]
async fn a_configured_token_is_required_except_by_the_probes() {
    let db = TestDb::with(|c| c.admin.token = Some("s3cret-token".into())).await;
    let served = Served::start(&db.config, Readiness::default()).await;
    let url = format!("{}/metrics", served.base);

    let response = served.http.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let wrong = served
        .http
        .get(&url)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = served
        .http
        .get(&url)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    assert!(right.text().await.unwrap().contains("herald_tasks"));

    // Orchestrators probe without the token.
    assert_eq!(served.get("/healthz").await.status().as_u16(), 200);
    assert_eq!(served.get("/readyz").await.status().as_u16(), 200);
}

#[tokio::test]
async fn a_browser_signs_in_with_the_token_and_gets_a_session_cookie() {
    let db = TestDb::with(|c| c.admin.token = Some("s3cret-token".into())).await;
    let served = Served::start(&db.config, Readiness::default()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{p}", served.base);

    // A browser without credentials is sent to the form; a script gets 401.
    let page = http
        .get(url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 303);
    assert_eq!(page.headers()["location"], "/login");
    let form = http.get(url("/login")).send().await.unwrap();
    assert_eq!(form.status().as_u16(), 200);
    assert!(form.text().await.unwrap().contains("name=\"token\""));

    let wrong = http
        .post(url("/login"))
        .form(&[("token", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    let signed = http
        .post(url("/login"))
        .form(&[("token", "s3cret-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status().as_u16(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("s3cret-token"),
        "the token itself never goes to the browser"
    );
    let session = cookie.split(';').next().unwrap().to_string();

    for path in ["/", "/metrics", "/dead-letters"] {
        let r = http
            .get(url(path))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path} with the session cookie");
    }
    let forged = http
        .get(url("/metrics"))
        .header("cookie", "herald_admin=00ff")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
}

#[tokio::test]
async fn a_non_loopback_bind_without_a_token_is_refused() {
    let mut config = Config {
        redis_url: common::redis_url(),
        ..Config::default()
    };
    config.admin.bind = "0.0.0.0:9187".into();
    let error = herald::admin::check_bind(&config).unwrap_err().to_string();
    assert!(error.contains("HERALD_ADMIN_TOKEN"), "{error}");

    // serve_on applies the rule to the address actually bound.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let pool = herald::db::pool(&config, "herald-admin-test").unwrap();
    let redis = herald::pubsub::redis_pool(&config).unwrap();
    let state = AdminState::new(config.clone(), pool.clone(), redis.clone());
    let served = herald::admin::serve_on(listener, state, CancellationToken::new());
    let error = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("refused at once")
        .unwrap_err()
        .to_string();
    assert!(error.contains("admin.token"), "{error}");

    config.admin.token = Some("t".into());
    assert!(herald::admin::check_bind(&config).is_ok());

    // The binary refuses to start, before touching the database.
    let db = TestDb::new().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("admin")
        .env("DATABASE_URL", &db.config.database_url)
        .env("REDIS_URL", &db.config.redis_url)
        .env("HERALD_ADMIN_BIND", "0.0.0.0:9187")
        .env_remove("HERALD_ADMIN_TOKEN")
        .env_remove("HERALD_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HERALD_ADMIN_TOKEN"), "{stderr}");
}

async fn node_row(client: &tokio_postgres::Client, id: uuid::Uuid) -> Option<tokio_postgres::Row> {
    client
        .query_opt(
            "SELECT host, pid, roles, version, started_at, last_seen FROM herald.nodes WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn nodes_register_heartbeat_and_expire_dead_ones() {
    // The live node tolerates a slow machine (10 missed heartbeats); the
    // dead one below expires after 2 missed ones of 100 ms.
    let db = TestDb::with(|c| {
        c.nodes.heartbeat_interval = Duration::from_millis(200);
        c.nodes.missed_heartbeats = 10;
    })
    .await;
    let client = db.client().await;

    let node = Node::new(&db.config, &[Role::Relay, Role::Admin, Role::Relay]);
    let id = node.id();
    let stop = CancellationToken::new();
    let running = tokio::spawn(node.run(db.pool(), stop.clone()));
    // Dead nodes are expired by the maintenance leader, not by heartbeats.
    let mut leader = db.config.clone();
    leader.maintenance.node_expiry_interval = Some(Duration::from_millis(100));
    let maintenance =
        tokio::spawn(herald::maintenance::Maintenance::new(&leader).run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(row) = node_row(&client, id).await {
            break row;
        }
        assert!(Instant::now() < deadline, "the node did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first.get::<_, i32>("pid"), std::process::id() as i32);
    assert_eq!(first.get::<_, Vec<String>>("roles"), vec!["relay", "admin"]);
    assert_eq!(first.get::<_, String>("version"), env!("CARGO_PKG_VERSION"));

    // It heartbeats: last_seen moves, started_at does not.
    let last_seen =
        |row: &tokio_postgres::Row| row.get::<_, chrono::DateTime<chrono::Utc>>("last_seen");
    let deadline = Instant::now() + Duration::from_secs(10);
    let later = loop {
        let row = node_row(&client, id).await.expect("still registered");
        if last_seen(&row) > last_seen(&first) {
            break row;
        }
        assert!(Instant::now() < deadline, "last_seen did not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        later.get::<_, chrono::DateTime<chrono::Utc>>("started_at"),
        first.get::<_, chrono::DateTime<chrono::Utc>>("started_at")
    );

    // A node that registers once and goes silent: once it has missed two
    // heartbeats, the maintenance leader deletes its row.
    let mut quiet = db.config.clone();
    quiet.nodes.heartbeat_interval = Duration::from_millis(100);
    quiet.nodes.missed_heartbeats = 2;
    let dead = Node::new(&quiet, &[Role::Worker]);
    dead.heartbeat(&client).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_row(&client, dead.id()).await.is_some() {
        assert!(Instant::now() < deadline, "the dead node was not expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = herald::nodes::list(&client).await.unwrap();
    assert_eq!(listed.iter().map(|n| n.id).collect::<Vec<_>>(), vec![id]);

    // A clean stop deregisters.
    stop.cancel();
    running.await.unwrap().unwrap();
    maintenance.await.unwrap().unwrap();
    assert!(node_row(&client, id).await.is_none());
}

/// Real processes: `herald worker` children register with their pid; one
/// killed with SIGKILL is expired by the other (the maintenance leader,
/// or it becomes the leader); SIGTERM deregisters.
#[tokio::test]
async fn herald_processes_register_and_a_killed_one_expires() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let env = [
        ("HERALD_NODES_HEARTBEAT_INTERVAL", "200ms"),
        ("HERALD_NODES_MISSED_HEARTBEATS", "2"),
    ];
    let a = HeraldProcess::command(&db.config, &["worker"], &env);
    let b = HeraldProcess::command(&db.config, &["worker"], &env);
    let (pid_a, pid_b) = (a.pid() as i32, b.pid() as i32);
    let pids = || async {
        client
            .query("SELECT pid, roles FROM herald.nodes ORDER BY pid", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, Vec<String>>(1)))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = pids().await;
        if rows.len() == 2 {
            let mut expected = vec![
                (pid_a, vec!["worker".to_string()]),
                (pid_b, vec!["worker".to_string()]),
            ];
            expected.sort();
            assert_eq!(rows, expected);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers did not register: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    a.kill9().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = pids().await;
        if rows.iter().all(|(pid, _)| *pid != pid_a) {
            assert_eq!(rows.len(), 1, "{rows:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed worker did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(b.terminate().await.success());
    assert!(pids().await.is_empty(), "SIGTERM deregisters");
}

/// `herald run` serves the probes and metrics of its own services.
#[tokio::test]
async fn herald_run_serves_readyz_and_metrics() {
    let db = TestDb::new().await;
    let port = common::free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let child = HeraldProcess::command(
        &db.config,
        &["run"],
        &[
            ("HERALD_ADMIN_BIND", bind.as_str()),
            ("HERALD_NODES_HEARTBEAT_INTERVAL", "200ms"),
        ],
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body: Value = loop {
        if let Ok(response) = http.get(format!("http://{bind}/readyz")).send().await {
            if response.status().as_u16() == 200 {
                break serde_json::from_str(&response.text().await.unwrap()).unwrap();
            }
        }
        assert!(Instant::now() < deadline, "herald run did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let connections = &body["checks"]["listen"]["connections"];
    for listener in ["relay", "worker", "scheduler"] {
        assert_eq!(connections[listener], true, "{body:#}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http
            .get(format!("http://{bind}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if sample(&text, "herald_nodes{role=\"admin\"}") == Some(1.0) {
            for role in ["relay", "worker", "scheduler"] {
                assert_eq!(
                    sample(&text, &format!("herald_nodes{{role=\"{role}\"}}")),
                    Some(1.0),
                    "{text}"
                );
            }
            assert_eq!(
                sample(&text, "herald_listen_up{listener=\"relay\"}"),
                Some(1.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "no node in /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.terminate().await.success());
}

/// `herald worker --admin` serves the probes and its own metrics, so a
/// worker-only deployment can be probed and scraped.
#[tokio::test]
async fn herald_worker_with_admin_serves_its_probes() {
    let db = TestDb::new().await;
    let bind = format!("127.0.0.1:{}", common::free_port());
    let child = HeraldProcess::command(
        &db.config,
        &["worker", "--admin"],
        &[("HERALD_ADMIN_BIND", bind.as_str())],
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body: Value = loop {
        if let Ok(response) = http.get(format!("http://{bind}/readyz")).send().await {
            if response.status().as_u16() == 200 {
                break serde_json::from_str(&response.text().await.unwrap()).unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "herald worker --admin did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        body["checks"]["listen"]["connections"],
        serde_json::json!({"worker": true}),
        "{body:#}"
    );
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let roles: Vec<String> = loop {
        let row = client
            .query_opt(
                "SELECT roles FROM herald.nodes WHERE pid = $1",
                &[&(child.pid() as i32)],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(Instant::now() < deadline, "the worker did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(roles, vec!["worker", "admin"]);
    let text = http
        .get(format!("http://{bind}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&text, "herald_listen_up{listener=\"worker\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(child.terminate().await.success());
}
