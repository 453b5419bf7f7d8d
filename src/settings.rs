//! [`Config::load`] and [`Config::validate`]: the configuration checked as a
//! whole, against what the modules it configures accept (the event catalog
//! and its schemas, subscriptions, cron schedules, queue names), on top of
//! each setting's own check in `config`.
//!
//! It owns no setting and opens no connection; it exists so that `config`
//! depends on no other module while loading still refuses, at start, every
//! setting that cannot work, naming it.

use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

impl Config {
    /// Defaults, then the TOML file (`path`, else `HERALD_CONFIG` when set),
    /// then the environment; validated.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let config = Config::from_sources(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reject settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<()> {
        self.check_settings()?;
        // sslmode and sslrootcert: a wrong value or an unreadable CA file
        // fails here, before any connection is tried.
        crate::db::tls_connector(self)?;
        crate::events::Catalog::from_config(self)?;
        let mut names = std::collections::HashSet::new();
        for sub in &self.subscriptions {
            sub.validate()?;
            if !names.insert(sub.name.as_str()) {
                return Err(Error::Config(format!(
                    "[[subscriptions]] {:?} is declared twice",
                    sub.name
                )));
            }
        }
        for q in &self.worker.queues {
            let (name, n) = match q.split_once('=') {
                Some((name, n)) => (name.trim(), Some(n.trim())),
                None => (q.trim(), None),
            };
            crate::queue::validate_name("queue", name, 128)
                .map_err(|e| Error::Config(format!("worker.queues: {e}")))?;
            if let Some(n) = n {
                match n.parse::<usize>() {
                    Ok(n) if n >= 1 => {}
                    _ => {
                        return Err(Error::Config(format!(
                            "worker.queues: {q:?}: the concurrency after '=' must be a whole number of at least 1"
                        )))
                    }
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.schedules.iter().enumerate() {
            s.validate().map_err(|e| {
                let msg = match e {
                    Error::InvalidSchedule(m) => m,
                    other => other.to_string(),
                };
                Error::Config(format!("schedules[{i}]: {msg}"))
            })?;
            if !names.insert(s.name.as_str()) {
                return Err(Error::Config(format!(
                    "schedules[{i}]: the name {:?} is used by another [[schedules]] entry; names must be unique",
                    s.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use crate::config::*;
    use std::time::Duration;

    #[test]
    fn cluster_and_sentinel_urls_parse_into_their_nodes() {
        assert_eq!(
            RedisTarget::parse("redis+cluster://u:p%40ss@h1:7000,h2,[::1]:7002?protocol=3")
                .unwrap(),
            RedisTarget::Cluster {
                nodes: vec![
                    "redis://u:p%40ss@h1:7000/?protocol=3".into(),
                    "redis://u:p%40ss@h2:6379/?protocol=3".into(),
                    "redis://u:p%40ss@[::1]:7002/?protocol=3".into(),
                ]
            }
        );
        assert_eq!(
            RedisTarget::parse("rediss+cluster://h1:7000/").unwrap(),
            RedisTarget::Cluster {
                nodes: vec!["rediss://h1:7000".into()]
            }
        );
        assert_eq!(
            RedisTarget::parse("redis+sentinel://:s%2Bcret@s1,s2:26380/my%20master/2").unwrap(),
            RedisTarget::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26380".into()],
                master: "my master".into(),
                username: None,
                password: Some("s+cret".into()),
                db: 2,
                tls: false,
            }
        );
        assert!(matches!(
            RedisTarget::parse("redis://127.0.0.1:6379/1").unwrap(),
            RedisTarget::Single(_)
        ));
        // Passwords never show in the messages.
        let err = RedisTarget::parse("redis+cluster://u:hunter2@h1:x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redis_url") && !err.contains("hunter2"),
            "{err}"
        );
        assert_eq!(
            mask_url("redis+sentinel://u:hunter2@s1,s2/m"),
            "redis+sentinel://u:****@s1,s2/m"
        );
        let mut config = Config {
            redis_url: "redis://127.0.0.1".into(),
            ..Config::default()
        };
        config.redis.pubsub = PubSubMode::Sharded;
        let err = config.check_settings().unwrap_err().to_string();
        assert!(err.contains("redis.pubsub (HERALD_REDIS_PUBSUB)"), "{err}");
    }

    #[test]
    fn worker_settings_that_cannot_work_are_refused() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.worker.heartbeat_interval = Some(Duration::from_secs(14));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("worker.heartbeat_interval"), "{e}");
        c.worker.heartbeat_interval = None;
        c.worker.lease_margin = Some(Duration::from_secs(20));
        assert!(c.validate().is_err());
        c.worker.lease_margin = None;
        c.worker.task_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn listen_check_is_fail_or_warn() {
        figment::Jail::expect_with(|jail| {
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.postgres.listen_check, crate::config::ListenCheck::Fail);
            jail.set_env("HERALD_POSTGRES_LISTEN_CHECK", "warn");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.postgres.listen_check, crate::config::ListenCheck::Warn);
            jail.set_env("HERALD_POSTGRES_LISTEN_CHECK", "off");
            let error = Config::load(None)
                .expect_err("not a listen_check")
                .to_string();
            assert!(error.to_lowercase().contains("listen_check"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                channel_prefix = "file:"
                partitions = 32
                [relay]
                batch_size = 10
                retain_published = "24h"
                [redis]
                pool_size = 3
                "#,
            )?;
            jail.set_env("HERALD_CONFIG", "herald.toml");
            jail.set_env("HERALD_RELAY_BATCH_SIZE", "500");
            jail.set_env("HERALD_POSTGRES_POOL_SIZE", "4");
            jail.set_env("REDIS_URL", "rediss://:s3cret@cache.example:6380/0");
            jail.set_env("HERALD_TEST_DATABASE_URL", "ignored");
            jail.set_env("HERALD_DEV_PG_PORT", "5432");
            jail.set_env("HERALD_CI_REDIS_PORT", "6379");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.channel_prefix, "file:");
            assert_eq!(c.partitions, 32);
            assert_eq!(c.relay.batch_size, 500, "environment wins over the file");
            assert_eq!(c.relay.retain_published, Some(Duration::from_secs(86400)));
            assert_eq!(c.postgres.pool_size, 4);
            assert_eq!(c.redis.pool_size, 3);
            let shown = c.to_masked_toml();
            assert!(
                shown.contains("rediss://:****@cache.example:6380/0"),
                "{shown}"
            );
            assert!(!shown.contains("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn bad_settings_name_the_setting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_RELAY_BATCH_SIZE", "many");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("batch_size"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_RELAY_BACH_SIZE", "5");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("bach_size"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "mysql://db/x");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(
                err.contains("database_url") && err.contains("mysql"),
                "{err}"
            );
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_REDIS_URL", "not a url");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("redis_url"), "{err}");
            Ok(())
        });
        let err = Config::load(Some(Path::new("/nonexistent/herald.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/herald.toml"), "{err}");
    }

    #[test]
    fn schedules_and_scheduler_settings_load_from_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "herald.toml",
                r#"
                [scheduler]
                max_backfill = 7
                misfire_grace = "2s"
                [[schedules]]
                name = "nightly"
                cron = "30 2 * * *"
                kind = "report.build"
                tz = "Europe/Berlin"
                misfire = "once"
                payload = { format = "pdf" }
                [[schedules]]
                name = "heartbeat"
                cron = "*/10 * * * * *"
                kind = "herald.noop"
                "#,
            )?;
            jail.set_env("HERALD_CONFIG", "herald.toml");
            jail.set_env("HERALD_SCHEDULER_POLL_INTERVAL", "10s");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.scheduler.max_backfill, 7);
            assert_eq!(c.scheduler.misfire_grace, Duration::from_secs(2));
            assert_eq!(c.scheduler.poll_interval, Duration::from_secs(10));
            assert_eq!(c.schedules.len(), 2);
            assert_eq!(c.schedules[0].misfire, crate::cron::Misfire::Once);
            assert_eq!(c.schedules[0].payload, serde_json::json!({"format": "pdf"}));
            assert_eq!(c.schedules[1].tz, "UTC");
            assert_eq!(c.schedules[1].queue, "default");
            Ok(())
        });
    }

