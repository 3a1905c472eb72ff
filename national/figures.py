"""The national figures, read from the platforms each cell holds and the cells' latest
snapshots. Summed figures are exact sums over the platforms of fresh cells; every answer says
which cells it covers, which are stale (their last figures shown apart, with their age), and
the age of the oldest snapshot it counts (docs/national.md)."""

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from national import sketches
from national.settings import STALE_INTERVALS
from registry import classification

FIGURES: Final = ("registered", "connected", "ever_connected", "active_24h", "active_30d")
DIMENSIONS: Final = ("tier", "type", "province", "prefecture", "industry", "cell")

# A cell is stale when its latest snapshot is older than three of its own intervals (or when
# it never delivered one).
CELLS = """
SELECT c.name, c.next_sequence - 1, c.interval_seconds, c.last_taken_at, c.last_received_at,
       extract(epoch FROM now() - c.last_taken_at)::float8,
       c.last_taken_at IS NOT NULL
           AND now() - c.last_taken_at <= make_interval(secs => c.interval_seconds * %s),
       s.definitions_version, s.took_seconds, now()
FROM cells c
LEFT JOIN snapshots s ON s.cell = c.name AND s.sequence = c.next_sequence - 1
WHERE c.retired_at IS NULL
ORDER BY c.name
"""
PLATFORMS = """
SELECT id, cell, name, tier, type, region, industry_code, industry_text, registered, connected,
       ever_connected, active_24h, active_30d, activity_as_of, sequence, taken_at, released_to,
       released_at
FROM platforms ORDER BY id
"""
LATEST_SKETCHES = """
SELECT s.sketch, s.sketch_lg_k, s.sketch_target, s.identities, s.connected_without_identity
FROM snapshots s JOIN cells c ON c.name = s.cell AND s.sequence = c.next_sequence - 1
WHERE c.name = ANY(%s)
"""


@dataclass(frozen=True, slots=True)
class Cell:
    name: str
    sequence: int  # its latest accepted snapshot's (0: none yet)
    interval_seconds: float | None
    taken_at: datetime | None
    received_at: datetime | None
    age_seconds: float | None
    fresh: bool
    definitions_version: str | None
    took_seconds: float | None

    def describe(self) -> dict[str, Any]:
        return {
            "cell": self.name,
            "status": "fresh" if self.fresh else ("stale" if self.taken_at else "never-reported"),
            "sequence": self.sequence,
            "taken_at": self.taken_at,
            "received_at": self.received_at,
            "age_seconds": self.age_seconds,
            "interval_seconds": self.interval_seconds,
            "stale_after_seconds": (
                self.interval_seconds * STALE_INTERVALS if self.interval_seconds else None
            ),
            "definitions_version": self.definitions_version,
            "took_seconds": self.took_seconds,
        }


@dataclass(frozen=True, slots=True)
class Platform:
    id: str
    cell: str
    name: str
    tier: str
    type: str
    region: str
    industry_code: str | None
    industry_text: str
    registered: int
    connected: int
    ever_connected: int
    active_24h: int
    active_30d: int
    activity_as_of: datetime | None
    sequence: int
    taken_at: datetime
    released_to: str | None
    released_at: datetime | None


def _key(dimension: str) -> Callable[[Platform], str]:
    return {
        "tier": lambda p: p.tier,
        "type": lambda p: p.type,
        "province": lambda p: classification.province_of(p.region),
        "prefecture": lambda p: classification.prefecture_of(p.region),
        "industry": lambda p: p.industry_code or "unmapped",
        "cell": lambda p: p.cell,
    }[dimension]


def _name(dimension: str, key: str) -> str | None:
    if dimension in ("province", "prefecture"):
        return classification.region_name(key)
    if dimension == "industry":
        return classification.industry_name(key)
    return None


def sums(platforms: Iterable[Platform]) -> dict[str, int]:
    total = dict.fromkeys(("platforms", *FIGURES), 0)
    for p in platforms:
        total["platforms"] += 1
        for name in FIGURES:
            total[name] += getattr(p, name)
    return total


