"""Device and gateway registration and liveness bookkeeping, done per batch of messages."""

from collections.abc import Collection, Mapping, Set
from itertools import islice
from typing import Any

from psycopg import AsyncConnection

from registry.arrays import BigintArray
from registry.connection import Counters
from registry.platforms import Platform, fetch_platforms

Key = tuple[str, str]
"""(platform id, device or gateway id) as they appear in topics."""

SELECT_DEVICE_IDS = """
SELECT d.id, d.platform_id, d.device_id
FROM devices d
JOIN unnest(%b::text[], %b::text[]) AS k(platform_id, device_id)
  ON d.platform_id = k.platform_id AND d.device_id = k.device_id
WHERE d.decommissioned_at IS NULL
"""
# Keys arrive sorted, so concurrent ingest processes take the unique-index locks in one order.
REGISTER_DEVICES = """
INSERT INTO devices (platform_id, device_id)
SELECT * FROM unnest(%b::text[], %b::text[])
ON CONFLICT (platform_id, device_id) DO NOTHING
RETURNING id, platform_id, device_id
"""
SELECT_GATEWAY_IDS = """
SELECT g.id, g.platform_id, g.gateway_id
FROM gateways g
JOIN unnest(%b::text[], %b::text[]) AS k(platform_id, gateway_id)
  ON g.platform_id = k.platform_id AND g.gateway_id = k.gateway_id
"""
REGISTER_GATEWAYS = """
INSERT INTO gateways (platform_id, gateway_id)
SELECT * FROM unnest(%b::text[], %b::text[])
ON CONFLICT (platform_id, gateway_id) DO NOTHING
RETURNING id, platform_id, gateway_id
"""
# Run with the old and new gateways locked (registry.connection.lock_gateways). Returns, per
# platform, how the connected count changes: an online device that moves from an unreachable
# gateway to a reachable one (or back) changes it.
ASSIGN_GATEWAYS = """
WITH old AS (
    SELECT id, via_gateway FROM devices WHERE id = ANY(%(ids)b) ORDER BY id FOR UPDATE
), moved AS (
    UPDATE devices d SET via_gateway = k.gateway
    FROM unnest(%(ids)b::bigint[], %(gateways)b::bigint[]) AS k(id, gateway), old
    WHERE d.id = ANY(%(ids)b) AND d.id = k.id AND old.id = k.id
      AND d.via_gateway IS DISTINCT FROM k.gateway
    RETURNING d.platform_id, d.state, old.via_gateway AS before, d.via_gateway AS after
)
SELECT m.platform_id,
       sum((gn.state = 'online')::int - (go.id IS NULL OR go.state = 'online')::int)
FROM moved m
JOIN gateways gn ON gn.id = m.after
LEFT JOIN gateways go ON go.id = m.before
WHERE m.state = 'online'
GROUP BY m.platform_id
"""


DEFAULT_MAX_CACHED_IDS = 1_000_000
# The share of a full cache dropped at once, oldest first: eviction copies what stays, so it
# runs once per this many new ids, not with every batch.
_EVICT_SHARE = 4


