-- Herald task queue: tasks claimed with FOR UPDATE SKIP LOCKED under a lease,
-- retried with backoff, moved to herald.dead_letters when attempts are spent.
-- Every state change is a function or a statement an operator can read here
-- or in src/queue.rs, src/worker.rs and src/dlq.rs.

-- A task row lives from enqueue to completion. Rows are updated several
-- times (claim, heartbeat, retry): leave room for HOT updates and let
-- autovacuum keep up with the churn.
CREATE TABLE herald.tasks (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue               text NOT NULL DEFAULT 'default'
                        CONSTRAINT tasks_queue_valid CHECK (queue ~ '^[A-Za-z0-9._:-]{1,128}$'),
    kind                text NOT NULL
                        CONSTRAINT tasks_kind_valid CHECK (kind ~ '^[A-Za-z0-9._:-]{1,255}$'),
    payload             jsonb NOT NULL DEFAULT '{}'::jsonb,
    headers             jsonb NOT NULL DEFAULT '{}'::jsonb,
    state               text NOT NULL DEFAULT 'ready'
                        CONSTRAINT tasks_state_valid
                        CHECK (state IN ('ready', 'running', 'succeeded', 'cancelled')),
    priority            integer NOT NULL DEFAULT 0,
    run_at              timestamptz NOT NULL DEFAULT now(),
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 25
                        CONSTRAINT tasks_max_attempts_valid CHECK (max_attempts >= 1),
    lease_expires_at    timestamptz,
    leased_by           text,
    unique_key          text,
    timeout             interval,
    last_error          text,
    errors              jsonb NOT NULL DEFAULT '[]'::jsonb,
    progress            jsonb,
    cancel_requested_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz
) WITH (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- Claim order on ready tasks only: higher priority first, then due time, then
-- insertion order. Finished and running rows never enter this index.
CREATE INDEX tasks_claim ON herald.tasks (queue, priority DESC, run_at, id)
    WHERE state = 'ready';
-- The rescuer's scan for expired leases.
CREATE INDEX tasks_running_lease ON herald.tasks (lease_expires_at)
    WHERE state = 'running';
-- At most one unfinished task per unique key.
CREATE UNIQUE INDEX tasks_unique_key ON herald.tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('ready', 'running');
-- Removal of retained finished tasks.
CREATE INDEX tasks_finished ON herald.tasks (finished_at)
    WHERE state IN ('succeeded', 'cancelled');

COMMENT ON TABLE herald.tasks IS
    'Task queue: ready → running (leased) → deleted, or succeeded/cancelled when retained; dead letters move to herald.dead_letters.';

-- Dead letters of tasks keep what a replay needs.
ALTER TABLE herald.dead_letters
    ADD COLUMN priority integer,
    ADD COLUMN max_attempts integer,
    ADD COLUMN timeout interval;
CREATE INDEX dead_letters_queue_kind ON herald.dead_letters (queue, kind) WHERE source = 'task';

-- Wake idle workers. Constant payload: at most one notification per
-- transaction, however many tasks it enqueued.
CREATE FUNCTION herald.tasks_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('herald_tasks', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify
    AFTER INSERT ON herald.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION herald.tasks_notify();

-- Checks shared by herald.enqueue and the Rust API (which checks first).
CREATE FUNCTION herald.check_task(p_kind text, p_queue text, p_payload jsonb, p_max_attempts integer)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    max_bytes integer;
    size integer;
BEGIN
    IF p_kind IS NULL OR p_kind = '' THEN
        RAISE EXCEPTION 'herald: invalid task kind: kind is empty' USING ERRCODE = '22023';
    END IF;
    IF p_kind !~ '^[A-Za-z0-9._:-]{1,255}$' THEN
        RAISE EXCEPTION 'herald: invalid task kind "%": 1 to 255 letters, digits, ".", "_", "-" or ":"', p_kind
            USING ERRCODE = '22023';
    END IF;
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'herald: invalid queue "%": 1 to 128 letters, digits, ".", "_", "-" or ":"', p_queue
            USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
        RAISE EXCEPTION 'herald: invalid max_attempts % for task kind "%": it must be at least 1', p_max_attempts, p_kind
            USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'herald: invalid payload for task kind "%": payload is NULL (use ''null''::jsonb for a JSON null)', p_kind
            USING ERRCODE = '22023';
    END IF;
    SELECT max_payload_bytes INTO max_bytes FROM herald.settings;
    size := octet_length(p_payload::text);
    IF size > coalesce(max_bytes, 1048576) THEN
        RAISE EXCEPTION 'herald: payload too large for task kind "%": % bytes, the limit is % bytes', p_kind, size, coalesce(max_bytes, 1048576)
            USING ERRCODE = '54000';
    END IF;
END
$$;

-- Enqueue one task in the caller's transaction. A unique_key held by an
-- unfinished task returns that task's id instead of inserting.
CREATE FUNCTION herald.enqueue(
    kind         text,
    payload      jsonb,
    queue        text DEFAULT 'default',
    priority     integer DEFAULT 0,
    run_at       timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 25,
    unique_key   text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    PERFORM herald.check_task(enqueue.kind, enqueue.queue, enqueue.payload, enqueue.max_attempts);
    LOOP
        INSERT INTO herald.tasks AS t (queue, kind, payload, priority, run_at, max_attempts, unique_key)
        VALUES (enqueue.queue, enqueue.kind, enqueue.payload, coalesce(enqueue.priority, 0),
                coalesce(enqueue.run_at, now()), enqueue.max_attempts, enqueue.unique_key)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('ready', 'running')
        DO NOTHING
        RETURNING t.id INTO v_id;
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
        SELECT t.id INTO v_id FROM herald.tasks t
        WHERE t.unique_key = enqueue.unique_key AND t.state IN ('ready', 'running');
        IF v_id IS NOT NULL THEN
            RETURN v_id;
        END IF;
        -- The holder finished between the two statements: try again.
    END LOOP;
END
$$;

COMMENT ON FUNCTION herald.enqueue(text, jsonb, text, integer, timestamptz, integer, text) IS
    'Enqueue a task in the current transaction; workers see it after COMMIT.';

-- A failed attempt of a running task, reported by the worker that holds its
-- lease (p_worker, p_attempt). Retries at p_retry_at, or moves the task to
-- the dead letters when its attempts are spent or the error is final
-- (p_final), in this one statement's transaction. Returns 'retry', 'dead',
-- 'cancelled' (its cancellation was requested), or 'lost' when the lease
-- was no longer the caller's (the rescuer or another worker has the task).
CREATE FUNCTION herald.fail_task(
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
BEGIN
    SELECT * INTO t FROM herald.tasks
    WHERE id = p_id AND state = 'running' AND attempts = p_attempt AND leased_by = p_worker
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    entry := jsonb_build_object('attempt', t.attempts, 'at', now(), 'worker', p_worker, 'error', p_error);
    IF t.cancel_requested_at IS NOT NULL THEN
        UPDATE herald.tasks
        SET state = 'cancelled', finished_at = now(), lease_expires_at = NULL, leased_by = NULL,
            last_error = p_error, errors = errors || entry
        WHERE id = p_id;
        RETURN 'cancelled';
    END IF;
    IF p_final OR t.attempts >= t.max_attempts THEN
        DELETE FROM herald.tasks WHERE id = p_id;
        INSERT INTO herald.dead_letters
            (source, original_id, kind, queue, payload, headers, attempts, errors, last_error,
             created_at, priority, max_attempts, timeout)
        VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts, t.errors || entry,
                p_error, t.created_at, t.priority, t.max_attempts, t.timeout);
        RETURN 'dead';
    END IF;
    UPDATE herald.tasks
    SET state = 'ready', run_at = p_retry_at, lease_expires_at = NULL, leased_by = NULL,
        last_error = p_error, errors = errors || entry
    WHERE id = p_id;
    -- Idle workers recompute when to wake.
    PERFORM pg_notify('herald_tasks', '');
    RETURN 'retry';
END
$$;

-- Return tasks whose lease expired (their worker died or hung) to the queue
-- as a failed attempt, or to the dead letters when attempts are spent; a
-- task whose cancellation was requested ends cancelled. Returns how many.
CREATE FUNCTION herald.rescue_expired_leases(p_limit integer DEFAULT 1000)
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
                last_error = msg, errors = errors || entry
            WHERE id = t.id;
        ELSIF t.attempts >= t.max_attempts THEN
            DELETE FROM herald.tasks WHERE id = t.id;
            INSERT INTO herald.dead_letters
                (source, original_id, kind, queue, payload, headers, attempts, errors, last_error,
                 created_at, priority, max_attempts, timeout)
            VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts, t.errors || entry,
                    msg, t.created_at, t.priority, t.max_attempts, t.timeout);
        ELSE
            UPDATE herald.tasks
            SET state = 'ready', run_at = now(), lease_expires_at = NULL, leased_by = NULL,
                last_error = msg, errors = errors || entry
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

-- Cancel a task: a ready one at once; a running one is asked to stop (its
-- worker hears NOTIFY herald_cancel and fires the handler's cancellation
-- token). Returns the resulting state: 'cancelled', 'cancelling', or NULL
-- when no unfinished task has that id.
CREATE FUNCTION herald.cancel_task(p_id bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_state text;
BEGIN
    SELECT state INTO v_state FROM herald.tasks WHERE id = p_id FOR UPDATE;
    IF v_state = 'ready' THEN
        UPDATE herald.tasks SET state = 'cancelled', finished_at = now() WHERE id = p_id;
        RETURN 'cancelled';
    ELSIF v_state = 'running' THEN
        UPDATE herald.tasks SET cancel_requested_at = coalesce(cancel_requested_at, now()) WHERE id = p_id;
        PERFORM pg_notify('herald_cancel', p_id::text);
        RETURN 'cancelling';
    END IF;
    RETURN NULL;
END
$$;

-- Put a dead letter back to work: a task dead letter becomes a new ready
-- task (fresh attempts, its error history kept), an outbox dead letter a new
-- outbox event. The dead letter row is removed. Returns the new id.
CREATE FUNCTION herald.replay_dead_letter(p_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    d herald.dead_letters;
    v_id bigint;
BEGIN
    DELETE FROM herald.dead_letters WHERE id = p_id RETURNING * INTO d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'herald: no dead letter with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF d.source = 'task' THEN
        INSERT INTO herald.tasks (queue, kind, payload, headers, priority, max_attempts, timeout, errors)
        VALUES (coalesce(d.queue, 'default'), d.kind, d.payload,
                d.headers || jsonb_build_object('replayed_from', d.id),
                coalesce(d.priority, 0), coalesce(d.max_attempts, 25), d.timeout, d.errors)
        RETURNING id INTO v_id;
    ELSE
        INSERT INTO herald.outbox (event_id, topic, key, partition, payload, headers)
        VALUES (coalesce(d.event_id, herald.uuid_v7()), d.topic, d.key, herald.partition_for(d.key),
                d.payload, d.headers)
        RETURNING id INTO v_id;
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION herald.purge_dead_letters(older_than interval)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    WITH gone AS (
        DELETE FROM herald.dead_letters WHERE failed_at < now() - older_than RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

-- Operator views ----------------------------------------------------------

CREATE VIEW herald.queue_stats AS
SELECT t.queue,
       t.state,
       count(*) AS count,
       max(now() - t.run_at) FILTER (WHERE t.state = 'ready' AND t.run_at <= now()) AS oldest_ready_age,
       count(*) FILTER (WHERE t.state = 'ready' AND t.run_at > now()) AS scheduled,
       count(*) FILTER (WHERE t.state = 'running') AS running,
       count(*) FILTER (WHERE t.state = 'running' AND t.lease_expires_at < now()) AS expired_leases,
       coalesce(sum((SELECT count(*) FROM jsonb_array_elements(t.errors) e
                      WHERE (e->>'at')::timestamptz > now() - interval '1 hour')), 0)::bigint
           AS failed_attempts_last_hour
FROM herald.tasks t
GROUP BY t.queue, t.state;

COMMENT ON VIEW herald.queue_stats IS
    'Per queue and state: count, age of the oldest due ready task, scheduled (future) tasks, running, expired leases, failed attempts in the last hour.';

CREATE VIEW herald.dead_letter_summary AS
SELECT source,
       coalesce(queue, '') AS queue,
       coalesce(kind, topic) AS kind,
       left(coalesce(last_error, ''), 200) AS error,
       count(*) AS count,
       min(failed_at) AS first_failed_at,
       max(failed_at) AS last_failed_at
FROM herald.dead_letters
GROUP BY 1, 2, 3, 4;

CREATE VIEW herald.outbox_backlog AS
SELECT count(*) AS unpublished,
       coalesce(now() - min(created_at), interval '0') AS oldest_age,
       count(*) FILTER (WHERE attempts > 0 OR last_error IS NOT NULL) AS failing
FROM herald.outbox;
