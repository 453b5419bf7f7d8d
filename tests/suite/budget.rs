//! Connection budgets against a real `herald run`: its connections to the
//! test's database (pg_stat_activity) and to a private Redis (CLIENT LIST),
//! sampled while relay, workers, scheduler, maintenance and the admin
//! server are all busy, never exceed what `herald::budget` computes for its
//! configuration; and `herald budget` prints the same numbers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::{self, HeraldProcess, RedisServer, TestDb};
use herald::budget::{Budget, Held, Services};
use herald::Task;

/// Herald's connections to the test database now, by application_name
/// (the test's own, `herald-test…`, left out).
async fn postgres_now(client: &tokio_postgres::Client, db: &str) -> BTreeMap<String, usize> {
    client
        .query(
            "SELECT application_name, count(*) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()
               AND application_name NOT LIKE 'herald-test%'
             GROUP BY 1",
            &[&db],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
        .collect()
}

/// Clients of the private Redis now, this test's own connection left out.
async fn redis_now(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    list.lines().filter(|l| !l.trim().is_empty()).count() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn herald_run_holds_no_more_connections_than_its_budget() {
    let redis_server = RedisServer::start();
    let db = TestDb::with(|c| c.redis_url = redis_server.url()).await;
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    // The settings of the child (herald_command sets the pool to 4 and
    // turns migrate_on_start off); maintenance intervals short so that the
    // leader's services overlap.
    let mut config = db.config.clone();
    config.postgres.pool_size = 4;
    config.redis.pool_size = 3;
    config.migrate_on_start = false;
    config.admin.bind = bind.clone();
    config.worker.concurrency = 6;
    let budget = Budget::of(&config, Services::run(&config));
    budget.check().unwrap();
    let env = [
        ("HERALD_ADMIN_BIND", bind.as_str()),
        ("HERALD_REDIS_POOL_SIZE", "3"),
        ("HERALD_WORKER_CONCURRENCY", "6"),
        ("HERALD_WORKER_POLL_INTERVAL", "200ms"),
        ("HERALD_MAINTENANCE_VACUUM_INTERVAL", "100ms"),
        ("HERALD_MAINTENANCE_RESCUE_INTERVAL", "100ms"),
        ("HERALD_MAINTENANCE_CLEAN_INTERVAL", "100ms"),
        ("HERALD_MAINTENANCE_RETENTION_INTERVAL", "100ms"),
        ("HERALD_MAINTENANCE_NODE_EXPIRY_INTERVAL", "100ms"),
    ];
    let run = HeraldProcess::command(&config, &["run"], &env);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://{bind}");
    common::wait_for("herald run to be ready", Duration::from_secs(30), async || {
        matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200)
    })
    .await;

    // Work for every role at once: events for both drain workers, tasks
    // for all six slots, a schedule every second, and admin requests that
    // each take a pooled connection.
    let client = db.client().await;
    common::insert_events(&config, 50, 200).await;
    let sleep = Task::new("herald.sleep", &serde_json::json!({"ms": 300})).unwrap();
    for _ in 0..60 {
        herald::queue::enqueue(&client, &sleep).await.unwrap();
    }
    let schedule = herald::cron::Schedule::new(
        "budget-tick",
        "* * * * * *",
        "herald.noop",
        &serde_json::json!({}),
    )
    .unwrap();
    herald::cron::upsert(&client, &schedule).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for n in 0..8 {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let paths = ["/", "/queues", "/metrics", "/readyz", "/dead-letters"];
            let mut i = n;
            while !stop.is_cancelled() {
                let _ = http
                    .get(format!("{base}{}", paths[i % paths.len()]))
                    .send()
                    .await;
                i += 1;
            }
        }));
    }

    let mut redis = common::redis_conn(&redis_server.url()).await;
    let mut most_pg = 0;
    let mut most_redis = 0;
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let now = postgres_now(&client, &db.name).await;
        most_pg = most_pg.max(now.values().sum());
        for (name, n) in now {
            let seen = by_name.entry(name).or_default();
            *seen = (*seen).max(n);
        }
        most_redis = most_redis.max(redis_now(&mut redis).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }
    let published = db.count("SELECT count(*) FROM herald.outbox").await;
    let left = db
        .count("SELECT count(*) FROM herald.tasks WHERE kind = 'herald.sleep'")
        .await;
    println!(
        "measured: postgres {most_pg} of {} budgeted, redis {most_redis} of {}; by application_name {by_name:?}; \
         outbox left {published}, sleep tasks left {left}\n{}",
        budget.postgres,
        budget.redis,
        budget.table()
    );

    // Never more than the budget, in total and per holder.
    assert!(
        most_pg <= budget.postgres,
        "{most_pg} > {}",
        budget.postgres
    );
    assert!(
        most_redis <= budget.redis,
        "{most_redis} > {}",
        budget.redis
    );
    let mut per_name: BTreeMap<&str, usize> = BTreeMap::new();
    for line in budget.lines.iter().filter(|l| l.held != Held::BeforeStart) {
        *per_name.entry(line.application_name).or_default() += line.postgres;
    }
    for (name, seen) in &by_name {
        let allowed = per_name.get(name.as_str()).copied().unwrap_or(0);
        assert!(
            *seen <= allowed,
            "{name}: {seen} connections, budget {allowed}"
        );
    }
    // And close to it: every session held always is there, the pools filled
    // under this load, and at most the leader's services and the
    // scheduler's start session (closed by now) were not all seen at once.
    let slack: usize = budget
        .lines
        .iter()
        .filter(|l| matches!(l.held, Held::WhileLeader | Held::Starting))
        .map(|l| l.postgres)
        .sum();
    assert!(
        most_pg + slack >= budget.postgres,
        "only {most_pg} of {} (slack {slack})",
        budget.postgres
    );
    assert_eq!(most_redis, budget.redis, "the Redis pool filled under load");

    // `herald budget` prints the same totals.
    let out = common::herald_command(&config, &["budget", "--json"], &env)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed["process"]["postgres"], budget.postgres);
    assert_eq!(printed["process"]["redis"], budget.redis);
    drop(run);
}

