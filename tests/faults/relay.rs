//! Fault tests: relay. See main.rs.
