//! Library errors. Every variant says what was wrong and where, so the CLI can
//! print it as is; nothing here knows about process exit codes.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic { topic: String, reason: String },

    #[error("payload too large for topic {topic:?}: {size} bytes, the limit is {limit} bytes (max_payload_bytes)")]
    PayloadTooLarge {
        topic: String,
        size: usize,
        limit: usize,
    },

    #[error("invalid JSON in {what}: {error}")]
    Json {
        what: String,
        error: serde_json::Error,
    },

    #[error("invalid event: {0}")]
    InvalidEvent(String),

    #[error("payload of topic {topic:?} does not match its schema: {details}")]
    SchemaViolation { topic: String, details: String },

    #[error("invalid task: {0}")]
    InvalidTask(String),

    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("invalid URL in {setting}: {reason}")]
    Url {
        setting: &'static str,
        reason: String,
    },

    /// A TLS setting in `database_url` that the server does not satisfy
    /// (certificate, host name, or no TLS at all); see `db::tls`.
    #[error("{setting}: {reason}")]
    Tls {
        setting: &'static str,
        reason: String,
    },

    #[error("postgres: {context}: {}", describe_pg(.error))]
    Postgres {
        context: String,
        error: tokio_postgres::Error,
    },

    #[error("postgres pool: {0}")]
    Pool(deadpool_postgres::PoolError),

    #[error("redis: {context}: {error}")]
    Redis {
        context: String,
        error: redis::RedisError,
    },

    #[error("redis pool: {0}")]
    RedisPool(deadpool_redis::PoolError),

    #[error("migrations: {0}")]
    Migration(refinery::Error),

    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),

    /// A step of starting Herald's services (see `Herald::builder`).
    #[error("{context}: {error}")]
    Startup { context: String, error: Box<Error> },

    #[error("{0}")]
    Other(String),
}

// Messages above already include their cause, so these variants carry it
// without `#[source]` (a source would print twice in an error chain).
impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Pool(e)
    }
}

impl From<deadpool_redis::PoolError> for Error {
    fn from(e: deadpool_redis::PoolError) -> Self {
        Error::RedisPool(e)
    }
}

impl From<refinery::Error> for Error {
    fn from(e: refinery::Error) -> Self {
        Error::Migration(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// tokio-postgres prints only "db error" for server errors; show what the
/// server said, with its code, detail and hint.
pub fn describe_pg(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut out = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        out.push_str(pooler_hint(db.message()));
        return out;
    }
    chain(error)
}

/// An error and its sources, as one line ("a: b: c").
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    let hint = pooler_hint(&out);
    out.push_str(hint);
    out
}

/// What to do when a pooler refused the startup `options` Herald sends
/// (PgBouncer does unless told to ignore them: 1.18 takes no `options`,
/// later versions only settings they track, not client_min_messages).
fn pooler_hint(message: &str) -> &'static str {
    if message.contains("unsupported startup parameter: options") {
        "; hint: PgBouncer refuses the startup options Herald sends (-c TimeZone=UTC ...): \
         add `ignore_startup_parameters = options` to its [pgbouncer] section \
         (Herald sets the time zone again after connecting)"
    } else {
        ""
    }
}

/// Attach a short description of the operation to driver errors.
pub(crate) trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, tokio_postgres::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|error| Error::Postgres {
            context: what.into(),
            error,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, redis::RedisError> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|error| Error::Redis {
            context: what.into(),
            error,
        })
    }
}
