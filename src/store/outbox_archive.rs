//! `herald.outbox_archive`: published events kept for
//! `relay.retain_published` (daily partitions).
//!
//! Rows are inserted only as CTE parts of the statements that remove
//! published events from the outbox, so that an event is archived exactly
//! when it leaves it: `store::outbox::claim` (CLAIM's `archived`) and
//! `store::outbox::remove_published` (SETTLE_PUBLISHED's `archived`).
//! Partitions are created and dropped by the SQL function
//! `herald.maintain_archive`, which the relay calls
//! (`relay::maintenance::maintain_archive`).
//!
//! Nothing may write this table outside those statements: an archived row
//! is a record of an event Redis acknowledged, never a way to deliver it.
