//! Cron schedules without pg_cron: `herald.schedules` rows that enqueue a
//! task on every tick of a cron expression in an IANA time zone.
//!
//! - `expr`: expressions, time zones and ticks ([`CronSchedule`]), with the
//!   daylight-saving rules written in `docs/scheduling.md`.
//! - `schedule`: the [`Schedule`] model, the [`Misfire`] policies,
//!   validation, and the Rust API ([`upsert`], [`pause`], [`sync_config`], …).
//! - `misfire`: which due ticks fire on catch-up ([`plan`]).
//! - `scheduler`: the [`Scheduler`] service, tick → enqueue.
//! - `listener`: its subscription to the notifier, which only signals
//!   "look again".
//!
//! The statements on `herald.schedules` are in `store::schedules`; the
//! `herald schedules …` commands are in the CLI.
//!
//! It must never fire a tick twice: a tick's task is inserted, with the unique
//! key `cron:<name>:<tick RFC 3339>`, in the same transaction that holds the
//! schedule's row lock (`FOR UPDATE SKIP LOCKED`) and advances its
//! `next_run_at`. It must never decide that a tick is due by the local clock:
//! the database's `now()` decides, so skewed nodes cannot double-fire. It
//! must never let one unusable row (an expression croner rejects, a zone
//! chrono-tz does not know) stop the others: such a row gets `last_error` and
//! is skipped until its definition changes. NOTIFY `herald_schedules` is only
//! a wake-up; every decision is read from the table.

mod expr;
mod listener;
mod misfire;
mod schedule;
mod scheduler;

pub use crate::store::schedules::ScheduleRow;
pub use expr::{parse_cron, parse_tz, CronSchedule};
pub use misfire::{plan, Fire, MisfireRules, Plan};
pub use schedule::{
    check_schedules_table, list, pause, remove, resume, sync_config, trigger, upsert,
    validate_schedule_name, Misfire, Schedule, Source, SyncReport,
};
pub use scheduler::{unique_key, Scheduler};

use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::error::Error;

/// The NOTIFY channel of `herald.schedules` (statement trigger).
pub const CHANNEL: &str = "herald_schedules";
/// `application_name` of the LISTEN connection (the notifier's session) of
/// a scheduler that runs alone or alone in its process; see
/// `crate::notifier::APPLICATION_NAME`.
pub const LISTEN_APPLICATION_NAME: &str = "herald-scheduler-listen";

/// Counters of a [`Scheduler`] and its listener that a caller (a test, the
/// bench, `/readyz`) can read while it runs.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Times the scheduler looked at the table (claim and next-tick query).
    pub cycles: AtomicU64,
    pub fired: AtomicU64,
    pub claims: AtomicU64,
    pub invalid: AtomicU64,
    pub listen_connects: AtomicU64,
    /// Whether the LISTEN connection is up now (`/readyz`).
    pub listening: AtomicBool,
}

/// The message of an error without its variant's prefix.
fn inner(e: Error) -> String {
    match e {
        Error::InvalidSchedule(m) | Error::InvalidTask(m) => m,
        other => other.to_string(),
    }
}
