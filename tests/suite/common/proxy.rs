//! A TCP proxy a fault test puts between Herald and Postgres or Redis, to
//! inject the faults a real network has: added latency on either direction,
//! a blackhole (bytes held, connections left open, as in a partition that
//! later heals), connections cut, and new connections refused.
//!
//! It must never reorder, drop or duplicate bytes of a connection it keeps:
//! what it injects is only time and disconnection, so every anomaly a test
//! sees is Herald's.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server (requests).
    Up,
    /// Server to client (replies).
    Down,
}

struct Faults {
    upstream: SocketAddr,
    delay_up_us: AtomicU64,
    delay_down_us: AtomicU64,
    /// true while a direction is blackholed; the pumps wait for false.
    hole_up: watch::Sender<bool>,
    hole_down: watch::Sender<bool>,
    refuse: AtomicBool,
    /// Cancelled to cut every connection open now; replaced after a cut.
    cut: std::sync::Mutex<CancellationToken>,
    accepted: AtomicUsize,
}

/// A running proxy; dropping it closes the listener and every connection.
pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = tokio::net::lookup_host(upstream)
            .await
            .expect("resolving the proxy's upstream")
            .next()
            .expect("an address for the proxy's upstream");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let faults = Arc::new(Faults {
            upstream,
            delay_up_us: AtomicU64::new(0),
            delay_down_us: AtomicU64::new(0),
            hole_up: watch::channel(false).0,
            hole_down: watch::channel(false).0,
            refuse: AtomicBool::new(false),
            cut: std::sync::Mutex::new(CancellationToken::new()),
            accepted: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, faults.clone(), stop.clone()));
        Proxy { addr, faults, stop }
    }

    /// Proxy for the Postgres server of `url`; returns it and `url`
    /// rewritten to go through it.
    pub async fn for_url(url: &str) -> (Proxy, String) {
        let mut parsed = url::Url::parse(url).expect("a URL to proxy");
        let host = parsed.host_str().expect("a host in the URL").to_string();
        let port = parsed
            .port_or_known_default()
            .unwrap_or(match parsed.scheme() {
                "redis" | "rediss" => 6379,
                _ => 5432,
            });
        let proxy = Proxy::start(&format!("{host}:{port}")).await;
        parsed
            .set_host(Some("127.0.0.1"))
            .expect("setting the host");
        parsed
            .set_port(Some(proxy.port()))
            .expect("setting the port");
        (proxy, parsed.to_string())
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.faults.accepted.load(Ordering::SeqCst)
    }

    /// Add `delay` to every chunk of `dir` (latency, not a throughput cap).
    pub fn delay(&self, dir: Dir, delay: Duration) {
        let us = delay.as_micros() as u64;
        match dir {
            Dir::Up => self.faults.delay_up_us.store(us, Ordering::SeqCst),
            Dir::Down => self.faults.delay_down_us.store(us, Ordering::SeqCst),
        }
    }

    /// Hold every byte of `dir` until [`Proxy::heal`]; connections stay
    /// open and new ones are accepted (their bytes are held too).
    pub fn blackhole(&self, dir: Dir) {
        match dir {
            Dir::Up => self.faults.hole_up.send_replace(true),
            Dir::Down => self.faults.hole_down.send_replace(true),
        };
    }

    /// Blackhole both directions: a network partition.
    pub fn partition(&self) {
        self.blackhole(Dir::Up);
        self.blackhole(Dir::Down);
    }

    /// End every blackhole and delay, and accept connections again.
    pub fn heal(&self) {
        self.faults.hole_up.send_replace(false);
        self.faults.hole_down.send_replace(false);
        self.faults.delay_up_us.store(0, Ordering::SeqCst);
        self.faults.delay_down_us.store(0, Ordering::SeqCst);
        self.faults.refuse.store(false, Ordering::SeqCst);
    }

    /// Close every connection open now (both sides see it closed).
    pub fn cut(&self) {
        let mut token = self.faults.cut.lock().expect("cut lock");
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Close new connections at once (as a refused connect would) until
    /// [`Proxy::heal`].
    pub fn refuse(&self) {
        self.faults.refuse.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn accept(listener: TcpListener, faults: Arc<Faults>, stop: CancellationToken) {
    loop {
        let (client, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        if faults.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        faults.accepted.fetch_add(1, Ordering::SeqCst);
        let faults = faults.clone();
        let cut = faults.cut.lock().expect("cut lock").clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(faults.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pump(cr, sw, faults.clone(), Dir::Up);
            let down = pump(sr, cw, faults.clone(), Dir::Down);
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
        });
    }
}

/// Copy one direction: a reader stamps each chunk with its arrival, a
/// writer sends it once its delay has passed and no blackhole holds it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
    dir: Dir,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut hole = match dir {
            Dir::Up => faults.hole_up.subscribe(),
            Dir::Down => faults.hole_down.subscribe(),
        };
        while let Some((at, chunk)) = rx.recv().await {
            let us = match dir {
                Dir::Up => faults.delay_up_us.load(Ordering::SeqCst),
                Dir::Down => faults.delay_down_us.load(Ordering::SeqCst),
            };
            tokio::time::sleep_until(at + Duration::from_micros(us)).await;
            if hole.wait_for(|held| !*held).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
