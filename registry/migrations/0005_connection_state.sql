-- Connection state: one state machine per device and per gateway (docs/counts.md).
--
-- A row is `online` or `offline`. Session events (status messages and Wills, Sparkplug births
-- and deaths) carry an order key (session_epoch, session_order): an event applies only if its
-- key is greater than the row's, so duplicated, late or stale events cannot flip the state.
-- Rows that never saw a session event follow their data: live data makes them online until
-- `expires_at` (arrival + the platform's liveness window); the sweeper turns expired rows offline.
-- A device counts as connected when it is online and so is the gateway it sits behind (if any).

ALTER TABLE devices
    ADD COLUMN state            text NOT NULL DEFAULT 'offline' CHECK (state IN ('online', 'offline')),
    ADD COLUMN session_managed  boolean NOT NULL DEFAULT false,
    ADD COLUMN session_epoch    bigint NOT NULL DEFAULT 0,
    ADD COLUMN session_order    bigint NOT NULL DEFAULT 0,
    ADD COLUMN state_changed_at timestamptz,
    ADD COLUMN expires_at       timestamptz,
    ADD COLUMN decommissioned_at timestamptz;

ALTER TABLE gateways
    ADD COLUMN state            text NOT NULL DEFAULT 'offline' CHECK (state IN ('online', 'offline')),
    ADD COLUMN session_managed  boolean NOT NULL DEFAULT false,
    ADD COLUMN session_epoch    bigint NOT NULL DEFAULT 0,
    ADD COLUMN session_order    bigint NOT NULL DEFAULT 0,
    ADD COLUMN state_changed_at timestamptz,
    ADD COLUMN expires_at       timestamptz,
    -- Sparkplug: the bdSeq of the edge node's current session (an NDEATH must match it).
    ADD COLUMN bd_seq           smallint;

-- The sweeper's work list: online rows that expire by time.
CREATE INDEX devices_expiry ON devices (expires_at) WHERE state = 'online' AND expires_at IS NOT NULL;
CREATE INDEX gateways_expiry ON gateways (expires_at) WHERE state = 'online' AND expires_at IS NOT NULL;

-- Maintained counters, so that reading a count never scans devices. Each writer adds its deltas
-- to a shard of its own (rows per platform = shards in use), so connection events from several
-- processes do not queue on one hot row. A platform's count is the sum over its shards.
CREATE TABLE platform_counters (
    platform_id    text NOT NULL REFERENCES platforms (id),
    shard          smallint NOT NULL,
    registered     bigint NOT NULL DEFAULT 0,
    connected      bigint NOT NULL DEFAULT 0,
    ever_connected bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (platform_id, shard)
);

-- Transitions of state, one row per change (a gateway's death is one row, whatever it carries).
CREATE TABLE connection_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time        timestamptz NOT NULL,
    platform_id text NOT NULL,
    subject     text NOT NULL CHECK (subject IN ('device', 'gateway')),
    subject_id  bigint NOT NULL,
    state       text NOT NULL,
    cause       text NOT NULL,
    -- For a gateway: how many online devices behind it changed reachability with it.
    devices_affected integer NOT NULL DEFAULT 0
);
CREATE INDEX connection_events_subject ON connection_events (subject, subject_id, time);
CREATE INDEX connection_events_platform ON connection_events (platform_id, time);

-- Counters for what existed before this migration (nothing was online yet).
INSERT INTO platform_counters (platform_id, shard, registered, ever_connected)
SELECT p.id, 0, count(d.id), count(d.first_seen)
FROM platforms p LEFT JOIN devices d ON d.platform_id = p.id
GROUP BY p.id;
