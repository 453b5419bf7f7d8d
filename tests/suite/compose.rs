//! docker-compose.yml checked without a Docker engine: parsed with
//! serde-saphyr (anchors and merge keys resolved), interpolated the way
//! `docker compose config` does, then held to what `docker compose` needs
//! (depends_on targets, conditions, volumes, variables) and to what the
//! file promises: a one-shot migration first, relay/worker/scheduler that
//! scale, an admin server published only with a token, matching passwords,
//! real `herald` subcommands, and a Dockerfile that builds the binary these
//! tests run. scripts/dev-services.sh and the Makefile are checked against
//! it too.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::common::{self, TestDb};

/// The file's text.
fn compose_text() -> String {
    std::fs::read_to_string(common::repo_root().join("docker-compose.yml")).unwrap()
}

/// `docker compose`'s interpolation of one string: `$$`, `$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`,
/// `${VAR?message}`; anything else after a `$` is an error, as is a
/// required variable that is missing. `used` collects each variable with
/// how it is guarded.
fn interpolate(
    text: &str,
    env: &BTreeMap<&str, &str>,
    used: &mut BTreeMap<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            let expr = &braced[..end];
            rest = &braced[end + 1..];
            let name_len = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_len);
            if name.is_empty() {
                return Err(format!("invalid interpolation ${{{expr}}} in {text:?}"));
            }
            let value = env.get(name).copied();
            let set = value.filter(|v| !v.is_empty());
            let replaced = match op {
                "" => {
                    used.insert(name.into(), "bare".into());
                    value.unwrap_or("").to_string()
                }
                _ if op.starts_with(":-") => {
                    used.insert(name.into(), "default".into());
                    set.unwrap_or(&op[2..]).to_string()
                }
                _ if op.starts_with('-') => {
                    used.insert(name.into(), "default".into());
                    value.unwrap_or(&op[1..]).to_string()
                }
                _ if op.starts_with(":?") || op.starts_with('?') => {
                    let message = op.trim_start_matches(':')[1..].trim();
                    used.insert(name.into(), format!("required: {message}"));
                    let got = if op.starts_with(':') { set } else { value };
                    match got {
                        Some(v) => v.to_string(),
                        None => {
                            return Err(format!(
                                "required variable {name} is missing a value: {message}"
                            ))
                        }
                    }
                }
                _ => return Err(format!("invalid interpolation ${{{expr}}} in {text:?}")),
            };
            out.push_str(&replaced);
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if name_len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("invalid interpolation after $ in {text:?}"));
        }
        let name = &rest[..name_len];
        used.insert(name.into(), "bare".into());
        out.push_str(env.get(name).copied().unwrap_or(""));
        rest = &rest[name_len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every string of `value` interpolated (mapping keys are not).
fn interpolate_all(
    value: &Value,
    env: &BTreeMap<&str, &str>,
    used: &mut BTreeMap<String, String>,
) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(interpolate(s, env, used)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| interpolate_all(v, env, used))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), interpolate_all(v, env, used)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// The file as `docker compose config` would see it with `env`.
fn project(env: &[(&str, &str)]) -> Result<Value, String> {
    let raw: Value = serde_saphyr::from_str(&compose_text()).map_err(|e| e.to_string())?;
    let env: BTreeMap<&str, &str> = env.iter().copied().collect();
    interpolate_all(&raw, &env, &mut BTreeMap::new())
}

fn services(project: &Value) -> &serde_json::Map<String, Value> {
    project["services"].as_object().expect("services")
}

/// A service's environment as a map (compose allows a mapping or a list of
/// `KEY=VALUE`).
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().expect("a string").to_string())
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Services that run the Herald image.
fn herald_services(project: &Value) -> Vec<(String, Value)> {
    services(project)
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("herald")))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

const TOKEN: (&str, &str) = ("HERALD_ADMIN_TOKEN", "a-token");

