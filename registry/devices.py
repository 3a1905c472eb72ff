"""Device registration and liveness bookkeeping, done per batch of ingested messages."""

from collections.abc import Collection, Iterable, Set
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from registry.platforms import Platform, fetch_platforms

DeviceKey = tuple[str, str]
"""(platform id, device id) as they appear in topics."""

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

MARK_SEEN = """
UPDATE devices SET last_seen = %(seen)s, first_seen = coalesce(first_seen, %(seen)s)
WHERE id = ANY(%(ids)s) AND (last_seen IS NULL OR last_seen < %(seen)s)
"""


class DeviceDirectory:
    """Resolves platforms and devices to registry rows, registering unknown devices.

    Device ids are cached (they never change once assigned); platforms are cached once found,
    and a platform not found is asked for again in the next batch that names it.
    """

    def __init__(self, *, max_cached_devices: int = 2_000_000) -> None:
        self._platforms: dict[str, Platform] = {}
        self._devices: dict[DeviceKey, int] = {}
        self._max_cached_devices = max_cached_devices

    async def platforms(
        self, conn: AsyncConnection[Any], platform_ids: Collection[str]
    ) -> dict[str, Platform]:
        """The known platforms among `platform_ids`; unknown ones are missing from the result."""
        missing = [p for p in platform_ids if p not in self._platforms]
        if missing:
            self._platforms.update(await fetch_platforms(conn, sorted(missing)))
        return {p: self._platforms[p] for p in platform_ids if p in self._platforms}

    async def resolve(
        self, conn: AsyncConnection[Any], keys: Iterable[DeviceKey], *, register: Set[DeviceKey]
    ) -> tuple[dict[DeviceKey, int], int]:
        """Internal ids of the registered devices among `keys`, registering those in `register`
        that do not exist yet. Returns the ids and how many devices this call registered.

        Call it inside a transaction of its own and `remember()` the ids once that committed:
        a cached id must name a row that exists.
        """
        wanted = set(keys)
        found = {k: self._devices[k] for k in wanted if k in self._devices}
        missing = sorted(wanted - found.keys())
        registered = 0
        if missing:
            fetched = await self._select(conn, missing)
            unregistered = [k for k in missing if k not in fetched and k in register]
            if unregistered:
                new = await self._register(conn, unregistered)
                registered = len(new)
                fetched.update(new)
                # Another process may have registered some in between: read those back.
                raced = [k for k in unregistered if k not in fetched]
                if raced:
                    fetched.update(await self._select(conn, raced))
            found.update(fetched)
        return found, registered

    def remember(self, ids: dict[DeviceKey, int]) -> None:
        """Caches ids whose rows are committed."""
        if len(self._devices) + len(ids) > self._max_cached_devices:
            self._devices.clear()
        self._devices.update(ids)

    def forget_platform(self, platform_id: str) -> None:
        self._platforms.pop(platform_id, None)

    @staticmethod
    async def mark_seen(conn: AsyncConnection[Any], device_ids: list[int], seen: datetime) -> None:
        if device_ids:
            await conn.execute(MARK_SEEN, {"ids": sorted(device_ids), "seen": seen})

    @staticmethod
    async def _select(conn: AsyncConnection[Any], keys: list[DeviceKey]) -> dict[DeviceKey, int]:
        cur = await conn.execute(SELECT_DEVICE_IDS, ([k[0] for k in keys], [k[1] for k in keys]))
        return {(p, d): i for i, p, d in await cur.fetchall()}

    @staticmethod
    async def _register(conn: AsyncConnection[Any], keys: list[DeviceKey]) -> dict[DeviceKey, int]:
        cur = await conn.execute(REGISTER_DEVICES, ([k[0] for k in keys], [k[1] for k in keys]))
        return {(p, d): i for i, p, d in await cur.fetchall()}
