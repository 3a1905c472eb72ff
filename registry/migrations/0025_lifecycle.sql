-- Table lifecycle (docs/operations.md): what `iiot maintain` needs to keep growing tables within
-- their retention. Adds nothing to a row that is written on the hot path.

-- Daily partitions of any natively partitioned table are named <table>_YYYYMMDD and hold one UTC
-- day of its partition key. Creates those covering [from_day, to_day] that do not exist yet and
-- returns how many it created; a no-op on a table that is not natively partitioned (a TimescaleDB
-- hypertable makes its own chunks). A day whose rows already sit in the table's default partition
-- (written while no partition covered it) is left there: creating its partition would fail.
CREATE FUNCTION iiot_ensure_daily_partitions(parent text, from_day date, to_day date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    parent_oid regclass := parent::regclass;
    key        text;
    fallback   regclass := to_regclass(quote_ident(current_schema()) || '.'
                                       || quote_ident(parent || '_default'));
    day        date;
    lower      timestamptz;
    upper      timestamptz;
    part       text;
    taken      boolean;
    created    integer := 0;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = parent_oid) <> 'p' THEN
        RETURN 0;
    END IF;
    SELECT a.attname INTO key
    FROM pg_partitioned_table pt
    JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
    WHERE pt.partrelid = parent_oid;
    -- Serialise creators within this schema (the same key as the telemetry function's).
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.' || parent || '_partitions'));
    FOR day IN SELECT generate_series(from_day, to_day, interval '1 day')::date LOOP
        part := parent || '_' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(quote_ident(current_schema()) || '.' || quote_ident(part))
            IS NOT NULL;
        lower := day::timestamp AT TIME ZONE 'UTC';
        upper := (day + 1)::timestamp AT TIME ZONE 'UTC';
        IF fallback IS NOT NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I >= %L AND %I < %L)',
                           fallback, key, lower, key, upper) INTO taken;
            CONTINUE WHEN taken;
        END IF;
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                       current_schema(), part, parent_oid, lower, upper);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Drops the daily partitions (or TimescaleDB chunks) of days before `before`; returns how many.
-- The default partition is never dropped: `iiot maintain` deletes its old rows in batches.
CREATE FUNCTION iiot_drop_daily_partitions(parent text, before date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    parent_oid regclass := parent::regclass;
    part       record;
    dropped    integer := 0;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = parent_oid) <> 'p' THEN
        -- A hypertable (this function is only called on partitioned tables or hypertables).
        EXECUTE format('SELECT count(*) FROM drop_chunks(%L::regclass, older_than => %L::timestamptz)',
                       parent_oid, before::timestamp AT TIME ZONE 'UTC') INTO dropped;
        RETURN dropped;
    END IF;
    FOR part IN SELECT * FROM iiot_daily_partitions(parent) WHERE day < before LOOP
        EXECUTE format('DROP TABLE %I.%I', current_schema(), part.name);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

-- The daily partitions of a natively partitioned table, oldest first.
CREATE FUNCTION iiot_daily_partitions(parent text)
RETURNS TABLE (name text, day date)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text, to_date(right(c.relname, 8), 'YYYYMMDD')
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = parent::regclass
      AND c.relname ~ ('^' || parent || '_[0-9]{8}$')
    ORDER BY 2
$$;

-- Every maintenance run (`iiot maintain`): what each step did, and whether it all succeeded.
-- Monitoring reads the newest rows; maintenance keeps 90 days of them.
CREATE TABLE maintenance_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    succeeded   boolean NOT NULL,
    steps       jsonb NOT NULL,
    error       text
);
CREATE INDEX maintenance_runs_succeeded ON maintenance_runs (succeeded, finished_at);

-- How far a step that works day by day has got (count history downsampling): days before
-- `through` are done, so a run looks at new days only.
CREATE TABLE maintenance_progress (
    step    text PRIMARY KEY,
    through date NOT NULL
);

-- The usage ledger's per-batch rows of settled days, rolled up: one row per platform, usage day
-- and source, holding the sums of the rows it replaced (and how many batches they were).
-- The view `usage_ledger_days` (migration 0026) adds up both.
CREATE TABLE usage_ledger_daily (
    platform_id      text NOT NULL,
    day              date NOT NULL,
    source           text NOT NULL,
    messages         bigint NOT NULL,
    bytes            bigint NOT NULL,
    points           bigint NOT NULL,
    duplicate_points bigint NOT NULL,
    refused_messages bigint NOT NULL,
    batches          bigint NOT NULL,
    PRIMARY KEY (platform_id, day, source)
);
