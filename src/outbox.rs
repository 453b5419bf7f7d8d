//! The producer side of the transactional outbox: the `Event` builder, topic
//! and payload checks, and `publish` / `publish_batch`, which write into
//! `herald.outbox` through the caller's own client or transaction.
//!
//! The INSERT statements themselves are `crate::store::outbox`'s.
//!
//! This module only ever INSERTs: it must never commit, open its own
//! connection or talk to Redis, so an event exists exactly when the caller's
//! transaction commits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Default for `max_payload_bytes`: 1 MiB of JSON text.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest topic accepted.
pub const MAX_TOPIC_LEN: usize = 255;
/// Longest event key accepted, in bytes (also enforced by `herald.publish`).
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest event headers accepted, in bytes of their JSON text (also
/// enforced by `herald.publish`).
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;
/// Deepest nesting of arrays and objects accepted in a payload or headers.
/// Consumers decode with serde_json, which stops at 128 levels, and the
/// envelope adds one: deeper JSON would be stored and then fail as "not
/// JSON" at the relay or the worker. Also enforced in SQL.
pub const MAX_JSON_DEPTH: usize = 100;

/// How deeply arrays and objects nest in JSON text (0 for a scalar). One
/// pass over the bytes, brackets inside strings ignored.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `Err(reason)` when `json` nests deeper than [`MAX_JSON_DEPTH`].
pub(crate) fn check_depth(json: &str) -> std::result::Result<(), String> {
    let depth = json_depth(json);
    if depth > MAX_JSON_DEPTH {
        return Err(format!(
            "nested {depth} levels deep, the limit is {MAX_JSON_DEPTH} (consumers decode JSON at most 128 levels deep)"
        ));
    }
    Ok(())
}

/// Well-known header names carried from producer to consumer.
pub mod headers {
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const CAUSATION_ID: &str = "causation_id";
    pub use crate::telemetry::TRACEPARENT;
}

/// An event about to be written to the outbox.
///
/// ```no_run
/// # async fn demo(tx: &tokio_postgres::Transaction<'_>) -> herald::Result<()> {
/// let event = herald::Event::new("payment.captured", &serde_json::json!({"amount": 42}))?
///     .key("customer-17")
///     .correlation_id("req-9f2c");
/// herald::outbox::publish(tx, &event).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    id: Uuid,
    topic: String,
    key: Option<String>,
    payload: String,
    headers: Map<String, Value>,
}

impl Event {
    /// An event whose payload is `payload` serialized to JSON. The topic is
    /// checked here, so a bad one fails before any SQL runs.
    pub fn new<T: Serialize + ?Sized>(topic: impl Into<String>, payload: &T) -> Result<Event> {
        let topic = topic.into();
        validate_topic(&topic)?;
        let payload = serde_json::to_string(payload).map_err(|error| Error::Json {
            what: format!("payload of topic {topic:?}"),
            error,
        })?;
        check_depth(&payload)
            .map_err(|e| Error::InvalidEvent(format!("payload of topic {topic:?}: {e}")))?;
        Ok(Event {
            id: Uuid::now_v7(),
            topic,
            key: None,
            payload,
            headers: Map::new(),
        })
    }

    /// An event whose payload is JSON text, checked to be one JSON value.
    pub fn from_json_str(topic: impl Into<String>, json: &str) -> Result<Event> {
        let topic = topic.into();
        validate_topic(&topic)?;
        // Before parsing, so the limit is named rather than serde_json's
        // "recursion limit exceeded".
        check_depth(json)
            .map_err(|e| Error::InvalidEvent(format!("payload of topic {topic:?}: {e}")))?;
        let value: &serde_json::value::RawValue =
            serde_json::from_str(json).map_err(|error| Error::Json {
                what: format!("payload of topic {topic:?}"),
                error,
            })?;
        Ok(Event {
            id: Uuid::now_v7(),
            topic,
            key: None,
            payload: value.get().to_owned(),
            headers: Map::new(),
        })
    }

