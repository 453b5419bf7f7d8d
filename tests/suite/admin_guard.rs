//! The admin server's guards against the network: the `Host` check without
//! a token (DNS rebinding), the `Secure` session cookie behind a trusted
//! TLS proxy, and the limit on wrong tokens per client address. Each test
//! serves the real router on 127.0.0.1:<free port> and talks HTTP to it.

use std::time::{Duration, Instant};

use crate::common::{admin_server, wait_for, TestDb};
use herald::admin::dashboard::Dashboard;
use herald::admin::{AdminState, SharedState};
use herald::{Config, Registry, Task, Worker};
use tokio_util::sync::CancellationToken;

/// The admin router served with its connection info, stopped on drop.
struct Server {
    url: String,
    port: u16,
    state: SharedState,
    shutdown: CancellationToken,
    http: reqwest::Client,
}

impl Server {
    async fn start(config: &Config) -> Server {
        let mut state = AdminState::new(
            config.clone(),
            herald::db::pool(config, "herald-guard-test").unwrap(),
            herald::pubsub::redis_pool(config).unwrap(),
        );
        state.dashboard = Dashboard::new(Duration::from_secs(10));
        let served = admin_server::serve(state).await;
        Server {
            url: format!("http://127.0.0.1:{}", served.port),
            port: served.port,
            state: served.state,
            shutdown: served.shutdown,
            http: admin_server::http(),
        }
    }

    fn get(&self, path: &str, host: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .header("host", host)
    }

