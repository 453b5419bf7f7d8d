//! The task kinds every [`Registry`] starts with: `herald.noop`,
//! `herald.sleep`, `herald.fail` (for trying a queue out) and
//! `herald.webhook` (a webhook subscription's delivery, in `webhook`).
//!
//! It owns [`Registry::new`]; it must never register a kind an application
//! could want for itself (every built-in kind starts with `herald.`).

use std::time::Duration;

use serde_json::Value;

use super::registry::{Registry, TaskContext};

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// A registry with the built-in kinds `herald.noop`, `herald.sleep`
    /// (`{"ms": N}`), `herald.fail` (`{"message": "..."}`) and
    /// `herald.webhook` (a webhook subscription's delivery).
    pub fn new() -> Registry {
        let mut r = Registry::empty();
        r.register("herald.noop", |_ctx, _payload: Value| async { Ok(()) });
        #[derive(serde::Deserialize)]
        struct Sleep {
            ms: u64,
        }
        r.register("herald.sleep", |ctx: TaskContext, p: Sleep| async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(p.ms)) => {}
                _ = ctx.cancellation().cancelled() => {}
            }
            Ok(())
        });
        #[derive(serde::Deserialize)]
        struct Fail {
            #[serde(default)]
            message: Option<String>,
        }
        r.register("herald.fail", |_ctx, p: Fail| async move {
            Err::<(), _>(anyhow::anyhow!(p
                .message
                .unwrap_or_else(|| "herald.fail always fails".into())))
        });
        super::webhook::register(&mut r);
        r
    }
}
