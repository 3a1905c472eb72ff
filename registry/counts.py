"""Device counts per platform, with the definitions they follow (docs/counts.md).

Every count reads the view `platform_totals`: maintained counters (registered, connected,
ever_connected, exact at the moment of reading) and the activity figures the sampler stored
last (active_24h, active_30d, with their time). No request counts devices.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection, sql

DEFINITIONS_VERSION: Final = "2026-11.4"
DEFINITIONS: Final = {
    "registered": (
        "Devices in the platform's registry, registered by an operator or on their first "
        "accepted message, and not decommissioned."
    ),
    "connected": (
        "Registered devices whose connection state is online and, for a device behind a "
        "gateway, whose gateway is online. A device that never sent a status or birth message "
        "is online while its newest live (not back-filled) data arrived within the platform's "
        "liveness window, by the backend's clock, and goes offline at most "
        "IIOT_ACTIVITY_RENEW_SECONDS (default 5 s) later; one that did follows those messages "
        "only."
    ),
    "ever_connected": "Registered devices that have been connected at least once.",
    "active_24h": (
        "Registered devices connected at some moment in the last 24 hours: connected now, or "
        "whose newest live data, or whose last change of connection state (or, behind a "
        "gateway, the gateway's), lies within the window. Computed by a background pass over "
        "the devices once per sampling interval; `activity_as_of` says when."
    ),
    "active_30d": "As active_24h, over the last 30 days.",
}
DUPLICATES: Final = (
    "Platform, grouped and national sums count registrations: a device registered on two "
    "platforms counts on each. The national `distinct` figures count a device once, taking "
    "devices with the same `metadata.global_id` (for example its industrial internet "
    "identifier) as one; a device without one counts once per registration."
)

_COLUMNS = "registered, connected, ever_connected, active_24h, active_30d, activity_as_of"
_SUMS = """sum(registered)::bigint, sum(connected)::bigint, sum(ever_connected)::bigint,
       sum(active_24h)::bigint, sum(active_30d)::bigint, min(activity_as_of)"""

PLATFORM_COUNTS = f"SELECT liveness_seconds, {_COLUMNS}, now() FROM platform_totals WHERE id = %s"

ALL_PLATFORM_COUNTS = f"""
SELECT id, 1, {_COLUMNS} FROM platform_totals
WHERE (%(after)s::text IS NULL OR id > %(after)s)
  AND (%(only)s::text IS NULL OR id = %(only)s)
ORDER BY id
LIMIT %(limit)s
"""

# {dimension} is one of DIMENSIONS, quoted by psycopg.sql; never caller text.
GROUPED_COUNTS = f"""
SELECT {{dimension}}, count(*), {_SUMS} FROM platform_totals GROUP BY 1 ORDER BY 1
"""

NATIONAL_COUNTS = f"SELECT 'national', count(*), {_SUMS}, now() FROM platform_totals"

NATIONAL_DISTINCT = """
SELECT registered, connected, active_24h, active_30d, as_of FROM national_distinct
"""

PLATFORM_GAUGES = """
SELECT id, tier, type, region, registered, connected, ever_connected, active_24h, active_30d
FROM platform_totals ORDER BY id
"""

DIMENSIONS: Final = ("tier", "type", "region", "industry")


@dataclass(frozen=True, slots=True)
class Counts:
    key: str
    platforms: int
    registered: int
    connected: int
    ever_connected: int
    active_24h: int
    active_30d: int
    # When the activity figures were computed (the oldest, for a sum); None: not yet.
    activity_as_of: datetime | None


@dataclass(frozen=True, slots=True)
class PlatformCounts:
    platform: str
    liveness_seconds: int
    registered: int
    connected: int
    ever_connected: int
    active_24h: int
    active_30d: int
    activity_as_of: datetime | None
    as_of: datetime


@dataclass(frozen=True, slots=True)
class DistinctCounts:
    registered: int
    connected: int
    active_24h: int
    active_30d: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class PlatformGauge:
    platform: str
    tier: str
    type: str
    region: str
    registered: int
    connected: int
    ever_connected: int
    active_24h: int
    active_30d: int


async def platform_gauges(conn: AsyncConnection[Any]) -> list[PlatformGauge]:
    """Every platform's counts with the labels monitoring groups them by."""
    cur = await conn.execute(PLATFORM_GAUGES)
    return [PlatformGauge(*row) for row in await cur.fetchall()]


async def platform_counts(conn: AsyncConnection[Any], platform_id: str) -> PlatformCounts | None:
    """Counts for one platform, or None when the platform does not exist."""
    cur = await conn.execute(PLATFORM_COUNTS, (platform_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    return PlatformCounts(platform_id, *row)


async def all_platform_counts(
    conn: AsyncConnection[Any], *, after: str | None, limit: int, only: str | None = None
) -> list[Counts]:
    """Platforms' counts in id order after `after`; `only`: just that platform's."""
    cur = await conn.execute(ALL_PLATFORM_COUNTS, {"after": after, "limit": limit, "only": only})
    return [Counts(*row) for row in await cur.fetchall()]


async def grouped_counts(conn: AsyncConnection[Any], dimension: str) -> list[Counts]:
    if dimension not in DIMENSIONS:
        raise ValueError(f"cannot group by {dimension!r}")
    query = sql.SQL(GROUPED_COUNTS).format(dimension=sql.Identifier(dimension))
    cur = await conn.execute(query)
    return [_counts(row) for row in await cur.fetchall()]


async def national_counts(
    conn: AsyncConnection[Any],
) -> tuple[Counts, DistinctCounts | None, datetime]:
    """Every platform's counts added up, and the same with each device counted once."""
    cur = await conn.execute(NATIONAL_COUNTS)
    row = await cur.fetchone()
    assert row is not None  # an aggregate always yields a row
    *figures, as_of = row
    cur = await conn.execute(NATIONAL_DISTINCT)
    distinct = await cur.fetchone()
    return _counts(figures), DistinctCounts(*distinct) if distinct else None, as_of


def _counts(row: Any) -> Counts:
    key, platforms, registered, connected, ever, active_24h, active_30d, activity_as_of = row
    # sum() over no platforms is NULL.
    return Counts(
        str(key),
        platforms,
        registered or 0,
        connected or 0,
        ever or 0,
        active_24h or 0,
        active_30d or 0,
        activity_as_of,
    )
