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
//! Every session is checked before its first `Up`: it LISTENs on a channel
//! of its own and a NOTIFY on it is sent from another connection. When that
//! notification does not arrive, notifications do not reach this session,
//! the sign of a pooler that hands out server connections per transaction
//! or statement (PgBouncer's transaction pooling): with
//! `postgres.listen_check = "fail"` the first session fails the notifier
//! for good ([`Notifier::failed`], which stops the services), a later one
//! is dropped and reopened; with `"warn"` it is logged and used anyway.
//!
//! It must never take a decision: a notification is only a wake-up, and
//! every decision is read from the tables. It must never run anything but
//! LISTEN (and the check's UNLISTEN) on its session (Postgres delivers
//! notifications only to an idle session; a wake lock lives on a session of
//! its own, see `crate::wake`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, ListenCheck};
use crate::error::{Context, Error, Result};
use crate::telemetry::names::event;

/// The check's channels: this prefix and a fresh id per session, so that no
/// other session hears them.
const CHECK_CHANNEL_PREFIX: &str = "herald_listen_check_";

/// The notifier session's application name when one notifier serves
/// several services (`Herald::builder`); a service that runs alone names it
/// after itself (e.g. `relay::LISTEN_APPLICATION_NAME`).
pub const APPLICATION_NAME: &str = "herald-notifier";

/// The application name of the check's sessions other than the notifier's
/// own: [`check`]'s LISTEN session and every check's NOTIFY connection.
pub const CHECK_APPLICATION_NAME: &str = "herald-listen-check";

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
    /// Only check a session, then end ([`check`]).
    check_only: bool,
    /// The check's channel and payload awaited on the current session, and
    /// who waits for them.
    check: Mutex<Option<(String, tokio::sync::oneshot::Sender<()>)>>,
    /// Why the notifier gave up for good (set once).
    failed: tokio::sync::watch::Sender<Option<String>>,
}

/// How one session ended.
enum Ended {
    /// It was up, then lost (why).
    Lost(String),
    /// It could not be set up.
    Failed(Error),
    /// Notifications did not reach it (the check's message).
    Unheard(String),
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
                check_only: false,
                check: Mutex::new(None),
                failed: tokio::sync::watch::Sender::new(None),
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

