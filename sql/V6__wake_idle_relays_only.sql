-- NOTIFY only when a relay is asleep.
--
-- A transaction that sends NOTIFY takes one cluster-wide lock at commit and
-- holds it until its commit record is flushed, so notifying producers commit
-- one at a time (benchmark O1c measured 0.4 of the commits/s of the same
-- inserts without the trigger). A relay that is draining needs no wake-up:
-- it claims again before it sleeps. So the trigger notifies only while a
-- relay holds, or waits for, the session-level advisory lock
-- (1751478903, 1) ("herw", outbox) in exclusive mode, which a relay takes
-- when all its drain workers have found nothing to claim, and lets go of as
-- soon as it is woken.
--
-- A producer that does not notify holds the same lock in shared mode until
-- its transaction ends. A relay's exclusive request therefore waits for
-- every such producer to commit or roll back, and the relay claims once more
-- after it got the lock, before sleeping: an event is either claimed by that
-- sweep or its producer notified. A producer whose try comes after a relay
-- asked for the lock fails the try (a waiting exclusive request blocks new
-- shared ones) and notifies. With no relay running nothing is notified; a
-- relay sweeps the table when it starts.
--
-- The lock statements live in src/relay.rs (search WAKE_LOCK).

-- The condition is the trigger's WHEN clause, evaluated without entering
-- PL/pgSQL: on the busy path a producer pays for one shared lock and nothing
-- else (O1c: 0.93 of the commits/s without the trigger, against 0.90 with
-- the same test inside the function).
DROP TRIGGER outbox_notify ON herald.outbox;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON herald.outbox
    FOR EACH STATEMENT
    WHEN (NOT pg_try_advisory_xact_lock_shared(1751478903, 1))
    EXECUTE FUNCTION herald.outbox_notify();

COMMENT ON TRIGGER outbox_notify ON herald.outbox IS
    'NOTIFY herald_outbox only while a relay sleeps (holds advisory lock 1751478903/1 exclusively); otherwise hold that lock shared until commit, so the relay''s sweep before sleeping waits for this transaction.';
