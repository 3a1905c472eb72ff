-- The tables that grow with events become partitioned by time, so that retention drops whole
-- days instead of deleting rows (docs/operations.md): connection_events, count_history and the
-- usage ledger's per-batch rows. Native daily partitions, plus a default partition that takes
-- any row no daily partition covers (a device's clock years off, or days for which maintenance
-- made no partition ahead), so no write ever fails for want of a partition. connection_events
-- becomes a TimescaleDB hypertable where telemetry is one; the ledger and the count history stay
-- native on both (their roll-up and downsampling rewrite whole days, which is the same code on
-- both).
--
-- Each table is copied into its partitioned successor, rows and ids unchanged. The copy holds an
-- ACCESS EXCLUSIVE lock on the table until this migration commits: writers of that table (ingest's
-- connection events, usage rows, count samples) wait meanwhile. docs/operations.md gives the
-- copy rate and how to migrate a large table.
--
-- PostgreSQL before 17 has no identity columns on partitioned tables: ids come from a sequence
-- owned by the column, started after the highest id copied.

CREATE FUNCTION pg_temp.iiot_partitions_for(parent text, oldest timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    -- Daily partitions from the oldest row (at most a year back: anything older goes to the
    -- default partition, where maintenance deletes it) to a week ahead.
    PERFORM iiot_ensure_daily_partitions(parent,
        least(greatest(coalesce((oldest AT TIME ZONE 'UTC')::date, today), today - 366), today),
        today + 7);
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I DEFAULT',
                   current_schema(), parent || '_default', current_schema(), parent);
END
$$;

-- connection_events ------------------------------------------------------------------------------
ALTER TABLE connection_events RENAME TO connection_events_unpartitioned;
CREATE TABLE connection_events (
    id          bigint NOT NULL,
    time        timestamptz NOT NULL,
    platform_id text NOT NULL,
    subject     text NOT NULL CHECK (subject IN ('device', 'gateway')),
    subject_id  bigint NOT NULL,
    state       text NOT NULL,
    cause       text NOT NULL,
    devices_affected integer NOT NULL DEFAULT 0
) PARTITION BY RANGE (time);

DO $migration$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'telemetry'::regclass) <> 'p' THEN
        -- TimescaleDB (migration 0002 made telemetry a hypertable): the same for the events.
        DROP TABLE connection_events;
        CREATE TABLE connection_events (LIKE connection_events_unpartitioned INCLUDING DEFAULTS
                                        INCLUDING CONSTRAINTS);
        ALTER TABLE connection_events ALTER COLUMN id DROP IDENTITY IF EXISTS;
        EXECUTE $$SELECT create_hypertable('connection_events', 'time',
                    chunk_time_interval => interval '1 day', create_default_indexes => false)$$;
    ELSE
        PERFORM pg_temp.iiot_partitions_for('connection_events',
                                            (SELECT min(time) FROM connection_events_unpartitioned));
    END IF;
END
$migration$;

INSERT INTO connection_events
    (id, time, platform_id, subject, subject_id, state, cause, devices_affected)
SELECT id, time, platform_id, subject, subject_id, state, cause, devices_affected
FROM connection_events_unpartitioned;
DROP TABLE connection_events_unpartitioned;

CREATE SEQUENCE connection_events_id_seq OWNED BY connection_events.id;
SELECT setval('connection_events_id_seq', coalesce(max(id), 0) + 1, false) FROM connection_events;
ALTER TABLE connection_events ALTER COLUMN id SET DEFAULT nextval('connection_events_id_seq');
-- A unique key of a partitioned table (or hypertable) must hold the partitioning column.
ALTER TABLE connection_events ADD PRIMARY KEY (id, time);
CREATE INDEX connection_events_device ON connection_events (subject_id, time)
    WHERE subject = 'device';
CREATE INDEX connection_events_gateway ON connection_events (subject_id, time)
    WHERE subject = 'gateway';

