"""The metric-name dictionary: telemetry rows carry small integer ids instead of names."""

from collections.abc import Collection
from typing import Any

from psycopg import AsyncConnection

REGISTER_NAMES = """
INSERT INTO metrics (name) SELECT unnest(%s::text[])
ON CONFLICT (name) DO NOTHING
"""
SELECT_IDS = "SELECT name, id FROM metrics WHERE name = ANY(%s)"


class MetricNames:
    """Resolves metric names to ids, registering new names; ids never change, so all are cached."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    async def resolve(self, conn: AsyncConnection[Any], names: Collection[str]) -> dict[str, int]:
        """Ids of `names`, registering new ones. Call it in a transaction of its own and
        `remember()` the result once that committed."""
        found = {n: self._ids[n] for n in names if n in self._ids}
        missing = sorted(set(names) - found.keys())
        if missing:
            cur = await conn.execute(SELECT_IDS, (missing,))
            found.update(await cur.fetchall())
            new = [n for n in missing if n not in found]
            if new:
                await conn.execute(REGISTER_NAMES, (new,))
                cur = await conn.execute(SELECT_IDS, (new,))
                found.update(await cur.fetchall())
        return found

    def remember(self, ids: dict[str, int]) -> None:
        self._ids.update(ids)
