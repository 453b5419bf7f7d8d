//! The edges of the admin server, migrations, `herald.nodes` and telemetry
//! that the other suites leave out: the dashboard's failure answers (no
//! Postgres, an unmigrated schema, a bad filter, an action that fails), the
//! probes when Postgres and Redis hang, migrating with settings that cannot
//! be stored, a node's heartbeat failing, recovering and its deregistration
//! failing or hanging, and the telemetry set-up's refusals. Real Postgres and
//! Redis (through the fault proxy where a server must misbehave), plain HTTP
//! against the real router, and `herald` child processes.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::proxy::Proxy;
use crate::common::{wait_for, TestDb};
use herald::admin::dashboard::Dashboard;
use herald::admin::{AdminState, Readiness, SharedState};
use herald::nodes::{Node, Role};
use herald::worker::Outcome;
use herald::{Config, Registry, Task, Worker};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------
// Harness

/// The admin router on 127.0.0.1:<free port>, with its state kept for the
/// CSRF tokens; stopped on drop.
struct Server {
    url: String,
    state: SharedState,
    shutdown: CancellationToken,
    http: reqwest::Client,
}

impl Server {
    async fn start(config: &Config) -> Server {
        let mut state = AdminState::new(
            config.clone(),
            herald::db::pool(config, "herald-cov-admin").unwrap(),
            herald::pubsub::redis_pool(config).unwrap(),
        );
        state.dashboard = Dashboard::new(Duration::from_secs(10));
        let served = common::admin_server::serve(state).await;
        Server {
            url: format!("http://127.0.0.1:{}", served.port),
            state: served.state,
            shutdown: served.shutdown,
            http: common::admin_server::http(),
        }
    }

    fn token(&self, action: &str) -> String {
        self.state.dashboard.csrf.token(action)
    }

