//! The event catalog and durable subscriptions at their edges: `herald events
//! list` and `herald subscriptions …` run as the binary (what they print,
//! what they store, how they refuse bad input), the catalog's checks and
//! configuration errors, and subscription validation and CRUD through the
//! library (what the rows hold after each call).

use crate::common;

use std::time::Duration;

use crate::common::{herald_fails as fails, herald_ok as ok, scalar, TestDb};
use herald::events::{describe, Catalog, DeliveryMode, EventType, Publisher, Violation};
use herald::subscriptions::{self, Subscription};
use herald::{Config, Error, Event, Registry};
use serde_json::{json, Value};

fn config_without_database() -> Config {
    // `herald events list` reads only the configuration.
    Config {
        database_url: "postgres://nobody@127.0.0.1:1/none".into(),
        ..Config::default()
    }
}

fn event_type(name: &str) -> EventType {
    EventType {
        name: name.into(),
        description: String::new(),
        version: 1,
        schema: None,
        schema_file: None,
        delivery: DeliveryMode::Durable,
    }
}

fn config_error(result: herald::Result<Catalog>) -> String {
    match result {
        Err(Error::Config(msg)) => msg,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(c) => panic!("expected a configuration error, got {c:?}"),
    }
}

#[tokio::test]
async fn events_list_prints_the_declared_types_and_the_strict_setting() {
    let config = config_without_database();
    let empty = ok(&config, &["events", "list"]).await;
    assert!(empty.contains("no event types declared"), "{empty}");
    assert!(
        empty.contains("undeclared topics are accepted ([catalog] strict = false)"),
        "{empty}"
    );
    assert_eq!(ok(&config, &["events", "list", "--json"]).await, "");

    let schema = common::temp_file(
        "order.json",
        r#"{"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}"#,
    );
    let toml = format!(
        r#"
[catalog]
strict = true

[[events]]
name = "payment.captured"
description = "a payment was captured"
version = 3
schema = {{ type = "object", required = ["amount"] }}

[[events]]
name = "order.placed"
schema_file = "{}"

[[events]]
name = "presence.seen"
description = "a user was seen"
delivery = "fire_and_forget"
"#,
        schema.display()
    );
    let file = common::temp_file("herald.toml", &toml);
    let file = file.to_str().expect("a UTF-8 path");

    let table = ok(&config, &["--config", file, "events", "list"]).await;
    let row = |name: &str| -> String {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
            .to_string()
    };
    for header in ["NAME", "VERSION", "DELIVERY", "SCHEMA", "DESCRIPTION"] {
        assert!(table.contains(header), "{header}: {table}");
    }
    let payment = row("payment.captured");
    assert!(
        payment.contains('3') && payment.contains("durable"),
        "{payment}"
    );
    assert!(payment.contains("inline") && payment.contains("a payment was captured"));
    assert!(row("order.placed").contains("order.json"), "{table}");
    let presence = row("presence.seen");
    assert!(presence.contains("fire_and_forget"), "{presence}");
    assert!(
        presence.contains(" - "),
        "no schema shows as '-': {presence}"
    );
    assert!(
        table.contains("undeclared topics are refused ([catalog] strict = true)"),
        "{table}"
    );

    // JSON: one object per line, by name, the file's schema read in.
    let lines: Vec<Value> = ok(&config, &["--config", file, "events", "list", "--json"])
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|l| l["name"].as_str()).collect();
    assert_eq!(names, ["order.placed", "payment.captured", "presence.seen"]);
    assert_eq!(
        lines[0]["schema"]["properties"]["id"]["type"],
        json!("integer")
    );
    assert_eq!(lines[1]["version"], json!(3));
    assert_eq!(lines[1]["schema"]["required"], json!(["amount"]));
    assert_eq!(lines[2]["delivery"], json!("fire_and_forget"));
    assert!(lines[2].get("schema").is_none(), "{}", lines[2]);
}

