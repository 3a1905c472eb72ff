"""The national figures over time (`/national/history`), and the aggregator's upkeep.

Every `sample_seconds` the `Sampler` writes the current minute's national sample (the live
figures, exactly what `/national/totals` answers), recomputes the past minutes a late snapshot
touched (a cell delivering what it kept while it could not reach us: its history fills in),
rolls minute samples older than `minute_history_days` up to hourly ones (the last sample of each
hour), drops old snapshot bodies, and recomputes the penetration numerators.
"""

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from national import figures, penetration, sketches
from national.settings import STALE_INTERVALS, NationalSettings

log = logging.getLogger(__name__)

TAKE_BACKLOG = "DELETE FROM history_backlog RETURNING since"
NOW_MINUTE = "SELECT date_trunc('minute', now())"
# Each cell's latest snapshot before `until`, if it was fresh then.
CELLS_AT = """
SELECT s.cell, s.platforms, s.registered, s.connected, s.ever_connected, s.active_24h,
       s.active_30d, extract(epoch FROM %(until)s - s.taken_at)::float8, s.sketch, s.sketch_lg_k,
       s.sketch_target, s.identities, s.connected_without_identity,
       %(until)s - s.taken_at <= make_interval(secs => s.interval_seconds * %(stale)s)
FROM cells c
CROSS JOIN LATERAL (
    SELECT * FROM snapshots s WHERE s.cell = c.name AND s.taken_at < %(until)s
    ORDER BY s.sequence DESC LIMIT 1
) s
WHERE c.retired_at IS NULL OR c.retired_at >= %(until)s
"""
CELL_COUNT = """
SELECT count(*) FROM cells WHERE added_at < %(until)s
  AND (retired_at IS NULL OR retired_at >= %(until)s)
"""
UPSERT_SAMPLE = """
INSERT INTO national_samples (resolution, at, cells, cells_stale, oldest_age_seconds, platforms,
    registered, connected, ever_connected, active_24h, active_30d, distinct_connected,
    distinct_lower, distinct_upper)
VALUES ('minute', %(at)s, %(cells)s, %(cells_stale)s, %(oldest_age_seconds)s, %(platforms)s,
    %(registered)s, %(connected)s, %(ever_connected)s, %(active_24h)s, %(active_30d)s,
    %(distinct_connected)s, %(distinct_lower)s, %(distinct_upper)s)
ON CONFLICT (resolution, at) DO UPDATE SET
    (cells, cells_stale, oldest_age_seconds, platforms, registered, connected, ever_connected,
     active_24h, active_30d, distinct_connected, distinct_lower, distinct_upper)
  = (excluded.cells, excluded.cells_stale, excluded.oldest_age_seconds, excluded.platforms,
     excluded.registered, excluded.connected, excluded.ever_connected, excluded.active_24h,
     excluded.active_30d, excluded.distinct_connected, excluded.distinct_lower,
     excluded.distinct_upper)
"""
# The last minute sample of each hour older than the cutoff becomes that hour's sample.
ROLL_UP = """
INSERT INTO national_samples
SELECT DISTINCT ON (date_trunc('hour', at)) 'hour', date_trunc('hour', at), cells, cells_stale,
       oldest_age_seconds, platforms, registered, connected, ever_connected, active_24h,
       active_30d, distinct_connected, distinct_lower, distinct_upper
FROM national_samples WHERE resolution = 'minute' AND at < %(cutoff)s
ORDER BY date_trunc('hour', at), at DESC
ON CONFLICT (resolution, at) DO NOTHING
"""
DROP_MINUTES = "DELETE FROM national_samples WHERE resolution = 'minute' AND at < %(cutoff)s"
DROP_BODIES = """
UPDATE snapshots s SET body = NULL FROM cells c
WHERE s.cell = c.name AND s.body IS NOT NULL AND s.received_at < %(cutoff)s
  AND s.sequence < c.next_sequence - 1
"""
HISTORY = """
SELECT resolution, at, cells, cells_stale, oldest_age_seconds, platforms, registered, connected,
       ever_connected, active_24h, active_30d, distinct_connected, distinct_lower, distinct_upper
FROM national_samples
WHERE at >= %(since)s AND at <= %(until)s
  AND (resolution = 'minute' OR at < (SELECT coalesce(min(at), 'infinity') FROM national_samples
                                      WHERE resolution = 'minute'))
ORDER BY at
"""
COLUMNS: Final = (
    "resolution",
    "at",
    "cells",
    "cells_stale",
    "oldest_age_seconds",
    "platforms",
    "registered",
    "connected",
    "ever_connected",
    "active_24h",
    "active_30d",
    "distinct_connected",
    "distinct_lower",
    "distinct_upper",
)
# Past minutes recomputed in one pass at most (a cell away longer fills in over several).
MAX_BACKFILL_MINUTES: Final = 7 * 24 * 60


