//! Cron schedules against real Postgres: exactly once across several
//! scheduler processes, misfire policies, pause/resume/trigger, changes from
//! the configuration and from SQL, and bad input everywhere.

use crate::common;

use std::time::{Duration, Instant};

use crate::common::{HeraldProcess, TestDb};
use chrono::{DateTime, Utc};
use herald::cron::{Misfire, Schedule, Scheduler};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// An in-process scheduler.
struct SchedulerTask {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<herald::Result<()>>,
}

impl SchedulerTask {
    fn start(db: &TestDb) -> SchedulerTask {
        SchedulerTask::start_with(Scheduler::new(&db.config, db.pool()))
    }

    fn start_with(scheduler: Scheduler) -> SchedulerTask {
        let token = CancellationToken::new();
        let handle = tokio::spawn(scheduler.run(token.clone()));
        SchedulerTask { token, handle }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the scheduler stops within 10 s")
            .expect("scheduler task")
            .expect("the scheduler ends without error");
    }
}

/// Poll `sql` (one bigint) until it is at least `n`; returns the last value.
async fn wait_for(db: &TestDb, sql: &str, n: i64, timeout: Duration) -> i64 {
    let client = db.client().await;
    let deadline = Instant::now() + timeout;
    loop {
        let v: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        if v >= n || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tick a task was created for.
const TICK: &str = "(headers->>'herald_tick')::timestamptz";

fn pg_message(e: &tokio_postgres::Error) -> String {
    herald::error::describe_pg(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scheduler_processes_fire_every_second_tick_exactly_once() {
    let db = TestDb::new().await;
    let schedulers: Vec<HeraldProcess> = (0..3)
        .map(|_| HeraldProcess::command(&db.config, &["scheduler"], &[]))
        .collect();
    let client = db.client().await;
    client
        .execute(
            "SELECT herald.upsert_schedule('every-second', '* * * * * *', 'herald.noop', '{}')",
            &[],
        )
        .await
        .unwrap();
    // The first tick some scheduler fired, then ten seconds of ticks from it.
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks",
            1,
            Duration::from_secs(10)
        )
        .await
            >= 1
    );
    let first: DateTime<Utc> = client
        .query_one(&format!("SELECT min({TICK}) FROM herald.tasks"), &[])
        .await
        .unwrap()
        .get(0);
    let window_end = first + chrono::Duration::seconds(10);
    let sql = format!(
        "SELECT count(*) FROM herald.tasks WHERE {TICK} >= '{}'::timestamptz + interval '10 seconds'",
        first.to_rfc3339()
    );
    // Wait until a tick past the window fired, so the window is complete.
    assert!(wait_for(&db, &sql, 1, Duration::from_secs(20)).await >= 1);
    for s in schedulers {
        assert!(
            s.terminate().await.success(),
            "schedulers exit cleanly on SIGTERM"
        );
    }
    let rows = client
        .query(
            &format!(
                "SELECT {TICK}, unique_key, headers->>'herald_schedule' FROM herald.tasks \
                 WHERE {TICK} >= $1 AND {TICK} < $2 ORDER BY 1"
            ),
            &[&first, &window_end],
        )
        .await
        .unwrap();
    let ticks: Vec<DateTime<Utc>> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<DateTime<Utc>> = (0..10)
        .map(|s| first + chrono::Duration::seconds(s))
        .collect();
    assert_eq!(ticks, expected, "exactly 10 tasks, one per tick, no gap");
    for r in &rows {
        let tick: DateTime<Utc> = r.get(0);
        assert_eq!(
            r.get::<_, String>(1),
            herald::cron::unique_key("every-second", tick)
        );
        assert_eq!(r.get::<_, String>(2), "every-second");
    }
    // And no tick anywhere fired twice.
    let dup: i64 = client
        .query_one(
            &format!("SELECT count(*) - count(DISTINCT {TICK}) FROM herald.tasks"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dup, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_policies_after_ten_hours_without_a_scheduler() {
    // The fixed 5 s grace: with the default fraction (a tenth of the hour),
    // a run in the first minutes of an hour would find that hour's tick
    // still on time, and what the policies fire would depend on the clock.
    let db = TestDb::with(|c| c.scheduler.misfire_grace_fraction = 0.0).await;
    let client = db.client().await;
    for (name, misfire) in [("m-skip", "skip"), ("m-once", "once"), ("m-all", "all")] {
        client
            .execute(
                "SELECT herald.upsert_schedule($1, '0 * * * *', 'herald.noop', '{}', misfire => $2)",
                &[&name, &misfire],
            )
            .await
            .unwrap();
    }
    // The last scheduler computed the next tick ten hours ago, then all died.
    client
        .batch_execute(
            "UPDATE herald.schedules SET next_run_at = date_trunc('hour', now()) - interval '10 hours'",
        )
        .await
        .unwrap();
    let t0: DateTime<Utc> = client
        .query_one("SELECT min(next_run_at) FROM herald.schedules", &[])
        .await
        .unwrap()
        .get(0);
    let scheduler = SchedulerTask::start(&db);
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.schedules WHERE next_run_at > now()",
            3,
            Duration::from_secs(10)
        )
        .await,
        3
    );
    scheduler.stop().await;
    let tasks = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    &format!(
                        "SELECT {TICK}, created_at, headers FROM herald.tasks \
                         WHERE headers->>'herald_schedule' = $1 ORDER BY 1"
                    ),
                    &[&name],
                )
                .await
                .unwrap()
        }
    };
    let hour = |t: DateTime<Utc>| {
        use chrono::{DurationRound, TimeDelta};
        t.duration_trunc(TimeDelta::hours(1)).unwrap()
    };
    assert!(tasks("m-skip").await.is_empty(), "skip fires nothing");
    let once = tasks("m-once").await;
    assert_eq!(once.len(), 1, "once fires one task");
    let (tick, created): (DateTime<Utc>, DateTime<Utc>) = (once[0].get(0), once[0].get(1));
    assert_eq!(tick, hour(created), "for the latest missed tick");
    assert_eq!(
        once[0].get::<_, serde_json::Value>(2)["herald_misfire"],
        "once"
    );
    let all = tasks("m-all").await;
    let created: DateTime<Utc> = all[0].get(1);
    let expected: Vec<DateTime<Utc>> = (0..)
        .map(|h| t0 + chrono::Duration::hours(h))
        .take_while(|t| *t <= hour(created))
        .collect();
    assert!(expected.len() >= 11);
    let got: Vec<DateTime<Utc>> = all.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, expected, "all fires every missed tick, oldest first");
    for r in &all {
        let tick: DateTime<Utc> = r.get(0);
        if tick < created - chrono::Duration::seconds(5) {
            assert_eq!(r.get::<_, serde_json::Value>(2)["herald_backfilled"], true);
        }
    }
    // Every policy continues with the next future tick.
    let next: Vec<DateTime<Utc>> = client
        .query("SELECT DISTINCT next_run_at FROM herald.schedules", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(next, vec![hour(created) + chrono::Duration::hours(1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_all_is_capped_by_max_backfill() {
    // The fixed 5 s grace, as above.
    let db = TestDb::with(|c| {
        c.scheduler.max_backfill = 3;
        c.scheduler.misfire_grace_fraction = 0.0;
    })
    .await;
    let client = db.client().await;
    client
        .batch_execute(
            "SELECT herald.upsert_schedule('m-all', '* * * * *', 'herald.noop', '{}', misfire => 'all');
             UPDATE herald.schedules SET next_run_at = date_trunc('minute', now()) - interval '1 hour';",
        )
        .await
        .unwrap();
    let scheduler = SchedulerTask::start(&db);
    wait_for(
        &db,
        "SELECT count(*) FROM herald.schedules WHERE next_run_at > now()",
        1,
        Duration::from_secs(10),
    )
    .await;
    scheduler.stop().await;
    let rows = client
        .query(
            &format!("SELECT {TICK}, created_at FROM herald.tasks ORDER BY 1"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the latest max_backfill ticks");
    let created: DateTime<Utc> = rows[2].get(1);
    let last: DateTime<Utc> = rows[2].get(0);
    assert!(last <= created && created - last < chrono::Duration::minutes(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_trigger() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let scheduler = SchedulerTask::start(&db);
    let schedule = Schedule::new("tick", "* * * * * *", "herald.noop", &json!({"n": 1}))
        .unwrap()
        .queue("cron");
    herald::cron::upsert(&client, &schedule).await.unwrap();
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks",
            2,
            Duration::from_secs(5)
        )
        .await
            >= 2
    );

    herald::cron::pause(&client, "tick").await.unwrap();
    // A tick being fired while we paused commits first; after that, nothing
    // for two ticks and more (a wait on nothing happening, so on the clock).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused_at = db.count("SELECT count(*) FROM herald.tasks").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks").await,
        paused_at,
        "a paused schedule does not fire"
    );

    // Trigger fires now, once, even while paused.
    let id = herald::cron::trigger(&client, "tick").await.unwrap();
    let row = client
        .query_one(
            "SELECT queue, payload, headers, unique_key FROM herald.tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cron");
    assert_eq!(row.get::<_, serde_json::Value>(1), json!({"n": 1}));
    let headers: serde_json::Value = row.get(2);
    assert_eq!(headers["herald_schedule"], "tick");
    assert_eq!(headers["herald_triggered"], true);
    assert!(row.get::<_, String>(3).starts_with(&format!(
        "cron:tick:{}",
        &headers["herald_tick"].as_str().unwrap()[..4]
    )));
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks").await,
        paused_at + 1
    );

    // Resume: ticks from now on, none for the paused time.
    let resumed_at: DateTime<Utc> = client
        .query_one("SELECT herald.resume_schedule('tick'), now()", &[])
        .await
        .unwrap()
        .get(1);
    let sql = format!(
        "SELECT count(*) FROM herald.tasks WHERE {TICK} > '{}'",
        resumed_at.to_rfc3339()
    );
    assert!(wait_for(&db, &sql, 2, Duration::from_secs(5)).await >= 2);
    scheduler.stop().await;
    let late: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM herald.tasks WHERE NOT headers ? 'herald_triggered' \
                 AND {TICK} < $1 AND created_at > $1"
            ),
            &[&resumed_at],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(late, 0, "ticks of the paused time never fire");

    // Unknown names are errors.
    let err = herald::cron::pause(&client, "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no schedule named \"nope\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_changes_are_picked_up_without_restart_and_bad_rows_do_not_block_others() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "SELECT herald.upsert_schedule('changing', '0 0 1 1 *', 'herald.noop', '{}')",
            &[],
        )
        .await
        .unwrap();
    let scheduler = SchedulerTask::start(&db);
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.schedules WHERE next_run_at IS NOT NULL",
            1,
            Duration::from_secs(5)
        )
        .await,
        1
    );
    // A row written straight into the table, with an expression croner
    // rejects and SQL's shape check never saw, plus a valid neighbour.
    client
        .batch_execute(
            "INSERT INTO herald.schedules (name, cron, kind) VALUES ('broken', '0 0 30 2 *', 'herald.noop');
             INSERT INTO herald.schedules (name, cron, kind, tz) VALUES ('bad-zone', '* * * * * *', 'herald.noop', 'Mars/Olympus');
             INSERT INTO herald.schedules (name, cron, kind) VALUES ('fine', '* * * * * *', 'herald.noop');",
        )
        .await
        .unwrap();
    // The scheduler sleeps towards next January; NOTIFY wakes it for these.
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'fine'",
            2,
            Duration::from_secs(5)
        )
        .await
            >= 2,
        "the valid row fires next to the invalid ones"
    );
    let errors = client
        .query(
            "SELECT name, last_error, next_run_at IS NULL FROM herald.schedules \
             WHERE last_error IS NOT NULL ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(errors.len(), 2, "both bad rows are marked");
    assert_eq!(errors[0].get::<_, String>(0), "bad-zone");
    assert!(errors[0].get::<_, String>(1).contains("\"Mars/Olympus\""));
    assert_eq!(errors[1].get::<_, String>(0), "broken");
    assert!(errors[1].get::<_, String>(1).contains("\"0 0 30 2 *\""));
    assert!(errors.iter().all(|r| r.get::<_, bool>(2)));

    // An UPDATE through plain SQL: the new expression takes effect at once.
    client
        .batch_execute("UPDATE herald.schedules SET cron = '* * * * * *' WHERE name = 'changing'")
        .await
        .unwrap();
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'changing'",
            2,
            Duration::from_secs(5)
        )
        .await
            >= 2
    );
    // Fixing a broken row clears its error and it fires.
    client
        .batch_execute("UPDATE herald.schedules SET cron = '* * * * * *' WHERE name = 'broken'")
        .await
        .unwrap();
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'broken'",
            1,
            Duration::from_secs(5)
        )
        .await
            >= 1
    );
    // Hand-written infinities neither stall the scheduler nor fire: -infinity
    // is recomputed from now, infinity never comes due.
    client
        .batch_execute(
            "UPDATE herald.schedules SET next_run_at = '-infinity' WHERE name = 'changing';
             UPDATE herald.schedules SET next_run_at = 'infinity' WHERE name = 'fine';",
        )
        .await
        .unwrap();
    let before = db
        .count("SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'changing'")
        .await;
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'changing'",
            before + 2,
            Duration::from_secs(5)
        )
        .await
            >= before + 2
    );
    let listed = herald::cron::list(&client).await.unwrap();
    assert_eq!(listed.len(), 4);
    scheduler.stop().await;
    assert_eq!(
        db.count("SELECT count(*) FROM herald.schedules WHERE last_error IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_functions_reject_bad_input_quoting_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for (call, needles) in [
        (
            "SELECT herald.upsert_schedule('a', '61 * * * *', 'herald.noop')",
            vec!["\"61 * * * *\"", "out of range for the minute field", "expected 5 fields"],
        ),
        (
            "SELECT herald.upsert_schedule('a', '* * * *', 'herald.noop')",
            vec!["\"* * * *\"", "4 fields", "expected 5 fields"],
        ),
        (
            "SELECT herald.upsert_schedule('a', '* * * * *', 'herald.noop', tz => 'Europe/Bärlin')",
            vec!["\"Europe/Bärlin\"", "IANA"],
        ),
        (
            "SELECT herald.upsert_schedule('a', '* * * * *', 'herald.noop', misfire => 'sometimes')",
            vec!["\"sometimes\"", "skip, once or all"],
        ),
        (
            "SELECT herald.upsert_schedule('a b', '* * * * *', 'herald.noop')",
            vec!["\"a b\"", "schedule name"],
        ),
        (
            "SELECT herald.upsert_schedule('a', '* * * * *', 'bad kind!')",
            vec!["bad kind!"],
        ),
        (
            "SELECT herald.trigger_schedule('missing')",
            vec!["no schedule named \"missing\""],
        ),
    ] {
        let err = client.execute(call, &[]).await.unwrap_err();
        let msg = pg_message(&err);
        for n in &needles {
            assert!(msg.contains(n), "{call}: {n:?} not in {msg}");
        }
    }
    assert_eq!(db.count("SELECT count(*) FROM herald.schedules").await, 0);
    // The Rust API says the same before it reaches SQL.
    let err = herald::cron::upsert(
        &client,
        &Schedule::new("a", "0 0 * * *", "herald.noop", &json!({}))
            .unwrap()
            .tz("Nowhere/Land")
            .misfire(Misfire::All),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"Nowhere/Land\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_schedules_and_rejects_bad_input() {
    let db = TestDb::new().await;
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let config = db.config.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = common::herald_output(&config, &args).await;
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let (ok, out, err) = run(&[
        "schedules",
        "add",
        "nightly",
        "30 2 * * *",
        "report.build",
        r#"{"format": "pdf"}"#,
        "--tz",
        "Europe/Berlin",
        "--misfire",
        "once",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("nightly") && out.contains("02:30:00+01:00"),
        "{out}"
    );
    let (ok, out, _) = run(&["schedules", "list"]).await;
    assert!(ok);
    assert!(
        out.contains("nightly") && out.contains("Europe/Berlin"),
        "{out}"
    );
    // Three fire times, in the schedule's zone.
    let next_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("next"))
        .unwrap();
    assert_eq!(next_line.matches("02:30:00 +01:00").count(), 3, "{out}");
    let (ok, _, err) = run(&["schedules", "pause", "nightly"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM herald.schedules WHERE enabled")
            .await,
        0
    );
    let (ok, _, err) = run(&["schedules", "resume", "nightly"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["schedules", "trigger", "nightly"]).await;
    assert!(ok, "{err}");
    let id: i64 = out.trim().parse().unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM herald.tasks WHERE id = {id} AND kind = 'report.build' \
             AND headers->>'herald_schedule' = 'nightly'"
        ))
        .await,
        1
    );
    let (ok, out, _) = run(&["schedules", "list", "--json"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["source"], "api");
    assert_eq!(v["upcoming"].as_array().unwrap().len(), 3);

    for (args, needles) in [
        (
            vec!["schedules", "add", "x", "61 * * * *", "k", "{}"],
            vec!["\"61 * * * *\"", "expected 5 fields"],
        ),
        (
            vec![
                "schedules",
                "add",
                "x",
                "* * * * *",
                "k",
                "{}",
                "--tz",
                "Mars/Base",
            ],
            vec!["\"Mars/Base\"", "IANA"],
        ),
        (
            vec![
                "schedules",
                "add",
                "x",
                "* * * * *",
                "k",
                "{}",
                "--misfire",
                "never",
            ],
            vec!["\"never\"", "skip, once or all"],
        ),
        (
            vec!["schedules", "add", "x", "* * * * *", "k", "{not json"],
            vec!["invalid JSON"],
        ),
        (vec!["schedules", "pause", "ghost"], vec!["\"ghost\""]),
        (vec!["schedules", "trigger", "ghost"], vec!["\"ghost\""]),
    ] {
        let (ok, _, err) = run(&args).await;
        assert!(!ok, "{args:?} must fail");
        for n in &needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
        }
    }
    let (ok, _, err) = run(&["schedules", "remove", "nightly"]).await;
    assert!(ok, "{err}");
    assert_eq!(db.count("SELECT count(*) FROM herald.schedules").await, 0);
}

