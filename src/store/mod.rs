//! Every SQL statement on Herald's tables, one module per table: a grep for
//! a table's name in Rust finds its module (and the migrations). Statements
//! are consts beside the one function that runs them, and rows are read by
//! column name into a typed struct beside their SELECT.

pub(crate) mod schedules;
