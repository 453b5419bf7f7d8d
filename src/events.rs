//! The event catalog and delivery modes: declared event types (name,
//! description, version, JSON Schema of the payload, default delivery mode),
//! checked when an event is published from Rust and, for events written by
//! SQL, by the relay; and the `Publisher` that sends each event the way its
//! type says (`durable` through the outbox, `fire_and_forget` straight to
//! Redis).
//!
//! It owns schema compilation (once per type) and validation; it never
//! writes a row other than through `outbox`, and never retries a
//! fire-and-forget publish.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

pub use crate::config::{CatalogConfig, DeliveryMode, EventType};
use crate::error::{Error, Result};
use crate::outbox::{Event, Outbox};

impl std::fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeliveryMode::Durable => "durable",
            DeliveryMode::FireAndForget => "fire_and_forget",
        })
    }
}

struct Compiled {
    decl: EventType,
    validator: Option<jsonschema::Validator>,
}

/// The declared event types with their compiled schemas. Cheap to clone.
#[derive(Clone, Default)]
pub struct Catalog {
    types: Arc<BTreeMap<String, Compiled>>,
    strict: bool,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("types", &self.types.keys().collect::<Vec<_>>())
            .field("strict", &self.strict)
            .finish()
    }
}

/// Why a payload does not match its schema: each failing location (a JSON
/// pointer into the payload) with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl Catalog {
    /// Compile every declared type; a schema that does not compile, a
    /// missing schema file or a duplicate name is an error naming it.
    pub fn new(types: &[EventType], strict: bool) -> Result<Catalog> {
        let mut map = BTreeMap::new();
        for decl in types {
            crate::outbox::validate_topic(&decl.name)
                .map_err(|e| Error::Config(format!("[[events]] name: {e}")))?;
            let schema = match (&decl.schema, &decl.schema_file) {
                (Some(_), Some(_)) => {
                    return Err(Error::Config(format!(
                        "[[events]] {:?}: give `schema` or `schema_file`, not both",
                        decl.name
                    )))
                }
                (Some(s), None) => Some(s.clone()),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        Error::Config(format!(
                            "[[events]] {:?}: reading schema_file {}: {e}",
                            decl.name,
                            path.display()
                        ))
                    })?;
                    Some(serde_json::from_str(&text).map_err(|e| {
                        Error::Config(format!(
                            "[[events]] {:?}: schema_file {} is not JSON: {e}",
                            decl.name,
                            path.display()
                        ))
                    })?)
                }
                (None, None) => None,
            };
            let validator = match &schema {
                Some(s) => Some(jsonschema::validator_for(s).map_err(|e| {
                    Error::Config(format!(
                        "[[events]] {:?}: the schema does not compile: {e} (at {})",
                        decl.name,
                        e.instance_path()
                    ))
                })?),
                None => None,
            };
            let mut decl = decl.clone();
            if decl.schema.is_none() {
                decl.schema = schema;
            }
            let name = decl.name.clone();
            if map
                .insert(name.clone(), Compiled { decl, validator })
                .is_some()
            {
                return Err(Error::Config(format!(
                    "[[events]] {name:?} is declared twice"
                )));
            }
        }
        Ok(Catalog {
            types: Arc::new(map),
            strict,
        })
    }

    pub fn from_config(config: &crate::Config) -> Result<Catalog> {
        Catalog::new(&config.events, config.catalog.strict)
    }

    pub fn is_strict(&self) -> bool {
        self.strict
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The declared types, by name.
    pub fn types(&self) -> impl Iterator<Item = &EventType> {
        self.types.values().map(|c| &c.decl)
    }

    pub fn get(&self, topic: &str) -> Option<&EventType> {
        self.types.get(topic).map(|c| &c.decl)
    }

    /// Whether the relay has anything to check: a schema or strict mode.
    pub fn checks_anything(&self) -> bool {
        self.strict || self.types.values().any(|c| c.validator.is_some())
    }

    /// The delivery mode of `topic`: its declared one, else durable.
    pub fn delivery(&self, topic: &str) -> DeliveryMode {
        self.get(topic).map(|t| t.delivery).unwrap_or_default()
    }

    /// Check a payload: `Ok` when it matches the type's schema (or the type
    /// has none, or the topic is undeclared and the catalog not strict).
    pub fn check(&self, topic: &str, payload: &Value) -> std::result::Result<(), Vec<Violation>> {
        let Some(compiled) = self.types.get(topic) else {
            if self.strict {
                return Err(vec![Violation {
                    path: String::new(),
                    message: format!(
                        "topic {topic:?} is not declared in [[events]] and [catalog] strict is on"
                    ),
                }]);
            }
            return Ok(());
        };
        let Some(validator) = &compiled.validator else {
            return Ok(());
        };
        let violations: Vec<Violation> = validator
            .iter_errors(payload)
            .map(|e| Violation {
                path: e.instance_path().to_string(),
                message: e.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// [`Catalog::check`] as a library error naming the topic, each failing
    /// path and rule.
    pub fn validate(&self, topic: &str, payload: &Value) -> Result<()> {
        self.check(topic, payload)
            .map_err(|violations| Error::SchemaViolation {
                topic: topic.to_string(),
                details: describe(&violations),
            })
    }
}

/// "at /amount: -1 is less than the minimum of 0; at /currency: …".
pub fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| {
            let path = if v.path.is_empty() { "/" } else { &v.path };
            format!("at {path}: {}", v.message)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Publishes events the way the catalog says: validated against their
/// schema, then through the outbox (`durable`) or straight to Redis
/// (`fire_and_forget`).
#[derive(Clone)]
pub struct Publisher {
    catalog: Catalog,
    outbox: Outbox,
    redis: Option<crate::RedisPool>,
    channel_prefix: String,
    response_timeout: std::time::Duration,
}

impl Publisher {
    /// `redis` is needed only for fire-and-forget events.
    pub fn new(config: &crate::Config, redis: Option<deadpool_redis::Pool>) -> Result<Publisher> {
        Publisher::with_redis(config, redis.map(crate::RedisPool::from))
    }

    /// [`Publisher::new`] with a [`crate::RedisPool`] (single server,
    /// Sentinel or Cluster); fire-and-forget events go out with its
    /// `redis.pubsub` mode.
    pub fn with_redis(
        config: &crate::Config,
        redis: Option<crate::RedisPool>,
    ) -> Result<Publisher> {
        Ok(Publisher {
            catalog: Catalog::from_config(config)?,
            outbox: Outbox::from_config(config),
            redis,
            channel_prefix: config.channel_prefix.clone(),
            response_timeout: config.redis.response_timeout,
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Validate, then publish with the type's delivery mode. A durable event
    /// is written through `client` (commit to send it); a fire-and-forget
    /// one is sent to Redis at once and `client` is not used.
    pub async fn publish<C: GenericClient + Sync>(
        &self,
        client: &C,
        event: &Event,
    ) -> Result<Uuid> {
        self.publish_as(client, event, self.catalog.delivery(event.topic()))
            .await
    }

    /// [`Publisher::publish`] with an explicit delivery mode.
    pub async fn publish_as<C: GenericClient + Sync>(
        &self,
        client: &C,
        event: &Event,
        mode: DeliveryMode,
    ) -> Result<Uuid> {
        self.check(event)?;
        match mode {
            DeliveryMode::Durable => self.outbox.publish(client, event).await,
            DeliveryMode::FireAndForget => self.emit_checked(event).await,
        }
    }

    /// Send an event straight to Redis pub/sub (fire and forget), after
    /// checking it against the catalog. Nothing is stored: a subscriber that
    /// is not connected now never sees it, and durable subscriptions never do.
    pub async fn emit(&self, event: &Event) -> Result<Uuid> {
        self.check(event)?;
        self.emit_checked(event).await
    }

    /// The size limit and the catalog, before anything is sent or written.
    fn check(&self, event: &Event) -> Result<()> {
        event.check_size(self.outbox.max_payload_bytes())?;
        let payload: Value =
            serde_json::from_str(event.payload_json()).map_err(|error| Error::Json {
                what: format!("payload of topic {:?}", event.topic()),
                error,
            })?;
        self.catalog.validate(event.topic(), &payload)
    }

    async fn emit_checked(&self, event: &Event) -> Result<Uuid> {
        let Some(redis) = &self.redis else {
            return Err(Error::Other(format!(
                "topic {:?} is fire_and_forget, but this Publisher has no Redis pool",
                event.topic()
            )));
        };
        let envelope = event.envelope_json();
        let channel = format!("{}{}", self.channel_prefix, event.topic());
        crate::pubsub::publish_all(redis, &[(channel, envelope)], self.response_timeout).await?;
        Ok(event.id())
    }
}
