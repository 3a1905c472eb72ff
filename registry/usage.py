"""Usage metering: what each platform used per UTC day, for pay-after-use billing.

Ingest appends one ledger row per platform, day and source with every batch, in the batch's
transaction, and adds it to the platform's daily totals in the same statement (docs/usage.md).
Connected-device-days come from the count samples: each sample's connected devices times the
seconds it stands for (an hourly row of downsampled history keeps that product for its hour).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row

from registry.arrays import BigintArray, TextArray

RECORD = """
WITH entries AS (
    INSERT INTO usage_ledger
        (platform_id, day, source, messages, bytes, points, duplicate_points, refused_messages)
    SELECT * FROM unnest(%(platforms)b::text[], %(days)s::date[], %(sources)b::text[],
                         %(messages)b::int8[], %(bytes)b::int8[], %(points)b::int8[],
                         %(duplicates)b::int8[], %(refused)b::int8[])
    RETURNING platform_id, day, messages, bytes, points, duplicate_points, refused_messages
)
INSERT INTO usage_daily AS u
    (platform_id, day, shard, messages, bytes, points, duplicate_points, refused_messages)
SELECT platform_id, day, %(shard)s, sum(messages), sum(bytes), sum(points),
       sum(duplicate_points), sum(refused_messages)
FROM entries GROUP BY platform_id, day
ORDER BY platform_id, day
ON CONFLICT (platform_id, day, shard) DO UPDATE SET
    messages = u.messages + excluded.messages,
    bytes = u.bytes + excluded.bytes,
    points = u.points + excluded.points,
    duplicate_points = u.duplicate_points + excluded.duplicate_points,
    refused_messages = u.refused_messages + excluded.refused_messages
"""
POINTS_ON = """
SELECT platform_id, sum(points)::bigint FROM usage_daily
WHERE day = %s AND platform_id = ANY(%s) GROUP BY platform_id
"""
QUOTAS = "SELECT tier, soft_points_per_day, hard_points_per_day FROM usage_quotas ORDER BY tier"
SET_QUOTA = """
INSERT INTO usage_quotas (tier, soft_points_per_day, hard_points_per_day)
VALUES (%(tier)s, %(soft)s, %(hard)s)
ON CONFLICT (tier) DO UPDATE SET soft_points_per_day = excluded.soft_points_per_day,
    hard_points_per_day = excluded.hard_points_per_day, updated_at = now()
"""
# Per platform and day in [start, end): the metered totals, connected-device-days from the
# count samples, and the platform's tier quotas.
DAYS = """
WITH metered AS (
    SELECT platform_id, day, sum(messages)::bigint AS messages, sum(bytes)::bigint AS bytes,
           sum(points)::bigint AS points, sum(duplicate_points)::bigint AS duplicate_points,
           sum(refused_messages)::bigint AS refused_messages
    FROM usage_daily
    WHERE day >= %(start)s AND day < %(end)s
      AND (%(platform)s::text IS NULL OR platform_id = %(platform)s)
    GROUP BY platform_id, day
), sampled AS (
    SELECT platform_id, (time AT TIME ZONE 'UTC')::date AS day,
           sum(coalesce(connected_seconds, connected * seconds))::float8 / 86400
               AS connected_device_days,
           sum(seconds)::bigint AS sampled_seconds
    FROM count_history
    WHERE time >= %(start)s::date AT TIME ZONE 'UTC' AND time < %(end)s::date AT TIME ZONE 'UTC'
      AND (%(platform)s::text IS NULL OR platform_id = %(platform)s)
    GROUP BY 1, 2
)
SELECT platform_id AS platform, day,
       coalesce(m.messages, 0) AS messages, coalesce(m.bytes, 0) AS bytes,
       coalesce(m.points, 0) AS points, coalesce(m.duplicate_points, 0) AS duplicate_points,
       coalesce(m.refused_messages, 0) AS refused_messages,
       coalesce(s.connected_device_days, 0) AS connected_device_days,
       coalesce(s.sampled_seconds, 0) AS sampled_seconds,
       q.soft_points_per_day AS soft_quota, q.hard_points_per_day AS hard_quota