    /// A POST as the page a browser loaded under `host` would send it: that
    /// page's origin, a valid CSRF token for `action`.
    async fn action(
        &self,
        path: &str,
        host: &str,
        action: &str,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let csrf = self.state.dashboard.csrf.token(action);
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend_from_slice(extra);
        self.http
            .post(format!("{}{path}", self.url))
            .header("host", host)
            .header("origin", format!("http://{host}"))
            .header("sec-fetch-site", "same-origin")
            .form(&form)
            .send()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Dead letters from `herald.fail` tasks with one attempt; their ids.
async fn dead_letters(db: &TestDb, n: usize) -> Vec<i64> {
    let client = db.client().await;
    for i in 0..n {
        let task = Task::new("herald.fail", &serde_json::json!({ "message": i }))
            .unwrap()
            .queue("guard")
            .max_attempts(1);
        herald::queue::enqueue(&client, &task).await.unwrap();
    }
    let mut config = db.config.clone();
    config.worker.queues = vec!["guard".into()];
    config.worker.poll_interval = Duration::from_millis(200);
    let worker = Worker::new(&config, db.pool(), Registry::new());
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    wait_for("the dead letters", Duration::from_secs(30), async || {
        db.count("SELECT count(*) FROM herald.dead_letters").await >= n as i64
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    client
        .query("SELECT id FROM herald.dead_letters ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Everything the actions could change, as one comparable row.
async fn snapshot(db: &TestDb) -> (i64, i64, i64) {
    (
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        db.count("SELECT count(*) FROM herald.tasks").await,
        db.count("SELECT count(*) FROM herald.tasks WHERE state = 'cancelled'")
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_foreign_host_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let dead = dead_letters(&db, 2).await;
    let later = herald::queue::enqueue(
        &db.client().await,
        &Task::new("guard.later", &serde_json::json!({}))
            .unwrap()
            .queue("guard")
            .delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let server = Server::start(&db.config).await;
    let before = snapshot(&db).await;
    let rebound = format!("rebind.example:{}", server.port);

    // A page, a JSON endpoint, the metrics: 421, naming the Host.
    for path in ["/", "/dead-letters", "/readyz", "/healthz", "/metrics"] {
        let r = server.get(path, &rebound).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 421, "{path}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(&rebound) && body.contains("admin.token"),
            "{path}: {body}"
        );
        assert!(!body.contains("herald_"), "{path} leaked metrics: {body}");
    }
    // The loopback names on another port are not this server either.
    let r = server
        .get("/metrics", &format!("127.0.0.1:{}", server.port + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 421);

    // Same-origin actions from the rebinding page, with valid CSRF tokens.
    let replay = server
        .action(
            &format!("/dead-letters/{}/replay", dead[0]),
            &rebound,
            "replay",
            &[],
        )
        .await;
    assert_eq!(replay.status().as_u16(), 421);
    let one = dead[1].to_string();
    let many = server
        .action(
            "/dead-letters/replay",
            &rebound,
            "replay-many",
            &[("one", one.as_str())],
        )
        .await;
    assert_eq!(many.status().as_u16(), 421);
    let purge = server
        .action(
            "/dead-letters/purge",
            &rebound,
            "purge",
            &[("older_than", "1s")],
        )
        .await;
    assert_eq!(purge.status().as_u16(), 421);
    let cancel = server
        .action(&format!("/tasks/{later}/cancel"), &rebound, "cancel", &[])
        .await;
    assert_eq!(cancel.status().as_u16(), 421);
    assert_eq!(snapshot(&db).await, before, "nothing changed");

    // The names a local browser uses answer.
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        let host = format!("{host}:{}", server.port);
        let r = server.get("/metrics", &host).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{host}");
        let r = server.get("/", &host).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{host}");
    }
    // The same form under the real name does what it says.
    let local = format!("localhost:{}", server.port);
    let cancel = server
        .action(&format!("/tasks/{later}/cancel"), &local, "cancel", &[])
        .await;
    assert_eq!(cancel.status().as_u16(), 303);
    assert_eq!(snapshot(&db).await.2, before.2 + 1, "cancelled");
}

#[tokio::test]
async fn with_a_token_any_host_may_ask_and_an_empty_token_is_no_token() {
    let db = TestDb::with(|c| c.admin.token = Some("s3cret-token".into())).await;
    let server = Server::start(&db.config).await;
    let named = format!("herald.internal.example:{}", server.port);
    let r = server
        .get("/metrics", &named)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "a proxy's name, with the token");
    let r = server.get("/metrics", &named).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "the token still guards");

    // HERALD_ADMIN_TOKEN="" (a compose file passing an unset variable on)
    // is no token: refused off loopback, Host-checked on it.
    let mut config = db.config.clone();
    config.admin.token = Some(String::new());
    config.admin.bind = "0.0.0.0:9187".into();
    let error = herald::admin::check_bind(&config).unwrap_err().to_string();
    assert!(error.contains("HERALD_ADMIN_TOKEN"), "{error}");
    config.admin.bind = "127.0.0.1:9187".into();
    let server = Server::start(&config).await;
    let r = server.get("/metrics", &named).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 421);
}

/// The session cookie of a successful sign-in, as sent.
async fn sign_in(server: &Server, headers: &[(&str, &str)]) -> String {
    let mut request = server
        .http
        .post(format!("{}/login", server.url))
        .form(&[("token", "s3cret-token")]);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    r.headers()["set-cookie"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn the_session_cookie_is_secure_when_a_trusted_proxy_says_https() {
    let https = [("x-forwarded-proto", "https")];
    // No trusted proxy: the header is anyone's to write, and ignored.
    let db = TestDb::with(|c| c.admin.token = Some("s3cret-token".into())).await;
    let server = Server::start(&db.config).await;
    let cookie = sign_in(&server, &https).await;
    assert!(!cookie.contains("Secure"), "{cookie}");

    // The peer (127.0.0.1) is the trusted proxy.
    let mut config = db.config.clone();
    config.admin.trusted_proxies = vec!["127.0.0.0/8".into()];
    let server = Server::start(&config).await;
    let cookie = sign_in(&server, &https).await;
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let cookie = sign_in(&server, &[("x-forwarded-proto", "http")]).await;
    assert!(!cookie.contains("Secure"), "{cookie}");
    let cookie = sign_in(&server, &[]).await;
    assert!(!cookie.contains("Secure"), "{cookie}");

    // A wrong entry is refused at start, naming the setting.
    config.admin.trusted_proxies = vec!["10.0.0.0/33".into()];
    let error = config.check_settings().unwrap_err().to_string();
    assert!(error.contains("admin.trusted_proxies"), "{error}");
}

#[tokio::test]
async fn wrong_tokens_are_limited_per_client_then_the_window_reopens() {
    let window = Duration::from_secs(3);
    let db = TestDb::with(|c| {
        c.admin.token = Some("s3cret-token".into());
        c.admin.login_max_failures = 3;
        c.admin.login_window = window;
        c.admin.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let server = Server::start(&db.config).await;
    let login = |token: &'static str, client: &'static str| {
        server
            .http
            .post(format!("{}/login", server.url))
            .header("x-forwarded-for", client)
            .form(&[("token", token)])
            .send()
    };
    let first_failure = Instant::now();
    for _ in 0..3 {
        let r = login("guess", "203.0.113.7").await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    // Past the limit even the right token is refused: a guesser must not
    // learn which guess was right.
    for token in ["guess", "s3cret-token"] {
        let r = login(token, "203.0.113.7").await.unwrap();
        assert_eq!(r.status().as_u16(), 429, "{token}");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=window.as_secs()).contains(&retry), "{retry}");
        assert!(r.text().await.unwrap().contains("admin.login_max_failures"));
    }
    // The bearer token is a sign-in too.
    let r = server
        .http
        .get(format!("{}/metrics", server.url))
        .header("x-forwarded-for", "203.0.113.7")
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    // Another client behind the same trusted proxy is not held back.
    let r = login("s3cret-token", "198.51.100.2").await.unwrap();
    assert_eq!(r.status().as_u16(), 303);

    // Once the window has passed the oldest failure, the right token works.
    let mut reopened = None;
    while first_failure.elapsed() < window * 3 {
        let r = login("s3cret-token", "203.0.113.7").await.unwrap();
        if r.status().as_u16() == 303 {
            reopened = Some(first_failure.elapsed());
            break;
        }
        assert_eq!(r.status().as_u16(), 429);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reopened = reopened.expect("the limit lifts after the window");
    assert!(reopened >= window, "lifted after {reopened:?}");
}

#[tokio::test]
async fn an_untrusted_peer_cannot_escape_the_limit_with_forwarded_headers() {
    let db = TestDb::with(|c| {
        c.admin.token = Some("s3cret-token".into());
        c.admin.login_max_failures = 2;
    })
    .await;
    let server = Server::start(&db.config).await;
    for (i, client) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
        let r = server
            .http
            .get(format!("{}/metrics", server.url))
            .header("x-forwarded-for", *client)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap();
        let want = if i < 2 { 401 } else { 429 };
        assert_eq!(r.status().as_u16(), want, "attempt {i}");
    }
    // A signed-in browser (cookie) is not a sign-in attempt: it keeps working.
    let session = {
        let mut config = db.config.clone();
        config.admin.login_max_failures = 5;
        let other = Server::start(&config).await;
        sign_in(&other, &[]).await
    };
    let session = session.split(';').next().unwrap().to_string();
    let r = server
        .http
        .get(format!("{}/metrics", server.url))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
