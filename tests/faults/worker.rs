//! Fault tests: worker. See main.rs.