#[tokio::test]
async fn events_list_refuses_a_catalog_that_does_not_compile() {
    let config = config_without_database();
    let file = common::temp_file(
        "herald.toml",
        r#"
[[events]]
name = "payment.captured"
schema = { type = "no-such-type" }
"#,
    );
    let err = fails(
        &config,
        &["--config", file.to_str().unwrap(), "events", "list"],
    )
    .await;
    assert!(err.contains("payment.captured"), "{err}");
    assert!(err.contains("does not compile"), "{err}");
}

#[test]
fn the_catalog_refuses_each_bad_declaration_by_name() {
    let mut bad_name = event_type("payment captured");
    bad_name.description = "a space in the name".into();
    let msg = config_error(Catalog::new(&[bad_name], false));
    assert!(
        msg.contains("[[events]] name") && msg.contains("' '"),
        "{msg}"
    );

    let mut both = event_type("a.both");
    both.schema = Some(json!({}));
    both.schema_file = Some("x.json".into());
    let msg = config_error(Catalog::new(&[both], false));
    assert!(
        msg.contains("\"a.both\"") && msg.contains("not both"),
        "{msg}"
    );

    let mut missing = event_type("a.missing");
    missing.schema_file = Some("/nonexistent/herald/schema.json".into());
    let msg = config_error(Catalog::new(&[missing], false));
    assert!(
        msg.contains("\"a.missing\"") && msg.contains("reading schema_file"),
        "{msg}"
    );

    let mut not_json = event_type("a.notjson");
    not_json.schema_file = Some(common::temp_file("bad.json", "{ not json"));
    let msg = config_error(Catalog::new(&[not_json], false));
    assert!(msg.contains("is not JSON"), "{msg}");

    let mut wrong = event_type("a.wrong");
    wrong.schema = Some(json!({"type": 12}));
    let msg = config_error(Catalog::new(&[wrong], false));
    assert!(
        msg.contains("\"a.wrong\"") && msg.contains("does not compile"),
        "{msg}"
    );

    let msg = config_error(Catalog::new(
        &[event_type("a.twice"), event_type("a.twice")],
        false,
    ));
    assert_eq!(msg, "[[events]] \"a.twice\" is declared twice");
}

#[test]
fn the_catalog_checks_payloads_against_the_declared_schema_only() {
    let mut payment = event_type("payment.captured");
    payment.schema = Some(json!({
        "type": "object",
        "required": ["amount", "currency"],
        "properties": {
            "amount": {"type": "integer", "minimum": 0},
            "currency": {"type": "string"}
        }
    }));
    let mut presence = event_type("presence.seen");
    presence.delivery = DeliveryMode::FireAndForget;
    let open = Catalog::new(&[payment.clone(), presence.clone()], false).unwrap();

    assert!(!open.is_strict() && !open.is_empty());
    assert!(open.checks_anything(), "a schema is something to check");
    assert_eq!(open.get("presence.seen"), Some(&presence));
    assert_eq!(open.get("nothing.here"), None);
    assert_eq!(open.delivery("presence.seen"), DeliveryMode::FireAndForget);
    assert_eq!(open.delivery("payment.captured"), DeliveryMode::Durable);
    assert_eq!(open.delivery("undeclared"), DeliveryMode::Durable);
    assert_eq!(DeliveryMode::FireAndForget.to_string(), "fire_and_forget");
    let debug = format!("{open:?}");
    assert!(
        debug.contains("payment.captured") && debug.contains("strict: false"),
        "{debug}"
    );

    assert_eq!(
        open.check("payment.captured", &json!({"amount": 5, "currency": "EUR"})),
        Ok(())
    );
    // No schema, or undeclared while not strict: anything goes.
    assert_eq!(open.check("presence.seen", &json!([1, 2])), Ok(()));
    assert_eq!(open.check("undeclared", &json!(null)), Ok(()));

    let violations = open
        .check("payment.captured", &json!({"amount": -1}))
        .unwrap_err();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations
        .iter()
        .any(|v| v.path == "/amount" && v.message.contains("minimum")));
    assert!(violations
        .iter()
        .any(|v| v.path.is_empty() && v.message.contains("currency")));
    let text = describe(&violations);
    assert!(
        text.contains("at /amount: ") && text.contains("at /: "),
        "{text}"
    );
    assert_eq!(text.matches("; ").count(), 1, "{text}");

    match open.validate(
        "payment.captured",
        &json!({"amount": "5", "currency": "EUR"}),
    ) {
        Err(Error::SchemaViolation { topic, details }) => {
            assert_eq!(topic, "payment.captured");
            assert!(details.starts_with("at /amount: "), "{details}");
        }
        other => panic!("expected a schema violation, got {other:?}"),
    }
    assert!(open
        .validate("payment.captured", &json!({"amount": 1, "currency": "X"}))
        .is_ok());

    // Strict: an undeclared topic is refused, a declared one without a
    // schema is not.
    let strict = Catalog::new(&[presence], true).unwrap();
    assert!(strict.checks_anything(), "strict mode checks topics");
    assert_eq!(
        strict.check("undeclared", &json!({})),
        Err(vec![Violation {
            path: String::new(),
            message:
                "topic \"undeclared\" is not declared in [[events]] and [catalog] strict is on"
                    .into()
        }])
    );
    assert_eq!(strict.check("presence.seen", &json!({})), Ok(()));

    let nothing = Catalog::new(&[event_type("plain.event")], false).unwrap();
    assert!(!nothing.checks_anything());
    assert!(Catalog::default().is_empty());
    assert_eq!(
        nothing.types().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["plain.event"]
    );
}

