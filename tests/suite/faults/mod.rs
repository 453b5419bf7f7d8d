//! Faults at the edges, injected by the test itself: a TCP proxy between
//! Herald and its servers (tests/common/proxy.rs), Redis ACL users, private
//! servers it stops and restarts. Each test measures what the guarantee
//! promises (events lost, duplicated or reordered; overlapping runs of a
//! task), never only that nothing crashed. docs/faults.md lists them.

mod holes;
mod proxy;
mod relay;
mod subscriber;
mod worker;
