-- Bounded task errors and smaller holes (issue 14).
--
-- 1. Bounded error history: a task's `errors` array keeps its newest 25
--    entries and every error text is cut to 8,192 characters. A task
--    retried without end (max_attempts in the thousands, a snooze loop that
--    fails) or a handler that returns a whole response body as its error
--    grew the row, and every later update of it, without limit.
--
-- 2. A replayed task keeps its unique key. Task dead letters now record the
--    key, and herald.replay_dead_letter puts it back on the new task. While
--    a live (ready or running) task holds that key, the replay is refused
--    with an error naming the holder, and the dead letter stays: replaying
--    it then would run the same unique work twice at once, and dropping it
--    would lose its payload and history.
-- 3. Event keys and headers have size limits in herald.publish, as the Rust
--    API has (src/outbox.rs: MAX_KEY_BYTES, MAX_HEADERS_BYTES).
-- 4. Payloads (and event headers) nested deeper than 100 levels are refused
--    at publish and enqueue. jsonb takes any depth, but consumers decode
--    JSON with serde_json's limit of 128 levels (the envelope adds one), so
--    such a payload was accepted and then dead-lettered as "not JSON".

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

ALTER TABLE herald.dead_letters ADD COLUMN unique_key text;

-- Bodies as in V2, with bounded error texts and history (herald.append_error)
-- and the unique key carried into herald.dead_letters.
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
             created_at, priority, max_attempts, timeout, unique_key)
        VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts, herald.append_error(t.errors, entry),
                msg, t.created_at, t.priority, t.max_attempts, t.timeout, t.unique_key);
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
                 created_at, priority, max_attempts, timeout, unique_key)
            VALUES ('task', t.id, t.kind, t.queue, t.payload, t.headers, t.attempts, herald.append_error(t.errors, entry),
                    msg, t.created_at, t.priority, t.max_attempts, t.timeout, t.unique_key);
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

