//! What the admin server believes about a request before any route sees it:
//! which connection it came on ([`Connection`]), whether its `Host` is one
//! this server answers to when no token guards it, who the client is and
//! whether it came over HTTPS (from a trusted proxy's `X-Forwarded-*`
//! headers only), and how many wrong tokens that client has sent lately
//! ([`SignInLimit`]).
//!
//! It must never believe a forwarded header from a peer outside
//! `admin.trusted_proxies`, and never let a request with a foreign `Host`
//! through when `admin.token` is unset: that is how a DNS-rebinding page
//! would become same-origin with the dashboard.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::connect_info::Connected;
use axum::http::{header, HeaderMap};
use axum::serve::IncomingStream;

use crate::config::AdminConfig;

/// Both ends of the TCP connection a request came on (the router is
/// served with `into_make_service_with_connect_info::<Connection>()`).
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The address the server accepted it on: the port the `Host` must name.
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Connection {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Connection {
        Connection {
            peer: *stream.remote_addr(),
            local: stream.io().local_addr().ok(),
        }
    }
}

/// What the guard learnt about a request, for the handlers (the sign-in
/// form's cookie and limit).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// The peer, or the client a trusted proxy named in `X-Forwarded-For`.
    pub ip: Option<IpAddr>,
    /// A trusted proxy said `X-Forwarded-Proto: https`.
    pub https: bool,
}

/// The parsed `admin.trusted_proxies`.
#[derive(Debug, Default)]
pub struct Proxies(Vec<ipnet::IpNet>);

