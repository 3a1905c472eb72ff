-- Telemetry: one narrow row per point. A TimescaleDB hypertable when the extension can be loaded,
-- otherwise a natively range-partitioned table with one partition per UTC day (docs/adr/0001).
-- The primary key makes a point (device, metric, time) unique: redelivered messages cannot
-- produce duplicate rows, and the same index serves per-device range queries.

DO $migration$
DECLARE
    timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
        OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
            AND current_setting('shared_preload_libraries') ~ 'timescaledb');
BEGIN
    -- One column list for both layouts: only the partitioning clause differs.
    EXECUTE format($$
        CREATE TABLE telemetry (
            time      timestamptz NOT NULL,
            device_id bigint      NOT NULL,
            metric_id integer     NOT NULL,
            value     double precision NOT NULL,
            PRIMARY KEY (device_id, metric_id, time)
        ) %s$$, CASE WHEN timescale THEN '' ELSE 'PARTITION BY RANGE (time)' END);
    IF timescale THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public;
        -- Called through EXECUTE so that plain PostgreSQL can still parse this block.
        EXECUTE $$SELECT create_hypertable('telemetry', 'time',
                    chunk_time_interval => interval '1 day', create_default_indexes => false)$$;
        EXECUTE $$ALTER TABLE telemetry SET (timescaledb.compress,
                    timescaledb.compress_segmentby = 'device_id',
                    timescaledb.compress_orderby = 'metric_id, time')$$;
        EXECUTE $$SELECT add_compression_policy('telemetry', interval '7 days')$$;
    END IF;
END
$migration$;

-- Creates the daily partitions covering [from_day, to_day] that do not exist yet and returns how
-- many it created. A no-op on a hypertable (TimescaleDB creates chunks itself).
CREATE FUNCTION iiot_ensure_telemetry_partitions(from_day date, to_day date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day     date;
    part    text;
    created integer := 0;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'telemetry'::regclass) <> 'p' THEN
        RETURN 0;
    END IF;
    -- Serialise creators (several ingest processes) within this schema.
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.telemetry_partitions'));
    FOR day IN SELECT generate_series(from_day, to_day, interval '1 day')::date LOOP
        part := 'telemetry_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(quote_ident(current_schema()) || '.' || part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                current_schema(), part,
                day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- Drops telemetry older than keep_days whole days (partitions or chunks); returns what it dropped.
CREATE FUNCTION iiot_apply_telemetry_retention(keep_days integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff  date := (now() AT TIME ZONE 'UTC')::date - keep_days;
    part    record;
    dropped integer := 0;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'telemetry'::regclass) <> 'p' THEN
        EXECUTE format('SELECT count(*) FROM drop_chunks(%L::regclass, older_than => %L::timestamptz)',
                       'telemetry', cutoff::timestamp AT TIME ZONE 'UTC') INTO dropped;
        RETURN dropped;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'telemetry'::regclass
          AND c.relname ~ '^telemetry_[0-9]{8}$'
          AND to_date(substr(c.relname, 11), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE %I.%I', current_schema(), part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;
