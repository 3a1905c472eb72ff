"""Operators' management of devices: register (in bulk), update, decommission.

Every change moves the platform's counters in the same transaction and tells running ingest
processes (NOTIFY iiot_registry) to drop what they cached about the platform's devices.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from registry.connection import Counters, lock_gateways
from registry.errors import Invalid, NotFound
from registry.ids import is_reserved_device_id, reserved_device_id
from registry.json_limits import MAX_BYTES, MAX_KEYS
from registry.notifications import announce

MAX_BULK: Final = 10_000

# Two statements, each counting only what it changed under its row locks, so that concurrent
# registrations of the same device count it once: first return decommissioned devices to
# service, then insert the new ones (xmax = 0 marks a row this statement inserted).
REACTIVATE_DEVICES = """
UPDATE devices d SET decommissioned_at = NULL, metadata = d.metadata || i.metadata
FROM unnest(%(devices)s::text[], %(metadata)s::jsonb[]) AS i(device_id, metadata)
WHERE d.platform_id = %(platform)s AND d.device_id = i.device_id
  AND d.decommissioned_at IS NOT NULL
RETURNING d.first_seen IS NOT NULL
"""
REGISTER_DEVICES = """
INSERT INTO devices (platform_id, device_id, metadata)
SELECT %(platform)s, device_id, metadata
FROM unnest(%(devices)s::text[], %(metadata)s::jsonb[]) AS i(device_id, metadata)
ORDER BY device_id
ON CONFLICT (platform_id, device_id) DO UPDATE SET metadata = devices.metadata || EXCLUDED.metadata
RETURNING xmax = 0, device_id
"""

# Merging adds one document's keys to another's: the merged metadata keeps the limits each
# document was checked against (registry/json_limits.py). Its depth cannot grow (`||` merges
# the top level). Size as jsonb's text, keys counted at every level.
MERGED_BEYOND_LIMITS = """
SELECT device_id, bytes, keys FROM devices,
LATERAL (SELECT octet_length(metadata::text) AS bytes,
                jsonb_array_length(jsonb_path_query_array(
                    metadata, 'strict $.** ? (@.type() == "object").keyvalue()')) AS keys) s
WHERE platform_id = %(platform)s AND device_id = ANY(%(devices)s)
  AND (bytes > %(max_bytes)s OR keys > %(max_keys)s)
ORDER BY device_id LIMIT 1
"""

SELECT_LIVE_IDS = """
SELECT id FROM devices
WHERE platform_id = %s AND device_id = ANY(%s) AND decommissioned_at IS NULL
ORDER BY id
"""

# Run with the devices' gateways locked.
DECOMMISSION = """
WITH target AS (
    SELECT id, state, first_seen IS NOT NULL AS seen, via_gateway FROM devices
    WHERE id = ANY(%(ids)s) AND decommissioned_at IS NULL
    ORDER BY id FOR UPDATE
), changed AS (
    UPDATE devices d SET decommissioned_at = now(), state = 'offline', expires_at = NULL,
        state_changed_at = CASE WHEN t.state = 'online' THEN now() ELSE d.state_changed_at END
    FROM target t WHERE d.id = ANY(%(ids)s) AND d.id = t.id
    RETURNING d.id, d.platform_id, t.state AS before, t.seen, t.via_gateway
), flips AS (
    INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)
    SELECT now(), platform_id, 'device', id, 'offline', 'decommissioned'
    FROM changed WHERE before = 'online'
)
SELECT count(*),
       count(*) FILTER (WHERE c.before = 'online' AND (g.id IS NULL OR g.state = 'online')),
       count(*) FILTER (WHERE c.seen)
FROM changed c LEFT JOIN gateways g ON g.id = c.via_gateway
"""

UPDATE_METADATA = """
UPDATE devices SET metadata = metadata || %s
WHERE platform_id = %s AND device_id = %s AND decommissioned_at IS NULL
RETURNING id
"""

DEVICE_COLUMNS = """
d.device_id, d.platform_id, g.gateway_id AS gateway, d.state,
d.state = 'online' AND (g.id IS NULL OR g.state = 'online') AS connected,
d.state_changed_at, d.first_seen, d.last_seen, d.metadata, d.created_at
"""
GET_DEVICE = f"""
SELECT {DEVICE_COLUMNS}
FROM devices d LEFT JOIN gateways g ON g.id = d.via_gateway
WHERE d.platform_id = %s AND d.device_id = %s AND d.decommissioned_at IS NULL
"""


# Search within a platform, in device id order, a page at a time. `connected` is the state the
# counts use; `metadata` is JSON containment (uses no index: the platform's rows are scanned in
# id order, and the page limit bounds the work per request).
LIST_DEVICES = f"""
SELECT {DEVICE_COLUMNS}
FROM devices d LEFT JOIN gateways g ON g.id = d.via_gateway
WHERE d.platform_id = %(platform)s AND d.decommissioned_at IS NULL
  AND (%(after)s::text IS NULL OR d.device_id > %(after)s)
  AND (%(gateway)s::text IS NULL OR g.gateway_id = %(gateway)s)
  AND (%(connected)s::boolean IS NULL
       OR (d.state = 'online' AND (g.id IS NULL OR g.state = 'online')) = %(connected)s)
  AND (%(metadata)s::jsonb IS NULL OR d.metadata @> %(metadata)s)
