-- Live Herald processes: every relay, worker, scheduler and admin process
-- registers one row when it starts, refreshes last_seen on a timer and
-- deletes its row when it stops. A row whose heartbeats stopped (the process
-- was killed, its host lost) is deleted by whichever process next notices:
-- there is no leader. Statements touching this table live in src/nodes.rs.

CREATE TABLE herald.nodes (
    -- A fresh UUID v7 per process start.
    id                  uuid PRIMARY KEY,
    host                text NOT NULL,
    pid                 integer NOT NULL,
    -- What the process runs: relay, worker, scheduler, admin.
    roles               text[] NOT NULL
                        CONSTRAINT nodes_roles_valid
                        CHECK (roles <@ ARRAY['relay', 'worker', 'scheduler', 'admin']::text[]
                               AND cardinality(roles) >= 1),
    -- Herald's version (Cargo package version).
    version             text NOT NULL,
    -- Worker queues, admin address and the like, for operators.
    details             jsonb NOT NULL DEFAULT '{}'::jsonb,
    started_at          timestamptz NOT NULL DEFAULT now(),
    -- Written with the database clock, so hosts' clocks do not matter.
    last_seen           timestamptz NOT NULL DEFAULT now(),
    -- This node's own heartbeat interval: it expires after
    -- missed_heartbeats of them without a heartbeat.
    heartbeat_interval  interval NOT NULL
                        CONSTRAINT nodes_heartbeat_positive CHECK (heartbeat_interval > interval '0'),
    missed_heartbeats   integer NOT NULL DEFAULT 3
                        CONSTRAINT nodes_missed_heartbeats_valid CHECK (missed_heartbeats >= 1)
);

CREATE INDEX nodes_last_seen ON herald.nodes (last_seen);

COMMENT ON TABLE herald.nodes IS
    'Live Herald processes (relay, worker, scheduler, admin) and their heartbeats; rows past last_seen + missed_heartbeats * heartbeat_interval are expired by any node.';

-- The live nodes, for operators: roles, age and time since the last heartbeat.
CREATE VIEW herald.live_nodes AS
SELECT id, host, pid, roles, version, details, started_at, last_seen,
       now() - last_seen AS since_last_seen,
       now() - started_at AS uptime
FROM herald.nodes
WHERE last_seen + missed_heartbeats * heartbeat_interval >= now();

COMMENT ON VIEW herald.live_nodes IS
    'herald.nodes rows whose heartbeat is current (not yet expired).';
