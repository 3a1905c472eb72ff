"""Count history: every platform's counts sampled on the minute (or another interval), and
with each sample the activity figures refreshed (registry/activity.py).

Any number of processes may run a sampler: a sample is keyed by (platform, time slot), and the
first process to write a slot wins, so there is one row per platform per slot whoever wrote it.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from registry.activity import refresh_activity
from registry.penetration import refresh_penetration

log = logging.getLogger(__name__)

SAMPLE = """
INSERT INTO count_history (time, platform_id, registered, connected, ever_connected, seconds)
SELECT date_bin(%(interval)s, now(), timestamptz '2000-01-01'), p.id,
       coalesce(sum(c.registered), 0), coalesce(sum(c.connected), 0),
       coalesce(sum(c.ever_connected), 0), extract(epoch FROM %(interval)s)::integer
FROM platforms p LEFT JOIN platform_counters c ON c.platform_id = p.id
WHERE p.moved_to IS NULL  -- a moved platform's history goes on in its new cell
GROUP BY p.id
ON CONFLICT (platform_id, time) DO NOTHING
"""

# date_bin is in PostgreSQL 14+ and works on TimescaleDB hypertables alike. Rows downsampled
# to hours (registry/lifecycle.py) carry the lowest and highest count of their hour.
HISTORY = """
SELECT date_bin(%(bucket)s, time, timestamptz '2000-01-01') AS bucket,
       min(coalesce(connected_min, connected)), max(coalesce(connected_max, connected)),
       (array_agg(connected ORDER BY time DESC))[1],
       (array_agg(registered ORDER BY time DESC))[1], count(*)
FROM count_history
WHERE platform_id = %(platform)s AND time >= %(start)s AND time < %(end)s
GROUP BY 1 ORDER BY 1
"""


# A device's own connection events and those of the gateway it sits behind (a gateway's death
# is one event for all its devices), newest first.
DEVICE_EVENTS = """
SELECT e.time, e.subject, e.state, e.cause FROM connection_events e
JOIN devices d ON d.platform_id = %(platform)s AND d.device_id = %(device)s
WHERE (e.subject = 'device' AND e.subject_id = d.id)
   OR (e.subject = 'gateway' AND e.subject_id = d.via_gateway)
ORDER BY e.time DESC, e.id DESC
LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    time: datetime
    subject: str
    state: str
    cause: str


async def device_events(
    conn: AsyncConnection[Any], platform: str, device: str, limit: int
) -> list[DeviceEvent]:
    cur = await conn.execute(
        DEVICE_EVENTS, {"platform": platform, "device": device, "limit": limit}
    )
    return [DeviceEvent(*row) for row in await cur.fetchall()]


@dataclass(frozen=True, slots=True)
class HistoryBucket:
    start: datetime
    connected_min: int
    connected_max: int
    connected_last: int
    registered_last: int
    samples: int


async def sample(conn: AsyncConnection[Any], interval: timedelta) -> int:
    """Writes the current slot's sample for every platform; returns the rows written."""
    cur = await conn.execute(SAMPLE, {"interval": interval})
    return cur.rowcount


async def history(
    conn: AsyncConnection[Any], platform: str, start: datetime, end: datetime, bucket: timedelta
) -> list[HistoryBucket]:
    cur = await conn.execute(
        HISTORY, {"platform": platform, "start": start, "end": end, "bucket": bucket}
    )
    return [HistoryBucket(*row) for row in await cur.fetchall()]


class HistorySampler:
    def __init__(self, pool: AsyncConnectionPool, *, interval: timedelta) -> None:
        self._pool = pool
        self._interval = interval
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        period = self._interval.total_seconds()
        while not self._stopping.is_set():
            try:
                async with self._pool.connection() as conn:
                    await sample(conn, self._interval)
                    await refresh_activity(conn)
                    await refresh_penetration(conn)
            except psycopg.OperationalError as exc:
                log.warning("count sample failed (%s); next slot", exc)
            # Wake just after the next slot starts, by the wall clock.
            wait = period - (time.time() % period) + 0.05
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()