impl Proxies {
    pub fn new(config: &AdminConfig) -> Proxies {
        // Validated at start (`Config::check_settings`); an entry that slipped
        // through is simply not trusted.
        Proxies(config.trusted_networks().unwrap_or_default())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer`, and whether it spoke HTTPS to the proxy.
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Client {
        let Some(peer) = peer.map(|p| p.ip().to_canonical()) else {
            return Client {
                ip: None,
                https: false,
            };
        };
        if !self.trusts(peer) {
            return Client {
                ip: Some(peer),
                https: false,
            };
        }
        let https = first_value(headers, "x-forwarded-proto")
            .is_some_and(|p| p.eq_ignore_ascii_case("https"));
        // The rightmost address no trusted proxy added is the client; the
        // ones left of it could be written by the client itself.
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            .collect();
        let ip = forwarded
            .iter()
            .rev()
            .find(|a| !self.trusts(**a))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer);
        Client {
            ip: Some(ip),
            https,
        }
    }
}

fn first_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
}

/// Without a token, refuse a request whose `Host` is not `localhost`,
/// `127.0.0.1`, `[::1]` or the bound address, each with the bound port:
/// a DNS-rebinding page reaches a loopback server under its own name.
pub fn check_host(headers: &HeaderMap, local: SocketAddr) -> Result<(), String> {
    let raw = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let (name, port) = split_host(raw);
    let bound = match local.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let name = name.to_ascii_lowercase();
    let known = ["localhost", "127.0.0.1", "[::1]", bound.as_str()].contains(&name.as_str());
    if known && port == Some(local.port()) {
        return Ok(());
    }
    Err(format!(
        "Host {raw:?} is not this admin server's: without admin.token (HERALD_ADMIN_TOKEN) it \
         answers only to localhost:{p}, 127.0.0.1:{p}, [::1]:{p} or {bound}:{p}, so that a \
         DNS-rebinding page cannot reach it; open one of those, or set admin.token to serve \
         it under another name",
        p = local.port(),
    ))
}

/// `(host, port)` of a `Host` header; no port is 80 (the server speaks
/// plain HTTP).
fn split_host(raw: &str) -> (&str, Option<u16>) {
    let (name, port) = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => (&raw[..=end], raw[end + 1..].strip_prefix(':')),
            None => (raw, None),
        }
    } else {
        match raw.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (raw, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok(),
        None => Some(80),
    };
    (name, port)
}

/// Most client addresses the limit remembers; past it, the addresses with
/// no failure left in the window are forgotten, then (a flood of
/// addresses) all of them.
const MAX_CLIENTS: usize = 65_536;

/// Failed sign-ins per client address (IPv6 by its /64, which one host
/// usually owns whole): `admin.login_max_failures` within
/// `admin.login_window`, then 429 until the oldest failure leaves it.
#[derive(Debug)]
pub struct SignInLimit {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl SignInLimit {
    pub fn new(config: &AdminConfig) -> SignInLimit {
        SignInLimit {
            max: config.login_max_failures.max(1) as usize,
            window: config.login_window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: Option<IpAddr>) -> IpAddr {
        match ip {
            Some(IpAddr::V6(v6)) => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            Some(ip) => ip,
            // Served without connection info (a router in a test): one
            // bucket for everyone.
            None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// How long `ip` must wait before trying again, when it is over the limit.
    pub fn retry_after(&self, ip: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let seen = failures.get_mut(&Self::key(ip))?;
        while seen
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            seen.pop_front();
        }
        if seen.len() < self.max {
            return None;
        }
        let oldest = *seen.front()?;
        Some((oldest + self.window).saturating_duration_since(now))
    }

    /// Count a wrong token from `ip`.
    pub fn failed(&self, ip: Option<IpAddr>) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_CLIENTS {
            failures.retain(|_, seen| {
                seen.back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
            if failures.len() >= MAX_CLIENTS {
                failures.clear();
            }
        }
        let seen = failures.entry(Self::key(ip)).or_default();
        seen.push_back(now);
        while seen.len() > self.max {
            seen.pop_front();
        }
    }
}

/// The 429 answer: `Retry-After` in whole seconds, rounded up.
pub fn too_many(wait: Duration) -> axum::response::Response {
    use axum::response::IntoResponse;
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    (
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, secs.to_string())],
        format!(
            "too many wrong tokens from this address (admin.login_max_failures within \
             admin.login_window): try again in {secs} s"
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn host(h: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        headers
    }

    #[test]
    fn only_loopback_names_with_the_bound_port_pass() {
        let local: SocketAddr = "127.0.0.1:9187".parse().unwrap();
        for ok in [
            "127.0.0.1:9187",
            "localhost:9187",
            "LOCALHOST:9187",
            "[::1]:9187",
        ] {
            assert!(check_host(&host(ok), local).is_ok(), "{ok}");
        }
        for bad in [
            "rebind.example:9187",
            "127.0.0.1:9188",
            "127.0.0.1",
            "localhost.:9187",
            "127.0.0.1.nip.io:9187",
            "",
        ] {
            let e = check_host(&host(bad), local).unwrap_err();
            assert!(e.contains("admin.token"), "{e}");
        }
        let e = check_host(&HeaderMap::new(), local).unwrap_err();
        assert!(e.contains("Host \"\""), "{e}");
        let other: SocketAddr = "127.0.0.2:80".parse().unwrap();
        assert!(check_host(&host("127.0.0.2"), other).is_ok());
        assert!(check_host(&host("localhost:80"), other).is_ok());
        let v6: SocketAddr = "[::1]:9187".parse().unwrap();
        assert!(check_host(&host("[::1]:9187"), v6).is_ok());
        assert!(check_host(&host("[::2]:9187"), v6).is_err());
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let config = AdminConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "192.168.1.7".into()],
            ..AdminConfig::default()
        };
        let proxies = Proxies::new(&config);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.1.1"),
        );
        let stranger: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let c = proxies.client(Some(stranger), &headers);
        assert!(!c.https);
        assert_eq!(c.ip, Some(stranger.ip()));
        let proxy: SocketAddr = "10.2.3.4:5000".parse().unwrap();
        let c = proxies.client(Some(proxy), &headers);
        assert!(c.https);
        assert_eq!(c.ip, Some("203.0.113.9".parse().unwrap()));
        let mapped: SocketAddr = "[::ffff:192.168.1.7]:1".parse().unwrap();
        assert!(proxies.client(Some(mapped), &headers).https);
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        assert!(!proxies.client(Some(proxy), &headers).https);
    }

    #[test]
    fn the_limit_counts_failures_per_address_within_the_window() {
        let config = AdminConfig {
            login_max_failures: 2,
            login_window: Duration::from_secs(60),
            ..AdminConfig::default()
        };
        let limit = SignInLimit::new(&config);
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_neighbour: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(limit.retry_after(Some(a)).is_none());
        limit.failed(Some(a));
        assert!(limit.retry_after(Some(a)).is_none());
        limit.failed(Some(a));
        let wait = limit.retry_after(Some(a)).unwrap();
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60));
        limit.failed(Some(b));
        limit.failed(Some(b_neighbour));
        assert!(limit.retry_after(Some(b)).is_some(), "one /64, one bucket");
        assert!(limit
            .retry_after(Some("203.0.113.2".parse().unwrap()))
            .is_none());
    }
}
