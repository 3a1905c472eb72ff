"""Device counts per platform, with the definitions they follow (docs/counts.md)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

DEFINITIONS_VERSION: Final = "2026-11.1"
DEFINITIONS: Final = {
    "registered": "Devices on the platform's registry, registered by an operator or on first data.",
    "connected": (
        "Registered devices whose newest live (not back-filled) data reached the backend within "
        "the platform's liveness window, measured by the backend's clock at arrival."
    ),
}

# Counting rows is fine at foundation scale; maintained counters replace it (issue: registry).
PLATFORM_COUNTS = """
SELECT p.liveness_seconds,
       count(d.id),
       count(d.id) FILTER (WHERE d.last_seen > now() - p.liveness_seconds * interval '1 second'),
       now()
FROM platforms p
LEFT JOIN devices d ON d.platform_id = p.id
WHERE p.id = %s
GROUP BY p.id
"""


@dataclass(frozen=True, slots=True)
class PlatformCounts:
    platform: str
    registered: int
    connected: int
    liveness_seconds: int
    as_of: datetime


async def platform_counts(conn: AsyncConnection[Any], platform_id: str) -> PlatformCounts | None:
    """Counts for one platform, or None when the platform does not exist."""
    cur = await conn.execute(PLATFORM_COUNTS, (platform_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    liveness, registered, connected, as_of = row
    return PlatformCounts(platform_id, registered, connected, liveness, as_of)