async fn schedule_names(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT name || ':' || source || ':' || cron FROM herald.schedules ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_are_picked_up_on_restart() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dir = std::env::temp_dir().join(format!("herald-cron-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    let path = file.to_str().unwrap().to_string();
    std::fs::write(
        &file,
        r#"
[[schedules]]
name = "keep"
cron = "0 0 1 1 *"
kind = "herald.noop"

[[schedules]]
name = "drop-me"
cron = "0 0 1 1 *"
kind = "herald.noop"
"#,
    )
    .unwrap();
    // A schedule created through the API survives every sync.
    client
        .execute(
            "SELECT herald.upsert_schedule('api-owned', '0 0 1 1 *', 'herald.noop')",
            &[],
        )
        .await
        .unwrap();
    let p = HeraldProcess::command(&db.config, &["--config", &path, "scheduler"], &[]);
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.schedules WHERE next_run_at IS NOT NULL",
            3,
            Duration::from_secs(10)
        )
        .await,
        3
    );
    assert!(p.terminate().await.success());
    assert_eq!(
        schedule_names(&client).await,
        [
            "api-owned:api:0 0 1 1 *",
            "drop-me:config:0 0 1 1 *",
            "keep:config:0 0 1 1 *"
        ]
    );
    // Change one, remove one, add one; restart (as `herald run` this time,
    // which runs the scheduler next to the relay and the workers).
    std::fs::write(
        &file,
        r#"
[[schedules]]
name = "keep"
cron = "* * * * * *"
kind = "herald.noop"
misfire = "all"

[[schedules]]
name = "new"
cron = "0 0 1 1 *"
kind = "herald.noop"
tz = "America/New_York"
"#,
    )
    .unwrap();
    // Its admin server on a port of its own, not the default one.
    let admin = format!("127.0.0.1:{}", common::free_port());
    let p = HeraldProcess::command(
        &db.config,
        &["--config", &path, "run"],
        &[("HERALD_ADMIN_BIND", &admin)],
    );
    let fired = wait_for(
        &db,
        "SELECT count(*) FROM herald.schedules WHERE name = 'keep' AND last_run_at IS NOT NULL",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(p.terminate().await.success());
    assert_eq!(fired, 1, "the changed expression fires");
    assert_eq!(
        schedule_names(&client).await,
        [
            "api-owned:api:0 0 1 1 *",
            "keep:config:* * * * * *",
            "new:config:0 0 1 1 *"
        ]
    );
    let row = client
        .query_one(
            "SELECT (SELECT misfire FROM herald.schedules WHERE name = 'keep'), \
                    (SELECT tz FROM herald.schedules WHERE name = 'new')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "all");
    assert_eq!(row.get::<_, String>(1), "America/New_York");

    // A configuration that does not parse stops the process at start and
    // says why; nothing stored is touched.
    std::fs::write(
        &file,
        "[[schedules]]\nname = \"keep\"\ncron = \"* * * * *\"\nkind = \"herald.noop\"\ntz = \"Europe/Bärlin\"\n",
    )
    .unwrap();
    let out = common::herald_output(&db.config, &["--config", &path, "scheduler"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"Europe/Bärlin\"") && err.contains("schedules[0]"),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) FROM herald.schedules").await, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_policies_after_a_downtime_without_a_scheduler() {
    // Time without a scheduler, in whole seconds: ticks past the 1 s grace
    // are missed. The downtime is what the test is about, so it is a sleep.
    const DOWNTIME: i64 = 5;
    let db = TestDb::with(|c| c.scheduler.misfire_grace = Duration::from_secs(1)).await;
    let client = db.client().await;
    for (name, misfire) in [("r-skip", "skip"), ("r-once", "once"), ("r-all", "all")] {
        client
            .execute(
                "SELECT herald.upsert_schedule($1, '* * * * * *', 'herald.noop', '{}', misfire => $2)",
                &[&name, &misfire],
            )
            .await
            .unwrap();
    }
    let per_schedule = "SELECT min(n) FROM (SELECT count(t.id) AS n FROM herald.schedules s \
                        LEFT JOIN herald.tasks t ON t.headers->>'herald_schedule' = s.name \
                        GROUP BY s.name) c";
    let scheduler = SchedulerTask::start(&db);
    assert!(wait_for(&db, per_schedule, 1, Duration::from_secs(5)).await >= 1);
    scheduler.stop().await;
    let before: DateTime<Utc> = client
        .query_one(&format!("SELECT max({TICK}) FROM herald.tasks"), &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_secs(DOWNTIME as u64)).await;
    let restart_from = before + chrono::Duration::seconds(DOWNTIME);
    let scheduler = SchedulerTask::start(&db);
    // Each schedule fires again on time, twice.
    let sql = format!(
        "SELECT min(n) FROM (SELECT count(t.id) AS n FROM herald.schedules s \
         LEFT JOIN herald.tasks t ON t.headers->>'herald_schedule' = s.name \
              AND {TICK} > '{}'::timestamptz + interval '1 second' \
         GROUP BY s.name) c",
        restart_from.to_rfc3339()
    );
    assert!(wait_for(&db, &sql, 2, Duration::from_secs(10)).await >= 2);
    scheduler.stop().await;
    let after = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    &format!(
                        "SELECT {TICK}, created_at, headers FROM herald.tasks \
                         WHERE headers->>'herald_schedule' = $1 AND {TICK} > $2 ORDER BY 1"
                    ),
                    &[&name, &before],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get::<_, DateTime<Utc>>(0),
                        r.get::<_, DateTime<Utc>>(1),
                        r.get::<_, serde_json::Value>(2),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let grace = chrono::Duration::seconds(1);
    // Missed ticks: more than the grace older than the claim that found them.
    let missed = |rows: &[(DateTime<Utc>, DateTime<Utc>, serde_json::Value)]| {
        rows.iter().filter(|(t, c, _)| *t < *c - grace).count()
    };
    // The seconds of downtime: their ticks fire no task under skip, and
    // one (the latest due when the scheduler came back) under once.
    let in_downtime = |rows: &[(DateTime<Utc>, DateTime<Utc>, serde_json::Value)]| {
        rows.iter()
            .filter(|(t, _, _)| *t < restart_from - grace)
            .count()
    };
    let skip = after("r-skip").await;
    assert_eq!(in_downtime(&skip), 0, "skip fires none of the missed ticks");
    assert_eq!(missed(&skip), 0);
    assert!(skip[0].2.get("herald_misfire").is_none());
    let once = after("r-once").await;
    assert_eq!(in_downtime(&once), 0, "once fires no old tick");
    assert_eq!(
        once[0].2["herald_misfire"], "once",
        "but one for the latest"
    );
    assert!(once[0].1 - once[0].0 < chrono::Duration::seconds(2));
    assert!(once[1..]
        .iter()
        .all(|(_, _, h)| h.get("herald_misfire").is_none()));
    let all = after("r-all").await;
    assert!(
        missed(&all) >= (DOWNTIME - 1) as usize,
        "all fires every missed tick: {}",
        missed(&all)
    );
    for pair in all.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            chrono::Duration::seconds(1),
            "no tick left out"
        );
    }
    assert_eq!(all[0].0, before + chrono::Duration::seconds(1));
    for (t, c, h) in &all {
        if *t < *c - grace {
            assert_eq!(h["herald_backfilled"], true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_scheduler_sleeps_until_the_next_tick() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "SELECT herald.upsert_schedule('yearly', '0 0 1 1 *', 'herald.noop', '{}')",
            &[],
        )
        .await
        .unwrap();
    let scheduler = Scheduler::new(&db.config, db.pool());
    let stats = scheduler.stats();
    let task = SchedulerTask::start_with(scheduler);
    wait_for(
        &db,
        "SELECT count(*) FROM herald.schedules WHERE next_run_at IS NOT NULL",
        1,
        Duration::from_secs(5),
    )
    .await;
    // Settle, then watch two seconds in which nothing may happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = stats.cycles.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = stats.cycles.load(std::sync::atomic::Ordering::Relaxed) - settled;
    assert_eq!(idle, 0, "no query while nothing is due and nothing changed");
    // A change wakes it at once (NOTIFY), without waiting for the poll.
    client
        .execute(
            "SELECT herald.upsert_schedule('soon', '* * * * * *', 'herald.noop', '{}')",
            &[],
        )
        .await
        .unwrap();
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks",
            1,
            Duration::from_secs(3)
        )
        .await
            >= 1
    );
    task.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_mid_run_costs_no_tick_and_doubles_none() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let first = HeraldProcess::command(&db.config, &["scheduler"], &[]);
    let second = HeraldProcess::command(&db.config, &["scheduler"], &[]);
    client
        .execute(
            "SELECT herald.upsert_schedule('every-second', '* * * * * *', 'herald.noop', '{}')",
            &[],
        )
        .await
        .unwrap();
    assert!(
        wait_for(
            &db,
            "SELECT count(*) FROM herald.tasks",
            3,
            Duration::from_secs(10)
        )
        .await
            >= 3
    );
    first.kill9().await;
    let killed_at: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let sql = format!(
        "SELECT count(*) FROM herald.tasks WHERE {TICK} > '{}'",
        killed_at.to_rfc3339()
    );
    assert!(wait_for(&db, &sql, 3, Duration::from_secs(10)).await >= 3);
    assert!(second.terminate().await.success());
    let ticks: Vec<DateTime<Utc>> = client
        .query(&format!("SELECT {TICK} FROM herald.tasks ORDER BY 1"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "every tick once, none lost: {ticks:?}"
        );
    }
}