    /// GET `path`: status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    async fn json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path).await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, json)
    }

    /// Poll `path` until it answers `status`.
    async fn until_status(&self, path: &str, status: u16, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (got, body) = self.json(path).await;
            if got == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {status} within {timeout:?}: {got} {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// POST a form from this server's own pages (same origin).
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .header("origin", &self.url)
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// POST an action that answers 303; returns where it goes back to and
    /// the message's key (`flash`, `error` or `failed`) and text.
    async fn action(&self, path: &str, form: &[(&str, &str)]) -> (String, String, String) {
        let response = self.post(path, form).await;
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        let body = response.text().await.unwrap();
        assert_eq!(status, 303, "POST {path}: {body}");
        redirect_message(&location.expect("a 303 has a location"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `/page?a=1&flash=msg` → ("/page?a=1", "flash", "msg"): the message is the
/// last pair.
fn redirect_message(location: &str) -> (String, String, String) {
    let (path, query) = location.split_once('?').expect("a message in the query");
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let (key, msg) = pairs.pop().expect("a message");
    let back = if pairs.is_empty() {
        path.to_string()
    } else {
        let rest: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{path}?{}", rest.join("&"))
    };
    (back, key, msg)
}

/// The text of an HTML fragment: tags dropped, the few entities maud writes
/// decoded, whitespace trimmed.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

/// The cell texts of the table row that contains `marker`.
fn row_cells(html: &str, marker: &str) -> Vec<String> {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in the page:\n{html}"));
    let start = html[..at].rfind("<tr").expect("the row's start");
    let end = at + html[at..].find("</tr>").expect("the row's end");
    html[start..end]
        .split("<td")
        .skip(1)
        .map(|cell| text_of(&format!("<td{cell}")))
        .collect()
}

/// Log lines captured by a subscriber set as the test thread's default
/// (a `#[tokio::test]` runs its spawned tasks on that thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// A database created without Herald's schema (never migrated), dropped
/// on drop.
struct BareDb {
    name: String,
    config: Config,
}

impl BareDb {
    async fn new() -> BareDb {
        let name = format!(
            "herald_bare_{}_{}",
            std::process::id(),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let (admin, conn) = tokio_postgres::connect(&common::admin_url(), tokio_postgres::NoTls)
            .await
            .expect("connecting to the test Postgres");
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut url = url::Url::parse(&common::admin_url()).unwrap();
        url.set_path(&format!("/{name}"));
        let config = Config {
            database_url: url.to_string(),
            redis_url: common::redis_url(),
            channel_prefix: format!("herald:{name}:"),
            ..Config::default()
        };
        BareDb { name, config }
    }
}

impl Drop for BareDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&common::admin_url(), tokio_postgres::NoTls).await
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

// ---------------------------------------------------------------------------
// Dashboard pages

/// The overview and queue pages fold running, succeeded and cancelled tasks
/// per queue, list the longest-running task and the live nodes with their
/// roles, and cut long errors; cancelling a running task asks its worker,
/// and cancelling it again says it is no longer running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_and_queues_show_tasks_in_every_state_and_the_live_nodes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let server = Server::start(&db.config).await;

    // A task for later, cancelled from its page while it waits.
    let later = herald::queue::enqueue(
        &client,
        &Task::new("cov.hold", &serde_json::json!({}))
            .unwrap()
            .queue("cov")
            .delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let (back, key, msg) = server
        .action(
            &format!("/tasks/{later}/cancel"),
            &[("csrf", &*server.token("cancel"))],
        )
        .await;
    assert_eq!(
        (back.as_str(), key.as_str(), msg.as_str()),
        (
            format!("/tasks/{later}").as_str(),
            "flash",
            format!("Task {later}: cancelled.").as_str()
        )
    );

    // One task succeeds (kept), one runs until cancelled, one dies with an
    // error longer than the overview shows.
    let long_error = "boom-".repeat(30);
    let done = herald::queue::enqueue(
        &client,
        &Task::new("herald.noop", &serde_json::json!({}))
            .unwrap()
            .queue("cov"),
    )
    .await
    .unwrap();
    let hold = herald::queue::enqueue(
        &client,
        &Task::new("cov.hold", &serde_json::json!({}))
            .unwrap()
            .queue("cov"),
    )
    .await
    .unwrap();
    herald::queue::enqueue(
        &client,
        &Task::new("herald.fail", &serde_json::json!({ "message": long_error }))
            .unwrap()
            .queue("cov")
            .max_attempts(1),
    )
    .await
    .unwrap();
    let mut config = db.config.clone();
    config.worker.queues = vec!["cov".into()];
    config.worker.poll_interval = Duration::from_millis(100);
    config.worker.retain_completed = Some(Duration::from_secs(3600));
    let mut registry = Registry::new();
    registry.register("cov.hold", |ctx, _p: Value| async move {
        ctx.cancellation().cancelled().await;
        Ok(Outcome::Cancel("stopped from the dashboard".into()))
    });
    let worker = Worker::new(&config, db.pool(), registry);
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let state_of = |id: i64| {
        let client = &client;
        async move {
            client
                .query_opt("SELECT state FROM herald.tasks WHERE id = $1", &[&id])
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    };
    wait_for("the tasks to settle", Duration::from_secs(30), async || {
        state_of(done).await.as_deref() == Some("succeeded")
            && state_of(hold).await.as_deref() == Some("running")
            && db.count("SELECT count(*) FROM herald.dead_letters").await == 1
    })
    .await;

    // Two live nodes: 1 relay and 2 worker roles between them.
    let both = Node::new(&db.config, &[Role::Worker, Role::Relay]);
    both.heartbeat(&client).await.unwrap();
    let worker_node = Node::new(&db.config, &[Role::Worker]);
    worker_node.heartbeat(&client).await.unwrap();

    let (status, page) = server.get("/").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("1 relay, 2 worker"), "{page}");
    let node = row_cells(&page, &format!("<td>{}</td>", herald::nodes::hostname()));
    assert_eq!(node[1], std::process::id().to_string(), "{node:?}");
    assert_eq!(node[2], "relay, worker", "{node:?}");
    assert_eq!(node[3], env!("CARGO_PKG_VERSION"), "{node:?}");
    assert!(node[5].ends_with(" ago"), "{node:?}");
    let queue = row_cells(&page, "href=\"/queues?queue=cov\"");
    // Queue, ready, scheduled, running, succeeded, cancelled, expired
    // leases, failed (1 h), dead letters, oldest ready.
    assert_eq!(queue[0], "cov");
    assert_eq!(
        &queue[1..7],
        &["0", "0", "1", "1", "1", "0"],
        "ready, scheduled, running, succeeded, cancelled, expired: {queue:?}"
    );
    assert_eq!(queue[8], "1", "dead letters: {queue:?}");
    assert_eq!(queue[9], "—", "no ready task: {queue:?}");
    let stored: String = client
        .query_one("SELECT last_error FROM herald.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.chars().count() > 120, "{stored}");
    let cut: String = stored.chars().take(120).collect();
    assert!(page.contains(&format!("{cut}…")), "{page}");
    assert!(
        !page.contains(&stored),
        "the whole error is on its own page"
    );

    // The queues page lists the running task with its worker.
    let leased_by: String = client
        .query_one("SELECT leased_by FROM herald.tasks WHERE id = $1", &[&hold])
        .await
        .unwrap()
        .get(0);
    let (status, page) = server.get("/queues").await;
    assert_eq!(status, 200, "{page}");
    let long = &page[page
        .find("id=\"long-running\"")
        .expect("the long-running table")..];
    let cells = row_cells(long, &format!("href=\"/tasks/{hold}\""));
    assert_eq!(cells[0], hold.to_string(), "{cells:?}");
    assert_eq!(cells[1], "cov");
    assert_eq!(cells[2], "cov.hold");
    assert_eq!(cells[3], "1", "first attempt");
    assert_eq!(cells[4], leased_by);
    assert!(cells[5].ends_with(" s"), "{cells:?}");

    // A bad state filter is said on the page, which still shows the rest.
    let (status, page) = server.get("/queues?state=bogus").await;
    assert_eq!(status, 200, "{page}");
    assert!(text_of(&page).contains("unknown state \"bogus\""), "{page}");
    assert!(page.contains("id=\"long-running\""), "{page}");

    // Cancelling the running task asks its worker; the handler stops.
    let (back, key, msg) = server
        .action(
            &format!("/tasks/{hold}/cancel"),
            &[("csrf", &*server.token("cancel")), ("back", "/queues")],
        )
        .await;
    assert_eq!(
        (back.as_str(), key.as_str(), msg),
        ("/queues", "flash", format!("Task {hold}: cancelling."))
    );
    wait_for(
        "the running task to stop",
        Duration::from_secs(15),
        async || state_of(hold).await.as_deref() == Some("cancelled"),
    )
    .await;
    let (back, key, msg) = server
        .action(
            &format!("/tasks/{hold}/cancel"),
            &[("csrf", &*server.token("cancel"))],
        )
        .await;
    assert_eq!(
        (back, key, msg),
        (
            format!("/tasks/{hold}"),
            "error".to_string(),
            format!("Task {hold} is not ready or running.")
        )
    );

    let (status, page) = server.get("/tasks/987654321").await;
    assert_eq!(status, 404);
    assert!(
        page.contains("no task 987654321: it finished and was removed"),
        "{page}"
    );

    stop.cancel();
    running.await.unwrap().unwrap();
}

/// Make one dead letter per `(queue, message)` with `herald.fail`; returns
/// their ids in that order.
async fn dead_letters(db: &TestDb, made: &[(&str, &str)]) -> Vec<i64> {
    let client = db.client().await;
    let mut config = db.config.clone();
    config.worker.queues = Vec::new();
    for (queue, message) in made {
        let task = Task::new("herald.fail", &serde_json::json!({ "message": message }))
            .unwrap()
            .queue(*queue)
            .max_attempts(1);
        herald::queue::enqueue(&client, &task).await.unwrap();
        if !config.worker.queues.iter().any(|q| q.as_str() == *queue) {
            config.worker.queues.push(queue.to_string());
        }
    }
    config.worker.poll_interval = Duration::from_millis(100);
    let worker = Worker::new(&config, db.pool(), Registry::new());
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let want = made.len() as i64;
    wait_for("the dead letters", Duration::from_secs(30), async || {
        db.count("SELECT count(*) FROM herald.dead_letters").await == want
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    let mut ids = Vec::new();
    for (queue, message) in made {
        ids.push(
            client
                .query_one(
                    "SELECT id FROM herald.dead_letters WHERE queue = $1 AND last_error LIKE '%' || $2 || '%'",
                    &[queue, message],
                )
                .await
                .unwrap()
                .get(0),
        );
    }
    ids
}

/// Replaying one, several, a bad selection or every match of a filter, and
/// purging with a missing or unreadable age: each answers with what it did
/// and what failed, under the page's own error key, and only the rows it
/// names change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_actions_say_what_they_did_and_what_failed() {
    let db = TestDb::new().await;
    let ids = dead_letters(
        &db,
        &[
            ("dl", "alpha"),
            ("dl", "beta"),
            ("dl", "gamma"),
            ("other", "gamma too"),
        ],
    )
    .await;
    let (alpha, beta, gamma, other) = (ids[0], ids[1], ids[2], ids[3]);
    let client = db.client().await;
    let server = Server::start(&db.config).await;
    let many = server.token("replay-many");
    let exists = |id: i64| {
        let client = &client;
        async move {
            client
                .query_opt("SELECT 1 FROM herald.dead_letters WHERE id = $1", &[&id])
                .await
                .unwrap()
                .is_some()
        }
    };
    let new_task_kind = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT kind || '/' || queue || '/' || state FROM herald.tasks WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };

    // The row's own Replay button posts `one`.
    let (back, key, msg) = server
        .action(
            "/dead-letters/replay",
            &[
                ("csrf", many.as_str()),
                ("back", "/dead-letters?queue=dl"),
                ("one", &*alpha.to_string()),
            ],
        )
        .await;
    assert_eq!(
        (back.as_str(), key.as_str()),
        ("/dead-letters?queue=dl", "flash")
    );
    let prefix = format!("Replayed 1 dead letter ({alpha} → ");
    let new: i64 = msg
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(")."))
        .unwrap_or_else(|| panic!("{msg}"))
        .parse()
        .unwrap();
    assert!(!exists(alpha).await);
    assert_eq!(new_task_kind(new).await, "herald.fail/dl/ready");

    // Nothing selected.
    let (back, key, msg) = server
        .action(
            "/dead-letters/replay",
            &[("csrf", many.as_str()), ("selected", "1")],
        )
        .await;
    assert_eq!(
        (back.as_str(), key.as_str(), msg.as_str()),
        (
            "/dead-letters",
            "failed",
            "Select at least one dead letter to replay."
        )
    );

    // A selection with a bad id and a missing one: the good one is replayed,
    // the others named.
    let (_, key, msg) = server
        .action(
            "/dead-letters/replay",
            &[
                ("csrf", many.as_str()),
                ("id", "abc"),
                ("id", "987654321"),
                ("id", &*beta.to_string()),
            ],
        )
        .await;
    assert_eq!(key, "failed", "{msg}");
    assert!(
        msg.starts_with(&format!("Replayed 1 dead letter ({beta} → ")),
        "{msg}"
    );
    assert!(
        msg.ends_with(
            "). Failed: \"abc\" is not a dead-letter id; no dead letter with id 987654321"
        ),
        "{msg}"
    );
    assert!(!exists(beta).await);

    // Every match of the page's filter (queue dl, error containing GAMMA).
    let (_, key, msg) = server
        .action(
            "/dead-letters/replay",
            &[
                ("csrf", many.as_str()),
                ("all", "1"),
                ("filter_queue", "dl"),
                ("filter_error", "GAMMA"),
            ],
        )
        .await;
    assert_eq!(
        (key.as_str(), msg.as_str()),
        ("flash", "Replayed 1 dead letters.")
    );
    assert!(!exists(gamma).await);
    assert!(exists(other).await, "another queue's match stays");

    // Without a token nothing happens.
    let refused = server
        .post("/dead-letters/replay", &[("one", &*other.to_string())])
        .await;
    assert_eq!(refused.status().as_u16(), 403);
    assert!(refused.text().await.unwrap().contains("CSRF"));
    assert!(exists(other).await);

    // Replaying one that is gone.
    let (back, key, msg) = server
        .action(
            "/dead-letters/987654321/replay",
            &[("csrf", &*server.token("replay"))],
        )
        .await;
    assert_eq!(
        (back.as_str(), key.as_str(), msg.as_str()),
        (
            "/dead-letters",
            "failed",
            "no dead letter with id 987654321"
        )
    );

    // Purge needs an age it can read.
    let purge = server.token("purge");
    let (_, key, msg) = server
        .action("/dead-letters/purge", &[("csrf", purge.as_str())])
        .await;
    assert_eq!(
        (key.as_str(), msg.as_str()),
        (
            "failed",
            "Say how old the dead letters to purge must be (e.g. 30d)."
        )
    );
    let (_, key, msg) = server
        .action(
            "/dead-letters/purge",
            &[("csrf", purge.as_str()), ("older_than", "soon")],
        )
        .await;
    assert_eq!(key, "failed");
    assert!(
        msg.starts_with("older_than \"soon\": ") && msg.ends_with("(e.g. 12h, 30d)"),
        "{msg}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM herald.dead_letters").await,
        1
    );

    // A filter the library refuses is a bad request, said on the page.
    let (status, page) = server.get("/dead-letters?source=bogus").await;
    assert_eq!(status, 400);
    assert!(
        text_of(&page).contains("unknown dead-letter source \"bogus\""),
        "{page}"
    );
}

/// A schedule stored through SQL that never fires shows its error in the
/// list; an unknown action is a 404 and a failed one comes back under
/// `error`.
#[tokio::test]
async fn schedules_page_shows_a_schedule_that_never_fires_and_failed_actions() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // SQL checks the fields' ranges, not that 30 February never comes.
    client
        .execute(
            "SELECT herald.upsert_schedule('never', '0 0 30 2 *', 'herald.noop')",
            &[],
        )
        .await
        .unwrap();
    let server = Server::start(&db.config).await;
    let (status, page) = server.get("/schedules").await;
    assert_eq!(status, 200, "{page}");
    let cells = row_cells(&page, "id=\"schedule-never\"");
    assert!(
        cells[4].contains("never matches a date (such as 31 February)"),
        "{cells:?}"
    );
    let row = &page[page.find("id=\"schedule-never\"").unwrap()..];
    assert!(row.contains("<span class=\"err\">"), "{row}");

    let response = server
        .post(
            "/schedules/never/explode",
            &[("csrf", &*server.token("explode"))],
        )
        .await;
    assert_eq!(response.status().as_u16(), 404);
    assert!(text_of(&response.text().await.unwrap()).contains("no schedule action \"explode\""),);

    let (back, key, msg) = server
        .action(
            "/schedules/ghost/trigger",
            &[("csrf", &*server.token("trigger"))],
        )
        .await;
    assert_eq!((back.as_str(), key.as_str()), ("/schedules", "error"));
    assert!(msg.contains("ghost"), "{msg}");
    assert_eq!(db.count("SELECT count(*) FROM herald.tasks").await, 0);
}

/// Without Postgres every page and every action (with a valid token) is a
/// 503 that says so; nothing hangs.
#[tokio::test]
async fn pages_and_actions_answer_503_without_postgres() {
    let port = common::free_port();
    let mut config = Config {
        database_url: format!("postgres://postgres@127.0.0.1:{port}/nowhere"),
        redis_url: common::redis_url(),
        ..Config::default()
    };
    config.postgres.connect_timeout = Duration::from_secs(2);
    let server = Server::start(&config).await;
    let (status, page) = server.get("/").await;
    assert_eq!(status, 503);
    assert!(page.contains("no Postgres connection"), "{page}");
    type Post<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let posts: [Post; 5] = [
        ("/dead-letters/1/replay", "replay", &[]),
        ("/dead-letters/replay", "replay-many", &[("one", "1")]),
        ("/dead-letters/purge", "purge", &[("older_than", "30d")]),
        ("/tasks/1/cancel", "cancel", &[]),
        ("/schedules/nightly/pause", "pause", &[]),
    ];
    for (path, action, extra) in posts {
        let token = server.token(action);
        let mut form = vec![("csrf", token.as_str())];
        form.extend_from_slice(extra);
        let started = Instant::now();
        let response = server.post(path, &form).await;
        assert_eq!(response.status().as_u16(), 503, "POST {path}");
        let body = response.text().await.unwrap();
        assert!(body.contains("no Postgres connection"), "{path}: {body}");
        assert!(started.elapsed() < Duration::from_secs(10), "{path}");
    }
}

// ---------------------------------------------------------------------------
// Probes, migrations

/// The readiness registry prints each connection and whether it is up.
#[test]
fn readiness_debug_lists_each_listener() {
    let readiness = Readiness::default();
    readiness.listener("relay", || true);
    readiness.listener("worker", || false);
    assert_eq!(
        format!("{readiness:?}"),
        r#"{"relay": true, "worker": false}"#
    );
}

/// Postgres and Redis that accept connections but never answer: `/readyz`
/// still answers within a few seconds, naming both and not checking the
/// migrations; once they answer again it is ready.
#[tokio::test]
async fn readyz_answers_in_time_when_postgres_and_redis_hang() {
    let db = TestDb::new().await;
    let (pg, pg_url) = Proxy::for_url(&db.config.database_url).await;
    let (redis, redis_url) = Proxy::for_url(&common::redis_url()).await;
    let mut config = db.config.clone();
    config.database_url = pg_url;
    config.redis_url = redis_url;
    let server = Server::start(&config).await;
    server
        .until_status("/readyz", 200, Duration::from_secs(10))
        .await;

    pg.partition();
    redis.partition();
    let started = Instant::now();
    let (status, body) = server.json("/readyz").await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body:#}");
    assert!(
        took < Duration::from_secs(4),
        "both checks time out together in 2 s, took {took:?}"
    );
    let checks = &body["checks"];
    assert_eq!(
        checks["postgres"],
        serde_json::json!({"ok": false, "error": "Postgres did not answer within 2s"})
    );
    assert_eq!(
        checks["migrations"],
        serde_json::json!({"ok": false, "error": "not checked: Postgres does not answer"})
    );
    assert_eq!(
        checks["redis"],
        serde_json::json!({"ok": false, "error": "Redis did not answer within 2s"})
    );
    assert_eq!(body["status"], "unavailable");

    pg.heal();
    redis.heal();
    server
        .until_status("/readyz", 200, Duration::from_secs(15))
        .await;
}

/// On a database nobody migrated: `check_schema` says to migrate, the
/// schema version is none, `/readyz` names the missing migrations and the
/// dashboard shows the library's error as a 500. Migrating with a
/// `max_payload_bytes` Postgres cannot store fails after the migrations
/// (which stay applied) and leaves the settings alone; migrating again
/// with a sane value writes it.
#[tokio::test]
async fn an_unmigrated_database_is_named_everywhere_and_bad_settings_are_refused() {
    let bare = BareDb::new().await;
    let client = herald::db::connect(&bare.config, "herald-cov")
        .await
        .unwrap();
    let error = herald::migrate::check_schema(&client)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(
            "the herald schema is missing: run `herald migrate` (or enable migrate_on_start)"
        ),
        "{error}"
    );
    assert_eq!(
        herald::migrate::schema_version(&client).await.unwrap(),
        None
    );

    let latest = herald::migrate::latest_version();
    let server = Server::start(&bare.config).await;
    let (status, body) = server.json("/readyz").await;
    assert_eq!(status, 503, "{body:#}");
    assert_eq!(body["checks"]["postgres"]["ok"], true, "{body:#}");
    assert_eq!(
        body["checks"]["migrations"],
        serde_json::json!({
            "ok": false,
            "schema_version": null,
            "expected": latest,
            "error": format!(
                "the schema is at version none, this binary needs {latest}: run `herald migrate`"
            ),
        })
    );
    let (status, page) = server.get("/").await;
    assert_eq!(status, 500, "{page}");
    let text = text_of(&page);
    assert!(
        text.contains("reading herald.queue_stats") && text.contains("does not exist"),
        "{text}"
    );

    let mut too_big = bare.config.clone();
    too_big.max_payload_bytes = i32::MAX as usize + 1;
    let error = herald::migrate::migrate(&too_big)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!(
            "max_payload_bytes {} does not fit in 32 bits",
            i32::MAX as u64 + 1
        )),
        "{error}"
    );
    assert_eq!(
        herald::migrate::schema_version(&client).await.unwrap(),
        Some(latest),
        "the migrations ran before the settings were refused"
    );
    let mut sane = bare.config.clone();
    sane.max_payload_bytes = 65_536;
    assert_ne!(stored_max_payload(&client).await, 65_536);
    // The lock was released: migrating again does not wait for it.
    let started = Instant::now();
    let report = herald::migrate::migrate(&sane).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(report.current_version, Some(latest));
    assert_eq!(stored_max_payload(&client).await, 65_536);
    herald::migrate::check_schema(&client).await.unwrap();
    server
        .until_status("/readyz", 200, Duration::from_secs(10))
        .await;
}

