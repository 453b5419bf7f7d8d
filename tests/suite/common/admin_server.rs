//! The admin router served on 127.0.0.1:<free port> with its connection
//! info, as `herald run --admin` serves it, for the tests that talk HTTP to
//! it (`admin_guard`, `coverage_admin`, `dashboard`).

use std::sync::Arc;

use herald::admin::{AdminState, SharedState};
use tokio_util::sync::CancellationToken;

/// A served router: its state (for the CSRF tokens), port, and the token
/// that stops it (the caller cancels it, usually on drop).
pub struct Served {
    pub state: SharedState,
    pub port: u16,
    pub shutdown: CancellationToken,
}

/// Serve `state` on 127.0.0.1 at a free port until `shutdown` is cancelled.
pub async fn serve(state: AdminState) -> Served {
    let state = Arc::new(state);
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = herald::admin::app(state.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap()
    });
    Served {
        state,
        port,
        shutdown,
    }
}

/// An HTTP client that shows redirects instead of following them.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .unwrap()
}
