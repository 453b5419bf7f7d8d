//! Webhook subscriptions against a real HTTP server started here: a 2xx
//! completes, a 500 and a timeout are retried, a 400 is a dead letter at
//! once, and the receiver verifies every signature.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{wait_for_count as eventually, TestDb};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use herald::subscriptions::Subscription;
use herald::{Registry, Worker};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "s3cret-for-tests";

/// Per path: (signature valid, body) of each call, in order.
type Calls = HashMap<String, Vec<(bool, serde_json::Value)>>;

#[derive(Clone, Default)]
struct Received {
    calls: Arc<Mutex<Calls>>,
}

async fn hook(
    State(state): State<Received>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let timestamp: i64 = header("herald-timestamp").parse().unwrap_or(0);
    let valid = herald::webhook::verify(SECRET, timestamp, &body, &header("herald-signature"));
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let n = {
        let mut calls = state.calls.lock().unwrap();
        let list = calls.entry(path.clone()).or_default();
        list.push((valid, json));
        list.len()
    };
    match (path.as_str(), n) {
        ("ok", _) => (StatusCode::OK, "ok"),
        ("flaky", 1) => (StatusCode::INTERNAL_SERVER_ERROR, "try again"),
        ("flaky", _) => (StatusCode::NO_CONTENT, ""),
        ("slow", 1) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, "too late")
        }
        ("slow", _) => (StatusCode::OK, "ok"),
        ("bad", _) => (StatusCode::BAD_REQUEST, "payload refused"),
        _ => (StatusCode::NOT_FOUND, "no such hook"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_succeed_retry_fail_permanently_and_are_signed() {
    let received = Received::default();
    let app = axum::Router::new()
        .route("/hooks/{path}", axum::routing::post(hook))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = TestDb::with(|c| {
        c.worker.retry_base = Duration::from_millis(50);
        c.worker.retry_max = Duration::from_millis(100);
        c.postgres.pool_size = 4;
    })
    .await;
    let client = db.client().await;
    for name in ["ok", "flaky", "slow", "bad"] {
        let sub = Subscription::webhook(
            name,
            format!("hook.{name}"),
            format!("http://{addr}/hooks/{name}"),
            SECRET,
        )
        .max_attempts(5)
        .timeout(Duration::from_millis(700));
        herald::subscriptions::upsert(&client, &sub, "api")
            .await
            .unwrap();
    }
    // Bad input is refused by name.
    let err = herald::subscriptions::upsert(
        &client,
        &Subscription::webhook("nourl", "x.*", "ftp://example.com", SECRET),
        "api",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("nourl") && err.contains("http"), "{err}");

    client
        .batch_execute(
            "SELECT herald.publish('hook.ok', '{\"n\": 1}');
             SELECT herald.publish('hook.flaky', '{\"n\": 2}');
             SELECT herald.publish('hook.slow', '{\"n\": 3}');
             SELECT herald.publish('hook.bad', '{\"n\": 4}');",
        )
        .await
        .unwrap();
    let relay = db.relay();
    let pool = herald::db::pool(&db.config, "herald-worker").unwrap();
    let token = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(&db.config, pool, Registry::new()).run(token.clone()));

    // The relay removes the events and queues their tasks in one transaction.
    eventually(&client, "SELECT count(*) FROM herald.outbox", 0, "relayed").await;
    eventually(
        &client,
        "SELECT count(*) FROM herald.tasks WHERE kind = 'herald.webhook'",
        0,
        "every webhook task settled",
    )
    .await;
    let calls = received.calls.lock().unwrap().clone();
    let n = |p: &str| calls.get(p).map(Vec::len).unwrap_or(0);
    assert_eq!(n("ok"), 1);
    assert_eq!(n("flaky"), 2, "a 500 is retried");
    assert!(n("slow") >= 2, "a timeout is retried");
    assert_eq!(n("bad"), 1, "a 400 is not retried");
    assert!(
        calls.values().flatten().all(|(valid, _)| *valid),
        "every signature verifies"
    );
    let (_, body) = &calls["ok"][0];
    assert_eq!(body["topic"], "hook.ok");
    assert_eq!(body["payload"]["n"], 1);

    let row = client
        .query_one(
            "SELECT attempts, last_error, headers->>'herald_subscription' FROM herald.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    let error: String = row.get(1);
    assert!(
        error.contains("400") && error.contains("payload refused"),
        "{error}"
    );
    assert_eq!(row.get::<_, String>(2), "bad");
    let slow_error: String = client
        .query_one(
            "SELECT coalesce(string_agg(e->>'error', ' | '), '')
             FROM herald.dead_letters d, jsonb_array_elements(d.errors) e",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!slow_error.is_empty());

    // A wrong signature does not verify.
    assert!(!herald::webhook::verify(
        "other",
        1,
        b"{}",
        &herald::webhook::sign(SECRET, 1, b"{}")
    ));

    relay.stop().await;
    token.cancel();
    worker.await.unwrap().unwrap();
}
