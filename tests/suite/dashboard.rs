//! The admin dashboard driven by a real browser: headless Chromium through
//! chromedriver (Debian's `chromium` and `chromium-driver` packages, which
//! `.ci/run` installs), against the real admin router on a real port and a
//! fresh migrated database per test. Clicks change the database; the tests
//! check the rows.
//!
//! `cargo test --test suite dashboard::screenshots -- --ignored` refreshes the PNGs
//! in docs/ from a seeded database.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::{free_port, wait_for, TestDb};
use fantoccini::{Client, ClientBuilder, Locator};
use herald::admin::dashboard::Dashboard;
use herald::admin::{AdminState, SharedState};
use herald::{Registry, Task, Worker};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio_util::sync::CancellationToken;

/// One browser at a time: two cores are shared by everything.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chromedriver_path() -> PathBuf {
    let path = PathBuf::from(
        std::env::var("HERALD_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
    );
    assert!(
        path.exists(),
        "{} not found: the dashboard tests need headless Chromium. Install Debian's packages \
         with `apt-get install -y chromium chromium-driver` (.ci/run does this when they are \
         missing), or point HERALD_CHROMEDRIVER at a chromedriver binary",
        path.display()
    );
    path
}

fn chromium_path() -> String {
    let path = std::env::var("HERALD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} not found: install Debian's chromium package (`apt-get install -y chromium \
         chromium-driver`), or point HERALD_CHROMIUM at a Chromium binary"
    );
    path
}

/// chromedriver in its own process group (killed with its browsers on drop)
/// and a WebDriver session on it.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl Browser {
    async fn start() -> Browser {
        let lock = BROWSER.lock().await;
        let driver_path = chromedriver_path();
        let chromium = chromium_path();
        let port = free_port();
        let driver = tokio::process::Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver_path.display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            // Plain HTTP to the local chromedriver: no TLS stack needed.
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver on port {port}: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _lock: lock,
        }
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            // The whole group: chromedriver and the Chromium it started.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

/// The admin router on a free port of 127.0.0.1.
struct Server {
    url: String,
    state: SharedState,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(db: &TestDb, read_only: bool) -> Server {
        Server::with_sampling(db, read_only, Duration::from_secs(10)).await
    }