@dataclass(frozen=True, slots=True)
class National:
    """One consistent read of the aggregator's state (one transaction's snapshot)."""

    as_of: datetime
    cells: list[Cell]
    platforms: list[Platform]
    device_sketches: list[tuple[bytes, int, str, int, int]]

    @property
    def fresh(self) -> set[str]:
        return {c.name for c in self.cells if c.fresh}

    def counted(self) -> list[Platform]:
        fresh = self.fresh
        return [p for p in self.platforms if p.cell in fresh]

    def stale_platforms(self) -> list[Platform]:
        fresh = self.fresh
        return [p for p in self.platforms if p.cell not in fresh]

    def coverage(self) -> dict[str, Any]:
        fresh = [c for c in self.cells if c.fresh]
        ages = [c.age_seconds for c in fresh if c.age_seconds is not None]
        return {
            "as_of": self.as_of,
            "cells_registered": len(self.cells),
            "cells_covered": len(fresh),
            "cells": sorted(c.name for c in fresh),
            "stale_cells": [
                {"cell": c.name, "age_seconds": c.age_seconds, "taken_at": c.taken_at}
                for c in self.cells
                if not c.fresh
            ],
            "oldest_snapshot_age_seconds": max(ages) if ages else None,
            "definitions_versions": sorted(
                {c.definitions_version for c in fresh if c.definitions_version}
            ),
            "stale_rule": f"a cell is stale after {STALE_INTERVALS} of its intervals without "
            "a snapshot; its last figures are shown apart and not counted",
        }

    def stale_apart(self) -> list[dict[str, Any]]:
        """Stale cells' last figures, each with its age: never added to the totals."""
        by_cell: dict[str, list[Platform]] = defaultdict(list)
        for p in self.stale_platforms():
            by_cell[p.cell].append(p)
        return [
            {
                "cell": c.name,
                "age_seconds": c.age_seconds,
                "taken_at": c.taken_at,
                **sums(by_cell.get(c.name, [])),
            }
            for c in self.cells
            if not c.fresh
        ]

    def distinct(self) -> sketches.Distinct:
        return sketches.union(self.device_sketches)

    def totals(self) -> dict[str, Any]:
        counted = self.counted()
        return {
            "coverage": self.coverage(),
            "totals": sums(counted),
            "moving_platforms": sorted(p.id for p in counted if p.released_to),
            "distinct": self.distinct().describe(),
            "stale": self.stale_apart(),
        }

    def breakdown(self, dimension: str) -> dict[str, Any]:
        return {
            "coverage": self.coverage(),
            "dimension": dimension,
            "rows": self.rows(dimension, self.counted()),
            "stale_rows": self.rows(dimension, self.stale_platforms()),
        }

    def rows(self, dimension: str, platforms: list[Platform]) -> list[dict[str, Any]]:
        key = _key(dimension)
        grouped: dict[str, list[Platform]] = defaultdict(list)
        for p in platforms:
            grouped[key(p)].append(p)
        return [
            {"key": k, "name": _name(dimension, k), **sums(grouped[k])} for k in sorted(grouped)
        ]

    def per_cell(self) -> dict[str, Any]:
        grouped: dict[str, list[Platform]] = defaultdict(list)
        for p in self.platforms:
            grouped[p.cell].append(p)
        return {
            "coverage": self.coverage(),
            "cells": [c.describe() | sums(grouped.get(c.name, [])) for c in self.cells],
        }

    def per_platform(self) -> dict[str, Any]:
        fresh = self.fresh
        ages = {c.name: c.age_seconds for c in self.cells}
        return {
            "coverage": self.coverage(),
            "platforms": [
                {
                    "platform": p.id,
                    "cell": p.cell,
                    "status": (
                        "stale" if p.cell not in fresh else "moving" if p.released_to else "counted"
                    ),
                    "moving_to": p.released_to,
                    "name": p.name,
                    "tier": p.tier,
                    "type": p.type,
                    "region": p.region,
                    "province": classification.province_of(p.region),
                    "prefecture": classification.prefecture_of(p.region),
                    "industry_code": p.industry_code,
                    "industry_text": p.industry_text,
                    **{name: getattr(p, name) for name in FIGURES},
                    "activity_as_of": p.activity_as_of,
                    "sequence": p.sequence,
                    "taken_at": p.taken_at,
                    "age_seconds": ages.get(p.cell),
                }
                for p in self.platforms
            ],
        }


async def read(conn: AsyncConnection[Any]) -> National:
    """Reads everything in one repeatable-read transaction: figures, coverage and sketches agree."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur = await conn.execute(CELLS, (STALE_INTERVALS,))
        rows = await cur.fetchall()
        cells = [Cell(*row[:9]) for row in rows]
        as_of = rows[0][9] if rows else None
        cur = await conn.execute(PLATFORMS)
        platforms = [Platform(*row) for row in await cur.fetchall()]
        fresh = [c.name for c in cells if c.fresh]
        cur = await conn.execute(LATEST_SKETCHES, (fresh,))
        found = [(bytes(r[0]), r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]
        if as_of is None:
            cur = await conn.execute("SELECT now()")
            now = await cur.fetchone()
            assert now is not None
            as_of = now[0]
    return National(as_of, cells, platforms, found)