#[test]
fn every_variable_has_a_default_or_a_message_and_the_token_is_required() {
    let raw: Value = serde_saphyr::from_str(&compose_text()).unwrap();
    let mut used = BTreeMap::new();
    let env: BTreeMap<&str, &str> = [TOKEN].into_iter().collect();
    interpolate_all(&raw, &env, &mut used).unwrap();
    for (name, how) in &used {
        assert!(
            how == "default" || (how.starts_with("required: ") && how.len() > 20),
            "${{{name}}} has neither a default nor a message: {how}"
        );
    }
    let required: Vec<&String> = used
        .iter()
        .filter(|(_, how)| how.starts_with("required"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(required, ["HERALD_ADMIN_TOKEN"]);
    // Without it, the whole file refuses to load, naming it.
    let error = project(&[]).unwrap_err();
    assert!(error.contains("HERALD_ADMIN_TOKEN"), "{error}");
    let error = project(&[("HERALD_ADMIN_TOKEN", "")]).unwrap_err();
    assert!(error.contains("HERALD_ADMIN_TOKEN"), "{error}");
    // What compose refuses, this does too.
    assert!(interpolate("$(date)", &env, &mut BTreeMap::new()).is_err());
    assert!(interpolate("${A:+x}", &env, &mut BTreeMap::new()).is_err());
    assert_eq!(
        interpolate(
            "a$$b ${X:-d} ${HERALD_ADMIN_TOKEN:?m}",
            &env,
            &mut BTreeMap::new()
        )
        .unwrap(),
        "a$b d a-token"
    );
}

#[test]
fn the_file_is_what_docker_compose_config_accepts() {
    let project = project(&[TOKEN]).unwrap();
    let top = project.as_object().unwrap();
    for key in top.keys() {
        assert!(
            ["services", "volumes", "networks", "configs", "secrets", "name"]
                .contains(&key.as_str())
                || key.starts_with("x-"),
            "unknown top-level key {key}"
        );
    }
    let known = [
        "build",
        "image",
        "command",
        "entrypoint",
        "environment",
        "env_file",
        "ports",
        "expose",
        "volumes",
        "depends_on",
        "healthcheck",
        "restart",
        "stop_grace_period",
        "deploy",
        "container_name",
        "networks",
        "labels",
        "user",
        "working_dir",
        "pull_policy",
    ];
    let services = services(&project);
    let volumes = top.get("volumes").and_then(Value::as_object);
    for (name, service) in services {
        let service = service.as_object().unwrap();
        for key in service.keys() {
            assert!(known.contains(&key.as_str()), "{name}: unknown key {key}");
        }
        assert!(
            service.contains_key("image") || service.contains_key("build"),
            "{name}: neither image nor build"
        );
        if let Some(deps) = service.get("depends_on") {
            let deps: Vec<(String, Option<String>)> = match deps {
                Value::Array(list) => list
                    .iter()
                    .map(|d| (d.as_str().unwrap().to_string(), None))
                    .collect(),
                Value::Object(map) => map
                    .iter()
                    .map(|(d, c)| (d.clone(), c["condition"].as_str().map(str::to_string)))
                    .collect(),
                other => panic!("{name}: depends_on {other}"),
            };
            for (dep, condition) in deps {
                let target = services
                    .get(&dep)
                    .unwrap_or_else(|| panic!("{name} depends on {dep}, which does not exist"));
                assert_ne!(dep, *name, "{name} depends on itself");
                match condition.as_deref() {
                    None | Some("service_started") => {}
                    Some("service_healthy") => assert!(
                        target["healthcheck"]["test"].is_array()
                            && target["healthcheck"]["disable"] != true,
                        "{name} waits for {dep} to be healthy, which has no healthcheck"
                    ),
                    Some("service_completed_successfully") => assert_eq!(
                        target["restart"], "no",
                        "{name} waits for {dep} to complete, which restarts"
                    ),
                    Some(other) => panic!("{name}: unknown condition {other}"),
                }
            }
        }
        for mount in strings(service.get("volumes").unwrap_or(&Value::Null)) {
            let source = mount.split(':').next().unwrap();
            if !source.starts_with(['.', '/', '~']) {
                assert!(
                    volumes.is_some_and(|v| v.contains_key(source)),
                    "{name}: named volume {source} is not declared"
                );
            }
        }
        for port in strings(service.get("ports").unwrap_or(&Value::Null)) {
            let parts: Vec<&str> = port.split(':').collect();
            assert!((1..=3).contains(&parts.len()), "{name}: port {port}");
            for p in &parts[parts.len().saturating_sub(2)..] {
                p.parse::<u16>()
                    .unwrap_or_else(|_| panic!("{name}: port {port}"));
            }
        }
    }
}

#[test]
fn a_one_shot_migration_runs_before_every_role() {
    let project = project(&[TOKEN]).unwrap();
    let migrate = &services(&project)["migrate"];
    assert_eq!(strings(&migrate["command"]), ["migrate"]);
    assert_eq!(migrate["restart"], "no");
    for (name, service) in herald_services(&project) {
        if name == "migrate" {
            continue;
        }
        assert_eq!(
            service["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{name}"
        );
        assert_eq!(
            environment(&service)["HERALD_MIGRATE_ON_START"],
            "false",
            "{name} leaves migrations to the migrate service"
        );
    }
}

#[test]
fn relay_worker_and_scheduler_scale_and_only_the_admin_server_is_published() {
    let project = project(&[TOKEN]).unwrap();
    let services = services(&project);
    for role in ["relay", "worker", "scheduler"] {
        let s = &services[role];
        assert_eq!(strings(&s["command"])[0], role);
        assert!(s.get("container_name").is_none(), "{role}: container_name");
        assert!(s.get("ports").is_none(), "{role}: host ports");
    }
    let admin = &services["admin"];
    assert_eq!(strings(&admin["command"]), ["admin"]);
    let env = environment(admin);
    let bind: std::net::SocketAddr = env["HERALD_ADMIN_BIND"].parse().unwrap();
    assert!(
        bind.ip().is_unspecified(),
        "reachable through the published port"
    );
    assert_eq!(env["HERALD_ADMIN_TOKEN"], TOKEN.1);
    let ports = strings(&admin["ports"]);
    assert_eq!(ports.len(), 1);
    assert!(
        ports[0].ends_with(&format!(":{}", bind.port())),
        "{} publishes the port the server binds ({})",
        ports[0],
        bind.port()
    );
    // Binding off loopback needs a token: the server refuses without one.
    let mut config = herald::Config::default();
    config.admin.bind = env["HERALD_ADMIN_BIND"].clone();
    assert!(herald::admin::check_bind(&config).is_err());
    config.admin.token = Some(env["HERALD_ADMIN_TOKEN"].clone());
    herald::admin::check_bind(&config).unwrap();
    // Every process probed over HTTP serves its admin server on the port
    // its healthcheck asks.
    for (name, service) in herald_services(&project) {
        let test = strings(&service["healthcheck"]["test"]).join(" ");
        if service["healthcheck"]["disable"] == true {
            assert_eq!(name, "migrate");
            continue;
        }
        let command = strings(&service["command"]);
        assert!(
            command == ["admin"] || command.contains(&"--admin".to_string()),
            "{name}: a healthcheck on /readyz without an admin server"
        );
        let port = environment(&service)["HERALD_ADMIN_BIND"]
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        assert!(
            test.contains(&format!("/dev/tcp/127.0.0.1/{port}")) && test.contains("/readyz"),
            "{name}: {test}"
        );
    }
}

#[test]
fn the_passwords_in_the_urls_are_the_servers_passwords() {
    for env in [
        vec![TOKEN],
        vec![
            TOKEN,
            ("HERALD_DB_PASSWORD", "pg-secret"),
            ("HERALD_REDIS_PASSWORD", "redis-secret"),
        ],
    ] {
        let project = project(&env).unwrap();
        let services = services(&project);
        let pg = environment(&services["postgres"]);
        let redis_command = strings(&services["redis"]["command"]);
        let at = redis_command
            .iter()
            .position(|a| a == "--requirepass")
            .expect("Redis has a password");
        let redis_password = &redis_command[at + 1];
        assert_eq!(
            &environment(&services["redis"])["REDISCLI_AUTH"],
            redis_password,
            "the healthcheck authenticates"
        );
        for (name, service) in herald_services(&project) {
            let e = environment(&service);
            let db = url::Url::parse(&e["DATABASE_URL"]).unwrap();
            assert_eq!(db.username(), pg["POSTGRES_USER"], "{name}");
            assert_eq!(
                db.password(),
                Some(pg["POSTGRES_PASSWORD"].as_str()),
                "{name}"
            );
            assert_eq!(db.path(), format!("/{}", pg["POSTGRES_DB"]), "{name}");
            assert_eq!(db.host_str(), Some("postgres"), "{name}");
            let r = url::Url::parse(&e["REDIS_URL"]).unwrap();
            assert_eq!(r.password(), Some(redis_password.as_str()), "{name}");
            assert_eq!(r.host_str(), Some("redis"), "{name}");
            // And Herald accepts the URLs.
            let config = herald::Config {
                database_url: e["DATABASE_URL"].clone(),
                redis_url: e["REDIS_URL"].clone(),
                ..herald::Config::default()
            };
            config.check_settings().unwrap();
        }
        if env.len() > 1 {
            assert_eq!(pg["POSTGRES_PASSWORD"], "pg-secret");
            assert_eq!(redis_password, "redis-secret");
        }
    }
}

#[tokio::test]
async fn every_command_is_a_herald_subcommand_of_the_binary_the_dockerfile_builds() {
    let db = TestDb::new().await;
    let project = project(&[TOKEN]).unwrap();
    for (name, service) in herald_services(&project) {
        assert_eq!(service["build"]["context"], ".", "{name}");
        let command = strings(&service["command"]);
        let out = common::herald_output(&db.config, &[command[0].as_str(), "--help"]).await;
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: `herald {} --help` failed: {}",
            command[0],
            String::from_utf8_lossy(&out.stderr)
        );
        for flag in command[1..].iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(flag.as_str()),
                "{name}: herald {} has no {flag}",
                command[0]
            );
        }
    }
    // The Dockerfile builds bin `herald` of package herald-cli, the binary
    // these tests run (CARGO_BIN_EXE_herald), and makes it the entrypoint.
    let root = common::repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("cargo build --release --locked -p herald-cli"),
        "{dockerfile}"
    );
    assert!(dockerfile.contains("cp target/release/herald /usr/local/bin/herald"));
    assert!(dockerfile.contains("ENTRYPOINT [\"herald\"]"));
    let cli: toml::Value =
        toml::from_str(&std::fs::read_to_string(root.join("cli/Cargo.toml")).unwrap()).unwrap();
    assert_eq!(cli["package"]["name"].as_str(), Some("herald-cli"));
    let bins = cli["bin"].as_array().unwrap();
    assert_eq!(bins.len(), 1);
    assert_eq!(bins[0]["name"].as_str(), Some("herald"));
    assert!(env!("CARGO_BIN_EXE_herald").ends_with("/herald"));
}

