//! Herald's integration tests, one binary: one module per area (the table
//! in docs/testing.md says what each covers), the shared harness in
//! `common`. Run one module with `cargo test --test suite tasks::`, one
//! test with `cargo test --test suite tasks::some_name -- --exact`.

mod common;

mod admin;
mod admin_guard;
mod budget;
mod cache;
mod compose;
mod coverage_admin;
mod coverage_cli;
mod coverage_events;
mod coverage_redis;
mod cron;
mod dashboard;
mod events;
mod failover;
mod failures;
mod faults;
mod maintenance;
mod operator;
mod outbox;
mod pgbouncer;
mod redis_cluster;
mod redis_sentinel;
mod tasks;
mod telemetry;
mod tls;
mod wakeup;
mod webhook;
