"""What a cell reports nationally, read from its store in one consistent transaction.

`read_figures` runs inside a REPEATABLE READ transaction (the caller's, see national/cell/
outbox.py), so every figure of a snapshot is of one moment: the platforms' counts, the sketch of
their connected devices and their enterprises agree with each other.

Per platform the figures are the registry's own (the view `platform_totals`, docs/counts.md).
A platform that moved to another cell (migration 0032) is not among them: it is released to
its new cell instead, in every snapshot for `snapshot_release_days` after the move (the
aggregator treats a repeated release as the same release), so a snapshot lost or delayed never
leaves a moved platform held by two cells or by none.

The devices counted once nationally travel as a DataSketches HLL sketch of the national
identities (`metadata.global_id`) of the cell's connected devices, rebuilt from the devices at
every snapshot. lg_k 14 in HLL_4 form: about 8 KiB per snapshot (11 KiB in base64), and a
relative standard error of 1.04 / sqrt(2^14) = 0.81 %, 1.6 % at two standard deviations (the
bound the aggregator states); below 1,536 identities the sketch keeps each one's hash and is
exact but for collisions of those hashes. lg_k 12 would save 6 KiB at twice the error, which a
national figure should not carry. The form (HLL_4, HLL_8) changes the size, not the error.
"""

import base64
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import datasketches
from psycopg import AsyncConnection

from national.cell.keys import EnterpriseHashKey
from national.format import (
    DeviceSketch,
    Enterprise,
    Enterprises,
    PlatformFigures,
    Release,
    Snapshot,
)
from registry import counts, penetration
from registry.activity import DEVICE_ACTIVITY

SKETCH_LG_K: Final = 14
SKETCH_TARGET: Final = "HLL_4"
# Identities streamed from a server-side cursor in chunks of this many rows.
_CHUNK = 10_000

TAKEN_AT = "SELECT now()"

# The platforms the cell holds, with their counts and their industry as a GB/T 4754 division
# (a text mapped to a whole section has no division).
PLATFORMS = """
SELECT t.id, p.name, t.tier, t.type, t.region,
       CASE WHEN i.industry ~ '^[0-9]{2}$' THEN i.industry END, p.industry,
       t.registered, t.connected, t.ever_connected, t.active_24h, t.active_30d, t.activity_as_of
FROM platform_totals t
JOIN platforms p ON p.id = t.id
JOIN platform_industries i ON i.platform_id = t.id
WHERE p.moved_to IS NULL
ORDER BY t.id
"""

# Connected as `connected` counts it (registry/connection.py): online and, behind a gateway, the
# gateway online too; decommissioned devices are not registered at all.
_CONNECTED = """
FROM devices d
JOIN platforms p ON p.id = d.platform_id AND p.moved_to IS NULL
LEFT JOIN gateways g ON g.id = d.via_gateway
WHERE d.decommissioned_at IS NULL AND d.state = 'online' AND (g.id IS NULL OR g.state = 'online')
"""
# Each identity once (`identities` is their exact count in this cell).
CONNECTED_IDENTITIES = f"""
SELECT DISTINCT d.metadata ->> 'global_id' {_CONNECTED} AND d.metadata ->> 'global_id' IS NOT NULL
"""
CONNECTED_WITHOUT_IDENTITY = f"""
SELECT count(*) {_CONNECTED} AND d.metadata ->> 'global_id' IS NULL
"""

# Each enterprise the cell's platforms declare, once: where they disagree on industry, size or
# region, the declaration most of them agree with, ties going to the earliest (the rule of
# registry/penetration.py), and whether a device of it on these platforms was connected within
# 30 days (as active_30d counts devices).
ENTERPRISES = f"""
WITH held AS (SELECT id FROM platforms WHERE moved_to IS NULL),
declared AS (
    SELECT e.platform_id, e.code, e.industry, e.above_size, e.region, e.created_at,
           count(*) OVER (PARTITION BY e.code, e.industry, e.above_size, e.region) AS agreeing
    FROM enterprises e JOIN held h ON h.id = e.platform_id
),
active AS (
    SELECT DISTINCT l.enterprise AS code
    FROM device_enterprises l
    JOIN held h ON h.id = l.platform_id
    JOIN ({DEVICE_ACTIVITY}) a ON a.id = l.id
    WHERE l.enterprise IS NOT NULL
      AND (a.connected OR a.last_active >= now() - interval '30 days')
)
SELECT DISTINCT ON (d.code) d.code, d.region, d.industry, d.above_size,
       EXISTS (SELECT FROM active a WHERE a.code = d.code)
FROM declared d
ORDER BY d.code, d.agreeing DESC, d.created_at, d.platform_id
"""

