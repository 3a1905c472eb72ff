"""Device counts per platform, with the definitions they follow (docs/counts.md)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection, sql

DEFINITIONS_VERSION: Final = "2026-11.2"
DEFINITIONS: Final = {
    "registered": (
        "Devices in the platform's registry, registered by an operator or on their first "
        "accepted message, and not decommissioned."
    ),
    "connected": (
        "Registered devices whose connection state is online and, for a device behind a "
        "gateway, whose gateway is online. A device that never sent a status or birth message "
        "is online while its newest live (not back-filled) data arrived within the platform's "
        "liveness window, by the backend's clock; one that did follows those messages only."
    ),
    "ever_connected": "Registered devices that have been connected at least once.",
}

# Maintained counters: the cost of a count does not grow with the number of devices.
PLATFORM_COUNTS = """
SELECT p.liveness_seconds,
       coalesce(sum(c.registered), 0)::bigint,
       coalesce(sum(c.connected), 0)::bigint,
       coalesce(sum(c.ever_connected), 0)::bigint,
       now()
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
WHERE p.id = %s
GROUP BY p.id
"""


@dataclass(frozen=True, slots=True)
class PlatformCounts:
    platform: str
    registered: int
    connected: int
    ever_connected: int
    liveness_seconds: int
    as_of: datetime


async def platform_counts(conn: AsyncConnection[Any], platform_id: str) -> PlatformCounts | None:
    """Counts for one platform, or None when the platform does not exist."""
    cur = await conn.execute(PLATFORM_COUNTS, (platform_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    liveness, registered, connected, ever, as_of = row
    return PlatformCounts(platform_id, registered, connected, ever, liveness, as_of)


COUNTS_SUMS = """
       coalesce(sum(c.registered), 0)::bigint,
       coalesce(sum(c.connected), 0)::bigint,
       coalesce(sum(c.ever_connected), 0)::bigint"""

ALL_PLATFORM_COUNTS = f"""
SELECT p.id, {COUNTS_SUMS}
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
WHERE (%(after)s::text IS NULL OR p.id > %(after)s)
GROUP BY p.id
ORDER BY p.id
LIMIT %(limit)s
"""

# {dimension} is one of DIMENSIONS, quoted by psycopg.sql; never caller text.
GROUPED_COUNTS = f"""
SELECT p.{{dimension}}, count(DISTINCT p.id), {COUNTS_SUMS}
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
GROUP BY p.{{dimension}}
ORDER BY 1
"""

NATIONAL_COUNTS = f"""
SELECT count(DISTINCT p.id), {COUNTS_SUMS}, now()
FROM platforms p
LEFT JOIN platform_counters c ON c.platform_id = p.id
"""

DIMENSIONS: Final = ("tier", "type", "region", "industry")


@dataclass(frozen=True, slots=True)
class Counts:
    key: str
    platforms: int
    registered: int
    connected: int
    ever_connected: int


async def all_platform_counts(
    conn: AsyncConnection[Any], *, after: str | None, limit: int
) -> list[Counts]:
    cur = await conn.execute(ALL_PLATFORM_COUNTS, {"after": after, "limit": limit})
    return [Counts(row[0], 1, *row[1:]) for row in await cur.fetchall()]


async def grouped_counts(conn: AsyncConnection[Any], dimension: str) -> list[Counts]:
    if dimension not in DIMENSIONS:
        raise ValueError(f"cannot group by {dimension!r}")
    query = sql.SQL(GROUPED_COUNTS).format(dimension=sql.Identifier(dimension))
    cur = await conn.execute(query)
    return [Counts(*row) for row in await cur.fetchall()]


async def national_counts(conn: AsyncConnection[Any]) -> tuple[Counts, datetime]:
    """Every platform's counts added up: a device registered on two platforms counts twice."""
    cur = await conn.execute(NATIONAL_COUNTS)
    row = await cur.fetchone()
    assert row is not None  # an aggregate always yields a row
    platforms, registered, connected, ever, as_of = row
    return Counts("national", platforms, registered, connected, ever), as_of
