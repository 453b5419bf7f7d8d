-- Bounded error history (issue 14): a task's `errors` array keeps its
-- newest 25 entries and every error text is cut to 8,192 characters. A
-- task retried without end (max_attempts in the thousands, a snooze loop
-- that fails) or a handler that returns a whole response body as its error
-- grew the row, and every later update of it, without limit.
--
-- herald.fail_task and herald.rescue_expired_leases are redefined with the
-- same signatures and behaviour, appending through herald.append_error.

CREATE FUNCTION herald.append_error(p_errors jsonb, p_entry jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN jsonb_array_length(p_errors) < 25 THEN p_errors || p_entry
        ELSE (SELECT coalesce(jsonb_agg(e ORDER BY i), '[]'::jsonb)
              FROM jsonb_array_elements(p_errors) WITH ORDINALITY AS x(e, i)
              WHERE i > jsonb_array_length(p_errors) - 24) || p_entry
    END
$$;

COMMENT ON FUNCTION herald.append_error(jsonb, jsonb) IS
    'p_errors with p_entry appended, keeping the newest 25 entries.';

CREATE OR REPLACE FUNCTION herald.fail_task(
    p_id       bigint,
    p_attempt  integer,
    p_worker   text,
    p_error    text,
    p_retry_at timestamptz,
    p_final    boolean DEFAULT false
) RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    t herald.tasks;
    entry jsonb;
    msg text := left(p_error, 8192);
BEGIN
    SELECT * INTO t FROM herald.tasks
    WHERE id = p_id AND state = 'running' AND attempts = p_attempt AND leased_by = p_worker
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    entry := jsonb_build_object('attempt', t.attempts, 'at', now(), 'worker', p_worker, 'error', msg);
    IF t.cancel_requested_at IS NOT NULL THEN
        UPDATE herald.tasks
        SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL, leased_by = NULL,
            last_error = msg, errors = herald.append_error(errors, entry)
        WHERE id = p_id;
        RETURN 'cancelled';
    END IF;
    IF p_final OR t.attempts >= t.max_attempts THEN
        DELETE FROM herald.tasks WHERE id = p_id;
        INSERT INTO herald.dead_letters
            (source, original_id, kind, queue, payload, headers, attempts, errors, last_error,
             created_at, priority, max_attempts, timeout)
        VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts,
                herald.append_error(t.errors, entry), msg, t.created_at, t.priority,
                t.max_attempts, t.timeout);
        RETURN 'dead';
    END IF;
    UPDATE herald.tasks
    SET state = 'ready', run_at = p_retry_at, lease_expires_at = NULL, leased_by = NULL,
        last_error = msg, errors = herald.append_error(errors, entry)
    WHERE id = p_id;
    -- Idle workers recompute when to wake.
    PERFORM pg_notify('herald_tasks', '');
    RETURN 'retry';
END
$$;

CREATE OR REPLACE FUNCTION herald.rescue_expired_leases(p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    t herald.tasks;
    n integer := 0;
    msg text;
    entry jsonb;
BEGIN
    FOR t IN
        SELECT * FROM herald.tasks
        WHERE state = 'running' AND lease_expires_at < now()
        ORDER BY lease_expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    LOOP
        msg := format('lease expired at %s (worker %s stopped renewing it)', t.lease_expires_at, t.leased_by);
        entry := jsonb_build_object('attempt', t.attempts, 'at', now(), 'worker', t.leased_by, 'error', msg);
        IF t.cancel_requested_at IS NOT NULL THEN
            UPDATE herald.tasks
            SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL, leased_by = NULL,
                last_error = msg, errors = herald.append_error(errors, entry)
            WHERE id = t.id;
        ELSIF t.attempts >= t.max_attempts THEN
            DELETE FROM herald.tasks WHERE id = t.id;
            INSERT INTO herald.dead_letters
                (source, original_id, kind, queue, payload, headers, attempts, errors, last_error,
                 created_at, priority, max_attempts, timeout)
            VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts,
                    herald.append_error(t.errors, entry), msg, t.created_at, t.priority,
                    t.max_attempts, t.timeout);
        ELSE
            UPDATE herald.tasks
            SET state = 'ready', run_at = now(), lease_expires_at = NULL, leased_by = NULL,
                last_error = msg, errors = herald.append_error(errors, entry)
            WHERE id = t.id;
        END IF;
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM pg_notify('herald_tasks', '');
    END IF;
    RETURN n;
END
$$;
