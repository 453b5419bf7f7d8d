//! Fault tests: holes. See main.rs.
//!
//! The smaller holes of issue 14 (item 10): each bad input gets a clear
//! error naming what is wrong and the limit, and nothing already stored is
//! lost.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::{Event, Task};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::common::{scalar, wait_for_count, TestDb};

/// `herald <args…>` against the test database with extra environment,
/// stopped after `limit` (None when it had not ended by then).
async fn herald_cli(
    db: &TestDb,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Option<std::process::Output> {
    let mut cmd = crate::common::herald_command(&db.config, args, env);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("running herald");
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .ok()
        .map(|o| o.expect("herald output"))
}

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

fn pg_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_task_keeps_its_unique_key_and_waits_for_a_live_holder() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let first = herald::enqueue(
        &client,
        &Task::new("hole.report", &json!({"n": 1}))
            .unwrap()
            .unique_key("report:2026-12-05"),
    )
    .await
    .unwrap();
    // Its one attempt fails for good: a dead letter.
    client
        .batch_execute(&format!(
            "UPDATE herald.tasks SET state = 'running', attempts = 1, leased_by = 'w1',
                    lease_expires_at = now() + interval '1 minute' WHERE id = {first};
             SELECT herald.fail_task({first}, 1, 'w1', 'boom', now(), true);"
        ))
        .await
        .unwrap();
    let dead = scalar(&client, "SELECT id FROM herald.dead_letters").await;

    // Meanwhile the same unique work was enqueued again and is live.
    let live = herald::enqueue(
        &client,
        &Task::new("hole.report", &json!({"n": 2}))
            .unwrap()
            .unique_key("report:2026-12-05"),
    )
    .await
    .unwrap();
    let refused = herald::dlq::replay(&client, dead).await;
    let bulk = herald::dlq::replay_matching(&client, &herald::dlq::Filter::default(), 100)
        .await
        .unwrap();
    let live_holders = scalar(
        &client,
        "SELECT count(*) FROM herald.tasks WHERE unique_key = 'report:2026-12-05' AND state IN ('ready', 'running')",
    )
    .await;
    eprintln!(
        "while held: replay -> {refused:?}; bulk replayed {}; live tasks holding the key: {live_holders}",
        bulk.len()
    );
    let err = refused.expect_err("replaying while a live task holds the key is refused");
    let err = err.to_string();
    assert!(
        err.contains(&format!("task {live}")) && err.contains("report:2026-12-05"),
        "{err}"
    );
    assert!(bulk.is_empty(), "a bulk replay skips it");
    assert_eq!(live_holders, 1);
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.dead_letters").await,
        1,
        "the dead letter is kept"
    );

    // Once the holder is gone, the replay takes the key back.
    herald::queue::cancel(&client, live).await.unwrap();
    let replayed = herald::dlq::replay(&client, dead).await.unwrap();
    let key: Option<String> = client
        .query_one(
            "SELECT unique_key FROM herald.tasks WHERE id = $1",
            &[&replayed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key.as_deref(), Some("report:2026-12-05"));
    let again = herald::enqueue(
        &client,
        &Task::new("hole.report", &json!({"n": 3}))
            .unwrap()
            .unique_key("report:2026-12-05"),
    )
    .await
    .unwrap();
    assert_eq!(again, replayed, "the key deduplicates against the replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_keys_and_headers_have_size_limits() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let long_key = "k".repeat(2000);
    let big_header = "h".repeat(20_000);

    let rust_key = herald::publish(
        &client,
        &Event::new("hole.t", &json!({})).unwrap().key(&long_key),
    )
    .await;
    let rust_headers = herald::publish(
        &client,
        &Event::new("hole.t", &json!({}))
            .unwrap()
            .header("big", big_header.as_str()),
    )
    .await;
    let sql_key = client
        .execute(
            "SELECT herald.publish('hole.t', '{}', $1)",
            &[&long_key.as_str()],
        )
        .await;
    let sql_headers = client
        .execute(
            "SELECT herald.publish('hole.t', '{}', NULL, jsonb_build_object('big', $1::text))",
            &[&big_header.as_str()],
        )
        .await;
    let stored = scalar(&client, "SELECT count(*) FROM herald.outbox").await;
    eprintln!("stored {stored} of 4 oversized events");
    let msg = |r: Result<String, String>| r.expect_err("refused");
    let rust_key = msg(rust_key.map(|_| String::new()).map_err(|e| e.to_string()));
    assert!(
        rust_key.contains("key too long") && rust_key.contains("1024"),
        "{rust_key}"
    );
    let rust_headers = msg(rust_headers
        .map(|_| String::new())
        .map_err(|e| e.to_string()));
    assert!(
        rust_headers.contains("headers too large") && rust_headers.contains("16384"),
        "{rust_headers}"
    );
    let sql_key = msg(sql_key.map(|_| String::new()).map_err(|e| pg_error(&e)));
    assert!(
        sql_key.contains("key too long") && sql_key.contains("1024"),
        "{sql_key}"
    );
    let sql_headers = msg(sql_headers.map(|_| String::new()).map_err(|e| pg_error(&e)));
    assert!(
        sql_headers.contains("headers too large") && sql_headers.contains("16384"),
        "{sql_headers}"
    );
    assert_eq!(stored, 0);

    // At the limits, accepted.
    herald::publish(
        &client,
        &Event::new("hole.t", &json!({}))
            .unwrap()
            .key("k".repeat(1024)),
    )
    .await
    .unwrap();
    client
        .execute(
            "SELECT herald.publish('hole.t', '{}', repeat('k', 1024))",
            &[],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_nested_too_deep_are_refused_where_they_enter() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let deep = nested(150);
    let deep_text = deep.to_string();

    // What a consumer would get: the envelope does not decode.
    let envelope = Event::from_json_str("hole.deep", "{}")
        .unwrap()
        .envelope_json()
        .replace("\"payload\":{}", &format!("\"payload\":{deep_text}"));
    assert!(serde_json::from_str::<herald::Envelope>(&envelope).is_err());

    let mut refused = vec![
        Event::new("hole.deep", &deep)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Event::from_json_str("hole.deep", &deep_text)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Task::new("hole.deep", &deep)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Task::from_json_str("hole.deep", &deep_text)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    ];
    if let Ok(event) = Event::new("hole.deep", &deep) {
        refused.push(
            herald::publish(&client, &event)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    }
    refused.push(
        client
            .execute(
                "SELECT herald.publish('hole.deep', $1::text::jsonb)",
                &[&deep_text],
            )
            .await
            .map(|_| ())
            .map_err(|e| pg_error(&e)),
    );
    refused.push(
        client
            .execute(
                "SELECT herald.enqueue('hole.deep', $1::text::jsonb)",
                &[&deep_text],
            )
            .await
            .map(|_| ())
            .map_err(|e| pg_error(&e)),
    );
    refused.push(
        herald::enqueue(
            &client,
            &Task::new("hole.deep", &json!({}))
                .unwrap()
                .header("deep", deep.clone()),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string()),
    );
    let accepted = refused.iter().filter(|r| r.is_ok()).count();
    eprintln!(
        "150 levels deep: {accepted} of {} entries accepted",
        refused.len()
    );
    for r in &refused {
        let e = r.as_ref().expect_err("a 150-level payload is refused");
        assert!(e.contains("100") && e.contains("deep"), "{e}");
    }
    assert_eq!(
        scalar(
            &client,
            "SELECT (SELECT count(*) FROM herald.outbox) + (SELECT count(*) FROM herald.tasks)"
        )
        .await,
        0
    );

    // At the limit: accepted everywhere, and its envelope decodes.
    let ok = nested(100);
    let event = Event::new("hole.deep", &ok).unwrap();
    let decoded: herald::Envelope = serde_json::from_str(&event.envelope_json()).unwrap();
    assert_eq!(decoded.payload, ok);
    herald::publish(&client, &event).await.unwrap();
    herald::enqueue(&client, &Task::new("hole.deep", &ok).unwrap())
        .await
        .unwrap();
    client
        .execute(
            "SELECT herald.publish('hole.deep', $1::text::jsonb)",
            &[&ok.to_string()],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_tick_ten_seconds_late_still_fires_by_default() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // A daily schedule whose tick came 10 s ago, while Postgres failed over
    // and no scheduler could claim it (the default policy, skip).
    let tick: chrono::DateTime<chrono::Utc> = client
        .query_one(
            "SELECT date_trunc('second', now()) - interval '10 seconds'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let cron = tick.format("%S %M %H * * *").to_string();
    client
        .execute(
            "SELECT herald.upsert_schedule('daily-report', $1, 'herald.noop', '{}')",
            &[&cron],
        )
        .await
        .unwrap();
    client
        .execute("UPDATE herald.schedules SET next_run_at = $1", &[&tick])
        .await
        .unwrap();
    let token = CancellationToken::new();
    let scheduler =
        tokio::spawn(herald::cron::Scheduler::new(&db.config, db.pool()).run(token.clone()));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let moved = scalar(
            &client,
            "SELECT count(*) FROM herald.schedules WHERE next_run_at > now()",
        )
        .await;
        if moved == 1 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    let _ = scheduler.await;
    let fired = scalar(
        &client,
        "SELECT count(*) FROM herald.tasks WHERE headers->>'herald_schedule' = 'daily-report'",
    )
    .await;
    eprintln!("daily tick 10 s late: {fired} task(s) fired");
    assert_eq!(fired, 1, "the late daily tick fires once, not skipped");
}

/// A receiver that answers 500 with a 100 MiB body; counts what it wrote.
async fn huge_error_server(written: Arc<AtomicU64>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                // Read the request head and whatever body came with it.
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let total: u64 = 100 * 1024 * 1024;
                let head = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: {total}\r\n\r\n"
                );
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'e'; 65536];
                let mut sent = 0u64;
                while sent < total {
                    if sock.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                    written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_error_body_is_bounded_and_its_url_never_stored() {
    let written = Arc::new(AtomicU64::new(0));
    let addr = huge_error_server(written.clone()).await;
    let db = TestDb::with(|c| c.postgres.pool_size = 4).await;
    let client = db.client().await;
    let url = format!("http://hook-user:pw-S3CRET@{addr}/hooks/PATH-S3CRET?token=QUERY-S3CRET");
    let sub = herald::subscriptions::Subscription::webhook("huge", "hole.hook", &url, "sign-key")
        .max_attempts(1)
        .timeout(Duration::from_secs(20));
    herald::subscriptions::upsert(&client, &sub, "api")
        .await
        .unwrap();
    client
        .batch_execute("SELECT herald.publish('hole.hook', '{\"n\": 1}')")
        .await
        .unwrap();
    let relay = db.relay();
    let pool = herald::db::pool(&db.config, "herald-worker").unwrap();
    let token = CancellationToken::new();
    let worker = tokio::spawn(
        herald::Worker::new(&db.config, pool, herald::Registry::new()).run(token.clone()),
    );
    let t0 = Instant::now();
    wait_for_count(
        &client,
        "SELECT count(*) FROM herald.dead_letters WHERE source = 'task'",
        1,
        "the webhook's dead letter",
    )
    .await;
    let took = t0.elapsed();
    token.cancel();
    let _ = worker.await;
    relay.stop().await;
    let row = client
        .query_one(
            "SELECT last_error, errors::text FROM herald.dead_letters WHERE source = 'task'",
            &[],
        )
        .await
        .unwrap();
    let (last_error, errors): (String, String) = (row.get(0), row.get(1));
    let mib = written.load(Ordering::SeqCst) / (1024 * 1024);
    eprintln!("server wrote {mib} MiB of its 100 MiB error body; failed after {took:?}; last_error: {last_error}");
    assert!(last_error.contains("HTTP 500"), "{last_error}");
    assert!(
        last_error.contains("eeee"),
        "the body's start is kept: {last_error}"
    );
    for secret in ["S3CRET", "pw-", "hook-user"] {
        assert!(
            !last_error.contains(secret) && !errors.contains(secret),
            "{secret} stored: {last_error} / {errors}"
        );
    }
    assert!(mib < 32, "the error body was read whole: {mib} MiB");
}

#[test]
fn mask_url_hides_secrets_in_the_query() {
    let masked = herald::config::mask_url(
        "postgres://app@db:5432/app?sslmode=require&password=hunter2&sslpassword=k3y&api_key=abc&application_name=x",
    );
    eprintln!("{masked}");
    for secret in ["hunter2", "k3y", "abc"] {
        assert!(!masked.contains(secret), "{secret} in {masked}");
    }
    assert!(
        masked.contains("sslmode=require") && masked.contains("application_name=x"),
        "{masked}"
    );
    assert_eq!(
        herald::config::mask_url("redis://:pw@cache:6379/0?token=t0k"),
        "redis://:****@cache:6379/0?token=****"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_names_the_task_kind_of_an_oversized_payload() {
    let db = TestDb::new().await;
    let out = herald_cli(
        &db,
        &[
            "enqueue",
            "report.build",
            &format!("{{\"pad\": \"{}\"}}", "x".repeat(200)),
        ],
        &[("HERALD_MAX_PAYLOAD_BYTES", "100")],
        Duration::from_secs(20),
    )
    .await
    .expect("herald enqueue ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("herald enqueue: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("task kind \"report.build\"") && !stderr.contains("topic"),
        "{stderr}"
    );
    assert!(stderr.contains("limit is 100"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_tail_refuses_patterns_that_can_never_match() {
    let db = TestDb::new().await;
    for (pattern, needle) in [
        ("payment.#", "'#'"),
        ("payments/created", "'/'"),
        ("order *", "' '"),
    ] {
        let t0 = Instant::now();
        let out = herald_cli(&db, &["tail", pattern], &[], Duration::from_secs(10)).await;
        let Some(out) = out else {
            panic!(
                "herald tail {pattern:?} was still waiting after {:?}",
                t0.elapsed()
            );
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{pattern}: {stderr}");
        assert!(
            stderr.contains(pattern) && stderr.contains(needle),
            "{pattern}: {stderr}"
        );
    }
    // The channel prefix given by mistake.
    let with_prefix = format!("{}payment.*", db.config.channel_prefix);
    let out = herald_cli(&db, &["tail", &with_prefix], &[], Duration::from_secs(10))
        .await
        .expect("herald tail with the prefix ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("channel prefix"), "{stderr}");
    // A good pattern still follows (and is stopped here).
    assert!(
        herald_cli(&db, &["tail", "payment.*"], &[], Duration::from_secs(2))
            .await
            .is_none(),
        "a valid pattern keeps following"
    );
}
