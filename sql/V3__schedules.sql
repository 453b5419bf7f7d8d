-- Herald cron schedules (no pg_cron): one row per schedule; any number of
-- schedulers claim due rows FOR UPDATE SKIP LOCKED, insert the tick's task
-- with the unique key cron:<name>:<tick RFC 3339> and advance next_run_at in
-- one transaction (src/cron.rs). SQL cannot evaluate cron expressions, so the
-- functions here check an expression's shape and field ranges; the scheduler
-- parses it fully and computes next_run_at, marking a row it cannot use with
-- last_error (and skipping it) instead of stopping.

CREATE TABLE herald.schedules (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL
                 CONSTRAINT schedules_name_valid CHECK (name ~ '^[A-Za-z0-9._:-]{1,200}$'),
    cron         text NOT NULL
                 CONSTRAINT schedules_cron_length CHECK (length(cron) BETWEEN 1 AND 500),
    tz           text NOT NULL DEFAULT 'UTC',
    queue        text NOT NULL DEFAULT 'default'
                 CONSTRAINT schedules_queue_valid CHECK (queue ~ '^[A-Za-z0-9._:-]{1,128}$'),
    kind         text NOT NULL
                 CONSTRAINT schedules_kind_valid CHECK (kind ~ '^[A-Za-z0-9._:-]{1,255}$'),
    payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 25
                 CONSTRAINT schedules_max_attempts_valid CHECK (max_attempts >= 1),
    enabled      boolean NOT NULL DEFAULT true,
    misfire      text NOT NULL DEFAULT 'skip'
                 CONSTRAINT schedules_misfire_valid CHECK (misfire IN ('skip', 'once', 'all')),
    -- The next tick (NULL: not computed yet, or unusable when last_error is set).
    next_run_at  timestamptz,
    -- The nominal time of the latest tick that fired.
    last_run_at  timestamptz,
    last_error   text,
    source       text NOT NULL DEFAULT 'api'
                 CONSTRAINT schedules_source_valid CHECK (source IN ('config', 'api')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_name_key UNIQUE (name)
);

-- The scheduler's claim: enabled rows by next tick (NULLs: to be computed).
CREATE INDEX schedules_due ON herald.schedules (next_run_at) WHERE enabled;

COMMENT ON TABLE herald.schedules IS
    'Cron schedules: each tick inserts one task (unique key cron:<name>:<tick>); next_run_at is computed by the scheduler.';

-- A change of what or when a schedule fires (by the functions below, the CLI,
-- the configuration sync or a plain UPDATE) is stamped in updated_at; a change
-- of when (cron, tz) or a resume clears next_run_at and last_error so that a
-- scheduler recomputes the next tick from now. The scheduler's own bookkeeping
-- (next_run_at, last_run_at, last_error) leaves updated_at alone.
CREATE FUNCTION herald.schedules_touch()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF (NEW.cron, NEW.tz, NEW.queue, NEW.kind, NEW.payload, NEW.priority, NEW.max_attempts,
        NEW.enabled, NEW.misfire, NEW.source, NEW.name)
       IS DISTINCT FROM
       (OLD.cron, OLD.tz, OLD.queue, OLD.kind, OLD.payload, OLD.priority, OLD.max_attempts,
        OLD.enabled, OLD.misfire, OLD.source, OLD.name) THEN
        NEW.updated_at := now();
    END IF;
    IF NEW.cron IS DISTINCT FROM OLD.cron OR NEW.tz IS DISTINCT FROM OLD.tz
       OR (NEW.enabled AND NOT OLD.enabled) THEN
        NEW.next_run_at := NULL;
        NEW.last_error := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER schedules_touch
    BEFORE UPDATE ON herald.schedules
    FOR EACH ROW EXECUTE FUNCTION herald.schedules_touch();

-- Wake the schedulers: a new or changed schedule may fire before the tick
-- they sleep towards. Statement level with a constant payload: one
-- notification per transaction.
CREATE FUNCTION herald.schedules_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('herald_schedules', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_notify
    AFTER INSERT OR UPDATE OR DELETE ON herald.schedules
    FOR EACH STATEMENT EXECUTE FUNCTION herald.schedules_notify();

-- Check a cron expression as far as SQL can: 5 fields (minute hour
-- day-of-month month day-of-week), or 6 with seconds first, or an @nickname;
-- each field made of numbers in the field's range, '*', '?', ranges, steps,
-- lists, month and weekday names, 'L', 'W' and '#'. The scheduler parses it
-- fully (croner) and marks what still fails with last_error.
CREATE FUNCTION herald.check_cron(p_cron text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    expected constant text :=
        'expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, '
        'such as "*/5 * * * *" or "0 30 2 * * MON-FRI", or one of @yearly, @monthly, @weekly, '
        '@daily, @hourly';
    fields text[];
    names text[];
    lo int[];
    hi int[];
    field text;
    part text;
    base text;
    step text;
    n text;
    i int;
    off int;
BEGIN
    IF p_cron IS NULL OR btrim(p_cron) = '' THEN
        RAISE EXCEPTION 'herald: invalid cron expression "%": it is empty; %', coalesce(p_cron, ''), expected
            USING ERRCODE = '22023';
    END IF;
    IF lower(btrim(p_cron)) IN ('@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly') THEN
        RETURN;
    END IF;
    fields := regexp_split_to_array(btrim(p_cron), '\s+');
    IF array_length(fields, 1) NOT IN (5, 6) THEN
        RAISE EXCEPTION 'herald: invalid cron expression "%": % fields; %', p_cron, array_length(fields, 1), expected
            USING ERRCODE = '22023';
    END IF;
    names := ARRAY['second', 'minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lo := ARRAY[0, 0, 0, 1, 1, 0];
    hi := ARRAY[59, 59, 23, 31, 12, 7];
    off := 7 - array_length(fields, 1);   -- 5 fields start at "minute"
    FOR i IN 1 .. array_length(fields, 1) LOOP
        field := upper(fields[i]);
        IF field !~ '^[0-9A-Z*?/,#LW-]+$' THEN
            RAISE EXCEPTION 'herald: invalid cron expression "%": the % field "%" has characters other than digits, names, * ? / , - # L W; %',
                p_cron, names[i + off - 1], fields[i], expected USING ERRCODE = '22023';
        END IF;
        FOREACH part IN ARRAY string_to_array(field, ',') LOOP
            base := split_part(part, '/', 1);
            step := CASE WHEN position('/' IN part) > 0 THEN split_part(part, '/', 2) END;
            IF part = '' OR base = '' OR step = '' OR (step IS NOT NULL AND (step !~ '^[0-9]+$' OR step::int < 1)) THEN
                RAISE EXCEPTION 'herald: invalid cron expression "%": "%" in the % field is not a value, range or step (a step is "/" and a number of at least 1); %',
                    p_cron, part, names[i + off - 1], expected USING ERRCODE = '22023';
            END IF;
            IF position('#' IN base) > 0 AND (i + off - 1 <> 6 OR split_part(base, '#', 2) !~ '^[1-5]$') THEN
                RAISE EXCEPTION 'herald: invalid cron expression "%": "%": "#" belongs in the day-of-week field, followed by 1 to 5; %',
                    p_cron, part, expected USING ERRCODE = '22023';
            END IF;
            IF base ~ '[A-Z]' AND i + off - 1 NOT IN (4, 5, 6) THEN
                RAISE EXCEPTION 'herald: invalid cron expression "%": "%" in the % field: names, L and W belong in the day-of-month, month and day-of-week fields; %',
                    p_cron, part, names[i + off - 1], expected USING ERRCODE = '22023';
            END IF;
            FOR n IN SELECT m[1] FROM regexp_matches(split_part(base, '#', 1), '([0-9]+)', 'g') AS m LOOP
                IF n::numeric < lo[i + off - 1] OR n::numeric > hi[i + off - 1] THEN
                    RAISE EXCEPTION 'herald: invalid cron expression "%": % is out of range for the % field (% to %); %',
                        p_cron, n, names[i + off - 1], lo[i + off - 1], hi[i + off - 1], expected
                        USING ERRCODE = '22023';
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;
END
$$;

CREATE FUNCTION herald.check_schedule(p_name text, p_cron text, p_tz text, p_misfire text, p_source text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9._:-]{1,200}$' THEN
        RAISE EXCEPTION 'herald: invalid schedule name "%": expected 1 to 200 letters, digits, ".", "_", "-" or ":"', coalesce(p_name, '')
            USING ERRCODE = '22023';
    END IF;
    PERFORM herald.check_cron(p_cron);
    IF p_tz IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = p_tz) THEN
        RAISE EXCEPTION 'herald: unknown time zone "%" for schedule "%": expected an IANA time zone name such as "UTC", "Europe/Berlin" or "America/New_York"',
            coalesce(p_tz, ''), p_name USING ERRCODE = '22023';
    END IF;
    IF p_misfire IS NULL OR p_misfire NOT IN ('skip', 'once', 'all') THEN
        RAISE EXCEPTION 'herald: unknown misfire policy "%" for schedule "%": expected skip, once or all', coalesce(p_misfire, ''), p_name
            USING ERRCODE = '22023';
    END IF;
    IF p_source IS NULL OR p_source NOT IN ('config', 'api') THEN
        RAISE EXCEPTION 'herald: unknown schedule source "%": expected config or api', coalesce(p_source, '')
            USING ERRCODE = '22023';
    END IF;
END
$$;

-- Create or change a schedule; returns its id. A change of cron or tz makes
-- the schedulers recompute next_run_at from now; other changes keep it.
-- enabled NULL keeps a schedule's state (a new one starts enabled).
CREATE FUNCTION herald.upsert_schedule(
    name         text,
    cron         text,
    kind         text,
    payload      jsonb DEFAULT '{}'::jsonb,
    tz           text DEFAULT 'UTC',
    queue        text DEFAULT 'default',
    misfire      text DEFAULT 'skip',
    priority     integer DEFAULT 0,
    max_attempts integer DEFAULT 25,
    enabled      boolean DEFAULT NULL,
    source       text DEFAULT 'api'
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    v_id bigint;
BEGIN
    PERFORM herald.check_schedule(upsert_schedule.name, upsert_schedule.cron, upsert_schedule.tz,
                                  upsert_schedule.misfire, upsert_schedule.source);
    PERFORM herald.check_task(upsert_schedule.kind, upsert_schedule.queue, upsert_schedule.payload,
                              upsert_schedule.max_attempts);
    INSERT INTO herald.schedules AS s
        (name, cron, tz, queue, kind, payload, priority, max_attempts, enabled, misfire, source)
    VALUES (upsert_schedule.name, btrim(upsert_schedule.cron), upsert_schedule.tz, upsert_schedule.queue,
            upsert_schedule.kind, upsert_schedule.payload, coalesce(upsert_schedule.priority, 0),
            upsert_schedule.max_attempts, coalesce(upsert_schedule.enabled, true),
            upsert_schedule.misfire, upsert_schedule.source)
    ON CONFLICT ON CONSTRAINT schedules_name_key DO UPDATE
    SET cron = EXCLUDED.cron, tz = EXCLUDED.tz, queue = EXCLUDED.queue, kind = EXCLUDED.kind,
        payload = EXCLUDED.payload, priority = EXCLUDED.priority,
        max_attempts = EXCLUDED.max_attempts,
        enabled = coalesce(upsert_schedule.enabled, s.enabled),
        misfire = EXCLUDED.misfire, source = EXCLUDED.source
    RETURNING s.id INTO v_id;
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION herald.upsert_schedule(text, text, text, jsonb, text, text, text, integer, integer, boolean, text) IS
    'Create or change a cron schedule; the schedulers compute next_run_at and are woken by NOTIFY herald_schedules.';

CREATE FUNCTION herald.no_schedule(p_name text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'herald: no schedule named "%"', p_name USING ERRCODE = 'P0002';
END
$$;

-- Stop firing; the row and its definition stay.
CREATE FUNCTION herald.pause_schedule(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE herald.schedules SET enabled = false WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM herald.no_schedule(p_name);
    END IF;
END
$$;

-- Fire again from the next tick after now: ticks that passed while the
-- schedule was paused are not misfires and never fire.
CREATE FUNCTION herald.resume_schedule(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE herald.schedules SET enabled = true WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM herald.no_schedule(p_name);
    END IF;
END
$$;

CREATE FUNCTION herald.remove_schedule(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    DELETE FROM herald.schedules WHERE name = p_name;
    IF NOT FOUND THEN
        PERFORM herald.no_schedule(p_name);
    END IF;
END
$$;

-- Fire a schedule now, once, whether it is enabled or not and without
-- touching its next tick. The task's tick is the database's now() with
-- microseconds, so its unique key never meets a cron tick's (whole seconds).
-- Returns the task id.
CREATE FUNCTION herald.trigger_schedule(p_name text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    s herald.schedules;
    v_tick text;
    v_id bigint;
BEGIN
    SELECT * INTO s FROM herald.schedules WHERE name = p_name FOR SHARE;
    IF NOT FOUND THEN
        PERFORM herald.no_schedule(p_name);
    END IF;
    v_tick := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    INSERT INTO herald.tasks (queue, kind, payload, headers, priority, max_attempts, unique_key)
    VALUES (s.queue, s.kind, s.payload,
            jsonb_build_object('herald_schedule', s.name, 'herald_tick', v_tick, 'herald_triggered', true),
            s.priority, s.max_attempts, 'cron:' || s.name || ':' || v_tick)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;
