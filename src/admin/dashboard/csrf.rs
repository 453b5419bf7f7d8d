//! Cross-site request forgery protection for the dashboard's POST actions.
//!
//! Every form carries a token: HMAC-SHA256 over the action's name with a key
//! drawn at random when the process starts. Another site can make a browser
//! POST to the dashboard, but it cannot read a dashboard page to learn the
//! token, so its forged request is refused. On top of that, a request whose
//! `Sec-Fetch-Site` or `Origin` header says it came from elsewhere is refused
//! before the token is even looked at.

use axum::http::{header, HeaderMap};
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The per-process key.
pub struct Csrf {
    key: [u8; 32],
}

impl Default for Csrf {
    fn default() -> Self {
        Csrf::new()
    }
}

impl Csrf {
    /// A fresh random key: tokens of an earlier process stop working.
    pub fn new() -> Csrf {
        Csrf {
            key: rand::random(),
        }
    }

    fn mac(&self, action: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"herald-admin-action:");
        mac.update(action.as_bytes());
        mac
    }

    /// The token a form for `action` carries.
    pub fn token(&self, action: &str) -> String {
        hex::encode(self.mac(action).finalize().into_bytes())
    }

    /// Whether `given` is the token for `action` (constant time).
    pub fn verify(&self, action: &str, given: &str) -> bool {
        match hex::decode(given) {
            Ok(bytes) => self.mac(action).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

/// Refuse a request that says it comes from another site: `Sec-Fetch-Site`
/// other than `same-origin` (or `none`, a request the user typed), or an
/// `Origin` whose host is neither the `Host` the request was sent to nor the
/// `X-Forwarded-Host` a reverse proxy set. Requests
/// without either header (curl, old browsers) are left to the token.
pub fn check_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if site != "same-origin" && site != "none" {
            return Err(format!(
                "cross-site request refused (Sec-Fetch-Site: {site})"
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        // Behind a reverse proxy that rewrites Host, the browser's host is
        // in X-Forwarded-Host (a header a cross-site form cannot set).
        let forwarded = headers
            .get("x-forwarded-host")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(',').next())
            .map(str::trim)
            .unwrap_or("");
        let matches = !origin_host.is_empty()
            && (origin_host == host || (!forwarded.is_empty() && origin_host == forwarded));
        if !matches {
            return Err(format!(
                "cross-origin request refused (Origin {origin:?}, Host {host:?})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_are_bound_to_the_key_and_the_action() {
        let a = Csrf::new();
        let b = Csrf::new();
        let t = a.token("replay");
        assert!(a.verify("replay", &t));
        assert!(!a.verify("purge", &t));
        assert!(!b.verify("replay", &t));
        assert!(!a.verify("replay", ""));
        assert!(!a.verify("replay", "not hex"));
    }

    #[test]
    fn origin_checks() {
        let mut h = HeaderMap::new();
        assert!(check_origin(&h).is_ok());
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9187"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9187"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(check_origin(&h).is_err());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(check_origin(&h).is_err());
        // Behind a proxy that rewrote Host.
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://herald.example.com"),
        );
        assert!(check_origin(&h).is_err());
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("herald.example.com"),
        );
        assert!(check_origin(&h).is_ok());
        h.remove("x-forwarded-host");
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(check_origin(&h).is_err());
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(check_origin(&h).is_ok());
    }
}