    /// Events with the same key reach Redis in the order they were inserted.
    pub fn key(mut self, key: impl Into<String>) -> Event {
        self.key = Some(key.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Event {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub fn correlation_id(self, id: impl Into<String>) -> Event {
        self.header(headers::CORRELATION_ID, id.into())
    }

    pub fn causation_id(self, id: impl Into<String>) -> Event {
        self.header(headers::CAUSATION_ID, id.into())
    }

    /// W3C trace context of the producer, so consumers can continue its trace.
    pub fn traceparent(self, traceparent: impl Into<String>) -> Event {
        self.header(headers::TRACEPARENT, traceparent.into())
    }

    /// The event id (UUID v7), known before the insert.
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn key_ref(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload's JSON text.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The envelope consumers receive, as the relay would build it, stamped
    /// now (fire-and-forget events never pass through Postgres).
    pub fn envelope_json(&self) -> String {
        let mut headers = self.headers.clone();
        if !headers.contains_key(headers::TRACEPARENT) {
            if let Some(tp) = crate::telemetry::current_traceparent() {
                headers.insert(headers::TRACEPARENT.into(), Value::String(tp));
            }
        }
        // `payload` is already checked JSON text; embed it as is.
        let raw = serde_json::value::RawValue::from_string(self.payload.clone());
        let payload = match raw {
            Ok(raw) => serde_json::to_value(&raw).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        serde_json::json!({
            "id": self.id,
            "topic": self.topic,
            "key": self.key,
            "payload": payload,
            "headers": headers,
            "created_at": chrono::Utc::now(),
        })
        .to_string()
    }

    pub fn headers(&self) -> &Map<String, Value> {
        &self.headers
    }

    /// The payload limit, and the key and headers limits `herald.publish`
    /// enforces too, before any round trip.
    pub(crate) fn check_size(&self, limit: usize) -> Result<()> {
        if self.payload.len() > limit {
            return Err(Error::PayloadTooLarge {
                topic: self.topic.clone(),
                size: self.payload.len(),
                limit,
            });
        }
        if let Some(key) = &self.key {
            if key.len() > MAX_KEY_BYTES {
                return Err(Error::InvalidEvent(format!(
                    "key too long for topic {:?}: {} bytes, the limit is {MAX_KEY_BYTES} bytes",
                    self.topic,
                    key.len()
                )));
            }
        }
        if !self.headers.is_empty() {
            let headers = serde_json::to_string(&self.headers).unwrap_or_default();
            if headers.len() > MAX_HEADERS_BYTES {
                return Err(Error::InvalidEvent(format!(
                    "headers too large for topic {:?}: {} bytes of JSON, the limit is {MAX_HEADERS_BYTES} bytes",
                    self.topic,
                    headers.len()
                )));
            }
            check_depth(&headers).map_err(|e| {
                Error::InvalidEvent(format!("headers of topic {:?}: {e}", self.topic))
            })?;
        }
        Ok(())
    }

    /// Headers as JSON text; `traceparent` (the producer's trace context)
    /// is added when the event has none.
    fn headers_json(&self, traceparent: Option<&str>) -> String {
        crate::telemetry::headers_json_with(&self.headers, traceparent)
    }
}

/// The message Herald publishes on Redis, and what a `Subscriber` decodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Value,
    #[serde(default)]
    pub headers: Map<String, Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl Envelope {
    /// Decode the payload into `T`, naming the topic and event on failure.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.payload).map_err(|error| Error::Json {
            what: format!("payload of event {} on topic {:?}", self.id, self.topic),
            error,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

/// Letters, digits, `.`, `_`, `-`, `:` only.
pub fn valid_topic_chars(topic: &str) -> bool {
    topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// The rule `herald.publish` enforces in SQL, checked before any round trip.
pub fn validate_topic(topic: &str) -> Result<()> {
    let reason = if topic.is_empty() {
        "topic is empty".to_string()
    } else if topic.len() > MAX_TOPIC_LEN {
        format!(
            "{} characters, at most {MAX_TOPIC_LEN} allowed",
            topic.len()
        )
    } else if !valid_topic_chars(topic) {
        let bad = topic
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
            .unwrap_or('?');
        format!("character {bad:?} is not allowed; use letters, digits, '.', '_', '-' or ':'")
    } else {
        return Ok(());
    };
    Err(Error::InvalidTopic {
        topic: topic.to_string(),
        reason,
    })
}

/// Writes events with a configured payload limit. The free functions
/// [`publish`] and [`publish_batch`] use the default limit.
#[derive(Debug, Clone, Copy)]
pub struct Outbox {
    max_payload_bytes: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl Outbox {
    pub fn new(max_payload_bytes: usize) -> Outbox {
        Outbox { max_payload_bytes }
    }

    pub fn from_config(config: &crate::Config) -> Outbox {
        Outbox::new(config.max_payload_bytes)
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Insert one event through `client`, which may be a transaction: the
    /// event is relayed only once that transaction commits.
    pub async fn publish<C: GenericClient + Sync>(
        &self,
        client: &C,
        event: &Event,
    ) -> Result<Uuid> {
        event.check_size(self.max_payload_bytes)?;
        let traceparent = crate::telemetry::current_traceparent();
        let headers = event.headers_json(traceparent.as_deref());
        crate::store::outbox::insert_one(
            client,
            &event.id,
            &event.topic,
            event.key.as_deref(),
            &event.payload,
            &headers,
        )
        .await?;
        tracing::debug!(
            event = crate::telemetry::names::event::EVENT_PUBLISHED,
            herald.topic = event.topic.as_str(),
            herald.event.id = %event.id,
            "event written to the outbox"
        );
        Ok(event.id)
    }

    /// Insert many events in one statement, in the order given (ids grow in
    /// that order, so events of one key keep it).
    pub async fn publish_batch<C: GenericClient + Sync>(
        &self,
        client: &C,
        events: &[Event],
    ) -> Result<Vec<Uuid>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        for event in events {
            event.check_size(self.max_payload_bytes)?;
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
        let keys: Vec<Option<&str>> = events.iter().map(|e| e.key.as_deref()).collect();
        let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
        let traceparent = crate::telemetry::current_traceparent();
        let headers: Vec<String> = events
            .iter()
            .map(|e| e.headers_json(traceparent.as_deref()))
            .collect();
        crate::store::outbox::insert_batch(client, &ids, &topics, &keys, &payloads, &headers)
            .await?;
        tracing::debug!(
            event = crate::telemetry::names::event::EVENT_PUBLISHED,
            herald.topic = events[0].topic.as_str(),
            herald.event.count = events.len() as i64,
            "events written to the outbox"
        );
        Ok(ids)
    }
}

/// [`Outbox::publish`] with the default payload limit.
pub async fn publish<C: GenericClient + Sync>(client: &C, event: &Event) -> Result<Uuid> {
    Outbox::default().publish(client, event).await
}

/// [`Outbox::publish_batch`] with the default payload limit.
pub async fn publish_batch<C: GenericClient + Sync>(
    client: &C,
    events: &[Event],
) -> Result<Vec<Uuid>> {
    Outbox::default().publish_batch(client, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(validate_topic("payment.captured").is_ok());
        assert!(validate_topic("a:b_c-d.9").is_ok());
        assert!(validate_topic("").is_err());
        assert!(validate_topic(&"x".repeat(256)).is_err());
        let err = validate_topic("bad topic").unwrap_err().to_string();
        assert!(err.contains("' '"), "{err}");
    }

    #[test]
    fn payload_limit_names_sizes() {
        let event = Event::new("t", &"x".repeat(100)).unwrap();
        let err = event.check_size(10).unwrap_err().to_string();
        assert!(
            err.contains("102 bytes") && err.contains("limit is 10"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_is_rejected() {
        let err = Event::from_json_str("t", "{nope").unwrap_err().to_string();
        assert!(err.contains("payload of topic \"t\""), "{err}");
        assert!(Event::from_json_str("t", " {\"a\": [1, 2]} ").is_ok());
    }
}
