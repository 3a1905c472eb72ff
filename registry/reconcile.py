"""Reconciliation: proves the maintained counters equal a full recount, and fixes any drift.

The recount and the counters are read in one REPEATABLE READ snapshot, so the comparison is
exact while writers go on; the correction is added afterwards as a delta, which stays right
whatever the writers committed in between.
"""

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, IsolationLevel
from psycopg.types.json import Jsonb

from registry.connection import Counters
from registry.settings import StoreSettings
from registry.store import connect

log = logging.getLogger(__name__)

RECOUNT = """
SELECT p.id,
       count(d.id),
       count(d.id) FILTER (WHERE d.state = 'online' AND (g.id IS NULL OR g.state = 'online')),
       count(d.first_seen)
FROM platforms p
LEFT JOIN devices d ON d.platform_id = p.id AND d.decommissioned_at IS NULL
LEFT JOIN gateways g ON g.id = d.via_gateway
GROUP BY p.id
"""
COUNTED = """
SELECT platform_id, sum(registered), sum(connected), sum(ever_connected)
FROM platform_counters GROUP BY platform_id
"""


@dataclass(frozen=True, slots=True)
class Drift:
    platform: str
    registered: int
    connected: int
    ever_connected: int


async def find_drift(conn: AsyncConnection[Any]) -> list[Drift]:
    """Counters minus truth, per platform, where they differ (empty when exact)."""
    saved = conn.isolation_level
    await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
    try:
        async with conn.transaction():
            truth = {row[0]: row[1:] for row in await (await conn.execute(RECOUNT)).fetchall()}
            counted = {row[0]: row[1:] for row in await (await conn.execute(COUNTED)).fetchall()}
    finally:
        await conn.set_isolation_level(saved)
    drift = []
    for platform in sorted(truth.keys() | counted.keys()):
        t = truth.get(platform, (0, 0, 0))
        c = counted.get(platform, (0, 0, 0))
        delta = [int(c[i] or 0) - int(t[i]) for i in range(3)]
        if any(delta):
            drift.append(Drift(platform, *delta))
    return drift


async def reconcile(conn: AsyncConnection[Any], shard: int) -> list[Drift]:
    """Finds drift and corrects it; returns what it corrected."""
    drift = await find_drift(conn)
    if drift:
        counters = Counters(shard)
        for d in drift:
            counters.add(
                d.platform,
                registered=-d.registered,
                connected=-d.connected,
                ever=-d.ever_connected,
            )
        async with conn.transaction():
            await counters.flush(conn)
    return drift


RECORD = "INSERT INTO reconciliations (platforms, drift) VALUES (%s, %s)"
# One reconciler at a time across all processes; the others skip their turn.
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(current_schema() || '.iiot_reconcile'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema() || '.iiot_reconcile'))"
PLATFORMS = "SELECT count(*) FROM platforms"
RECENT = """
SELECT id, time, platforms, drift FROM reconciliations
WHERE %(drift_only)s IS FALSE OR drift <> '[]'::jsonb
ORDER BY id DESC LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class Reconciliation:
    id: int
    time: Any
    platforms: int
    drift: list[Drift]


async def recent_reconciliations(
    conn: AsyncConnection[Any], *, limit: int, drift_only: bool = False
) -> list[Reconciliation]:
    """The latest reconciliation runs, newest first, with the drift each found and fixed."""
    cur = await conn.execute(RECENT, {"limit": limit, "drift_only": drift_only})
    return [
        Reconciliation(id, time, platforms, [Drift(**d) for d in drift])
        for id, time, platforms, drift in await cur.fetchall()
    ]


class Reconciler:
    """Reconciles the counters every `interval` seconds; `last_drift` feeds monitoring."""

    def __init__(self, settings: StoreSettings, *, shard: int, interval: float = 300.0) -> None:
        self._settings = settings
        self._shard = shard
        self._interval = interval
        self._stopping = asyncio.Event()
        self.last_drift: list[Drift] = []
        self.runs = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except psycopg.OperationalError as exc:
                log.warning("reconciliation failed (%s); next turn", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()

    async def run_once(self) -> list[Drift] | None:
        """Reconciles unless another process is doing it; returns the drift it corrected."""
        async with await connect(self._settings, autocommit=True) as conn:
            locked = await (await conn.execute(TRY_LOCK)).fetchone()
            if not locked or not locked[0]:
                return None
            try:
                drift = await reconcile(conn, self._shard)
                platforms = await (await conn.execute(PLATFORMS)).fetchone()
                await conn.execute(
                    RECORD, (platforms[0] if platforms else 0, Jsonb([asdict(d) for d in drift]))
                )
            finally:
                await conn.execute(UNLOCK)
        if drift:
            log.error("counter drift found and corrected: %s", drift)
        self.last_drift = drift
        self.runs += 1
        return drift