    #[test]
    fn bad_schedules_are_rejected_quoting_the_text() {
        for (entry, needles) in [
            (
                r#"name = "a"
                cron = "61 * * * *"
                kind = "k""#,
                vec!["schedules[0]", "\"61 * * * *\"", "expected 5 fields"],
            ),
            (
                r#"name = "a"
                cron = "* * * * *"
                kind = "k"
                tz = "Europe/Bärlin""#,
                vec!["\"Europe/Bärlin\"", "IANA"],
            ),
            (
                r#"name = "a"
                cron = "* * * * *"
                kind = "k"
                misfire = "sometimes""#,
                vec!["\"sometimes\"", "skip, once or all"],
            ),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.create_file("herald.toml", &format!("[[schedules]]\n{entry}\n"))?;
                jail.set_env("HERALD_CONFIG", "herald.toml");
                let err = Config::load(None).unwrap_err().to_string();
                for n in &needles {
                    assert!(err.contains(n), "{n:?} not in {err}");
                }
                Ok(())
            });
        }
    }

    #[test]
    fn subscriber_buffer_and_grace_fraction_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_REDIS_SUBSCRIBER_BUFFER", "500");
            jail.set_env("HERALD_SCHEDULER_MISFIRE_GRACE_FRACTION", "0.25");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.subscriber_buffer, 500);
            assert_eq!(c.scheduler.misfire_grace_fraction, 0.25);
            Ok(())
        });
        for (var, value, needle) in [
            (
                "HERALD_REDIS_SUBSCRIBER_BUFFER",
                "0",
                "redis.subscriber_buffer",
            ),
            (
                "HERALD_SCHEDULER_MISFIRE_GRACE_FRACTION",
                "1.5",
                "misfire_grace_fraction",
            ),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains(needle), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn maintenance_settings_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_MAINTENANCE_LEADER_RETRY", "500ms");
            jail.set_env("HERALD_MAINTENANCE_PROCESSED_EVENTS_RETENTION", "7days");
            jail.set_env("HERALD_MAINTENANCE_RESCUE_INTERVAL", "1s");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.maintenance.leader_retry, Duration::from_millis(500));
            assert_eq!(
                c.maintenance.processed_events_retention,
                Duration::from_secs(7 * 86400)
            );
            assert_eq!(c.maintenance.rescue_interval, Some(Duration::from_secs(1)));
            assert_eq!(c.maintenance.node_expiry_interval, None);
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("HERALD_MAINTENANCE_VACUUM_INTERVAL", "0s");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("maintenance.vacuum_interval must be more than 0"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn admin_guard_settings_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "HERALD_ADMIN_TRUSTED_PROXIES",
                "[10.0.0.0/8, \"192.168.1.7\"]",
            );
            jail.set_env("HERALD_ADMIN_LOGIN_MAX_FAILURES", "3");
            jail.set_env("HERALD_ADMIN_LOGIN_WINDOW", "90s");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.admin.trusted_proxies, ["10.0.0.0/8", "192.168.1.7"]);
            assert_eq!(
                c.admin.trusted_networks().map_err(|e| e.to_string())?.len(),
                2
            );
            assert_eq!(c.admin.login_max_failures, 3);
            assert_eq!(c.admin.login_window, Duration::from_secs(90));
            Ok(())
        });
        for (key, value, needle) in [
            (
                "HERALD_ADMIN_TRUSTED_PROXIES",
                "[proxy.example]",
                "admin.trusted_proxies",
            ),
            (
                "HERALD_ADMIN_LOGIN_MAX_FAILURES",
                "0",
                "admin.login_max_failures",
            ),
            ("HERALD_ADMIN_LOGIN_WINDOW", "0s", "admin.login_window"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains(needle), "{err}");
                Ok(())
            });
        }
    }

    #[test]
    fn masking_hides_passwords() {
        assert_eq!(
            mask_url("postgres://app:hunter2@db:5432/app"),
            "postgres://app:****@db:5432/app"
        );
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_url("::::"), "<unparsable URL>");
        assert_eq!(
            mask_url("postgres://db/app?user=app&password=hunter2&sslmode=require"),
            "postgres://db/app?user=app&password=****&sslmode=require"
        );
    }

    fn subscription(name: &str, pattern: &str) -> crate::subscriptions::Subscription {
        serde_json::from_value(serde_json::json!({"name": name, "pattern": pattern}))
            .expect("a subscription")
    }

    /// `validate` refuses each setting that cannot work with a message that
    /// names the setting and the value it got.
    #[test]
    fn each_unworkable_setting_is_refused_by_name() {
        type Tweak = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Tweak, Vec<&str>)> = vec![
            (
                Box::new(|c: &mut Config| c.admin.bind = "localhost".into()),
                vec!["admin.bind \"localhost\" is not an address:port (e.g. 127.0.0.1:9187)"],
            ),
            (
                Box::new(|c: &mut Config| c.nodes.heartbeat_interval = Duration::ZERO),
                vec!["nodes.heartbeat_interval must be more than 0"],
            ),
            (
                Box::new(|c: &mut Config| c.nodes.missed_heartbeats = 0),
                vec!["nodes.missed_heartbeats must be at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.subscriptions = vec![subscription("s1", "a b")]),
                vec!["subscription \"s1\"", "pattern \"a b\" is not a topic or a glob"],
            ),
            (
                Box::new(|c: &mut Config| {
                    c.subscriptions = vec![subscription("s1", "a.*"), subscription("s1", "b.*")]
                }),
                vec!["[[subscriptions]] \"s1\" is declared twice"],
            ),
            (
                Box::new(|c: &mut Config| {
                    c.redis.subscriber_buffer = MAX_SUBSCRIBER_BUFFER + 1
                }),
                vec!["redis.subscriber_buffer must be at most 16777216, got 16777217"],
            ),
            (
                Box::new(|c: &mut Config| c.partitions = 0),
                vec!["partitions must be between 1 and 1024, got 0"],
            ),
            (
                Box::new(|c: &mut Config| c.partitions = 1025),
                vec!["partitions must be between 1 and 1024, got 1025"],
            ),
            (
                Box::new(|c: &mut Config| c.max_payload_bytes = i32::MAX as usize + 1),
                vec!["max_payload_bytes must be below 2147483647, got 2147483648"],
            ),
            (
                Box::new(|c: &mut Config| c.relay.max_attempts = 0),
                vec!["relay.max_attempts must be at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.relay.backoff_min = Duration::from_secs(20)),
                vec!["relay.backoff_min (20s) is larger than relay.backoff_max (10s)"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues.clear()),
                vec!["worker.queues must name at least one queue"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["default".into(), "mail=0".into()]),
                vec!["worker.queues: \"mail=0\": the concurrency after '=' must be a whole number of at least 1"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["mail=four".into()]),
                vec!["worker.queues: \"mail=four\": the concurrency after '='"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.queues = vec!["bad name".into()]),
                vec!["worker.queues:", "queue \"bad name\": only letters"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.lease = Duration::from_millis(200)),
                vec!["worker.lease must be at least 300ms, got 200ms"],
            ),
            (
                Box::new(|c: &mut Config| c.worker.heartbeat_interval = Some(Duration::ZERO)),
                vec!["worker.heartbeat_interval must be more than 0"],
            ),
            (
                Box::new(|c: &mut Config| c.scheduler.poll_interval = Duration::from_millis(50)),
                vec!["scheduler.poll_interval must be at least 100ms, got 50ms"],
            ),
            (
                Box::new(|c: &mut Config| {
                    let nightly =
                        crate::cron::Schedule::new("nightly", "0 2 * * *", "report.build", &())
                            .expect("a schedule");
                    c.schedules = vec![nightly.clone(), nightly];
                }),
                vec!["schedules[1]: the name \"nightly\" is used by another [[schedules]] entry"],
            ),
            (
                Box::new(|c: &mut Config| c.channel_prefix = "herald :".into()),
                vec!["channel_prefix \"herald :\" must not contain whitespace or control characters"],
            ),
            (
                Box::new(|c: &mut Config| c.channel_prefix = "herald\u{7}".into()),
                vec!["must not contain whitespace or control characters"],
            ),
        ];
        for (tweak, needles) in cases {
            let mut c = Config::default();
            tweak(&mut c);
            let err = c.validate().expect_err(&format!("{needles:?} accepted"));
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            let err = err.to_string();
            assert!(err.starts_with("invalid configuration: "), "{err}");
            for n in &needles {
                assert!(err.contains(n), "{n:?} not in {err}");
            }
        }
    }

    #[test]
    fn queue_concurrency_may_be_set_per_queue() {
        let mut c = Config::default();
        c.worker.concurrency = 3;
        c.worker.queues = vec!["default".into(), " mail = 4 ".into()];
        assert!(c.validate().is_ok());
        assert_eq!(
            c.worker.queue_concurrency(),
            vec![("default".to_string(), 3), ("mail".to_string(), 4)]
        );
    }

    /// A URL that does not parse is refused without echoing it: it may hold
    /// a password.
    #[test]
    fn unparsable_urls_are_refused_without_their_password() {
        let mut c = Config {
            database_url: "postgres://app:hunter2@db:port/app".into(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("invalid URL in database_url (DATABASE_URL)")
                && err.contains("<unparsable URL>"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        c.database_url = Config::default().database_url;
        c.redis_url = "redis://:s3cret@cache:99999".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("invalid URL in redis_url (REDIS_URL)")
                && err.contains("<unparsable URL>"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        c.redis_url = "http://cache:6379".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("scheme \"http\" is not redis://"), "{err}");
    }

    /// A webhook URL that does not parse is refused without echoing it: its
    /// user info or query may hold a credential.
    #[test]
    fn an_unparsable_webhook_url_is_refused_without_its_credential() {
        let mut hook = subscription("billing", "payment.*");
        hook.webhook = Some("https://hook:wh-s3cret@hooks.example:99999/in".into());
        hook.secret = Some("key".into());
        let c = Config {
            subscriptions: vec![hook],
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("subscription \"billing\"") && err.contains("is not a URL"),
            "{err}"
        );
        assert!(!err.contains("wh-s3cret"), "{err}");
    }

    /// `herald config` prints this: every secret masked, and what is left is
    /// still a configuration file that loads.
    #[test]
    fn the_masked_toml_hides_every_secret_and_still_loads() {
        let mut hook = subscription("billing", "payment.*");
        hook.webhook = Some("https://hooks.example/in?token=abc123&v=1".into());
        hook.secret = Some("wh-s3cret".into());
        let plain = subscription("audit", "*");
        let c = Config {
            database_url: "postgres://app:hunter2@db:5432/app".into(),
            admin: AdminConfig {
                token: Some("adm1n-token".into()),
                ..AdminConfig::default()
            },
            subscriptions: vec![hook, plain],
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        let shown = c.to_masked_toml();
        for secret in ["hunter2", "adm1n-token", "wh-s3cret", "abc123"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://app:****@db:5432/app"), "{shown}");
        assert!(shown.contains("token = \"****\""), "{shown}");
        assert!(shown.contains("secret = \"****\""), "{shown}");
        assert!(
            shown.contains("https://hooks.example/in?token=****&v=1"),
            "{shown}"
        );
        let back: Config = toml::from_str(&shown).expect("the printed configuration loads");
        assert_eq!(back.subscriptions.len(), 2);
        assert_eq!(back.subscriptions[1].secret, None, "none was added");
        assert_eq!(back.subscriptions[1].webhook, None);
        assert_eq!(back.admin.bind, c.admin.bind);
        assert_eq!(back.partitions, c.partitions);
        assert_eq!(back.worker, c.worker);
        assert_eq!(back.relay, c.relay);
    }
}
