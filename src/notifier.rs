//! The notifier: the one dedicated session of a process that LISTENs on
//! every channel its services subscribed to (`herald_outbox` for the relay,
//! `herald_tasks` and `herald_cancel` for the workers, `herald_schedules`
//! for the scheduler), reopened with backoff whenever it is lost.
//!
//! Each subscriber gets, in order: [`Signal::Up`] once LISTEN on its
//! channels is in effect (it must then sweep: anything committed before is
//! found by the sweep, anything after sends a notification), every
//! notification on its channels, and [`Signal::Down`] when the session is
//! lost (notifications may then go unnoticed until the next `Up`).
//!
//! It must never take a decision: a notification is only a wake-up, and
//! every decision is read from the tables. It must never run anything but
//! LISTEN on its session (Postgres delivers notifications only to an idle
//! session; a wake lock lives on a session of its own, see `crate::wake`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Context, Result};
use crate::telemetry::names::event;

/// The notifier session's application name when one notifier serves
/// several services (`Herald::builder`); a service that runs alone names it
/// after itself (e.g. `relay::LISTEN_APPLICATION_NAME`).
pub const APPLICATION_NAME: &str = "herald-notifier";

/// What a subscriber hears, in order: `Up`, notifications, `Down`, `Up`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// LISTEN on the subscriber's channels is in effect: sweep now.
    Up,
    /// A notification on one of the subscriber's channels.
    Notification { channel: String, payload: String },
    /// The session was lost (why); notifications may go unnoticed until
    /// the next `Up`.
    Down(String),
}

/// One subscriber's end: the signals for its channels.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Signal>,
}

impl Subscription {
    /// The next signal; `None` once the notifier is gone.
    pub async fn recv(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }
}

struct Subscriber {
    channels: Vec<String>,
    tx: mpsc::UnboundedSender<Signal>,
    /// Whether it got `Up` on the current session.
    up: bool,
}

struct Inner {
    config: Config,
    application_name: String,
    subscribers: Mutex<Vec<Subscriber>>,
    /// A subscriber was added: LISTEN on its channels.
    added: Notify,
    connected: AtomicBool,
}

/// The process's LISTEN session; cheap to clone (every clone is the same
/// notifier). Subscribe with [`subscribe`](Self::subscribe), drive it with
/// [`run`](Self::run) (once).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

impl Notifier {
    /// A notifier whose session is named `application_name`; it connects
    /// when [`run`](Self::run).
    pub fn new(config: &Config, application_name: &str) -> Notifier {
        Notifier {
            inner: Arc::new(Inner {
                config: config.clone(),
                application_name: application_name.to_string(),
                subscribers: Mutex::new(Vec::new()),
                added: Notify::new(),
                connected: AtomicBool::new(false),
            }),
        }
    }

    /// Listen on `channels` (before or after `run` started); the
    /// subscription hears `Up` as soon as LISTEN on them is in effect.
    pub fn subscribe(&self, channels: &[&str]) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers().push(Subscriber {
            channels: channels.iter().map(|c| c.to_string()).collect(),
            tx,
            up: false,
        });
        self.inner.added.notify_one();
        Subscription { rx }
    }

    /// Whether the session is open and LISTENing (for `/readyz`).
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        // A panic while holding it leaves the list whole (pushes and flag
        // updates only), so a poisoned lock is still usable.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Keep the session open until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                outcome = self.session() => outcome,
            };
            self.inner.connected.store(false, Ordering::Relaxed);
            let reason = match outcome {
                Ok(reason) => {
                    // We had a working session: retry at once-ish.
                    backoff.reset();
                    tracing::warn!(event = event::POSTGRES_CONNECTION_LOST,
                        component = "notifier", %reason,
                        "LISTEN connection lost; reconnecting");
                    reason
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed");
                    error.to_string()
                }
            };
            self.down(&reason);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
        self.inner.connected.store(false, Ordering::Relaxed);
        self.down("shutting down");
        Ok(())
    }

    /// Tell every subscriber that was up that the session is gone.
    fn down(&self, reason: &str) {
        self.subscribers().retain_mut(|s| {
            let was_up = std::mem::replace(&mut s.up, false);
            !was_up || s.tx.send(Signal::Down(reason.to_string())).is_ok()
        });
    }

    /// One session. `Err` when it could not be set up; `Ok(reason)` when it
    /// was up and then ended.
    async fn session(&self) -> Result<String> {
        let (client, mut connection) = crate::db::connect_session(
            &self.inner.config,
            &self.inner.application_name,
            "opening the LISTEN connection",
        )
        .await?;
        let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<Option<String>>();
        let this = self.clone();
        // Driven here rather than spawned as a plain future so that
        // notifications come out of poll_message.
        let driver = tokio::spawn(async move {
            let end = loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        this.deliver(n.channel(), n.payload())
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::debug!(notice = %notice.message(), "postgres notice")
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break Some(crate::error::describe_pg(&e)),
                    None => break None,
                }
            };
            let _ = closed_tx.send(end);
        });
        let mut listening: Vec<String> = Vec::new();
        let mut first = true;
        let end = loop {
            // LISTEN on the channels of every subscriber not yet up, then
            // tell them; a notification before their `Up` is not delivered
            // (the sweep that follows `Up` finds its rows).
            let pending: Vec<String> = self
                .subscribers()
                .iter()
                .filter(|s| !s.up)
                .flat_map(|s| s.channels.iter().cloned())
                .filter(|c| !listening.contains(c))
                .collect();
            for channel in pending {
                if listening.contains(&channel) {
                    continue;
                }
                let sql = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
                let listen = client.batch_execute(&sql);
                tokio::select! {
                    done = listen => done.context(format!("LISTEN {channel}"))?,
                    end = &mut closed_rx => {
                        return Ok(end.ok().flatten().unwrap_or_else(|| "closed by the server".into()));
                    }
                }
                listening.push(channel);
            }
            if first {
                first = false;
                self.inner.connected.store(true, Ordering::Relaxed);
                tracing::debug!(channels = ?listening, "notifier listening");
            }
            self.subscribers().retain_mut(|s| {
                if s.up || !s.channels.iter().all(|c| listening.contains(c)) {
                    return !s.tx.is_closed();
                }
                s.up = true;
                s.tx.send(Signal::Up).is_ok()
            });
            tokio::select! {
                end = &mut closed_rx => break end.ok().flatten(),
                _ = self.inner.added.notified() => {}
            }
        };
        drop(client);
        let _ = driver.await;
        Ok(end.unwrap_or_else(|| "closed by the server".into()))
    }

    /// Hand a notification to every subscriber of its channel that is up.
    fn deliver(&self, channel: &str, payload: &str) {
        self.subscribers().retain(|s| {
            if !s.up || !s.channels.iter().any(|c| c == channel) {
                return true;
            }
            s.tx.send(Signal::Notification {
                channel: channel.to_string(),
                payload: payload.to_string(),
            })
            .is_ok()
        });
    }
}