#[tokio::test]
async fn the_publisher_refuses_before_writing_or_sending_anything() {
    let db = TestDb::with(|c| {
        let mut payment = event_type("payment.captured");
        payment.schema = Some(json!({"type": "object", "required": ["amount"]}));
        let mut presence = event_type("presence.seen");
        presence.delivery = DeliveryMode::FireAndForget;
        c.events = vec![payment, presence];
        c.max_payload_bytes = 64;
    })
    .await;
    let client = db.client().await;
    // No Redis pool: fire-and-forget events cannot be sent.
    let publisher = Publisher::new(&db.config, None).unwrap();
    assert_eq!(publisher.catalog().types().count(), 2);

    let bad = Event::new("payment.captured", &json!({"currency": "EUR"})).unwrap();
    let err = publisher.publish(&client, &bad).await.unwrap_err();
    assert!(matches!(err, Error::SchemaViolation { .. }), "{err}");

    let big = Event::new(
        "payment.captured",
        &json!({"amount": 1, "note": "x".repeat(100)}),
    )
    .unwrap();
    let err = publisher.publish(&client, &big).await.unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { limit: 64, .. }),
        "{err}"
    );

    let seen = Event::new("presence.seen", &json!({"user": 7})).unwrap();
    let err = publisher.publish(&client, &seen).await.unwrap_err();
    assert!(
        err.to_string().contains("has no Redis pool"),
        "fire_and_forget without a pool: {err}"
    );
    let err = publisher.emit(&seen).await.unwrap_err();
    assert!(err.to_string().contains("has no Redis pool"), "{err}");
    // Forced through the outbox, the same event is stored.
    let good = Event::new("payment.captured", &json!({"amount": 1})).unwrap();
    publisher
        .publish_as(&client, &seen, DeliveryMode::Durable)
        .await
        .unwrap();
    publisher.publish(&client, &good).await.unwrap();
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.outbox").await,
        2,
        "only the two valid durable events are written"
    );
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM herald.outbox WHERE topic = 'presence.seen'"
        )
        .await,
        1
    );
}

