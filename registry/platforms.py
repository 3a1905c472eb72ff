"""Platforms: the tenants devices belong to."""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from registry.errors import Conflict, NotFound
from registry.notifications import announce


class Tier(StrEnum):
    """The four levels of the 2026-2028 industrial internet platform plan."""

    BASIC = "basic"
    GROWTH = "growth"
    LEADING = "leading"
    ECOSYSTEM = "ecosystem"


class PlatformType(StrEnum):
    PROFESSIONAL = "professional"
    INDUSTRY = "industry"
    COLLABORATIVE = "collaborative"


@dataclass(frozen=True, slots=True)
class Platform:
    id: str
    name: str
    tier: str
    type: str
    region: str
    industry: str
    liveness_seconds: int
    auto_provision: bool
    metadata: dict[str, Any]
    created_at: datetime
    # Set when the platform moved to another cell (registry/moves.py): the cell and when.
    moved_to: str | None = None
    moved_at: datetime | None = None
    # The GB/T 4754 section or division its industry text maps to (migration 0031); None when
    # the text is not mapped. Read only, like the move.
    industry_code: str | None = None


COLUMNS = (
    "id, name, tier, type, region, industry, liveness_seconds, auto_provision, metadata, created_at"
)
# Reads say whether the platform moved (migration 0032); writes return the fields they set.
READ_COLUMNS = f"""{COLUMNS}, moved_to, moved_at,
(SELECT m.industry FROM industry_mappings m WHERE m.text = lower(btrim(platforms.industry)))
    AS industry_code"""
# Fields an operator may change; the id never changes.
MUTABLE = (
    "name",
    "tier",
    "type",
    "region",
    "industry",
    "liveness_seconds",
    "auto_provision",
    "metadata",
)


UPSERT_PLATFORM = f"""
INSERT INTO platforms (id, name, tier, type, region, industry, liveness_seconds, auto_provision,
                       metadata)
VALUES (%(id)s, %(name)s, %(tier)s, %(type)s, %(region)s, %(industry)s, %(liveness_seconds)s,
        %(auto_provision)s, %(metadata)s)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, tier = EXCLUDED.tier, type = EXCLUDED.type, region = EXCLUDED.region,
    industry = EXCLUDED.industry, liveness_seconds = EXCLUDED.liveness_seconds,
    auto_provision = EXCLUDED.auto_provision, metadata = EXCLUDED.metadata
RETURNING {COLUMNS}
"""

INSERT_PLATFORM = f"""
INSERT INTO platforms (id, name, tier, type, region, industry, liveness_seconds, auto_provision,
                       metadata)
VALUES (%(id)s, %(name)s, %(tier)s, %(type)s, %(region)s, %(industry)s, %(liveness_seconds)s,
        %(auto_provision)s, %(metadata)s)
ON CONFLICT (id) DO NOTHING
RETURNING {COLUMNS}
"""

# Every mutable field is set from itself unless a new value is given (NULL means "keep").
UPDATE_PLATFORM = f"""
UPDATE platforms SET
    name = coalesce(%(name)s, name), tier = coalesce(%(tier)s, tier),
    type = coalesce(%(type)s, type), region = coalesce(%(region)s, region),
    industry = coalesce(%(industry)s, industry),
    liveness_seconds = coalesce(%(liveness_seconds)s, liveness_seconds),
    auto_provision = coalesce(%(auto_provision)s, auto_provision),
    metadata = coalesce(%(metadata)s, metadata)
WHERE id = %(id)s
RETURNING {COLUMNS}
"""

SELECT_PLATFORMS = f"SELECT {READ_COLUMNS} FROM platforms WHERE id = ANY(%s)"
LIST_PLATFORMS = f"""
SELECT {READ_COLUMNS} FROM platforms
WHERE (%(after)s::text IS NULL OR id > %(after)s)
  AND (%(tier)s::text IS NULL OR tier = %(tier)s)
  AND (%(region)s::text IS NULL OR region = %(region)s)
  AND (%(only)s::text IS NULL OR id = %(only)s)
ORDER BY id LIMIT %(limit)s
"""
# The platforms this cell serves: its own, less those moved to another cell (whose traffic is
# refused as `platform_moved`, docs/operations.md "Cells"); what MQTT ingest subscribes to.
# What an MQTT session of this cell subscribes to: the platforms it serves, and those moved away
# less than `hold` seconds ago, whose traffic it still takes in to refuse it, recorded, as
# `platform_moved` while their devices find the new cell (docs/operations.md, "Cells").
SUBSCRIBED_PLATFORM_IDS = """
SELECT id FROM platforms
WHERE moved_to IS NULL OR moved_at > now() - make_interval(secs => %(hold)s)
ORDER BY id
"""
RELEASED_PLATFORM_IDS = """
SELECT id FROM platforms
WHERE moved_to IS NOT NULL AND moved_at <= now() - make_interval(secs => %(hold)s)
ORDER BY id
"""
# Counters start with a row, so a new platform counts zero rather than missing.
INIT_COUNTERS = (
    "INSERT INTO platform_counters (platform_id, shard) VALUES (%s, 0) ON CONFLICT DO NOTHING"
)


