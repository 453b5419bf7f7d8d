-- Durable subscriptions keep flowing while Redis is down.
--
-- The relay inserts one task per (event, matching durable subscription).
-- Normally that happens in the claim's transaction, which commits only once
-- Redis took the events. While Redis is down those transactions roll back,
-- so the relay fans the waiting events out in transactions of their own and
-- marks them here; the claim that finally publishes them skips the marked
-- ones, so each event's tasks are created exactly once.
--
-- A constant default: adding the column rewrites nothing.
ALTER TABLE herald.outbox ADD COLUMN fanned_out boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN herald.outbox.fanned_out IS
    'The relay already inserted this event''s durable-subscription tasks (while Redis was down); publishing it must not insert them again.';
