//! The built-in `herald.webhook` task kind: POSTs a durable subscription's
//! event envelope to the subscription's URL, signed with HMAC-SHA256.
//!
//! It owns the request, its signature and the reading of the response (2xx
//! done; 4xx other than 408 and 429 permanent; anything else retried by the
//! task's policy; of an error response only the first
//! `MAX_ERROR_BODY_BYTES` are read). It never stores the secret anywhere but
//! `herald.subscriptions`, never writes the URL's path, query or credentials
//! (often a secret themselves) into an error, a log or `last_error`, and
//! never follows redirects (a 3xx is a failure).
//!
//! Signature: `Herald-Signature: v1=<hex(HMAC-SHA256(secret, "<Herald-Timestamp>.<body>"))>`.

use std::sync::OnceLock;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde_json::Value;

use super::registry::{permanent, Registry, TaskContext};

/// Task kind of the built-in webhook delivery.
pub const WEBHOOK_KIND: &str = "herald.webhook";
/// Task header naming the subscription a fanned-out task is for.
pub const HEADER_SUBSCRIPTION: &str = "herald_subscription";

/// Request headers Herald sets on every webhook call.
pub mod headers {
    pub const TIMESTAMP: &str = "Herald-Timestamp";
    pub const SIGNATURE: &str = "Herald-Signature";
    pub const EVENT_ID: &str = "Herald-Event-Id";
    pub const TOPIC: &str = "Herald-Topic";
    pub const SUBSCRIPTION: &str = "Herald-Subscription";
    pub const ATTEMPT: &str = "Herald-Attempt";
}

/// Longest a call may take when the subscription sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of an error response's body read (its start goes into the
/// error); the rest is never read, so a huge or endless body costs nothing.
pub const MAX_ERROR_BODY_BYTES: usize = 1024;

/// A webhook URL as errors and logs show it: scheme, host and port only.
/// Paths and queries of webhook URLs often are the secret (`/hooks/T0K3N`,
/// `?token=…`), so they are replaced by `…`.
pub fn display_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("");
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            let rest = if url.path() != "/" || url.query().is_some() {
                "/…"
            } else {
                ""
            };
            format!("{}://{host}{port}{rest}", url.scheme())
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

/// The start of a response body, at most `MAX_ERROR_BODY_BYTES` read.
async fn body_start(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(MAX_ERROR_BODY_BYTES);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `v1=<hex>`: the signature of `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// The MAC over `"<timestamp>.<body>"`, keyed with the secret.
fn mac(secret: &str, timestamp: i64, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Check a received signature in constant time; what a receiver does.
pub fn verify(secret: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&expected).is_ok()
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

async fn deliver(ctx: TaskContext, envelope: Value) -> anyhow::Result<()> {
    let Some(name) = ctx.header(HEADER_SUBSCRIPTION).map(str::to_string) else {
        return Err(permanent(format!(
            "task {} has no {HEADER_SUBSCRIPTION} header; herald.webhook tasks are created by the relay for a subscription",
            ctx.id
        )));
    };
    let row = {
        let client = ctx.pool().get().await?;
        client
            .query_opt(
                "SELECT webhook_url, webhook_secret, extract(epoch FROM timeout)::float8
                 FROM herald.subscriptions WHERE name = $1",
                &[&name],
            )
            .await?
    };
    let Some(row) = row else {
        return Err(permanent(format!(
            "subscription {name:?} no longer exists; its event {} was not sent",
            envelope["id"]
        )));
    };
    let url: Option<String> = row.get(0);
    let secret: Option<String> = row.get(1);
    let timeout = row
        .get::<_, Option<f64>>(2)
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT);
    let (Some(url), Some(secret)) = (url, secret) else {
        return Err(permanent(format!(
            "subscription {name:?} has no webhook URL or secret"
        )));
    };
    let body = serde_json::to_vec(&envelope)?;
    let timestamp = chrono::Utc::now().timestamp();
    let request = client()
        .post(&url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(headers::TIMESTAMP, timestamp.to_string())
        .header(headers::SIGNATURE, sign(&secret, timestamp, &body))
        .header(headers::EVENT_ID, envelope["id"].as_str().unwrap_or(""))
        .header(headers::TOPIC, envelope["topic"].as_str().unwrap_or(""))
        .header(headers::SUBSCRIPTION, &name)
        .header(headers::ATTEMPT, ctx.attempt.to_string())
        .body(body);
    let shown = format!("webhook of subscription {name:?} ({})", display_url(&url));
    let response = tokio::select! {
        r = request.send() => r,
        _ = ctx.cancellation().cancelled() => anyhow::bail!("cancelled while calling the {shown}"),
    };
    let response = match response {
        Ok(r) => r,
        Err(e) if e.is_timeout() => anyhow::bail!("POST {shown}: no response within {timeout:?}"),
        // reqwest's message names the full URL; leave it out.
        Err(e) => anyhow::bail!("POST {shown}: {}", e.without_url()),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = tokio::select! {
        t = body_start(response) => t,
        _ = ctx.cancellation().cancelled() => String::new(),
    };
    let snippet: String = text.chars().take(200).collect();
    let message = format!("POST {shown}: HTTP {status}: {snippet}");
    if status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        // The receiver refuses this request; sending it again will not help.
        return Err(permanent(message));
    }
    anyhow::bail!(message)
}

/// Add the `herald.webhook` kind to `registry`.
pub(crate) fn register(registry: &mut Registry) {
    registry.register(WEBHOOK_KIND, deliver);
}
