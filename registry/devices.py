"""Device and gateway registration and liveness bookkeeping, done per batch of messages."""

from collections.abc import Collection, Iterable, Set
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from registry.platforms import Platform, fetch_platforms

Key = tuple[str, str]
"""(platform id, device or gateway id) as they appear in topics."""

SELECT_DEVICE_IDS = """
SELECT d.id, d.platform_id, d.device_id
FROM devices d
JOIN unnest(%s::text[], %s::text[]) AS k(platform_id, device_id)
  ON d.platform_id = k.platform_id AND d.device_id = k.device_id
"""
# Keys arrive sorted, so concurrent ingest processes take the unique-index locks in one order.
REGISTER_DEVICES = """
INSERT INTO devices (platform_id, device_id)
SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT (platform_id, device_id) DO NOTHING
RETURNING id, platform_id, device_id
"""
SELECT_GATEWAY_IDS = """
SELECT g.id, g.platform_id, g.gateway_id
FROM gateways g
JOIN unnest(%s::text[], %s::text[]) AS k(platform_id, gateway_id)
  ON g.platform_id = k.platform_id AND g.gateway_id = k.gateway_id
"""
REGISTER_GATEWAYS = """
INSERT INTO gateways (platform_id, gateway_id)
SELECT * FROM unnest(%s::text[], %s::text[])
ON CONFLICT (platform_id, gateway_id) DO NOTHING
RETURNING id, platform_id, gateway_id
"""
ASSIGN_GATEWAYS = """
UPDATE devices d SET via_gateway = k.gateway
FROM unnest(%s::bigint[], %s::bigint[]) AS k(id, gateway)
WHERE d.id = k.id AND d.via_gateway IS DISTINCT FROM k.gateway
"""
MARK_DEVICES_SEEN = """
UPDATE devices SET last_seen = %(seen)s, first_seen = coalesce(first_seen, %(seen)s)
WHERE id = ANY(%(ids)s) AND (last_seen IS NULL OR last_seen < %(seen)s)
"""
MARK_GATEWAYS_SEEN = """
UPDATE gateways SET last_seen = %(seen)s, first_seen = coalesce(first_seen, %(seen)s)
WHERE id = ANY(%(ids)s) AND (last_seen IS NULL OR last_seen < %(seen)s)
"""


class Identities:
    """Maps (platform, external id) to the internal id of one table's rows, registering new ones.

    Ids never change once assigned, so they are cached; only ids of committed rows may be
    cached (`remember()` after the registering transaction committed).
    """

    def __init__(self, select: str, register: str, *, max_cached: int = 2_000_000) -> None:
        self._select_sql = select
        self._register_sql = register
        self._ids: dict[Key, int] = {}
        self._max_cached = max_cached

    async def resolve(
        self, conn: AsyncConnection[Any], keys: Iterable[Key], *, register: Set[Key]
    ) -> tuple[dict[Key, int], int]:
        """Ids of the existing rows among `keys`, registering those in `register` that do not
        exist yet. Returns the ids and how many rows this call registered."""
        wanted = set(keys)
        found = {k: self._ids[k] for k in wanted if k in self._ids}
        missing = sorted(wanted - found.keys())
        registered = 0
        if missing:
            found.update(await self._run(conn, self._select_sql, missing))
            unregistered = [k for k in missing if k not in found and k in register]
            if unregistered:
                new = await self._run(conn, self._register_sql, unregistered)
                registered = len(new)
                found.update(new)
                # Another process may have registered some in between: read those back.
                raced = [k for k in unregistered if k not in found]
                if raced:
                    found.update(await self._run(conn, self._select_sql, raced))
        return found, registered

    def remember(self, ids: dict[Key, int]) -> None:
        if len(self._ids) + len(ids) > self._max_cached:
            self._ids.clear()
        self._ids.update(ids)

    @staticmethod
    async def _run(conn: AsyncConnection[Any], query: str, keys: list[Key]) -> dict[Key, int]:
        cur = await conn.execute(query, ([k[0] for k in keys], [k[1] for k in keys]))
        return {(p, x): i for i, p, x in await cur.fetchall()}


class DeviceDirectory:
    """Platforms, devices and gateways as ingest sees them, cached.

    Platforms are cached once found; a platform not found is asked for again in the next batch
    that names it, so a platform created while ingest runs is picked up.
    """

    def __init__(self, *, max_cached_devices: int = 2_000_000) -> None:
        self._platforms: dict[str, Platform] = {}
        self.devices = Identities(
            SELECT_DEVICE_IDS, REGISTER_DEVICES, max_cached=max_cached_devices
        )
        self.gateways = Identities(SELECT_GATEWAY_IDS, REGISTER_GATEWAYS)
        self._via: dict[int, int] = {}

    async def platforms(
        self, conn: AsyncConnection[Any], platform_ids: Collection[str]
    ) -> dict[str, Platform]:
        """The known platforms among `platform_ids`; unknown ones are missing from the result."""
        missing = [p for p in platform_ids if p not in self._platforms]
        if missing:
            self._platforms.update(await fetch_platforms(conn, sorted(missing)))
        return {p: self._platforms[p] for p in platform_ids if p in self._platforms}

    def forget_platform(self, platform_id: str) -> None:
        self._platforms.pop(platform_id, None)

    async def assign_gateways(
        self, conn: AsyncConnection[Any], via: dict[int, int]
    ) -> dict[int, int]:
        """Records which gateway each device was seen through; returns what to `remember_via`."""
        changed = {d: g for d, g in via.items() if self._via.get(d) != g}
        if changed:
            ids = sorted(changed)
            await conn.execute(ASSIGN_GATEWAYS, (ids, [changed[d] for d in ids]))
        return changed

    def remember_via(self, via: dict[int, int]) -> None:
        self._via.update(via)

    @staticmethod
    async def mark_seen(
        conn: AsyncConnection[Any], devices: list[int], gateways: list[int], seen: datetime
    ) -> None:
        if devices:
            await conn.execute(MARK_DEVICES_SEEN, {"ids": sorted(devices), "seen": seen})
        if gateways:
            await conn.execute(MARK_GATEWAYS_SEEN, {"ids": sorted(gateways), "seen": seen})
