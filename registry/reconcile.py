"""Reconciliation: proves the maintained counters equal a full recount, and fixes any drift.

The recount and the counters are read in one REPEATABLE READ snapshot, so the comparison is
exact while writers go on; the correction is added afterwards as a delta, which stays right
whatever the writers committed in between.
"""

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, IsolationLevel

from registry.connection import Counters

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
