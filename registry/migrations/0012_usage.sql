-- Usage metering for pay-after-use billing (docs/usage.md).

-- The ledger: one row per platform, UTC day and source for each committed batch, written in
-- the batch's transaction. Append-only: rows are never changed or removed.
CREATE TABLE usage_ledger (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    platform_id      text NOT NULL,
    day              date NOT NULL,
    source           text NOT NULL,
    messages         bigint NOT NULL,
    bytes            bigint NOT NULL,
    points           bigint NOT NULL,
    duplicate_points bigint NOT NULL,
    refused_messages bigint NOT NULL
);
CREATE INDEX usage_ledger_platform_day ON usage_ledger (platform_id, day);

CREATE FUNCTION iiot_usage_ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'usage_ledger is append-only: % refused', TG_OP;
END $$;
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_usage_ledger_is_append_only();

-- The ledger added up per platform and day, one row per writer shard (no row every writer
-- waits for), maintained in the same statement that appends to the ledger.
CREATE TABLE usage_daily (
    platform_id      text NOT NULL,
    day              date NOT NULL,
    shard            smallint NOT NULL,
    messages         bigint NOT NULL DEFAULT 0,
    bytes            bigint NOT NULL DEFAULT 0,
    points           bigint NOT NULL DEFAULT 0,
    duplicate_points bigint NOT NULL DEFAULT 0,
    refused_messages bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (platform_id, day, shard)
);

-- Points per day a platform of a tier may store: over the soft quota its usage is flagged,
-- over the hard quota its messages are refused (dead-lettered as quota_exceeded).
CREATE TABLE usage_quotas (
    tier                 text PRIMARY KEY
                         CHECK (tier IN ('basic', 'growth', 'leading', 'ecosystem')),
    soft_points_per_day  bigint CHECK (soft_points_per_day > 0),
    hard_points_per_day  bigint CHECK (hard_points_per_day > 0),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Each count sample says how long it stands for, so connected-device-days add up exactly.
ALTER TABLE count_history ADD COLUMN seconds integer NOT NULL DEFAULT 60;
