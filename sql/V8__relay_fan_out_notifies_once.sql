-- The relay's claim statement carries the durable-subscription fan-out, an
-- INSERT into herald.tasks, and a statement trigger fires for every INSERT
-- statement, even one that inserted no row. So every relay batch, and every
-- empty sweep, sent NOTIFY herald_tasks: it woke every idle worker for
-- nothing, and its commit queued for the notification lock behind task
-- producers (benchmark O4: relay commits waiting on that lock, event latency
-- p50 23 ms). The relay now sets herald.relay_fan_out for its transaction
-- (SET LOCAL, pipelined with the claim) and sends NOTIFY herald_tasks itself
-- when it inserted tasks (src/relay.rs, search relay_fan_out).

DROP TRIGGER tasks_notify ON herald.tasks;

CREATE TRIGGER tasks_notify
    AFTER INSERT ON herald.tasks
    FOR EACH STATEMENT
    WHEN (current_setting('herald.relay_fan_out', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION herald.tasks_notify();

COMMENT ON TRIGGER tasks_notify ON herald.tasks IS
    'NOTIFY herald_tasks after every INSERT statement, except in a relay claim transaction (herald.relay_fan_out = on), which notifies itself when it fanned tasks out.';