#[test]
fn subscriptions_are_validated_field_by_field() {
    let err = |s: Subscription| match s.validate() {
        Err(Error::Config(msg)) => msg,
        other => panic!("{s:?} should be refused, got {other:?}"),
    };
    assert!(Subscription::new("audit", "payment.*").validate().is_ok());
    assert!(
        Subscription::webhook("crm", "*", "https://crm.example/h", "k")
            .validate()
            .is_ok()
    );

    let msg = err(Subscription::new("bad name", "x"));
    assert!(msg.starts_with("subscription \"bad name\": "), "{msg}");
    for pattern in ["", "pay ment", "payment.?", "x".repeat(256).as_str()] {
        let msg = err(Subscription::new("audit", pattern));
        assert!(
            msg.contains("is not a topic or a glob"),
            "{pattern:?}: {msg}"
        );
    }
    let msg = err(Subscription::new("audit", "a").kind("bad kind"));
    assert!(msg.contains("task kind"), "{msg}");
    let msg = err(Subscription::new("audit", "a").queue(""));
    assert!(msg.contains("queue"), "{msg}");
    let msg = err(Subscription::new("audit", "a").max_attempts(0));
    assert!(msg.contains("max_attempts is 0"), "{msg}");
    let msg = err(Subscription::webhook("w", "a", "not a url", "k"));
    assert!(msg.contains("is not a URL"), "{msg}");
    let msg = err(Subscription::webhook("w", "a", "ftp://example.com/x", "k"));
    assert!(msg.contains("http or https"), "{msg}");
    let msg = err(Subscription::webhook("w", "a", "https://example.com/x", ""));
    assert!(msg.contains("needs a secret"), "{msg}");
    let msg = err(Subscription::new("w", "a").kind(subscriptions::WEBHOOK_KIND));
    assert!(msg.contains("needs a webhook URL"), "{msg}");

    // As declared in the configuration: the defaults fill what is left out,
    // and an unknown field is refused rather than ignored.
    let parsed: Subscription =
        serde_json::from_value(json!({"name": "audit", "pattern": "a.*", "timeout": "30s"}))
            .unwrap();
    assert_eq!(
        parsed,
        Subscription::new("audit", "a.*").timeout(Duration::from_secs(30))
    );
    assert!(parsed.enabled && parsed.queue == "default");
    let unknown = serde_json::from_value::<Subscription>(
        json!({"name": "audit", "pattern": "a.*", "colour": "red"}),
    );
    assert!(unknown.unwrap_err().to_string().contains("colour"));

    // The kind each one's events become.
    assert_eq!(Subscription::new("audit", "a").task_kind(), "sub:audit");
    assert_eq!(subscriptions::handler_kind("audit"), "sub:audit");
    assert_eq!(
        Subscription::new("audit", "a")
            .kind("billing.audit")
            .task_kind(),
        "billing.audit"
    );
    assert_eq!(
        Subscription::webhook("crm", "a", "https://x.example", "k").task_kind(),
        subscriptions::WEBHOOK_KIND
    );

    // The registry refuses an invalid one before registering a handler.
    let mut registry = Registry::new();
    let refused = registry.subscribe_durable("bad name", "x", |_ctx, _env| async { Ok(()) });
    assert!(refused.is_err());
    assert!(registry
        .subscribe_durable_with(
            Subscription::new("good", "x").timeout(Duration::from_secs(30)),
            |_ctx, _env| async { Ok(()) },
        )
        .is_ok());
}