def _evict_oldest(cache: dict[Any, Any], incoming: int, bound: int) -> dict[Any, Any]:
    """`cache` with room for `incoming` more entries within `bound`: the oldest-cached quarter
    (or what it takes) dropped. A new dict, so a mapping handed out earlier stays whole."""
    if len(cache) + incoming <= bound:
        return cache
    drop = max(len(cache) + incoming - bound, bound // _EVICT_SHARE)
    return dict(islice(cache.items(), drop, None))


class Identities:
    """Maps (platform, external id) to the internal id of one table's rows, registering new ones.

    Ids never change once assigned, so they are cached, up to `max_cached` (the oldest cached
    are dropped first, and read from the store again when they are next seen); only ids of
    committed rows may be cached (`remember()` after the registering transaction committed).
    """

    def __init__(
        self, select: str, register: str, *, max_cached: int = DEFAULT_MAX_CACHED_IDS
    ) -> None:
        self._select_sql = select
        self._register_sql = register
        self._ids: dict[Key, int] = {}
        self._max_cached = max_cached

    async def resolve(
        self, conn: AsyncConnection[Any], keys: set[Key], *, provision: Set[str]
    ) -> tuple[Mapping[Key, int], dict[Key, int], list[Key]]:
        """Finds the rows of `keys`, registering those that do not exist yet on the platforms
        in `provision`. Returns the ids to look the keys up in (keys without a row are missing;
        other keys may be there too), the ids read from the store (to `remember()` once this
        transaction committed) and the keys this call registered."""
        cached = self._ids
        # Not `keys - cached.keys()`: that walks every cached key (a million, every batch);
        # difference() with the dict looks up the batch's keys only.
        missing = keys.difference(cached)
        if not missing:  # the usual case: look up in the cache itself, no copy per batch
            return cached, {}, []
        new = await self._run(conn, self._select_sql, sorted(missing))
        unregistered = sorted(k for k in missing if k not in new and k[0] in provision)
        registered: list[Key] = []
        if unregistered:
            inserted = await self._run(conn, self._register_sql, unregistered)
            registered = sorted(inserted)
            new.update(inserted)
            # Another process may have registered some in between: read those back.
            raced = [k for k in unregistered if k not in new]
            if raced:
                new.update(await self._run(conn, self._select_sql, raced))
        found = {k: cached[k] for k in keys - missing}
        found.update(new)
        return found, new, registered

    def forget(self) -> None:
        self._ids = {}

    def remember(self, ids: dict[Key, int]) -> None:
        # Eviction makes a new dict rather than deleting: what resolve() returned (the cache
        # itself, when every key was cached) stays valid for its caller.
        self._ids = _evict_oldest(self._ids, len(ids), self._max_cached)
        self._ids.update(ids)

    def __len__(self) -> int:
        return len(self._ids)

    @staticmethod
    async def _run(conn: AsyncConnection[Any], query: str, keys: list[Key]) -> dict[Key, int]:
        cur = await conn.execute(query, ([k[0] for k in keys], [k[1] for k in keys]))
        return {(p, x): i for i, p, x in await cur.fetchall()}


class DeviceDirectory:
    """Platforms, devices and gateways as ingest sees them, cached.

    Platforms are cached once found; a platform not found is asked for again in the next batch
    that names it, so a platform created while ingest runs is picked up. Device ids, gateway ids
    and the gateway each device was seen through are each bounded by `max_cached_ids`
    (IIOT_DEVICE_CACHE_MAX): what memory they take grows with it (bench/id_cache_memory.py).
    """

    def __init__(self, *, max_cached_ids: int = DEFAULT_MAX_CACHED_IDS) -> None:
        self.max_cached_ids = max_cached_ids
        self._platforms: dict[str, Platform] = {}
        self.devices = Identities(SELECT_DEVICE_IDS, REGISTER_DEVICES, max_cached=max_cached_ids)
        self.gateways = Identities(SELECT_GATEWAY_IDS, REGISTER_GATEWAYS, max_cached=max_cached_ids)
        self._via: dict[int, int] = {}

    async def platforms(
        self, conn: AsyncConnection[Any], platform_ids: Collection[str]
    ) -> dict[str, Platform]:
        """The known platforms among `platform_ids`; unknown ones are missing from the result."""
        missing = [p for p in platform_ids if p not in self._platforms]
        if missing:
            self._platforms.update(await fetch_platforms(conn, sorted(missing)))
        return {p: self._platforms[p] for p in platform_ids if p in self._platforms}

    def forget(self) -> None:
        """Drops every cached platform and id (after an operator changed the registry)."""
        self._platforms.clear()
        self.devices.forget()
        self.gateways.forget()
        self._via.clear()

    def moved(self, via: dict[int, int]) -> dict[int, int]:
        """The devices of `via` whose gateway may differ from the one on record."""
        return {d: g for d, g in via.items() if self._via.get(d) != g}

    @staticmethod
    async def assign_gateways(
        conn: AsyncConnection[Any], moved: dict[int, int], counters: Counters
    ) -> None:
        """Records the gateway each device was seen through (with the gateways locked)."""
        if moved:
            ids = sorted(moved)
            cur = await conn.execute(
                ASSIGN_GATEWAYS,
                {"ids": BigintArray(ids), "gateways": BigintArray([moved[d] for d in ids])},
            )
            for platform, connected in await cur.fetchall():
                counters.add(platform, connected=connected)

    def remember_via(self, via: dict[int, int]) -> None:
        # A device evicted here counts as moved when next seen: its (unchanged) gateway is
        # written again, which changes nothing.
        self._via = _evict_oldest(self._via, len(via), self.max_cached_ids)
        self._via.update(via)
