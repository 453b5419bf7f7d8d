//! Every statement that writes a table, one file per table, named for it:
//! a grep for a table's name in Rust finds its one owner here.

pub(crate) mod dead_letters;
pub(crate) mod outbox;
pub(crate) mod outbox_archive;