CREATE OR REPLACE FUNCTION herald.replay_dead_letter(p_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    d herald.dead_letters;
    v_id bigint;
    v_holder bigint;
    v_state text;
BEGIN
    DELETE FROM herald.dead_letters WHERE id = p_id RETURNING * INTO d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'herald: no dead letter with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF d.source = 'task' THEN
        IF d.unique_key IS NOT NULL THEN
            SELECT id, state INTO v_holder, v_state FROM herald.tasks
            WHERE unique_key = d.unique_key AND state IN ('ready', 'running');
            IF FOUND THEN
                -- The exception rolls the DELETE back: the dead letter stays.
                RAISE EXCEPTION 'herald: cannot replay dead letter %: task % (%) holds its unique key "%"', p_id, v_holder, v_state, d.unique_key
                    USING ERRCODE = '23505',
                          HINT = 'replay it once that task has finished, or cancel that task first';
            END IF;
        END IF;
        INSERT INTO herald.tasks (queue, kind, payload, headers, priority, max_attempts, timeout, errors, unique_key)
        VALUES (coalesce(d.queue, 'default'), d.kind, d.payload,
                d.headers || jsonb_build_object('replayed_from', d.id),
                coalesce(d.priority, 0), coalesce(d.max_attempts, 25), d.timeout, d.errors, d.unique_key)
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

-- Whether a JSON value nests containers more than 100 levels deep: a
-- container at level 100 (the root is level 0) is one level too many. One
-- pass in C over the value, well under a microsecond for a small payload.
CREATE FUNCTION herald.json_too_deep(p_value jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT jsonb_path_exists(
        p_value, 'strict $.**{100} ? (@.type() == "array" || @.type() == "object")')
$$;

CREATE OR REPLACE FUNCTION herald.check_event(p_topic text, p_payload jsonb, p_headers jsonb)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    max_bytes integer;
    size integer;
BEGIN
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'herald: invalid topic: topic is empty'
            USING ERRCODE = '22023',
                  HINT = 'a topic is 1 to 255 characters of letters, digits, ".", "_", "-" or ":"';
    END IF;
    IF length(p_topic) > 255 THEN
        RAISE EXCEPTION 'herald: invalid topic: % characters, at most 255 allowed', length(p_topic)
            USING ERRCODE = '22023';
    END IF;
    IF p_topic !~ '^[A-Za-z0-9._:-]+$' THEN
        RAISE EXCEPTION 'herald: invalid topic "%": only letters, digits, ".", "_", "-" and ":" are allowed', p_topic
            USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'herald: invalid payload for topic "%": payload is NULL (use ''null''::jsonb for a JSON null)', p_topic
            USING ERRCODE = '22023';
    END IF;
    IF p_headers IS NOT NULL AND jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'herald: invalid headers for topic "%": headers must be a JSON object, got %', p_topic, jsonb_typeof(p_headers)
            USING ERRCODE = '22023';
    END IF;
    IF p_headers IS NOT NULL AND octet_length(p_headers::text) > 16384 THEN
        RAISE EXCEPTION 'herald: headers too large for topic "%": % bytes, the limit is 16384 bytes', p_topic, octet_length(p_headers::text)
            USING ERRCODE = '54000';
    END IF;
    IF p_headers IS NOT NULL AND herald.json_too_deep(p_headers) THEN
        RAISE EXCEPTION 'herald: headers of topic "%" are nested more than 100 levels deep, the limit is 100', p_topic
            USING ERRCODE = '54000';
    END IF;
    SELECT max_payload_bytes INTO max_bytes FROM herald.settings;
    size := octet_length(p_payload::text);
    IF size > coalesce(max_bytes, 1048576) THEN
        RAISE EXCEPTION 'herald: payload too large for topic "%": % bytes, the limit is % bytes', p_topic, size, coalesce(max_bytes, 1048576)
            USING ERRCODE = '54000',
                  HINT = 'raise max_payload_bytes (HERALD_MAX_PAYLOAD_BYTES) and run herald migrate, or publish a reference to the data instead';
    END IF;
    IF herald.json_too_deep(p_payload) THEN
        RAISE EXCEPTION 'herald: payload of topic "%" is nested more than 100 levels deep, the limit is 100', p_topic
            USING ERRCODE = '54000',
                  HINT = 'consumers decode JSON at most 128 levels deep (serde_json); flatten the payload';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION herald.publish(
    topic   text,
    payload jsonb,
    key     text DEFAULT NULL,
    headers jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id uuid := herald.uuid_v7();
BEGIN
    PERFORM herald.check_event(topic, payload, headers);
    IF octet_length(publish.key) > 1024 THEN
        RAISE EXCEPTION 'herald: key too long for topic "%": % bytes, the limit is 1024 bytes', publish.topic, octet_length(publish.key)
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO herald.outbox (event_id, topic, key, partition, payload, headers)
    VALUES (v_id, publish.topic, publish.key, herald.partition_for(publish.key),
            publish.payload, coalesce(publish.headers, '{}'::jsonb));
    RETURN v_id;
END
$$;

-- Body as in V7, plus the depth limit.
CREATE OR REPLACE FUNCTION herald.check_task(p_kind text, p_queue text, p_payload jsonb, p_max_attempts integer)
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
    IF p_kind !~ '^[A-Za-z0-9._:-]+$' OR length(p_kind) > 255 THEN
        RAISE EXCEPTION 'herald: invalid task kind "%": 1 to 255 letters, digits, ".", "_", "-" or ":"', p_kind
            USING ERRCODE = '22023';
    END IF;
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z0-9._:-]+$' OR length(p_queue) > 128 THEN
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
    IF herald.json_too_deep(p_payload) THEN
        RAISE EXCEPTION 'herald: payload of task kind "%" is nested more than 100 levels deep, the limit is 100', p_kind
            USING ERRCODE = '54000',
                  HINT = 'workers decode JSON at most 128 levels deep (serde_json); flatten the payload';
    END IF;
END
$$;
