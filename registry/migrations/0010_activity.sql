-- Activity within a window (24 h, 30 d) and national counts that take a device registered on
-- several platforms once. Both need a pass over the devices, so a background sampler computes
-- them once per interval (registry/activity.py); a request reads the stored figures and their
-- time, at the cost of a key lookup.
CREATE TABLE platform_activity (
    platform_id text PRIMARY KEY REFERENCES platforms (id),
    active_24h  bigint NOT NULL,
    active_30d  bigint NOT NULL,
    as_of       timestamptz NOT NULL
);

CREATE TABLE national_distinct (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    registered  bigint NOT NULL,
    connected   bigint NOT NULL,
    active_24h  bigint NOT NULL,
    active_30d  bigint NOT NULL,
    as_of       timestamptz NOT NULL
);

-- Each platform's counts in one row: maintained counters summed over their shards, and the
-- latest activity figures. Every count query reads this view.
CREATE VIEW platform_totals AS
SELECT p.id, p.tier, p.type, p.region, p.industry, p.liveness_seconds,
       coalesce(sum(c.registered), 0)::bigint AS registered,
       coalesce(sum(c.connected), 0)::bigint AS connected,
       coalesce(sum(c.ever_connected), 0)::bigint AS ever_connected,
       coalesce(max(a.active_24h), 0)::bigint AS active_24h,
       coalesce(max(a.active_30d), 0)::bigint AS active_30d,
       max(a.as_of) AS activity_as_of
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
LEFT JOIN platform_activity a ON a.platform_id = p.id
GROUP BY p.id;
