//! Postgres over TLS, against private servers (`PgServer`) whose
//! certificates a CA made here signs: every session Herald opens is
//! encrypted, events and tasks go through end to end over `verify-full`,
//! and each `sslmode` accepts and refuses what libpq's does, failing at start
//! with a message that names the setting.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::{Config, Registry};
use tokio_util::sync::CancellationToken;

use crate::common::pg_server::{Ca, PgServer};
use crate::common::{self, Collector};

const DB: &str = "herald";

/// A TLS server whose certificate `ca` issued for `localhost` only, with an
/// empty database `herald`.
async fn tls_server(ca: &Ca) -> PgServer {
    let server = PgServer::start_tls(ca, &["localhost"]);
    server.create_database(DB).await;
    server
}

/// A configuration on `database_url`, the machine's Redis, a channel prefix
/// of the test's own and small pools.
fn config(database_url: String) -> Config {
    common::init_tracing();
    let mut config = Config {
        database_url,
        redis_url: common::redis_url(),
        channel_prefix: format!("herald:tls:{}:", uuid::Uuid::now_v7().simple()),
        ..Config::default()
    };
    config.postgres.pool_size = 4;
    config.postgres.connect_timeout = Duration::from_secs(5);
    config.relay.poll_interval = Duration::from_secs(5);
    config
}

/// `?sslmode=<mode>[&sslrootcert=<file>]` on the server's URL for `host`.
fn url(server: &PgServer, host: &str, mode: &str, root: Option<&std::path::Path>) -> String {
    let mut url = format!("{}?sslmode={mode}", server.url_on(host, DB));
    if let Some(root) = root {
        url.push_str(&format!("&sslrootcert={}", root.display()));
    }
    url
}

/// Whether the session of `client` is encrypted (`pg_stat_ssl`).
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A connection through Herald's `db::connect` that must fail; the message.
async fn refused(config: &Config) -> String {
    match herald::db::connect(config, "herald-test").await {
        Ok(_) => panic!("{} connected", config.database_url),
        Err(e) => e.to_string(),
    }
}