    async fn with_sampling(db: &TestDb, read_only: bool, every: Duration) -> Server {
        let mut state = AdminState::new(
            db.config.clone(),
            db.pool(),
            herald::pubsub::redis_pool(&db.config).unwrap(),
        );
        state.read_only = read_only;
        state.dashboard = Dashboard::new(every);
        let served = crate::common::admin_server::serve(state).await;
        herald::admin::dashboard::start_sampler(&served.state, served.shutdown.clone());
        Server {
            url: format!("http://127.0.0.1:{}", served.port),
            state: served.state,
            shutdown: served.shutdown,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The text of the page's flash message once `done` holds for it: an
/// action's answer replaces the page, so the flash of an earlier action may
/// still be there, or go stale, while it loads. The last text seen (for the
/// caller's assertion) when 10 s pass first.
async fn flash_when(c: &fantoccini::Client, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    loop {
        if let Ok(element) = c.find(Locator::Css("p.flash")).await {
            if let Ok(text) = element.text().await {
                if done(&text) {
                    return text;
                }
                last = text;
            }
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Enqueue `herald.fail` tasks with one attempt each and run a worker until
/// they are all dead letters; returns the dead-letter ids.
async fn make_dead_letters(db: &TestDb, queue: &str, messages: &[&str]) -> Vec<i64> {
    let client = db.client().await;
    for m in messages {
        let task = Task::new("herald.fail", &serde_json::json!({ "message": m }))
            .unwrap()
            .queue(queue)
            .max_attempts(1);
        herald::queue::enqueue(&client, &task).await.unwrap();
    }
    let mut config = db.config.clone();
    config.worker.queues = vec![queue.into()];
    config.worker.poll_interval = Duration::from_millis(200);
    let worker = Worker::new(&config, db.pool(), Registry::new());
    let stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(stop.clone()));
    let want = messages.len() as i64;
    let sql = format!("SELECT count(*) FROM herald.dead_letters WHERE queue = '{queue}'");
    wait_for("the dead letters", Duration::from_secs(30), async || {
        db.count(&sql).await >= want
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    client
        .query(
            "SELECT id FROM herald.dead_letters WHERE queue = $1 ORDER BY id",
            &[&queue],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn add_schedule(db: &TestDb, name: &str, cron: &str, tz: &str) {
    let client = db.client().await;
    let schedule = herald::cron::Schedule::new(name, cron, "herald.noop", &serde_json::json!({}))
        .unwrap()
        .tz(tz);
    herald::cron::upsert(&client, &schedule).await.unwrap();
}

/// The schedule's next two fire times as the page writes them, in its own
/// zone (two: a tick may pass between the page and this read).
async fn next_fires(db: &TestDb, name: &str) -> Vec<String> {
    let rows = herald::cron::list(&db.client().await).await.unwrap();
    let row = rows.iter().find(|r| r.name == name).unwrap();
    row.upcoming(2)
        .unwrap()
        .iter()
        .map(|t| t.format("%a %Y-%m-%d %H:%M:%S %Z").to_string())
        .collect()
}

async fn body_text(browser: &Client) -> String {
    browser
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A plain HTTP client that does not follow redirects.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_loads_with_its_figures() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(&db, "mail", &["smtp refused: 550 mailbox unavailable"]).await;
    add_schedule(&db, "nightly-report", "0 30 2 * * *", "Europe/Paris").await;
    let task_id = herald::queue::enqueue(
        &db.client().await,
        &Task::new("report.build", &serde_json::json!({"day": "2026-11-25"}))
            .unwrap()
            .queue("reports"),
    )
    .await
    .unwrap();
    let server = Server::start(&db, false).await;

    let pages: Vec<(String, Vec<&str>)> = vec![
        (
            "/".into(),
            vec![
                "Overview",
                "Ready tasks",
                "Outbox backlog",
                "Relay lag",
                "Dead letters",
                "Throughput",
                "reports",
            ],
        ),
        ("/queues".into(), vec!["Queues", "reports", "report.build"]),
        (
            format!("/tasks/{task_id}"),
            vec!["report.build", "2026-11-25"],
        ),
        (
            "/dead-letters".into(),
            vec!["1 dead letters match", "herald.fail", "smtp refused"],
        ),
        (
            format!("/dead-letters/{}", dead[0]),
            vec![
                "Error history",
                "smtp refused: 550 mailbox unavailable",
                "Payload",
            ],
        ),
        (
            "/schedules".into(),
            vec!["nightly-report", "Europe/Paris", "active"],
        ),
    ];
    let http = http();
    for (path, _) in &pages {
        let resp = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "GET {path}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }
    let resp = http.get(&server.url).send().await.unwrap();
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let resp = http
        .get(format!("{}/dead-letters/999999", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let browser = Browser::start().await;
    for (path, texts) in &pages {
        browser
            .client
            .goto(&format!("{}{path}", server.url))
            .await
            .unwrap();
        // Lower case: WebDriver text follows CSS text-transform.
        let text = body_text(&browser.client).await.to_lowercase();
        for t in texts {
            assert!(
                text.contains(&t.to_lowercase()),
                "{path} should show {t:?}; it shows:\n{text}"
            );
        }
    }
    // The next fire time is shown in the schedule's zone (CET or CEST).
    let text = body_text(&browser.client).await;
    let next = next_fires(&db, "nightly-report").await;
    assert!(next.iter().any(|t| text.contains(t)), "{next:?} in\n{text}");
    // The overview's charts are inline SVG.
    browser.client.goto(&server.url).await.unwrap();
    let charts = browser
        .client
        .find_all(Locator::Css("figure.chart svg"))
        .await
        .unwrap();
    assert_eq!(charts.len(), 2);
    // Filters narrow the list through the query string.
    browser
        .client
        .goto(&format!("{}/dead-letters?error=no+such+error", server.url))
        .await
        .unwrap();
    assert!(body_text(&browser.client)
        .await
        .contains("No dead letters match."));
    // The error filter matches part of the last error, in any case.
    browser
        .client
        .goto(&format!("{}/dead-letters?error=MAILBOX", server.url))
        .await
        .unwrap();
    assert!(body_text(&browser.client)
        .await
        .contains("1 dead letters match"));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_dead_letter_by_clicking_puts_a_task_back() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(&db, "payments", &["card declined"]).await;
    let server = Server::start(&db, false).await;
    let browser = Browser::start().await;
    let c = &browser.client;

    c.goto(&format!("{}/dead-letters", server.url))
        .await
        .unwrap();
    c.find(Locator::LinkText(&dead[0].to_string()))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(body_text(c).await.contains("card declined"));
    c.find(Locator::XPath("//button[normalize-space()='Replay']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = flash_when(c, |t| {
        t.contains(&format!("Dead letter {} replayed as task", dead[0]))
    })
    .await;
    assert!(
        flash.contains(&format!("Dead letter {} replayed as task", dead[0])),
        "{flash}"
    );
    assert!(c.current_url().await.unwrap().path() == "/dead-letters");

    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0,
        "the dead letter is gone"
    );
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT state, queue, payload->>'message', attempts FROM herald.tasks WHERE kind = 'herald.fail'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "ready");
    assert_eq!(row.get::<_, String>(1), "payments");
    assert_eq!(row.get::<_, String>(2), "card declined");
    assert_eq!(
        row.get::<_, i32>(3),
        0,
        "a replay starts with fresh attempts"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_selected_dead_letters_and_purging() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(&db, "batch", &["one", "two", "three"]).await;
    let server = Server::start(&db, false).await;
    let browser = Browser::start().await;
    let c = &browser.client;

    c.goto(&format!("{}/dead-letters?queue=batch", server.url))
        .await
        .unwrap();
    for id in &dead[..2] {
        c.find(Locator::Css(&format!("input[name=id][value='{id}']")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }
    c.find(Locator::XPath(
        "//button[normalize-space()='Replay selected']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let flash = flash_when(c, |t| t.starts_with("Replayed 2 dead letters")).await;
    assert!(flash.starts_with("Replayed 2 dead letters"), "{flash}");
    // Back on the filtered list.
    assert_eq!(
        c.current_url()
            .await
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "queue")
            .unwrap()
            .1,
        "batch"
    );
    let left: Vec<i64> = db
        .client()
        .await
        .query("SELECT id FROM herald.dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![dead[2]]);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE state = 'ready'")
            .await,
        2
    );

    // Purge (the confirm() dialog is accepted).
    c.find(Locator::Css("#purge-form input[name=older_than]"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    c.find(Locator::Css("#purge-form input[name=older_than]"))
        .await
        .unwrap()
        .send_keys("0s")
        .await
        .unwrap();
    c.find(Locator::Css("#purge-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.unwrap();
    let flash = flash_when(c, |t| t.starts_with("Purged 1 dead letters")).await;
    assert!(flash.starts_with("Purged 1 dead letters"), "{flash}");
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_resuming_and_triggering_a_schedule_by_clicking() {
    let db = TestDb::new().await;
    add_schedule(&db, "hourly-sync", "0 0 * * * *", "America/New_York").await;
    let server = Server::start(&db, false).await;
    let browser = Browser::start().await;
    let c = &browser.client;
    let enabled = async || -> bool {
        db.client()
            .await
            .query_one(
                "SELECT enabled FROM herald.schedules WHERE name = 'hourly-sync'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };

    c.goto(&format!("{}/schedules", server.url)).await.unwrap();
    let row = body_text(c).await;
    let next = next_fires(&db, "hourly-sync").await;
    assert!(
        row.contains("America/New_York") && next.iter().any(|t| row.contains(t)),
        "{next:?} in\n{row}"
    );
    c.find(Locator::XPath(
        "//tr[@id='schedule-hourly-sync']//button[normalize-space()='Pause']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let flash = flash_when(c, |t| t == "Schedule hourly-sync paused.").await;
    assert_eq!(flash, "Schedule hourly-sync paused.");
    assert!(
        !enabled().await,
        "herald.schedules.enabled is false after Pause"
    );
    assert!(body_text(c).await.contains("paused"));

    c.find(Locator::XPath(
        "//tr[@id='schedule-hourly-sync']//button[normalize-space()='Resume']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    c.wait()
        .for_element(Locator::XPath(
            "//p[contains(@class,'flash') and contains(., 'resumed')]",
        ))
        .await
        .unwrap();
    assert!(enabled().await, "enabled again after Resume");

    c.find(Locator::XPath(
        "//tr[@id='schedule-hourly-sync']//button[normalize-space()='Trigger now']",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let flash = c
        .wait()
        .for_element(Locator::XPath(
            "//p[contains(@class,'flash') and contains(., 'triggered')]",
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let task_id: i64 = flash
        .trim_end_matches('.')
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let kind: String = db
        .client()
        .await
        .query_one("SELECT kind FROM herald.tasks WHERE id = $1", &[&task_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kind, "herald.noop");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_mode_shows_no_actions_and_refuses_posts() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(&db, "ro", &["boom"]).await;
    add_schedule(&db, "ro-schedule", "0 0 * * * *", "UTC").await;
    let task = herald::queue::enqueue(
        &db.client().await,
        &Task::new("herald.noop", &serde_json::json!({})).unwrap(),
    )
    .await
    .unwrap();
    let server = Server::start(&db, true).await;
    let browser = Browser::start().await;
    let c = &browser.client;
    for path in [
        "/".to_string(),
        "/queues".into(),
        format!("/tasks/{task}"),
        "/dead-letters".into(),
        format!("/dead-letters/{}", dead[0]),
        "/schedules".into(),
    ] {
        c.goto(&format!("{}{path}", server.url)).await.unwrap();
        let text = body_text(c).await;
        assert!(text.contains("read-only"), "{path} says read-only");
        let forms = c.find_all(Locator::Css("form[method=post]")).await.unwrap();
        assert!(
            forms.is_empty(),
            "{path} has no action forms in read-only mode"
        );
        let buttons = c
            .find_all(Locator::XPath("//button[normalize-space()='Replay' or normalize-space()='Pause' or normalize-space()='Trigger now' or starts-with(normalize-space(), 'Cancel')]"))
            .await
            .unwrap();
        assert!(buttons.is_empty(), "{path} has no action buttons");
    }
    browser.close().await;

    // A forged POST, even with a token the server would accept, is refused.
    let csrf = &server.state.dashboard.csrf;
    let http = http();
    for (path, action) in [
        (format!("/dead-letters/{}/replay", dead[0]), "replay"),
        ("/schedules/ro-schedule/pause".to_string(), "pause"),
        ("/dead-letters/purge".to_string(), "purge"),
        (format!("/tasks/{task}/cancel"), "cancel"),
    ] {
        let resp = http
            .post(format!("{}{path}", server.url))
            .form(&[("csrf", csrf.token(action).as_str()), ("older_than", "0s")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "POST {path}");
        assert!(resp.text().await.unwrap().contains("read-only"));
    }
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.schedules WHERE enabled")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.tasks WHERE state = 'ready'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_without_a_valid_csrf_token_or_from_another_site_are_refused() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(&db, "csrf", &["nope"]).await;
    let server = Server::start(&db, false).await;
    let url = format!("{}/dead-letters/{}/replay", server.url, dead[0]);
    let http = http();
    let csrf = &server.state.dashboard.csrf;

    let no_token = http.post(&url).form(&[("back", "/")]).send().await.unwrap();
    assert_eq!(no_token.status(), 403);
    assert!(no_token.text().await.unwrap().contains("CSRF"));
    let wrong = http
        .post(&url)
        .form(&[("csrf", "00ff")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    // A token for another action does not do.
    let other = http
        .post(&url)
        .form(&[("csrf", csrf.token("purge"))])
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);
    // The right token from another site does not do either.
    let cross = http
        .post(&url)
        .header("origin", "https://evil.example")
        .form(&[("csrf", csrf.token("replay"))])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let cross = http
        .post(&url)
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", csrf.token("replay"))])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        1,
        "nothing replayed"
    );

    // A form posted by another page in the browser (no token) is refused too.
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&format!("{}/dead-letters/{}", server.url, dead[0]))
        .await
        .unwrap();
    c.execute(
        "document.querySelector('form[method=post] input[name=csrf]').value = 'forged'; \
         document.querySelector('form[method=post]').submit();",
        vec![],
    )
    .await
    .unwrap();
    c.wait()
        .for_element(Locator::XPath("//h1[contains(., '403')]"))
        .await
        .unwrap();
    assert!(body_text(c).await.contains("invalid CSRF token"));
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        1,
        "nothing replayed"
    );
    browser.close().await;

    // The page's own token, same origin: accepted.
    let ok = http
        .post(&url)
        .header("origin", &server.url)
        .header("sec-fetch-site", "same-origin")
        .form(&[("csrf", csrf.token("replay"))])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 303);
    assert!(ok.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/dead-letters?flash="));
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        0
    );
}

/// Refresh docs/dashboard-*.png from a seeded database:
/// `cargo test --test suite dashboard::screenshots -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/dashboard-*.png; run by hand"]
async fn screenshots() {
    let db = TestDb::new().await;
    let dead = make_dead_letters(
        &db,
        "emails",
        &[
            "smtp: 550 5.1.1 mailbox unavailable",
            "smtp: 421 4.7.0 try again later",
            "template \"welcome\" not found",
        ],
    )
    .await;
    make_dead_letters(&db, "billing", &["card declined: insufficient funds"]).await;
    add_schedule(&db, "nightly-report", "0 30 2 * * *", "Europe/Paris").await;
    add_schedule(&db, "hourly-sync", "0 0 * * * *", "America/New_York").await;
    add_schedule(&db, "weekly-digest", "0 0 9 * * MON", "Asia/Tokyo").await;
    herald::cron::pause(&db.client().await, "weekly-digest")
        .await
        .unwrap();

    // Two live nodes, as `herald run` processes would register them.
    let client = db.client().await;
    for roles in [
        &[herald::nodes::Role::Relay, herald::nodes::Role::Worker][..],
        &[herald::nodes::Role::Scheduler, herald::nodes::Role::Admin][..],
    ] {
        herald::nodes::Node::new(&db.config, roles)
            .heartbeat(&client)
            .await
            .unwrap();
    }
    let server = Server::with_sampling(&db, false, Duration::from_secs(1)).await;
    // Some traffic for the charts: a worker on three queues while tasks
    // arrive in bursts, and outbox events nobody relays.
    let mut config = db.config.clone();
    config.worker.queues = vec!["default".into(), "emails".into(), "reports".into()];
    config.worker.concurrency = 4;
    // Keep finished tasks, so the queues table has succeeded counts.
    config.worker.retain_completed = Some(Duration::from_secs(3600));
    config.worker.poll_interval = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(&config, db.pool(), Registry::new()).run(stop.clone()));
    for round in 0..40u64 {
        let n = 5 + (round * 7) % 23;
        for i in 0..n {
            let queue = ["default", "emails", "reports"][(i % 3) as usize];
            let task = Task::new(
                "herald.sleep",
                &serde_json::json!({ "ms": 20 + (i * 37) % 200 }),
            )
            .unwrap()
            .queue(queue);
            herald::queue::enqueue(&client, &task).await.unwrap();
        }
        if round % 4 == 0 {
            client
                .execute(
                    "SELECT herald.publish('order.created', '{\"order\": 1}'::jsonb)",
                    &[],
                )
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
    for i in 0..12 {
        let task = Task::new("report.build", &serde_json::json!({ "n": i }))
            .unwrap()
            .queue("reports");
        herald::queue::enqueue(&client, &task).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let browser = Browser::start().await;
    let c = &browser.client;
    let docs = crate::common::repo_root().join("docs");
    for (path, file) in [
        ("/".to_string(), "dashboard-overview.png"),
        ("/queues".to_string(), "dashboard-queues.png"),
        ("/dead-letters".to_string(), "dashboard-dead-letters.png"),
        (
            format!("/dead-letters/{}", dead[0]),
            "dashboard-dead-letter.png",
        ),
        ("/schedules".to_string(), "dashboard-schedules.png"),
    ] {
        c.set_window_size(1280, 900).await.unwrap();
        c.goto(&format!("{}{path}", server.url)).await.unwrap();
        // The whole page: grow the window to the document's height.
        let height = c
            .execute("return document.documentElement.scrollHeight", vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap_or(900);
        c.set_window_size(1280, height.clamp(600, 2400) as u32 + 140)
            .await
            .unwrap();
        let png = c.screenshot().await.unwrap();
        std::fs::write(docs.join(file), png).unwrap();
    }
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_follow_the_traffic() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for i in 0..30 {
        let task = Task::new("herald.noop", &serde_json::json!({ "i": i })).unwrap();
        herald::queue::enqueue(&client, &task).await.unwrap();
    }
    client
        .execute("SELECT herald.publish('chart.test', '{}'::jsonb)", &[])
        .await
        .unwrap();
    // Sampling starts with the 30 tasks waiting.
    let server = Server::with_sampling(&db, false, Duration::from_millis(300)).await;
    let history = server.state.dashboard.history.clone();
    wait_for("a first sample", Duration::from_secs(10), async || {
        !history.samples().is_empty()
    })
    .await;
    assert_eq!(history.samples()[0].open_tasks, 30);
    let mut config = db.config.clone();
    config.worker.poll_interval = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let worker = tokio::spawn(Worker::new(&config, db.pool(), Registry::new()).run(stop.clone()));
    wait_for(
        "a sample with no open task",
        Duration::from_secs(20),
        async || history.samples().last().is_some_and(|s| s.open_tasks == 0),
    )
    .await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    wait_for("four samples", Duration::from_secs(10), async || {
        history.samples().len() >= 4
    })
    .await;
    let samples = history.samples();
    let last = samples.last().unwrap();
    assert_eq!(
        last.task_ids, 30,
        "the task id sequence counts every enqueue"
    );
    assert_eq!(last.unpublished, 1, "nobody relays the event");
    assert!(last.relay_lag_secs > 0.0);
    // The finished/s line integrates to the 30 tasks done.
    let charted: f64 = history
        .rates()
        .finished
        .iter()
        .zip(samples.windows(2))
        .map(|(rate, w)| rate.1 * (w[1].at - w[0].at).num_milliseconds() as f64 / 1000.0)
        .sum();
    assert!(
        (charted - 30.0).abs() < 0.01,
        "finished/s integrates to {charted}, not 30"
    );

    let html = http()
        .get(&server.url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let charts = &html[..html.find("<h2>Queues").unwrap()];
    let polylines: Vec<&str> = charts
        .match_indices("<polyline points=\"")
        .map(|(i, m)| {
            let rest = &charts[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(polylines.len(), 5, "three throughput and two latency lines");
    assert!(
        polylines.iter().all(|p| p.split(' ').count() >= 2),
        "{polylines:?}"
    );
    assert!(!html.contains("collecting samples"));
    // The default queue's backlog sparkline in the queues table.
    assert!(html.contains("ready and running tasks in default"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_the_dashboard_and_its_actions() {
    let db = TestDb::with(|c| c.admin.token = Some("s3cret".into())).await;
    add_schedule(&db, "guarded", "0 0 * * * *", "UTC").await;
    let server = Server::start(&db, false).await;
    let http = http();
    for path in ["/", "/queues", "/dead-letters", "/schedules"] {
        let resp = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "GET {path} without the token");
        let resp = http
            .get(format!("{}{path}", server.url))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "GET {path} with the token");
    }
    let token = server.state.dashboard.csrf.token("pause");
    let url = format!("{}/schedules/guarded/pause", server.url);
    let resp = http
        .post(&url)
        .form(&[("csrf", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.schedules WHERE enabled")
            .await,
        1
    );
    let resp = http
        .post(&url)
        .bearer_auth("s3cret")
        .form(&[("csrf", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        db.count("SELECT count(*) FROM herald.schedules WHERE enabled")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_by_clicking() {
    let db = TestDb::new().await;
    let later = Task::new("report.build", &serde_json::json!({}))
        .unwrap()
        .queue("reports")
        .delay(Duration::from_secs(3600));
    let id = herald::queue::enqueue(&db.client().await, &later)
        .await
        .unwrap();
    let server = Server::start(&db, false).await;
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&format!("{}/queues?queue=reports", server.url))
        .await
        .unwrap();
    c.find(Locator::LinkText(&id.to_string()))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::XPath("//button[normalize-space()='Cancel task']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let flash = flash_when(c, |t| t == format!("Task {id}: cancelled.")).await;
    assert_eq!(flash, format!("Task {id}: cancelled."));
    let state: String = db
        .client()
        .await
        .query_one("SELECT state FROM herald.tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "cancelled");
    browser.close().await;
}