async def upsert_platform(
    conn: AsyncConnection[Any],
    platform_id: str,
    *,
    name: str | None = None,
    tier: Tier = Tier.BASIC,
    type: PlatformType = PlatformType.PROFESSIONAL,
    region: str = "000000",
    industry: str = "unspecified",
    liveness_seconds: int = 300,
    auto_provision: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Platform:
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(
            UPSERT_PLATFORM,
            {
                "id": platform_id,
                "name": name or platform_id,
                "tier": tier.value,
                "type": type.value,
                "region": region,
                "industry": industry,
                "liveness_seconds": liveness_seconds,
                "auto_provision": auto_provision,
                "metadata": Jsonb(metadata or {}),
            },
        )
        row = await cur.fetchone()
    assert row is not None  # RETURNING always yields the row
    await conn.execute(INIT_COUNTERS, (platform_id,))
    return row


async def create_platform(conn: AsyncConnection[Any], fields: dict[str, Any]) -> Platform:
    """Creates a platform from validated fields; Conflict if the id is taken."""
    values = {"metadata": {}, **fields}
    values["metadata"] = Jsonb(values["metadata"])
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(INSERT_PLATFORM, values)
        row = await cur.fetchone()
    if row is None:
        raise Conflict(f"platform {fields['id']!r} exists already")
    await conn.execute(INIT_COUNTERS, (row.id,))
    return row


async def update_platform(
    conn: AsyncConnection[Any], platform_id: str, changes: dict[str, Any]
) -> Platform:
    """Applies the given fields (others keep their value); NotFound if there is no such platform."""
    values: dict[str, Any] = dict.fromkeys(MUTABLE)
    values.update(changes)
    if values["metadata"] is not None:
        values["metadata"] = Jsonb(values["metadata"])
    values["id"] = platform_id
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(UPDATE_PLATFORM, values)
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"platform {platform_id!r}")
    await announce(conn, platform_id)
    return row


async def get_platform(conn: AsyncConnection[Any], platform_id: str) -> Platform:
    found = await fetch_platforms(conn, [platform_id])
    if platform_id not in found:
        raise NotFound(f"platform {platform_id!r}")
    return found[platform_id]


async def list_platforms(
    conn: AsyncConnection[Any],
    *,
    after: str | None = None,
    limit: int = 100,
    tier: str | None = None,
    region: str | None = None,
    only: str | None = None,
) -> list[Platform]:
    """Platforms in id order after `after`; `only`: just that one (a platform key's view)."""
    args = {"after": after, "limit": limit, "tier": tier, "region": region, "only": only}
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(LIST_PLATFORMS, args)
        return await cur.fetchall()


async def fetch_platforms(conn: AsyncConnection[Any], ids: list[str]) -> dict[str, Platform]:
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(SELECT_PLATFORMS, (ids,))
        return {p.id: p for p in await cur.fetchall()}


async def subscribed_platform_ids(conn: AsyncConnection[Any], hold_seconds: float) -> list[str]:
    """The platforms this cell serves, and those moved away less than `hold_seconds` ago."""
    cur = await conn.execute(SUBSCRIBED_PLATFORM_IDS, {"hold": hold_seconds})
    return [row[0] for row in await cur.fetchall()]


async def released_platform_ids(conn: AsyncConnection[Any], hold_seconds: float) -> list[str]:
    """The platforms moved away at least `hold_seconds` ago: no longer subscribed to."""
    cur = await conn.execute(RELEASED_PLATFORM_IDS, {"hold": hold_seconds})
    return [row[0] for row in await cur.fetchall()]