    /// Resolves once the notifier has given up for good: its first session
    /// was not reached by notifications (`postgres.listen_check = "fail"`).
    /// Never resolves otherwise.
    pub async fn failed(&self) -> Error {
        let mut rx = self.inner.failed.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => unheard_error(reason),
            None => std::future::pending().await,
        }
    }

    /// A child of `shutdown` that is also cancelled when the notifier fails
    /// for good, and a task that ends with the notifier's error if that is
    /// why (once the child is cancelled): a service that listens stops on
    /// either and returns that error.
    pub(crate) fn stop_on_failure(
        &self,
        shutdown: &CancellationToken,
    ) -> (CancellationToken, tokio::task::JoinHandle<Option<Error>>) {
        let token = shutdown.child_token();
        let (this, stop) = (self.clone(), token.clone());
        let failure = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => None,
                error = this.failed() => {
                    stop.cancel();
                    Some(error)
                }
            }
        });
        (token, failure)
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
    /// Returns an error only when it gave up for good (see
    /// [`failed`](Self::failed)).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        // Whether a session passed the check: until then, failing it is fatal.
        let mut checked = false;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                outcome = self.session(&mut checked) => outcome,
            };
            self.inner.connected.store(false, Ordering::Relaxed);
            let reason = match outcome {
                Ended::Lost(reason) => {
                    // We had a working session: retry at once-ish.
                    backoff.reset();
                    tracing::warn!(event = event::POSTGRES_CONNECTION_LOST,
                        component = "notifier", %reason,
                        "LISTEN connection lost; reconnecting");
                    reason
                }
                Ended::Failed(error) => {
                    tracing::warn!(%error, "LISTEN connection failed");
                    error.to_string()
                }
                Ended::Unheard(reason) if !checked => {
                    self.inner.failed.send_replace(Some(reason.clone()));
                    self.down("notifications do not reach the LISTEN session");
                    return Err(unheard_error(reason));
                }
                Ended::Unheard(reason) => {
                    tracing::error!(event = event::POSTGRES_CONNECTION_LOST,
                        component = "notifier", %reason,
                        "notifications do not reach the new LISTEN session; reconnecting");
                    reason
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

    /// One session: set up, checked, then up until it ends.
    async fn session(&self, checked: &mut bool) -> Ended {
        match self.session_inner(checked).await {
            Ok(ended) => ended,
            Err(error) => Ended::Failed(error),
        }
    }

    async fn session_inner(&self, checked: &mut bool) -> Result<Ended> {
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
                        if n.channel().starts_with(CHECK_CHANNEL_PREFIX) {
                            this.heard(n.channel(), n.payload());
                        } else {
                            this.deliver(n.channel(), n.payload())
                        }
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
        let check = tokio::select! {
            checked = self.check(&client) => checked?,
            end = &mut closed_rx => {
                let reason = end.ok().flatten().unwrap_or_else(|| "closed by the server".into());
                return Err(Error::Other(format!("the LISTEN connection closed during its check: {reason}")));
            }
        };
        if let Err(reason) = check {
            if self.inner.config.postgres.listen_check == ListenCheck::Fail {
                return Ok(Ended::Unheard(reason));
            }
            tracing::warn!(%reason, "notifications do not reach the LISTEN session; going on \
                (postgres.listen_check = \"warn\"): wake-ups come at the poll intervals");
        }
        *checked = true;
        if self.inner.check_only {
            drop(client);
            let _ = driver.await;
            return Ok(Ended::Lost("checked".into()));
        }
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
                        return Ok(Ended::Lost(end.ok().flatten().unwrap_or_else(|| "closed by the server".into())));
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
        Ok(Ended::Lost(
            end.unwrap_or_else(|| "closed by the server".into()),
        ))
    }

    /// LISTEN on a channel of this session's own, NOTIFY it from another
    /// connection and wait up to `postgres.connect_timeout` for the
    /// notification. `Err(why)` when it does not come.
    async fn check(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<std::result::Result<(), String>> {
        let started = std::time::Instant::now();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let channel = format!("{CHECK_CHANNEL_PREFIX}{id}");
        let (heard_tx, heard_rx) = tokio::sync::oneshot::channel();
        *self.check_slot() = Some((channel.clone(), heard_tx));
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .context("LISTEN for the start-up check")?;
        let config = &self.inner.config;
        let other = crate::db::connect(config, CHECK_APPLICATION_NAME).await?;
        other
            .batch_execute(&format!("NOTIFY {channel}, '{id}'"))
            .await
            .context("NOTIFY for the start-up check")?;
        let wait = config.postgres.connect_timeout;
        let heard = tokio::time::timeout(wait, heard_rx).await.is_ok();
        self.check_slot().take();
        client
            .batch_execute(&format!("UNLISTEN {channel}"))
            .await
            .context("UNLISTEN after the start-up check")?;
        if !heard {
            return Ok(Err(format!(
                "a NOTIFY sent from another connection did not reach the LISTEN session \
                 within {wait:?} (postgres.connect_timeout)"
            )));
        }
        tracing::debug!(took = ?started.elapsed(), "notifications reach the LISTEN session");
        Ok(Ok(()))
    }

    fn check_slot(&self) -> MutexGuard<'_, Option<(String, tokio::sync::oneshot::Sender<()>)>> {
        // Only ever replaced or taken whole: a poisoned lock is still usable.
        self.inner.check.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A notification on a check channel: the awaited one ends the check.
    fn heard(&self, channel: &str, payload: &str) {
        let mut slot = self.check_slot();
        let awaited = slot
            .as_ref()
            .is_some_and(|(c, _)| c == channel && c.ends_with(payload));
        if awaited {
            if let Some((_, tx)) = slot.take() {
                let _ = tx.send(());
            }
        }
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

/// Check once, on a LISTEN session of its own, that notifications reach a
/// session opened with `config` (see the module's doc): what a service that
/// listens does before anything else, so that behind transaction pooling it
/// stops before running a statement. An error only when they do not
/// (unless `postgres.listen_check = "warn"`): a session that cannot be
/// opened is left to the statements that follow, which report why.
pub async fn check(config: &Config) -> Result<()> {
    let mut notifier = Notifier::new(config, CHECK_APPLICATION_NAME);
    if let Some(inner) = Arc::get_mut(&mut notifier.inner) {
        inner.check_only = true;
    }
    let mut checked = false;
    match notifier.session(&mut checked).await {
        Ended::Lost(_) => Ok(()),
        Ended::Failed(error) => {
            tracing::debug!(%error, "could not check the LISTEN session");
            Ok(())
        }
        Ended::Unheard(reason) => Err(unheard_error(reason)),
    }
}

/// The error of a notifier whose first session notifications did not reach.
fn unheard_error(reason: String) -> Error {
    Error::Startup {
        context: "checking that notifications reach the LISTEN session".into(),
        error: Box::new(Error::Config(format!(
            "database_url (DATABASE_URL): {reason}; notifications do not reach this session, \
             the sign of a pooler that hands out server connections per transaction or \
             statement (PgBouncer pool_mode = transaction or statement). Herald's services \
             need sessions of their own (LISTEN, the advisory locks of wake-ups and of the \
             maintenance leader, prepared statements): point their database_url at session \
             pooling or at Postgres directly \
             (producers may stay on transaction pooling), or set postgres.listen_check = \
             \"warn\" (HERALD_POSTGRES_LISTEN_CHECK=warn) to start anyway and wake only at \
             the poll intervals"
        ))),
    }
}