#[tokio::test]
async fn subscriptions_are_stored_updated_only_when_changed_and_synced_from_config() {
    let db = TestDb::new().await;
    let mut client = db.client().await;

    let audit = Subscription::new("audit", "payment.*")
        .queue("billing")
        .max_attempts(7)
        .timeout(Duration::from_secs(90));
    subscriptions::upsert(&client, &audit, "api").await.unwrap();
    let hook = Subscription::webhook("crm", "customer.*", "https://crm.example/h", "s3cret");
    subscriptions::upsert(&client, &hook, "config")
        .await
        .unwrap();

    let listed = subscriptions::list(&client).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["audit", "crm"],
        "listed by name"
    );
    let a = &listed[0];
    assert_eq!(
        (a.pattern.as_str(), a.kind.as_str(), a.queue.as_str()),
        ("payment.*", "sub:audit", "billing")
    );
    assert_eq!((a.max_attempts, a.timeout_secs), (7, Some(90.0)));
    assert_eq!((a.webhook_url.as_deref(), a.enabled), (None, true));
    assert_eq!(a.source, "api");
    let c = &listed[1];
    assert_eq!(c.kind, subscriptions::WEBHOOK_KIND);
    assert_eq!(c.webhook_url.as_deref(), Some("https://crm.example/h"));
    assert_eq!(c.source, "config");
    // The secret is stored for the webhook handler, never listed.
    let listed_json = serde_json::to_string(&listed).unwrap();
    assert!(!listed_json.contains("s3cret"), "{listed_json}");
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM herald.subscriptions WHERE webhook_secret = 's3cret'"
        )
        .await,
        1
    );

    // The same values again: the row is not touched.
    let updated_at = a.updated_at;
    subscriptions::upsert(&client, &audit, "api").await.unwrap();
    let again = subscriptions::list(&client).await.unwrap();
    assert_eq!(
        again[0].updated_at, updated_at,
        "an unchanged upsert writes nothing"
    );
    // A change is written.
    subscriptions::upsert(&client, &audit.clone().max_attempts(2), "api")
        .await
        .unwrap();
    let changed = subscriptions::list(&client).await.unwrap();
    assert_eq!(changed[0].max_attempts, 2);
    assert!(changed[0].updated_at > updated_at);
    // An invalid one is refused before the database sees it.
    let err = subscriptions::upsert(&client, &audit.clone().max_attempts(0), "api")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_attempts"), "{err}");
    assert_eq!(
        subscriptions::list(&client).await.unwrap()[0].max_attempts,
        2
    );

    // Pause, resume, remove; each says whether the name existed.
    assert!(subscriptions::set_enabled(&client, "audit", false)
        .await
        .unwrap());
    assert!(!subscriptions::list(&client).await.unwrap()[0].enabled);
    assert!(subscriptions::set_enabled(&client, "audit", true)
        .await
        .unwrap());
    assert!(subscriptions::list(&client).await.unwrap()[0].enabled);
    assert!(!subscriptions::set_enabled(&client, "nobody", true)
        .await
        .unwrap());
    assert!(!subscriptions::remove(&client, "nobody").await.unwrap());

    // Syncing the configuration: its subscriptions are created or updated,
    // config ones it no longer lists are deleted, API ones are kept.
    let ledger = Subscription::new("ledger", "ledger.*");
    subscriptions::sync_config(&mut client, std::slice::from_ref(&ledger))
        .await
        .unwrap();
    let synced = subscriptions::list(&client).await.unwrap();
    let names: Vec<(&str, &str)> = synced
        .iter()
        .map(|s| (s.name.as_str(), s.source.as_str()))
        .collect();
    assert_eq!(names, [("audit", "api"), ("ledger", "config")]);
    // A bad one in the configuration rolls the whole sync back.
    let err = subscriptions::sync_config(
        &mut client,
        &[
            Subscription::new("other", "o.*"),
            Subscription::new("bad name", "x"),
        ],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bad name"), "{err}");
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.subscriptions").await,
        2,
        "nothing of the failed sync is kept"
    );
    assert!(subscriptions::remove(&client, "audit").await.unwrap());
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM herald.subscriptions").await,
        1
    );
}