ORDER BY d.device_id
LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    platform_id: str
    gateway: str | None
    state: str
    connected: bool
    state_changed_at: datetime | None
    first_seen: datetime | None
    last_seen: datetime | None
    metadata: dict[str, Any]
    created_at: datetime


async def register_devices(
    conn: AsyncConnection[Any],
    platform: str,
    devices: list[tuple[str, dict[str, Any]]],
    *,
    shard: int,
) -> int:
    """Registers devices (or returns decommissioned ones to service, merging metadata);
    returns how many are newly counted as registered. Call within a transaction."""
    reserved = [d for d, _ in devices if is_reserved_device_id(d)]
    if reserved:
        raise Invalid(f"reserved_device_id: {reserved_device_id(reserved[0])}")
    given = dict(devices)  # one entry per id
    ordered = sorted(given.items())  # in lock order
    args = {
        "platform": platform,
        "devices": [d for d, _ in ordered],
        "metadata": [Jsonb(m) for _, m in ordered],
    }
    cur = await conn.execute(REACTIVATE_DEVICES, args)
    returned = [row[0] for row in await cur.fetchall()]
    cur = await conn.execute(REGISTER_DEVICES, args)
    rows = await cur.fetchall()
    inserted = sum(1 for new, _ in rows if new)
    # Inserted metadata was checked by the API; merged metadata is checked as merged.
    merged = [device for new, device in rows if not new and given[device]]
    if merged:
        await _check_merged(conn, platform, merged)
    added, seen_again = inserted + len(returned), sum(returned)
    counters = Counters(shard)
    counters.add(platform, registered=added, ever=seen_again)
    await counters.flush(conn)
    await announce(conn, platform)
    return int(added)


async def decommission_devices(
    conn: AsyncConnection[Any], platform: str, device_ids: list[str], *, shard: int
) -> int:
    """Takes devices out of service: not registered, not connected, their data refused.
    Returns how many were decommissioned. Call within a transaction."""
    cur = await conn.execute(SELECT_LIVE_IDS, (platform, device_ids))
    ids = [row[0] for row in await cur.fetchall()]
    if not ids:
        return 0
    await lock_gateways(conn, [], ids)
    cur = await conn.execute(DECOMMISSION, {"ids": ids})
    row = await cur.fetchone()
    assert row is not None
    removed, connected, seen = row
    counters = Counters(shard)
    counters.add(platform, registered=-removed, connected=-connected, ever=-seen)
    await counters.flush(conn)
    await announce(conn, platform)
    return int(removed)


async def update_device_metadata(
    conn: AsyncConnection[Any], platform: str, device_id: str, metadata: dict[str, Any]
) -> Device:
    """Merges `metadata` into the device's; call within a transaction (a merged document
    beyond the limits raises Invalid, and the transaction must roll back)."""
    cur = await conn.execute(UPDATE_METADATA, (Jsonb(metadata), platform, device_id))
    if await cur.fetchone() is None:
        raise NotFound(f"device {device_id!r} on platform {platform!r}")
    await _check_merged(conn, platform, [device_id])
    return await get_device(conn, platform, device_id)


async def _check_merged(conn: AsyncConnection[Any], platform: str, devices: list[str]) -> None:
    limits = {"max_bytes": MAX_BYTES, "max_keys": MAX_KEYS}
    cur = await conn.execute(
        MERGED_BEYOND_LIMITS, {"platform": platform, "devices": devices, **limits}
    )
    row = await cur.fetchone()
    if row is not None:
        device, size, keys = row
        raise Invalid(
            f"device {device!r}: its merged metadata would have {keys} keys and {size} bytes; "
            f"the limits are {MAX_KEYS} keys (max_keys) and {MAX_BYTES} bytes (max_bytes)"
        )


async def get_device(conn: AsyncConnection[Any], platform: str, device_id: str) -> Device:
    async with conn.cursor(row_factory=class_row(Device)) as cur:
        await cur.execute(GET_DEVICE, (platform, device_id))
        device = await cur.fetchone()
    if device is None:
        raise NotFound(f"device {device_id!r} on platform {platform!r}")
    return device


async def list_devices(
    conn: AsyncConnection[Any],
    platform: str,
    *,
    after: str | None = None,
    gateway: str | None = None,
    connected: bool | None = None,
    metadata: dict[str, Any] | None = None,
    limit: int = 500,
) -> list[Device]:
    async with conn.cursor(row_factory=class_row(Device)) as cur:
        await cur.execute(
            LIST_DEVICES,
            {
                "platform": platform,
                "after": after,
                "gateway": gateway,
                "connected": connected,
                "metadata": Jsonb(metadata) if metadata is not None else None,
                "limit": limit,
            },
        )
        return await cur.fetchall()
