//! Fault tests: subscriber. See main.rs.