-- count_history -----------------------------------------------------------------------------------
ALTER TABLE count_history RENAME TO count_history_unpartitioned;
ALTER INDEX count_history_pkey RENAME TO count_history_unpartitioned_pkey;
CREATE TABLE count_history (
    time           timestamptz NOT NULL,
    platform_id    text NOT NULL,
    registered     bigint NOT NULL,
    connected      bigint NOT NULL,
    ever_connected bigint NOT NULL,
    seconds        integer NOT NULL DEFAULT 60,
    -- Set on a row downsampled from several samples, so that billing and charts read from it
    -- what they read from the samples it replaced: connected device-seconds (connected-device-
    -- days), and the lowest and highest count. NULL on a sample standing for itself (then
    -- connected * seconds, connected, connected): the sampler writes them not.
    connected_seconds bigint,
    connected_min     bigint,
    connected_max     bigint,
    PRIMARY KEY (platform_id, time)
) PARTITION BY RANGE (time);
SELECT pg_temp.iiot_partitions_for('count_history',
                                   (SELECT min(time) FROM count_history_unpartitioned));
INSERT INTO count_history (time, platform_id, registered, connected, ever_connected, seconds)
SELECT time, platform_id, registered, connected, ever_connected, seconds
FROM count_history_unpartitioned;
DROP TABLE count_history_unpartitioned;

-- usage_ledger ------------------------------------------------------------------------------------
-- Partitioned by the time a batch committed (`recorded_at`): a day's partition is complete once
-- the day is over, whatever usage days its rows are for, and rolling it up folds it into
-- usage_ledger_daily (migration 0025).
ALTER TABLE usage_ledger RENAME TO usage_ledger_unpartitioned;
CREATE TABLE usage_ledger (
    id               bigint NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    platform_id      text NOT NULL,
    day              date NOT NULL,
    source           text NOT NULL,
    messages         bigint NOT NULL,
    bytes            bigint NOT NULL,
    points           bigint NOT NULL,
    duplicate_points bigint NOT NULL,
    refused_messages bigint NOT NULL
) PARTITION BY RANGE (recorded_at);
SELECT pg_temp.iiot_partitions_for('usage_ledger',
                                   (SELECT min(recorded_at) FROM usage_ledger_unpartitioned));
INSERT INTO usage_ledger (id, recorded_at, platform_id, day, source, messages, bytes, points,
                          duplicate_points, refused_messages)
SELECT id, recorded_at, platform_id, day, source, messages, bytes, points, duplicate_points,
       refused_messages
FROM usage_ledger_unpartitioned;
DROP TABLE usage_ledger_unpartitioned;  -- not a DELETE: its append-only trigger goes with it

CREATE SEQUENCE usage_ledger_id_seq OWNED BY usage_ledger.id;
SELECT setval('usage_ledger_id_seq', coalesce(max(id), 0) + 1, false) FROM usage_ledger;
ALTER TABLE usage_ledger ALTER COLUMN id SET DEFAULT nextval('usage_ledger_id_seq');
ALTER TABLE usage_ledger ADD PRIMARY KEY (id, recorded_at);
CREATE INDEX usage_ledger_platform_day ON usage_ledger (platform_id, day);
CREATE INDEX usage_ledger_recent ON usage_ledger (platform_id, recorded_at);
-- Still append-only for every statement on the ledger: only maintenance's roll-up, which drops
-- a settled day's partition (or deletes from the default partition itself) in the transaction
-- that adds its sums to usage_ledger_daily, removes per-batch rows.
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_usage_ledger_is_append_only();

-- The ledger's totals per platform and usage day: per-batch rows and rolled-up rows together.
CREATE VIEW usage_ledger_days AS
SELECT platform_id, day, sum(messages)::bigint AS messages, sum(bytes)::bigint AS bytes,
       sum(points)::bigint AS points, sum(duplicate_points)::bigint AS duplicate_points,
       sum(refused_messages)::bigint AS refused_messages, sum(batches)::bigint AS batches
FROM (
    SELECT platform_id, day, messages, bytes, points, duplicate_points, refused_messages,
           1 AS batches
    FROM usage_ledger
    UNION ALL
    SELECT platform_id, day, messages, bytes, points, duplicate_points, refused_messages, batches
    FROM usage_ledger_daily
) entries
GROUP BY platform_id, day;
