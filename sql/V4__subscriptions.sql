-- Durable subscriptions: every committed outbox event whose topic matches a
-- subscription's pattern becomes one task for that subscription, inserted by
-- the relay in the transaction that removes the event from the outbox. Each
-- subscriber then has its own retries, backoff and dead letters.
-- Statements touching these tables live here and in src/subscriptions.rs and
-- src/relay.rs.

CREATE TABLE herald.subscriptions (
    name            text PRIMARY KEY
                    CONSTRAINT subscriptions_name_valid CHECK (name ~ '^[A-Za-z0-9._:-]{1,128}$'),
    -- A topic, or a glob where '*' matches any run of characters: 'payment.*', '*'.
    pattern         text NOT NULL
                    CONSTRAINT subscriptions_pattern_valid CHECK (pattern ~ '^[A-Za-z0-9._:*-]{1,255}$'),
    -- The pattern as a LIKE pattern ('_' is a wildcard in LIKE, '*' is not).
    topic_like      text GENERATED ALWAYS AS (replace(replace(pattern, '_', '\_'), '*', '%')) STORED,
    -- The task kind each matching event becomes; 'herald.webhook' posts it to webhook_url.
    kind            text NOT NULL
                    CONSTRAINT subscriptions_kind_valid CHECK (kind ~ '^[A-Za-z0-9._:-]{1,255}$'),
    queue           text NOT NULL DEFAULT 'default'
                    CONSTRAINT subscriptions_queue_valid CHECK (queue ~ '^[A-Za-z0-9._:-]{1,128}$'),
    max_attempts    integer NOT NULL DEFAULT 25
                    CONSTRAINT subscriptions_max_attempts_valid CHECK (max_attempts >= 1),
    timeout         interval,
    webhook_url     text
                    CONSTRAINT subscriptions_webhook_url_valid CHECK (webhook_url ~ '^https?://'),
    webhook_secret  text,
    enabled         boolean NOT NULL DEFAULT true,
    source          text NOT NULL DEFAULT 'api'
                    CONSTRAINT subscriptions_source_valid CHECK (source IN ('config', 'api')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_webhook_has_url
        CHECK (kind <> 'herald.webhook' OR webhook_url IS NOT NULL)
);

COMMENT ON TABLE herald.subscriptions IS
    'Durable subscriptions: each matching outbox event becomes a task of `kind` on `queue`, inserted by the relay.';

-- Events a durable subscriber has applied, written in the subscriber's own
-- transaction together with its effects and the task's completion, so a
-- redelivered event is recognised and skipped.
CREATE TABLE herald.processed_events (
    subscription    text NOT NULL,
    event_id        uuid NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, event_id)
);
CREATE INDEX processed_events_processed_at ON herald.processed_events (processed_at);

COMMENT ON TABLE herald.processed_events IS
    'Idempotency records of durable subscribers: (subscription, event id) applied once.';

-- Delete idempotency records older than `older_than`; returns how many. Keep
-- them longer than any event can be redelivered (the task's retry horizon).
CREATE FUNCTION herald.purge_processed_events(older_than interval)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    WITH gone AS (
        DELETE FROM herald.processed_events WHERE processed_at < now() - older_than RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