#[tokio::test]
async fn pools_smaller_than_the_relay_stop_the_process_at_start_naming_the_settings() {
    let db = TestDb::new().await;
    // herald_command sets postgres.pool_size to 4.
    for args in [&["relay"][..], &["run"][..]] {
        let out = common::herald_command(&db.config, args, &[("HERALD_RELAY_CONCURRENCY", "6")])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("relay.concurrency is 6")
                && stderr.contains("postgres.pool_size is 4")
                && stderr.contains("HERALD_POSTGRES_POOL_SIZE"),
            "{args:?}: {stderr}"
        );
    }
    let out = common::herald_command(
        &db.config,
        &["relay"],
        &[
            ("HERALD_RELAY_CONCURRENCY", "3"),
            ("HERALD_REDIS_POOL_SIZE", "2"),
        ],
    )
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("redis.pool_size is 2"),
        "{stderr}"
    );
    // A worker alone does not need them, and `herald budget` says so.
    let out = common::herald_command(
        &db.config,
        &["budget", "--for", "worker"],
        &[("HERALD_RELAY_CONCURRENCY", "6")],
    )
    .output()
    .await
    .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("herald-worker-wake-lock") && !table.contains("herald-relay"),
        "{table}"
    );
}

#[tokio::test]
async fn herald_scheduler_logs_its_budget_at_start() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await;
    let config = {
        let mut c = db.config.clone();
        c.postgres.pool_size = 4;
        c
    };
    let expected = Budget::of(
        &config,
        Services {
            scheduler: true,
            ..Services::default()
        },
    );
    let mut child = common::herald_command(
        &db.config,
        &["scheduler"],
        &[("RUST_LOG", "info"), ("HERALD_LOG_FORMAT", "json")],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("connection budget") {
                return line;
            }
        }
        panic!("herald scheduler exited without logging its budget");
    })
    .await
    .expect("the budget is logged at start");
    let logged: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(logged["fields"]["postgres"], expected.postgres, "{line}");
    assert_eq!(logged["fields"]["redis"], expected.redis, "{line}");
    assert!(
        logged["fields"]["lines"]
            .as_str()
            .unwrap()
            .contains("maintenance_candidate_session=1/0"),
        "{line}"
    );
    child.kill().await.unwrap();
}