FROM metered m FULL JOIN sampled s USING (platform_id, day)
JOIN platforms p ON p.id = platform_id AND p.moved_to IS NULL  -- its usage moved with it
LEFT JOIN usage_quotas q ON q.tier = p.tier
ORDER BY platform_id, day
"""


RECENT = """
SELECT date_bin('1 minute', recorded_at, timestamptz '2000-01-01') AS minute,
       sum(messages)::bigint, sum(points)::bigint, sum(refused_messages)::bigint
FROM usage_ledger
WHERE platform_id = %(platform)s AND recorded_at >= now() - %(window)s
GROUP BY 1 ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class Minute:
    minute: datetime
    messages: int
    points: int
    refused_messages: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What one batch used of one platform's day."""

    platform: str
    day: date
    source: str
    messages: int = 0
    bytes: int = 0
    points: int = 0
    duplicate_points: int = 0
    refused_messages: int = 0


@dataclass(frozen=True, slots=True)
class Quota:
    tier: str
    soft_points_per_day: int | None
    hard_points_per_day: int | None


@dataclass(frozen=True, slots=True)
class UsageDay:
    platform: str
    day: date
    messages: int
    bytes: int
    points: int
    duplicate_points: int
    refused_messages: int
    connected_device_days: float
    sampled_seconds: int
    soft_quota: int | None
    hard_quota: int | None

    @property
    def over_soft_quota(self) -> bool:
        return self.soft_quota is not None and self.points > self.soft_quota


async def record_usage(conn: AsyncConnection[Any], usage: Iterable[Usage], *, shard: int) -> None:
    """Appends the batch's usage to the ledger and the daily totals; call in its transaction."""
    rows = list(usage)
    if not rows:
        return
    await conn.execute(
        RECORD,
        {
            "platforms": TextArray([u.platform for u in rows]),
            "days": [u.day for u in rows],
            "sources": TextArray([u.source for u in rows]),
            "messages": BigintArray([u.messages for u in rows]),
            "bytes": BigintArray([u.bytes for u in rows]),
            "points": BigintArray([u.points for u in rows]),
            "duplicates": BigintArray([u.duplicate_points for u in rows]),
            "refused": BigintArray([u.refused_messages for u in rows]),
            "shard": shard,
        },
    )


async def points_on(conn: AsyncConnection[Any], day: date, platforms: list[str]) -> dict[str, int]:
    """Points the platforms stored on `day`, as committed so far."""
    cur = await conn.execute(POINTS_ON, (day, platforms))
    return {platform: int(points) for platform, points in await cur.fetchall()}


async def quotas(conn: AsyncConnection[Any]) -> dict[str, Quota]:
    cur = await conn.execute(QUOTAS)
    return {row[0]: Quota(*row) for row in await cur.fetchall()}


async def set_quota(conn: AsyncConnection[Any], quota: Quota) -> None:
    args = {
        "tier": quota.tier,
        "soft": quota.soft_points_per_day,
        "hard": quota.hard_points_per_day,
    }
    await conn.execute(SET_QUOTA, args)


async def recent_minutes(
    conn: AsyncConnection[Any], platform: str, window: timedelta
) -> list[Minute]:
    """Per minute of the last `window`: messages accepted, points stored, messages refused,
    as committed (the ledger's time is its batch's commit)."""
    cur = await conn.execute(RECENT, {"platform": platform, "window": window})
    return [Minute(*row) for row in await cur.fetchall()]


async def usage_days(
    conn: AsyncConnection[Any], *, platform: str | None, start: date, end: date
) -> list[UsageDay]:
    """Per platform (or one) and UTC day in [start, end), in platform and day order."""
    async with conn.cursor(row_factory=class_row(UsageDay)) as cur:
        await cur.execute(DAYS, {"platform": platform, "start": start, "end": end})
        return await cur.fetchall()
