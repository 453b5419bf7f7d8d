-- NOTIFY herald_tasks only when a worker needs waking.
--
-- 1. Only while a worker sleeps: the wake lock of V6, for tasks ("herw", 2).
--    An idle worker process takes it exclusively on a session of its own,
--    sweeps its queues once more and sleeps; it lets go at the first
--    notification. A producer that can take it shared holds it until its
--    transaction ends and does not notify: the worker's request waits for
--    it, and the sweep after the request sees its tasks. Benchmark O4
--    measured 8 task producers reaching 513 of 1,000 tasks/s, their commits
--    queued on the notification lock. Worker processes of different queues
--    do not leave the lock to each other: one holds it, the others wait for
--    it, and while one waits every producer notifies. The lock statements
--    are in src/wake.rs.
--
-- 2. Never for a relay claim. The relay's claim statement carries the
--    durable-subscription fan-out, an INSERT into herald.tasks, and a
--    statement trigger fires for every INSERT statement, even one that
--    inserted no row. So every relay batch, and every empty sweep, sent
--    NOTIFY herald_tasks: it woke every idle worker for nothing, and its
--    commit queued for the notification lock behind task producers
--    (benchmark O4: relay commits waiting on that lock, event latency p50
--    23 ms). The relay sets herald.relay_fan_out for its transaction (SET
--    LOCAL, pipelined with the claim) and sends NOTIFY herald_tasks itself
--    when it inserted tasks (src/relay.rs, search relay_fan_out).

DROP TRIGGER tasks_notify ON herald.tasks;

CREATE TRIGGER tasks_notify
    AFTER INSERT ON herald.tasks
    FOR EACH STATEMENT
    WHEN (current_setting('herald.relay_fan_out', true) IS DISTINCT FROM 'on'
          AND NOT pg_try_advisory_xact_lock_shared(1751478903, 2))
    EXECUTE FUNCTION herald.tasks_notify();

COMMENT ON TRIGGER tasks_notify ON herald.tasks IS
    'NOTIFY herald_tasks only while a worker sleeps (holds advisory lock 1751478903/2 exclusively), and never for a relay claim''s fan-out (herald.relay_fan_out = on; the relay notifies itself).';