async fn stored_max_payload(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT max_payload_bytes FROM herald.settings", &[])
        .await
        .unwrap()
        .get(0)
}

// ---------------------------------------------------------------------------
// Nodes

fn node_config(db: &TestDb, url: String, connect_timeout: Duration) -> Config {
    let mut config = db.config.clone();
    config.database_url = url;
    config.postgres.connect_timeout = connect_timeout;
    config.nodes.heartbeat_interval = Duration::from_millis(100);
    // Its own row must outlive the outages below.
    config.nodes.missed_heartbeats = 1000;
    config
}

async fn last_seen(
    client: &tokio_postgres::Client,
    id: uuid::Uuid,
) -> Option<chrono::DateTime<chrono::Utc>> {
    client
        .query_opt("SELECT last_seen FROM herald.nodes WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

fn heartbeat_errors() -> f64 {
    herald::telemetry::render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("herald_node_heartbeat_errors_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// The leader expires a dead node (and says which); a node keeps running while its
/// heartbeats fail (counted each time, logged once), says when they
/// recover, and when it cannot deregister at shutdown leaves its row to
/// expire and says so.
#[tokio::test]
async fn a_node_survives_failing_heartbeats_and_a_failed_deregistration() {
    let logs = Logs::default();
    let _capture = logs.capture();
    herald::telemetry::init_metrics();
    let db = TestDb::new().await;
    let direct = db.client().await;
    let (proxy, url) = Proxy::for_url(&db.config.database_url).await;
    let config = node_config(&db, url, Duration::from_secs(1));

    let mut quiet = db.config.clone();
    quiet.nodes.heartbeat_interval = Duration::from_millis(100);
    quiet.nodes.missed_heartbeats = 1;
    let dead = Node::new(&quiet, &[Role::Relay]);
    dead.heartbeat(&direct).await.unwrap();

    let node = Node::new(&config, &[Role::Admin, Role::Worker, Role::Admin]);
    assert_eq!(node.roles(), &[Role::Worker, Role::Admin]);
    let id = node.id();
    let stop = CancellationToken::new();
    let pool = herald::db::pool(&config, "herald-cov-node").unwrap();
    let running = tokio::spawn(node.run(pool, stop.clone()));
    // The maintenance leader expires the dead node, and says which.
    let mut leader = db.config.clone();
    leader.maintenance.node_expiry_interval = Some(Duration::from_millis(100));
    tokio::spawn(herald::maintenance::Maintenance::new(&leader).run(stop.clone()));
    wait_for(
        "the node to register and the leader to expire the dead one",
        Duration::from_secs(10),
        async || {
            last_seen(&direct, id).await.is_some()
                && last_seen(&direct, dead.id()).await.is_none()
                && logs.count("expired a node that stopped heartbeating") == 1
        },
    )
    .await;
    let expired = logs.text();
    let line = expired
        .lines()
        .find(|l| l.contains("expired a node"))
        .unwrap();
    assert!(
        line.contains(&dead.id().to_string()) && line.contains("roles=[\"relay\"]"),
        "{line}"
    );
    let row = direct
        .query_one(
            "SELECT roles, details FROM herald.nodes WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<String>>(0), vec!["worker", "admin"]);
    assert_eq!(
        row.get::<_, Value>(1)["admin_bind"],
        Value::String(config.admin.bind.clone())
    );

    // Postgres refuses: every tick fails, the first one is logged.
    let before = heartbeat_errors();
    proxy.refuse();
    proxy.cut();
    wait_for(
        "three failed heartbeats",
        Duration::from_secs(10),
        async || heartbeat_errors() - before >= 3.0,
    )
    .await;
    assert_eq!(logs.count("node heartbeat failed; retrying"), 1);
    let stale = last_seen(&direct, id).await.unwrap();

    proxy.heal();
    wait_for(
        "the heartbeat to recover",
        Duration::from_secs(10),
        async || {
            logs.count("node heartbeat recovered") == 1
                && last_seen(&direct, id).await.unwrap() > stale
        },
    )
    .await;

    // It cannot deregister: the row stays (to expire), and it says so.
    proxy.refuse();
    proxy.cut();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the node stops")
        .unwrap()
        .unwrap();
    assert_eq!(
        logs.count("could not deregister; the row expires"),
        1,
        "{}",
        logs.text()
    );
    assert!(last_seen(&direct, id).await.is_some());
}

/// Postgres stops answering while a heartbeat is in flight: the node still
/// stops within its deregistration bound instead of waiting on the hung
/// heartbeat, and leaves its row to expire.
#[tokio::test]
async fn a_node_stops_in_bounded_time_when_postgres_hangs() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let db = TestDb::new().await;
    let direct = db.client().await;
    let (proxy, url) = Proxy::for_url(&db.config.database_url).await;
    // Connecting would take longer than the deregistration's 5 s bound.
    let config = node_config(&db, url, Duration::from_secs(20));
    let node = Node::new(&config, &[Role::Scheduler]);
    let id = node.id();
    let stop = CancellationToken::new();
    let pool = herald::db::pool(&config, "herald-cov-node").unwrap();
    let running = tokio::spawn(node.run(pool, stop.clone()));
    wait_for(
        "the node to register",
        Duration::from_secs(10),
        async || last_seen(&direct, id).await.is_some(),
    )
    .await;

    proxy.partition();
    // No heartbeat lands for several intervals: one hangs in flight.
    wait_for("the heartbeats to stall", Duration::from_secs(10), async || {
        let age: f64 = direct
            .query_one(
                "SELECT extract(epoch FROM now() - last_seen)::float8 FROM herald.nodes WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        age > 0.5
    })
    .await;
    let started = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the node stops within 15 s of shutdown although Postgres hangs")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
        "deregistration is bounded at 5 s, took {took:?}"
    );
    assert_eq!(
        logs.count("deregistering timed out; the row expires"),
        1,
        "{}",
        logs.text()
    );
    proxy.heal();
    assert!(
        last_seen(&direct, id).await.is_some(),
        "the row is left to expire"
    );
}

// ---------------------------------------------------------------------------
// Telemetry

/// A span no subscriber records gets no parent and has no traceparent.
#[test]
fn a_disabled_span_takes_no_parent() {
    let span = tracing::Span::none();
    herald::telemetry::set_parent_from_traceparent(
        &span,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    assert_eq!(herald::telemetry::traceparent_of(&span), None);
}

/// `herald migrate` with the given environment; returns stdout and stderr.
async fn herald_migrate(db: &TestDb, env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("migrate")
        .env("DATABASE_URL", &db.config.database_url)
        .env("REDIS_URL", &db.config.redis_url)
        .env("RUST_LOG", "info")
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_LOG_FORMAT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().await.expect("running herald migrate");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// JSON log lines, and an OTLP protocol Herald cannot speak: the binary
/// logs only, says why, and still does its work; with a protocol it speaks
/// (and no OTEL_SERVICE_NAME) it exports.
#[tokio::test]
async fn the_binary_logs_json_and_refuses_an_otlp_protocol_it_cannot_speak() {
    let db = TestDb::new().await;
    let endpoint = format!("http://127.0.0.1:{}", common::free_port());
    let (stdout, stderr) = herald_migrate(
        &db,
        &[
            ("HERALD_LOG_FORMAT", "json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    )
    .await;
    assert!(stdout.starts_with("schema is current"), "{stdout}");
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let warning = lines
        .iter()
        .find(|l| l["fields"]["message"] == "OTLP trace export not started; logging only")
        .unwrap_or_else(|| panic!("no warning in {stderr}"));
    assert_eq!(warning["level"], "WARN");
    assert_eq!(
        warning["fields"]["error"],
        "OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\": Herald exports over http/protobuf only"
    );
    assert!(!stderr.contains("exporting traces over OTLP"), "{stderr}");

    let (_, stderr) =
        herald_migrate(&db, &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())]).await;
    assert!(
        stderr.contains("exporting traces over OTLP (http/protobuf)"),
        "{stderr}"
    );
}

/// The child half of `telemetry_set_up_twice_...`: run only in a process of
/// its own (it installs process-wide state).
#[test]
#[ignore = "run in a child process by telemetry_set_up_twice_with_a_foreign_recorder_and_a_stuck_collector"]
fn telemetry_child() {
    if std::env::var_os("HERALD_COV_TELEMETRY_CHILD").is_none() {
        return;
    }
    herald::telemetry::init(herald::config::LogFormat::Json);
    // A second set-up keeps the first subscriber and exporter.
    herald::telemetry::init(herald::config::LogFormat::Json);
    let span = tracing::info_span!("herald.cov.child");
    let traceparent = span.in_scope(herald::telemetry::current_traceparent);
    assert!(traceparent.is_some(), "the first exporter records spans");
    drop(span);
    // Another recorder got there first: Herald's is not installed.
    let _foreign = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the first recorder");
    assert!(herald::telemetry::init_metrics().is_none());
    assert_eq!(herald::telemetry::render_metrics(), "");
    // The collector never answers: the flush gives up and says so.
    herald::telemetry::shutdown();
    println!("child done");
}

/// Setting telemetry up twice keeps one exporter; a metrics recorder
/// installed by someone else leaves `/metrics` empty with a warning; a
/// collector that never answers makes the exit flush fail with a message,
/// not hang.
#[tokio::test]
async fn telemetry_set_up_twice_with_a_foreign_recorder_and_a_stuck_collector() {
    // Accepts connections (the kernel's backlog) and never answers.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let started = Instant::now();
    let output = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "coverage_admin::telemetry_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HERALD_COV_TELEMETRY_CHILD", "1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())
        .env("RUST_LOG", "info")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("child done"),
        "the child test ran: {stdout}"
    );
    assert_eq!(
        stderr.matches("exporting traces over OTLP").count(),
        1,
        "{stderr}"
    );
    let warning = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "metrics recorder not installed")
        .unwrap_or_else(|| panic!("no recorder warning in {stderr}"));
    assert_eq!(warning["level"], "WARN");
    assert!(
        stderr.contains("herald: flushing traces at exit failed:"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    drop(collector);
}
