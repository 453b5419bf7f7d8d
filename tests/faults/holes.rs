//! Fault tests: holes. See main.rs.