#[test]
fn dev_services_and_make_use_the_file_as_it_is() {
    let root = common::repo_root();
    let project = project(&[TOKEN]).unwrap();
    let services = services(&project);
    // dev-services.sh starts postgres and redis by name, on the host ports
    // it asks for, and prints URLs with the file's default passwords.
    let script = std::fs::read_to_string(root.join("scripts/dev-services.sh")).unwrap();
    assert!(script.contains("want_docker+=(postgres)") && script.contains("want_docker+=(redis)"));
    for (service, var) in [
        ("postgres", "HERALD_DEV_PG_PORT"),
        ("redis", "HERALD_DEV_REDIS_PORT"),
    ] {
        assert!(services.contains_key(service));
        let raw = compose_text();
        assert!(
            raw.contains(&format!("127.0.0.1:${{{var}:-")),
            "{service} on {var}"
        );
    }
    let dir = common::temp_file("started", "docker-postgres\ndocker-redis\n");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/dev-services.sh"))
        .arg("env")
        .env("HERALD_DEV_DIR", dir.parent().unwrap())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("HERALD_DB_PASSWORD")
        .env_remove("HERALD_REDIS_PASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let pg = environment(&services["postgres"]);
    assert!(
        printed.contains(&format!(
            "postgres://herald:{}@127.0.0.1:5432/herald",
            pg["POSTGRES_PASSWORD"]
        )),
        "{printed}"
    );
    let redis_password = environment(&services["redis"])["REDISCLI_AUTH"].clone();
    assert!(
        printed.contains(&format!("redis://:{redis_password}@127.0.0.1:6379")),
        "{printed}"
    );
    // Compose refuses the file without the token, so the script gives it one
    // of its own when it only starts postgres and redis.
    assert!(script.contains("HERALD_ADMIN_TOKEN=\"${HERALD_ADMIN_TOKEN:-"));
    let makefile = std::fs::read_to_string(root.join("Makefile")).unwrap();
    assert!(makefile.contains("docker compose up --build"), "{makefile}");
}
