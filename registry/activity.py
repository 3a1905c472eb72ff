"""Activity within 24 hours and 30 days, and national counts with each device once.

Both need a pass over the devices, so they are not maintained per event: `refresh_activity`
computes them in one transaction and stores them with their time (`platform_activity`,
`national_distinct`), and the count history sampler calls it once per interval. One process
at a time does the work (an advisory lock); the others skip the round.
"""

from typing import Any

from psycopg import AsyncConnection

ACTIVITY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.activity'))"

# Every device in service (of platforms that have not moved to another cell), whether it is
# connected now and when it was last active (also read by registry/penetration.py). A device
# was connected at some moment of a window if it is connected now, or if its newest live data
# or its last state change (going online, or offline: it was online until then), or for a
# device online behind a gateway the gateway's last change, lies within it.
DEVICE_ACTIVITY = """
SELECT d.id, d.platform_id,
       coalesce(d.metadata ->> 'global_id', d.platform_id || '/' || d.device_id) AS identity,
       d.state = 'online' AND (g.id IS NULL OR g.state = 'online') AS connected,
       greatest(d.last_seen, d.state_changed_at,
                CASE WHEN d.state = 'online' THEN g.state_changed_at END) AS last_active
FROM devices d
LEFT JOIN gateways g ON g.id = d.via_gateway
WHERE d.decommissioned_at IS NULL
  AND d.platform_id NOT IN (SELECT id FROM platforms WHERE moved_to IS NOT NULL)
"""

REFRESH_PLATFORMS = f"""
WITH devices AS ({DEVICE_ACTIVITY}),
active AS (
    SELECT platform_id,
           count(*) FILTER (WHERE connected OR last_active >= now() - interval '24 hours') AS d1,
           count(*) AS d30
    FROM devices
    WHERE connected OR last_active >= now() - interval '30 days'
    GROUP BY platform_id
)
INSERT INTO platform_activity (platform_id, active_24h, active_30d, as_of)
SELECT p.id, coalesce(a.d1, 0), coalesce(a.d30, 0), now()
FROM platforms p LEFT JOIN active a ON a.platform_id = p.id
WHERE p.moved_to IS NULL
ON CONFLICT (platform_id) DO UPDATE
SET active_24h = excluded.active_24h, active_30d = excluded.active_30d, as_of = excluded.as_of
"""

REFRESH_NATIONAL = f"""
WITH devices AS ({DEVICE_ACTIVITY})
INSERT INTO national_distinct (registered, connected, active_24h, active_30d, as_of)
SELECT count(DISTINCT identity),
       count(DISTINCT identity) FILTER (WHERE connected),
       count(DISTINCT identity)
           FILTER (WHERE connected OR last_active >= now() - interval '24 hours'),
       count(DISTINCT identity)
           FILTER (WHERE connected OR last_active >= now() - interval '30 days'),
       now()
FROM devices
ON CONFLICT (only_row) DO UPDATE
SET registered = excluded.registered, connected = excluded.connected,
    active_24h = excluded.active_24h, active_30d = excluded.active_30d, as_of = excluded.as_of
"""


async def refresh_activity(conn: AsyncConnection[Any]) -> bool:
    """Recomputes the activity and national distinct figures; False if another process is."""
    async with conn.transaction():
        cur = await conn.execute(ACTIVITY_LOCK)
        row = await cur.fetchone()
        if not row or not row[0]:
            return False
        await conn.execute(REFRESH_PLATFORMS)
        await conn.execute(REFRESH_NATIONAL)
    return True