async def sample_live(conn: AsyncConnection[Any], at: datetime) -> None:
    now = await figures.read(conn)
    counted = figures.sums(now.counted())
    distinct = now.distinct()
    coverage = now.coverage()
    await conn.execute(
        UPSERT_SAMPLE,
        {
            "at": at,
            "cells": coverage["cells_covered"],
            "cells_stale": len(coverage["stale_cells"]),
            "oldest_age_seconds": coverage["oldest_snapshot_age_seconds"],
            **counted,
            "distinct_connected": distinct.estimate,
            "distinct_lower": distinct.lower,
            "distinct_upper": distinct.upper,
        },
    )


async def sample_past(conn: AsyncConnection[Any], minute: datetime) -> None:
    """The national figures as they stood at the end of `minute`, from the snapshots."""
    until = minute + timedelta(minutes=1)
    cur = await conn.execute(CELLS_AT, {"until": until, "stale": STALE_INTERVALS})
    rows = await cur.fetchall()
    cur = await conn.execute(CELL_COUNT, {"until": until})
    registered_cells = await cur.fetchone()
    fresh = [r for r in rows if r[13]]
    totals = {
        name: sum(r[i] for r in fresh)
        for i, name in enumerate(("platforms", *figures.FIGURES), start=1)
    }
    distinct = sketches.union((bytes(r[8]), r[9], r[10], r[11], r[12]) for r in fresh)
    await conn.execute(
        UPSERT_SAMPLE,
        {
            "at": minute,
            "cells": len(fresh),
            "cells_stale": (registered_cells[0] if registered_cells else 0) - len(fresh),
            "oldest_age_seconds": max((r[7] for r in fresh), default=None),
            **totals,
            "distinct_connected": distinct.estimate,
            "distinct_lower": distinct.lower,
            "distinct_upper": distinct.upper,
        },
    )


async def history(conn: AsyncConnection[Any], since: datetime, until: datetime) -> list[Any]:
    cur = await conn.execute(HISTORY, {"since": since, "until": until})
    return await cur.fetchall()


class Sampler:
    """Samples and maintains every `sample_seconds` until stopped; one pass can be asked for."""

    def __init__(self, pool: AsyncConnectionPool, settings: NationalSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.once()
            except Exception:  # the next pass retries; the log says what failed
                log.exception("national sampling failed; retrying at the next interval")
            try:
                async with asyncio.timeout(self._settings.sample_seconds):
                    await self._stop.wait()
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()

    async def once(self) -> None:
        async with self._lock, self._pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(TAKE_BACKLOG)
                backlog = await cur.fetchone()
                cur = await conn.execute(NOW_MINUTE)
                row = await cur.fetchone()
                assert row is not None
                minute: datetime = row[0]
                if backlog is not None:
                    start = max(backlog[0], minute - timedelta(minutes=MAX_BACKFILL_MINUTES))
                    while start < minute:
                        await sample_past(conn, start)
                        start += timedelta(minutes=1)
            await sample_live(conn, minute)
            cutoff = minute - timedelta(days=self._settings.minute_history_days)
            async with conn.transaction():
                await conn.execute(ROLL_UP, {"cutoff": cutoff})
                await conn.execute(DROP_MINUTES, {"cutoff": cutoff})
            bodies = minute - timedelta(days=self._settings.body_retention_days)
            await conn.execute(DROP_BODIES, {"cutoff": bodies})
            await penetration.refresh(conn)