# Platforms that moved away within the release period, released to their new cell.
RELEASES = """
SELECT id, moved_to, moved_at FROM platforms
WHERE moved_to IS NOT NULL AND moved_at >= now() - %(period)s
ORDER BY id
"""


@dataclass(frozen=True, slots=True)
class Figures:
    """A snapshot but for its sequence number (taken when it is stored)."""

    taken_at: datetime
    took_seconds: float
    platforms: list[PlatformFigures]
    releases: list[Release]
    devices: DeviceSketch
    enterprises: Enterprises | None

    def snapshot(self, cell: str, sequence: int, interval_seconds: float) -> Snapshot:
        return Snapshot(
            cell=cell,
            sequence=sequence,
            taken_at=self.taken_at,
            took_seconds=self.took_seconds,
            interval_seconds=interval_seconds,
            definitions_version=counts.DEFINITIONS_VERSION,
            platforms=self.platforms,
            releases=self.releases,
            devices=self.devices,
            enterprises=self.enterprises,
        )


async def read_figures(
    conn: AsyncConnection[Any],
    *,
    hash_key: EnterpriseHashKey | None,
    release_period: timedelta,
) -> Figures:
    """The cell's figures; call inside a REPEATABLE READ transaction so they are of one moment."""
    started = time.monotonic()
    taken_at = await _scalar(conn, TAKEN_AT)
    cur = await conn.execute(PLATFORMS)
    platforms = [_platform(row) for row in await cur.fetchall()]
    cur = await conn.execute(RELEASES, {"period": release_period})
    releases = [Release(platform=p, to_cell=c, released_at=at) for p, c, at in await cur.fetchall()]
    devices = await _device_sketch(conn)
    enterprises = None if hash_key is None else await _enterprises(conn, hash_key)
    return Figures(
        taken_at=taken_at,
        took_seconds=round(time.monotonic() - started, 3),
        platforms=platforms,
        releases=releases,
        devices=devices,
        enterprises=enterprises,
    )


def _platform(row: tuple[Any, ...]) -> PlatformFigures:
    (id_, name, tier, type_, region, industry_code, industry_text, *figures) = row
    registered, connected, ever, active_24h, active_30d, activity_as_of = figures
    return PlatformFigures(
        id=id_,
        name=name,
        tier=tier,
        type=type_,
        region=region,
        industry_code=industry_code,
        industry_text=industry_text,
        registered=registered,
        connected=connected,
        ever_connected=ever,
        active_24h=active_24h,
        active_30d=active_30d,
        activity_as_of=activity_as_of,
    )


async def _device_sketch(conn: AsyncConnection[Any]) -> DeviceSketch:
    sketch = datasketches.hll_sketch(SKETCH_LG_K, datasketches.tgt_hll_type.HLL_4)
    identities = 0
    # A server-side cursor: a cell's identities are streamed, never held in memory at once.
    async with conn.cursor(name="national_identities") as cur:
        await cur.execute(CONNECTED_IDENTITIES)
        while rows := await cur.fetchmany(_CHUNK):
            for (identity,) in rows:
                sketch.update(identity)
            identities += len(rows)
    return DeviceSketch(
        lg_k=SKETCH_LG_K,
        target=SKETCH_TARGET,
        data=_base64(sketch.serialize_compact()),
        identities=identities,
        connected_without_identity=await _scalar(conn, CONNECTED_WITHOUT_IDENTITY),
    )


async def _enterprises(conn: AsyncConnection[Any], key: EnterpriseHashKey) -> Enterprises:
    cur = await conn.execute(ENTERPRISES)
    items = [
        Enterprise(
            code_hmac=key.code_hmac(code),
            region=region,
            industry_code=industry,
            above_designated_size=above_size,
            active_30d=active,
            # Every enterprise listed is declared by a platform of the cell.
            served=True,
        )
        for code, region, industry, above_size, active in await cur.fetchall()
    ]
    # In hash order: the list's order says nothing of the codes' order.
    items.sort(key=lambda e: e.code_hmac)
    return Enterprises(
        key_id=key.key_id, definitions_version=penetration.DEFINITIONS_VERSION, items=items
    )


async def _scalar(conn: AsyncConnection[Any], query: str) -> Any:
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None  # each query here yields one row
    return row[0]


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