/// `herald <args>` against `config`, which must fail within 30 s; stderr.
async fn herald_fails(config: &Config, args: &[&str]) -> String {
    tokio::time::timeout(Duration::from_secs(30), common::herald_fails(config, args))
        .await
        .unwrap_or_else(|_| panic!("herald {} did not fail within 30 s", args.join(" ")))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_carries_events_tasks_and_migrations_with_every_session_encrypted() {
    const KEYS: usize = 4;
    const PER_KEY: usize = 100;
    const TASKS: usize = 50;
    let ca = Ca::new("Herald test CA");
    let server = tls_server(&ca).await;
    let root = ca.pem_file();
    let config = config(url(&server, "localhost", "verify-full", Some(&root)));
    config.validate().expect("a valid configuration");
    herald::migrate::migrate(&config)
        .await
        .expect("migrating over verify-full");

    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    let seen = ran.clone();
    registry.register(
        "tls.job",
        move |ctx: herald::TaskContext, _: serde_json::Value| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(ctx.id);
                Ok(())
            }
        },
    );
    let shutdown = CancellationToken::new();
    let herald = herald::Herald::builder(&config)
        .relay(true)
        .scheduler(true)
        .workers(registry)
        .start(shutdown.clone())
        .await
        .expect("Herald starts over verify-full");

    let sub = herald::Subscriber::from_config(&config)
        .unwrap()
        .pattern("*");
    let mut collector = Collector::start(&config, sub).await;
    common::insert_events(&config, KEYS, PER_KEY).await;
    let client = herald::db::connect(&config, "herald-test").await.unwrap();
    assert!(
        encrypted(&client).await,
        "Herald's own session is encrypted"
    );
    for i in 0..TASKS {
        let task = herald::Task::new("tls.job", &serde_json::json!({ "i": i })).unwrap();
        herald::enqueue(&client, &task).await.unwrap();
    }
    assert!(
        collector
            .distinct(KEYS * PER_KEY, Duration::from_secs(60))
            .await,
        "every event arrives over TLS: {} of {}",
        collector.distinct_ids(),
        KEYS * PER_KEY
    );
    common::assert_per_key_order(&collector, KEYS, PER_KEY);
    common::wait_for("every task to run", Duration::from_secs(60), async || {
        ran.lock().unwrap().len() >= TASKS
    })
    .await;
    let ran_ids: HashSet<i64> = ran.lock().unwrap().iter().copied().collect();
    assert_eq!(ran_ids.len(), TASKS, "every task ran");

    // Every session of the process, from pg_stat_activity and pg_stat_ssl
    // seen by a plain session of the test's own.
    let (check, conn) = tokio_postgres::connect(
        &format!(
            "{}?sslmode=disable&application_name=tls-check",
            server.url(DB)
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let wanted = [
        "herald",
        "herald-relay",
        "herald-notifier",
        "herald-maintenance",
        "herald-relay-wake-lock",
        "herald-worker-wake-lock",
    ];
    let mut sessions: Vec<(String, bool)> = Vec::new();
    common::wait_for(
        "Herald's pool, notifier, wake-lock and maintenance sessions",
        Duration::from_secs(30),
        async || {
            sessions = check
                .query(
                    "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                     JOIN pg_stat_ssl s USING (pid) \
                     WHERE a.datname = $1 AND a.application_name LIKE 'herald%'",
                    &[&DB],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            wanted
                .iter()
                .all(|w| sessions.iter().any(|(name, _)| name == w))
        },
    )
    .await;
    let plain: Vec<_> = sessions.iter().filter(|(_, ssl)| !ssl).collect();
    assert!(plain.is_empty(), "unencrypted sessions: {plain:?}");
    let names: HashSet<&str> = sessions.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("encrypted sessions: {names:?} ({} in all)", sessions.len());

    shutdown.cancel();
    herald.wait().await.expect("Herald stops cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_encrypts_without_checking_the_certificate_and_prefer_follows_the_server() {
    let ca = Ca::new("Herald test CA");
    let server = tls_server(&ca).await;
    // No sslrootcert: any certificate, any host name.
    let client = herald::db::connect(
        &config(url(&server, "127.0.0.1", "require", None)),
        "herald-test",
    )
    .await
    .expect("require connects to a server with TLS");
    assert!(encrypted(&client).await);

    // prefer, the default: TLS when the server offers it, plain otherwise.
    let client = herald::db::connect(&config(server.url(DB)), "herald-test")
        .await
        .unwrap();
    assert!(encrypted(&client).await, "prefer uses the server's TLS");
    let plain = PgServer::start();
    plain.create_database(DB).await;
    let client = herald::db::connect(&config(plain.url(DB)), "herald-test")
        .await
        .expect("prefer connects to a server without TLS");
    assert!(!encrypted(&client).await);
    let client = herald::db::connect(
        &config(url(&server, "127.0.0.1", "disable", None)),
        "herald-test",
    )
    .await
    .unwrap();
    assert!(!encrypted(&client).await, "disable never uses TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_certificate_for_another_host_naming_the_setting() {
    let ca = Ca::new("Herald test CA");
    let server = tls_server(&ca).await;
    let root = ca.pem_file();
    // The certificate names localhost only.
    let config = config(url(&server, "127.0.0.1", "verify-full", Some(&root)));
    let want = "database_url (DATABASE_URL): sslmode=verify-full: server certificate is not valid for host 127.0.0.1";
    let err = refused(&config).await;
    assert!(err.starts_with(want), "{err}");
    assert!(
        err.ends_with("(it is for localhost)"),
        "says whom it is for: {err}"
    );

    let stderr = herald_fails(&config, &["migrate"]).await;
    assert!(stderr.contains(want), "herald migrate: {stderr}");
    // `herald run` without migrating first: the pool's first connection.
    let stderr = herald_fails(&config, &["run"]).await;
    assert!(stderr.contains(want), "herald run: {stderr}");

    // verify-ca checks the chain only: the same server and host connect.
    let ok = self::config(url(&server, "127.0.0.1", "verify-ca", Some(&root)));
    let client = herald::db::connect(&ok, "herald-test")
        .await
        .expect("verify-ca ignores the host name");
    assert!(encrypted(&client).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_another_ca_is_refused_by_verify_ca_and_by_require_with_a_root() {
    let ca = Ca::new("Herald test CA");
    let server = tls_server(&ca).await;
    let other = Ca::new("Another CA").pem_file();
    for mode in ["verify-ca", "verify-full", "require"] {
        let config = config(url(&server, "localhost", mode, Some(&other)));
        let err = refused(&config).await;
        assert!(
            err.starts_with("database_url (DATABASE_URL): sslmode=")
                && err.contains(mode)
                && err.contains("server certificate is not signed by a CA in sslrootcert")
                && err.contains(&other.display().to_string()),
            "{mode}: {err}"
        );
    }
    let config = config(url(&server, "localhost", "verify-ca", Some(&other)));
    let stderr = herald_fails(&config, &["migrate"]).await;
    assert!(
        stderr
            .contains("sslmode=verify-ca: server certificate is not signed by a CA in sslrootcert"),
        "herald migrate: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn require_against_a_server_without_tls_fails_clearly() {
    let plain = PgServer::start();
    plain.create_database(DB).await;
    let ca = Ca::new("Herald test CA");
    let root = ca.pem_file();
    let want = "server does not support TLS";
    for (mode, root) in [
        ("require", None),
        ("verify-ca", Some(root.as_path())),
        ("verify-full", Some(root.as_path())),
    ] {
        let config = config(url(&plain, "localhost", mode, root));
        let err = refused(&config).await;
        assert!(
            err.starts_with(&format!(
                "database_url (DATABASE_URL): sslmode={mode}: {want}"
            )),
            "{mode}: {err}"
        );
    }
    let config = config(url(&plain, "127.0.0.1", "require", None));
    let stderr = herald_fails(&config, &["migrate"]).await;
    assert!(
        stderr.contains(&format!(
            "database_url (DATABASE_URL): sslmode=require: {want}"
        )),
        "herald migrate: {stderr}"
    );
    let stderr = herald_fails(&config, &["run"]).await;
    assert!(
        stderr.contains(&format!(
            "database_url (DATABASE_URL): sslmode=require: {want}"
        )),
        "herald run: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tls_settings_fail_at_start_naming_the_setting() {
    // Nothing listens: these fail before any connection is tried.
    let base = format!("postgres://postgres@127.0.0.1:{}/{DB}", common::free_port());
    let not_pem = common::temp_file("ca.pem", "not a certificate\n");
    let cases = [
        (
            format!("{base}?sslmode=verify_full"),
            "sslmode=\"verify_full\" is not one of disable, allow, prefer, require, verify-ca, verify-full",
        ),
        (
            format!("{base}?sslmode=verify-full&sslrootcert=/nonexistent/root.crt"),
            "sslrootcert=/nonexistent/root.crt: cannot read the file",
        ),
        (
            format!("{base}?sslmode=verify-ca&sslrootcert={}", not_pem.display()),
            "holds no PEM certificate",
        ),
        (format!("{base}?sslmode=verify-full"), "sslmode=verify-full needs sslrootcert"),
        (
            format!("{base}?sslmode=require&sslrootcert=system"),
            "sslmode=require may not be used with sslrootcert=system",
        ),
        (format!("{base}?sslkey=/k.pem"), "sslkey is not supported"),
    ];
    for (database_url, want) in cases {
        let config = config(database_url.clone());
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid URL in database_url (DATABASE_URL): ") && err.contains(want),
            "{database_url}: {err}"
        );
        let stderr = herald_fails(&config, &["migrate"]).await;
        assert!(
            stderr.contains("database_url (DATABASE_URL)") && stderr.contains(want),
            "herald migrate with {database_url}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_with_channel_binding_runs_over_verify_full() {
    let ca = Ca::new("Herald test CA");
    let server = tls_server(&ca).await;
    server
        .admin("SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD 'hunter2'")
        .await;
    // Passwords over TLS only, and SCRAM, which offers SCRAM-SHA-256-PLUS
    // (bound to the server's certificate) on a TLS session.
    server
        .set_hba("hostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n");
    let root = ca.pem_file();
    let database_url = format!(
        "postgres://postgres:hunter2@localhost:{}/{DB}?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        server.port,
        root.display()
    );
    let config = config(database_url);
    config.validate().unwrap();
    // The reload is asynchronous: until it is read, trust (which runs no
    // SCRAM, so channel_binding=require refuses it) still applies.
    let mut connected = None;
    common::wait_for(
        "a SCRAM session with channel binding",
        Duration::from_secs(10),
        async || {
            connected = herald::db::connect(&config, "herald-test").await.ok();
            connected.is_some()
        },
    )
    .await;
    assert!(encrypted(&connected.unwrap()).await);
    herald::migrate::migrate(&config)
        .await
        .expect("migrating with SCRAM and channel binding");
    // Without TLS the server takes no password at all.
    let err = refused(&self::config(format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/{DB}?sslmode=disable",
        server.port
    )))
    .await;
    assert!(err.contains("pg_hba.conf"), "{err}");
}
