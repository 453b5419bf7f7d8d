//! The operator's commands against real Postgres: `herald tasks`, `herald dlq`
//! and `herald stats`, run as the `herald` binary, reading and repairing what
//! real workers left behind; bad input fails with a clear message and loses
//! nothing.

use std::time::Duration;

use crate::common::{
    herald_fails as fails, herald_ok as ok, herald_run as herald, scalar as count, TestDb,
};
use herald::{Config, Registry, Task, Worker};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Run in-process workers with the built-in kinds until `sql` counts `n`.
async fn work_until(config: &Config, client: &tokio_postgres::Client, sql: &str, n: i64) {
    let pool = herald::db::pool(config, "herald-worker").expect("pool");
    let token = CancellationToken::new();
    let handle = tokio::spawn(Worker::new(config, pool, Registry::new()).run(token.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(client, sql).await != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers did not reach {n}: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    handle
        .await
        .expect("worker task")
        .expect("worker ends cleanly");
}

fn fast(c: &mut Config) {
    c.worker.queues = vec!["default".into(), "mail".into()];
    c.worker.retry_base = Duration::from_millis(10);
    c.worker.shutdown_grace = Duration::from_secs(2);
    c.postgres.pool_size = 3;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged_from_the_cli() {
    let db = TestDb::with(fast).await;
    let cfg = &db.config;
    let client = db.client().await;
    let fail = |msg: &str| {
        Task::new("herald.fail", &json!({ "message": msg }))
            .unwrap()
            .max_attempts(1)
    };
    let a = herald::enqueue(&client, &fail("boom A")).await.unwrap();
    let b = herald::enqueue(&client, &fail("boom B")).await.unwrap();
    // A kind no worker knows: it fails with a clear error, never blocks.
    let c = herald::enqueue(
        &client,
        &Task::new("mail.send", &json!({"to": "a@example.com"}))
            .unwrap()
            .queue("mail")
            .max_attempts(1),
    )
    .await
    .unwrap();
    work_until(cfg, &client, "SELECT count(*) FROM herald.dead_letters", 3).await;
    let dl = |task: i64| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT id FROM herald.dead_letters WHERE original_id = $1",
                    &[&task],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (dl_a, dl_b, dl_c) = (dl(a).await, dl(b).await, dl(c).await);

    // list: a table, and filters.
    let table = ok(cfg, &["dlq", "list"]).await;
    for id in [dl_a, dl_b, dl_c] {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{id} "))),
            "{id} missing from:\n{table}"
        );
    }
    assert!(
        table.contains("boom A") && table.contains("mail.send"),
        "{table}"
    );
    let mail = json_lines(&ok(cfg, &["dlq", "list", "--kind", "mail.send", "--json"]).await);
    assert_eq!(mail.len(), 1);
    assert_eq!(mail[0]["id"], dl_c);
    assert_eq!(mail[0]["queue"], "mail");
    let err = mail[0]["last_error"].as_str().unwrap();
    assert!(err.contains("mail.send"), "the error names the kind: {err}");
    let default = json_lines(&ok(cfg, &["dlq", "list", "--queue", "default", "--json"]).await);
    assert_eq!(default.len(), 2);
    assert!(default
        .iter()
        .all(|d| d["errors"].as_array().unwrap().len() == 1));
    let recent = json_lines(&ok(cfg, &["dlq", "list", "--since", "1h", "--json"]).await);
    assert_eq!(recent.len(), 3);
    let limited = ok(cfg, &["dlq", "list", "--limit", "1"]).await;
    assert!(limited.contains("1 of 3 shown"), "{limited}");

    // show: the payload and every attempt's error.
    let shown = ok(cfg, &["dlq", "show", &dl_a.to_string()]).await;
    assert!(shown.contains("\"message\": \"boom A\""), "{shown}");
    assert!(
        shown.contains("#1 at ") && shown.contains(": boom A"),
        "{shown}"
    );
    assert!(shown.contains(&format!("task id:      {a}")), "{shown}");

    // replay one by id: a new ready task keeps the error history.
    let out = ok(cfg, &["dlq", "replay", &dl_a.to_string()]).await;
    let new_a: i64 = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no new id in {out:?}"));
    let row = client
        .query_one(
            "SELECT state, attempts, jsonb_array_length(errors), headers->>'replayed_from'
             FROM herald.tasks WHERE id = $1",
            &[&new_a],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    assert_eq!(row.get::<_, i32>(1), 0);
    assert_eq!(row.get::<_, i32>(2), 1);
    assert_eq!(row.get::<_, Option<String>>(3), Some(dl_a.to_string()));

    // replay --all with a filter takes only what matches.
    let out = ok(cfg, &["dlq", "replay", "--all", "--kind", "mail.send"]).await;
    assert!(out.contains("replayed 1 dead letters"), "{out}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE kind = 'mail.send' AND state = 'ready'"
        )
        .await,
        1
    );

    // An unknown id fails by name, and the other ids still replay.
    let out = herald(cfg, &["dlq", "replay", "999999", &dl_b.to_string()]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("no dead letter with id 999999"),
        "{}",
        out.stderr
    );
    assert!(out
        .stdout
        .contains(&format!("dead letter {dl_b} replayed as")));
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        0
    );

    // purge: only what failed before the cut-off goes.
    work_until(cfg, &client, "SELECT count(*) FROM herald.dead_letters", 3).await;
    client
        .execute(
            "UPDATE herald.dead_letters SET failed_at = now() - interval '8 days' WHERE kind = 'mail.send'",
            &[],
        )
        .await
        .unwrap();
    let out = ok(cfg, &["dlq", "purge", "--older-than", "7d"]).await;
    assert!(out.contains("purged 1 dead letters"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM herald.dead_letters WHERE kind = 'herald.fail'"
        )
        .await,
        2
    );

    // Bad input: a clear message, nothing lost.
    let err = fails(cfg, &["dlq", "purge", "--older-than", "-1d"]).await;
    assert!(err.contains("negative"), "{err}");
    let err = fails(cfg, &["dlq", "purge", "--older-than", "soon"]).await;
    assert!(err.contains("\"soon\""), "{err}");
    let err = fails(cfg, &["dlq", "list", "--source", "bogus"]).await;
    assert!(err.contains("\"bogus\"") && err.contains("outbox"), "{err}");
    let err = fails(cfg, &["dlq", "replay"]).await;
    assert!(err.contains("--all"), "{err}");
    let err = fails(cfg, &["dlq", "show", "424242"]).await;
    assert!(err.contains("no dead letter with id 424242"), "{err}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM herald.dead_letters").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_listed_shown_and_cancelled_and_stats_sum_them_up() {
    let db = TestDb::with(fast).await;
    let cfg = &db.config;
    let client = db.client().await;
    let low = herald::enqueue(
        &client,
        &Task::new("report.build", &json!({"n": 1})).unwrap(),
    )
    .await
    .unwrap();
    let high = herald::enqueue(
        &client,
        &Task::new("report.build", &json!({"n": 2}))
            .unwrap()
            .priority(5)
            .unique_key("report:2"),
    )
    .await
    .unwrap();
    let later = herald::enqueue(
        &client,
        &Task::new("mail.send", &json!({"to": "b@example.com"}))
            .unwrap()
            .queue("mail")
            .delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    herald::outbox::publish(
        &client,
        &herald::Event::new("report.ready", &json!({})).unwrap(),
    )
    .await
    .unwrap();

    // Claim order: priority first.
    let listed = json_lines(&ok(cfg, &["tasks", "list", "--queue", "default", "--json"]).await);
    let ids: Vec<i64> = listed.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![high, low]);
    let table = ok(cfg, &["tasks", "list"]).await;
    assert!(
        table.contains("mail.send") && table.contains("in 59m"),
        "{table}"
    );
    let mail = json_lines(&ok(cfg, &["tasks", "list", "--queue", "mail", "--json"]).await);
    assert_eq!(mail.len(), 1);

    let shown = ok(cfg, &["tasks", "show", &high.to_string()]).await;
    assert!(
        shown.contains("report:2") && shown.contains("\"n\": 2"),
        "{shown}"
    );
    assert!(shown.contains("attempts:     0 of 25"), "{shown}");

    // stats, before and after a cancel.
    let snap: Value = serde_json::from_str(&ok(cfg, &["stats", "--json"]).await).unwrap();
    let ready = |snap: &Value, queue: &str| -> i64 {
        snap["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == queue && q["state"] == "ready")
            .map(|q| q["count"].as_i64().unwrap())
            .unwrap_or(0)
    };
    assert_eq!(ready(&snap, "default"), 2);
    assert_eq!(ready(&snap, "mail"), 1);
    assert_eq!(snap["outbox"]["unpublished"], 1);

    let out = ok(cfg, &["tasks", "cancel", &later.to_string()]).await;
    assert!(out.contains(&format!("task {later} cancelled")), "{out}");
    let err = fails(cfg, &["tasks", "cancel", &later.to_string()]).await;
    assert!(
        err.contains(&format!("no unfinished task with id {later}")),
        "{err}"
    );
    let text = ok(cfg, &["stats"]).await;
    assert!(text.contains("outbox: 1 unpublished"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("mail") && l.contains("cancelled")),
        "{text}"
    );

    // Bad input.
    let err = fails(cfg, &["tasks", "list", "--state", "nope"]).await;
    assert!(err.contains("\"nope\"") && err.contains("ready"), "{err}");
    let err = fails(cfg, &["tasks", "show", "999999"]).await;
    assert!(err.contains("no task with id 999999"), "{err}");
    let err = fails(cfg, &["tasks", "show", "abc"]).await;
    assert!(err.contains("abc"), "{err}");
    let err = fails(cfg, &["stats", "--watch", "0s"]).await;
    assert!(err.contains("--watch"), "{err}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM herald.tasks WHERE state = 'ready'"
        )
        .await,
        2
    );
}
