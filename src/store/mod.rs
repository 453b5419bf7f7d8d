//! Every statement that writes a Herald table, one file per table, each
//! with its SQL as consts beside the one function that runs it and its rows
//! read by column name into typed structs beside the SELECT that produces
//! them. A grep for a table's name in Rust finds its module here (and the
//! migrations). Two tables keep the module that always owned them:
//! `herald.nodes` is `crate::nodes`' and `herald.settings` is
//! `crate::migrate`'s.
//!
//! The producers' statements (publish, enqueue, cancel) run as unnamed
//! statements (`query_typed`, `execute_typed`): parsed, bound and run in
//! one round trip, so that they work through a pooler that hands out server
//! connections per transaction (PgBouncer's transaction pooling), where a
//! named statement prepared in one round trip may be run on another server
//! connection in the next.

pub(crate) mod dead_letters;
pub(crate) mod outbox;
pub(crate) mod outbox_archive;
pub(crate) mod processed_events;
pub(crate) mod schedules;
pub(crate) mod subscriptions;
pub(crate) mod tasks;