#[tokio::test]
async fn the_subscriptions_cli_adds_lists_pauses_resumes_and_removes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let config = &db.config;
    let subs = "SELECT count(*) FROM herald.subscriptions";

    assert_eq!(
        ok(config, &["subscriptions", "list"]).await.trim(),
        "no subscriptions"
    );
    assert_eq!(ok(config, &["subscriptions", "list", "--json"]).await, "");

    let out = ok(
        config,
        &[
            "subscriptions",
            "add",
            "billing-audit",
            "payment.*",
            "--kind",
            "billing.audit",
            "--queue",
            "billing",
            "--max-attempts",
            "4",
            "--timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(
        out.trim(),
        "subscription \"billing-audit\" on \"payment.*\" → billing.audit"
    );
    let out = ok(
        config,
        &[
            "subscriptions",
            "add",
            "crm",
            "customer.*",
            "--webhook",
            "https://crm.example.com/hooks/herald?token=s3cr3t",
            "--secret",
            "k3y",
        ],
    )
    .await;
    assert!(
        out.contains("→ POST https://crm.example.com/hooks/herald?token=****")
            && !out.contains("s3cr3t"),
        "{out}"
    );
    let row = client
        .query_one(
            "SELECT kind, queue, max_attempts, extract(epoch FROM timeout)::float8, source \
             FROM herald.subscriptions WHERE name = 'billing-audit'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "billing.audit");
    assert_eq!(row.get::<_, String>(1), "billing");
    assert_eq!(row.get::<_, i32>(2), 4);
    assert_eq!(row.get::<_, Option<f64>>(3), Some(30.0));
    assert_eq!(row.get::<_, String>(4), "api");

    let table = ok(config, &["subscriptions", "list"]).await;
    for header in [
        "NAME", "PATTERN", "TARGET", "QUEUE", "ATTEMPTS", "STATE", "SOURCE",
    ] {
        assert!(table.contains(header), "{header}: {table}");
    }
    let line = |t: &str, name: &str| -> String {
        t.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name}: {t}"))
            .to_string()
    };
    let audit = line(&table, "billing-audit");
    assert!(
        audit.contains("billing.audit") && audit.contains("active") && audit.contains("api"),
        "{audit}"
    );
    assert!(line(&table, "crm").contains("POST https://crm.example.com/hooks/herald?token=****"));
    assert!(
        !table.contains("k3y") && !table.contains("s3cr3t"),
        "the secret is never printed: {table}"
    );

    assert_eq!(
        ok(config, &["subscriptions", "pause", "crm"]).await.trim(),
        "subscription \"crm\" paused"
    );
    let paused = ok(config, &["subscriptions", "list"]).await;
    assert!(line(&paused, "crm").contains("paused"), "{paused}");
    let json: Vec<Value> = ok(config, &["subscriptions", "list", "--json"])
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    assert_eq!(json[1]["name"], json!("crm"));
    assert_eq!(json[1]["enabled"], json!(false));
    assert_eq!(
        json[1]["webhook_url"],
        json!("https://crm.example.com/hooks/herald?token=****"),
        "the URL's secret is masked in JSON too"
    );
    assert_eq!(json[0]["timeout_secs"], json!(30.0));
    assert_eq!(
        ok(config, &["subscriptions", "resume", "crm"]).await.trim(),
        "subscription \"crm\" resumed"
    );
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM herald.subscriptions WHERE enabled"
        )
        .await,
        2
    );

    // Refusals: each names what is wrong and changes nothing.
    for verb in ["pause", "resume", "remove"] {
        let err = fails(config, &["subscriptions", verb, "nobody"]).await;
        assert!(
            err.contains("no subscription named \"nobody\""),
            "{verb}: {err}"
        );
    }
    let err = fails(
        config,
        &["subscriptions", "add", "x", "a.*", "--max-attempts", "0"],
    )
    .await;
    assert!(err.contains("max_attempts is 0"), "{err}");
    let err = fails(
        config,
        &[
            "subscriptions",
            "add",
            "x",
            "a.*",
            "--webhook",
            "https://h.example",
        ],
    )
    .await;
    assert!(err.contains("--secret"), "a webhook needs --secret: {err}");
    let err = fails(config, &["subscriptions", "add", "x", "a b", "--kind", "k"]).await;
    assert!(err.contains("is not a topic or a glob"), "{err}");
    assert_eq!(scalar(&client, subs).await, 2, "no refused add was stored");

    assert_eq!(
        ok(config, &["subscriptions", "remove", "crm"]).await.trim(),
        "subscription \"crm\" removed"
    );
    assert_eq!(scalar(&client, subs).await, 1);
}
