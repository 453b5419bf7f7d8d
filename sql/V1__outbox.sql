-- Herald foundation: settings, the transactional outbox, its wake-up trigger,
-- the publish function, the archive of published events and the dead letters.
-- Applied by `herald migrate` (refinery); never edit an applied migration,
-- add a new V<n>__*.sql instead.

CREATE SCHEMA IF NOT EXISTS herald;

-- One row of cluster-wide settings that producers (SQL and Rust) and relays
-- must agree on. `herald migrate` writes them from the configuration.
CREATE TABLE herald.settings (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions        integer NOT NULL DEFAULT 16 CHECK (partitions BETWEEN 1 AND 1024),
    max_payload_bytes integer NOT NULL DEFAULT 1048576 CHECK (max_payload_bytes > 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO herald.settings DEFAULT VALUES;

-- The outbox is a queue with very high churn: every row is inserted once and
-- deleted once, usually within milliseconds. Keep it narrow, leave room for
-- HOT updates of `attempts`, and let autovacuum run early and without
-- throttling so dead tuples never pile up in front of the claim index.
CREATE TABLE herald.outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL,
    topic        text NOT NULL CONSTRAINT outbox_topic_valid
                 CHECK (topic ~ '^[A-Za-z0-9._:-]{1,255}$'),
    key          text,
    partition    smallint NOT NULL,
    payload      jsonb NOT NULL,
    headers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    last_error   text
) WITH (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- The relay's claim order: per partition, by id.
CREATE INDEX outbox_claim ON herald.outbox (partition, id);

COMMENT ON TABLE herald.outbox IS
    'Transactional outbox: events committed with business data, relayed to Redis and then deleted (or archived).';

-- Partition of an event: stable for a key so that one relay at a time drains
-- it in id order; events without a key are spread at random.
CREATE FUNCTION herald.partition_for(p_key text, p_partitions integer)
RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (abs(hashtextextended(p_key, 0)) % p_partitions)::smallint
$$;

CREATE FUNCTION herald.partition_for(p_key text)
RETURNS smallint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    n integer;
BEGIN
    SELECT partitions INTO n FROM herald.settings;
    IF p_key IS NULL THEN
        RETURN floor(random() * coalesce(n, 16))::smallint;
    END IF;
    RETURN herald.partition_for(p_key, coalesce(n, 16));
END
$$;

-- Wake-up hint for idle relays. Constant payload: Postgres folds identical
-- notifications of one transaction into one, and the relay reads the table,
-- never the notification. Statement level, so a bulk insert notifies once.
CREATE FUNCTION herald.outbox_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON herald.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION herald.outbox_notify();

-- Checks shared by herald.publish and anything else that writes events.
CREATE FUNCTION herald.check_event(p_topic text, p_payload jsonb, p_headers jsonb)
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
    SELECT max_payload_bytes INTO max_bytes FROM herald.settings;
    size := octet_length(p_payload::text);
    IF size > coalesce(max_bytes, 1048576) THEN
        RAISE EXCEPTION 'herald: payload too large for topic "%": % bytes, the limit is % bytes', p_topic, size, coalesce(max_bytes, 1048576)
            USING ERRCODE = '54000',
                  HINT = 'raise max_payload_bytes (HERALD_MAX_PAYLOAD_BYTES) and run herald migrate, or publish a reference to the data instead';
    END IF;
END
$$;

-- Publish one event inside the caller's transaction; returns its event id.
-- The id is a UUID v7 (time-ordered), generated here so SQL producers need
-- no extension.
CREATE FUNCTION herald.uuid_v7()
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    -- 48-bit Unix milliseconds, then a v4 UUID's random bits with the version
    -- nibble turned from 4 (0100) into 7 (0111); its variant bits stay 10.
    -- set_bit numbers bits from the low end of each byte: 52..55 are the high
    -- nibble of byte 6.
    SELECT encode(
        set_bit(set_bit(set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1), 54, 1), 55, 0),
        'hex')::uuid
$$;

CREATE FUNCTION herald.publish(
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
    INSERT INTO herald.outbox (event_id, topic, key, partition, payload, headers)
    VALUES (v_id, publish.topic, publish.key, herald.partition_for(publish.key),
            publish.payload, coalesce(publish.headers, '{}'::jsonb));
    RETURN v_id;
END
$$;

COMMENT ON FUNCTION herald.publish(text, jsonb, text, jsonb) IS
    'Write an event to the outbox in the current transaction; it reaches Redis after COMMIT, never after ROLLBACK.';

-- Published events, kept only when retain_published is set. Partitioned by
-- day so that expiry is DROP TABLE, not DELETE + vacuum.
CREATE TABLE herald.outbox_archive (
    id           bigint NOT NULL,
    event_id     uuid NOT NULL,
    topic        text NOT NULL,
    key          text,
    partition    smallint NOT NULL,
    payload      jsonb NOT NULL,
    headers      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    attempts     integer NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (published_at);

CREATE TABLE herald.outbox_archive_default PARTITION OF herald.outbox_archive DEFAULT;

-- Create the daily partitions for today and tomorrow and drop the ones that
-- ended before now() - retain. Returns the number of partitions dropped.
CREATE FUNCTION herald.maintain_archive(retain interval)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    day date;
    part record;
    dropped integer := 0;
    part_end timestamptz;
BEGIN
    FOR day IN SELECT generate_series(current_date, current_date + 1, interval '1 day')::date LOOP
        IF to_regclass(format('herald.outbox_archive_%s', to_char(day, 'YYYYMMDD'))) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE herald.%I PARTITION OF herald.outbox_archive FOR VALUES FROM (%L) TO (%L)',
                    'outbox_archive_' || to_char(day, 'YYYYMMDD'), day::timestamptz, (day + 1)::timestamptz);
            EXCEPTION WHEN duplicate_table OR invalid_object_definition OR check_violation THEN
                -- another relay created it, or rows for that day already sit in
                -- the default partition: keep using the default one.
                NULL;
            END;
        END IF;
    END LOOP;
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'herald.outbox_archive'::regclass
          AND c.relname ~ '^outbox_archive_[0-9]{8}$'
    LOOP
        part_end := (to_date(substring(part.relname FROM 16), 'YYYYMMDD') + 1)::timestamptz;
        IF part_end < now() - retain THEN
            EXECUTE format('DROP TABLE herald.%I', part.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    DELETE FROM herald.outbox_archive_default WHERE published_at < now() - retain;
    RETURN dropped;
END
$$;

-- One table for everything Herald gave up on: events the relay could not
-- deliver (source 'outbox') and, later, tasks whose attempts are spent.
CREATE TABLE herald.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text NOT NULL CHECK (source IN ('outbox', 'task')),
    original_id bigint,
    event_id    uuid,
    topic       text,
    kind        text,
    queue       text,
    key         text,
    payload     jsonb NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts    integer NOT NULL,
    errors      jsonb NOT NULL DEFAULT '[]'::jsonb,
    last_error  text,
    created_at  timestamptz,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_failed_at ON herald.dead_letters (failed_at);
CREATE INDEX dead_letters_source_topic ON herald.dead_letters (source, topic, kind);

COMMENT ON TABLE herald.dead_letters IS
    'Events and tasks Herald gave up on, with their error history; replay or purge them.';
