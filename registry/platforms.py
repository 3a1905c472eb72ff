"""Platforms: the tenants devices belong to."""

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb


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


UPSERT_PLATFORM = """
INSERT INTO platforms (id, name, tier, type, region, industry, liveness_seconds, auto_provision,
                       metadata)
VALUES (%(id)s, %(name)s, %(tier)s, %(type)s, %(region)s, %(industry)s, %(liveness_seconds)s,
        %(auto_provision)s, %(metadata)s)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, tier = EXCLUDED.tier, type = EXCLUDED.type, region = EXCLUDED.region,
    industry = EXCLUDED.industry, liveness_seconds = EXCLUDED.liveness_seconds,
    auto_provision = EXCLUDED.auto_provision, metadata = EXCLUDED.metadata
RETURNING id, name, tier, type, region, industry, liveness_seconds, auto_provision
"""

SELECT_PLATFORMS = """
SELECT id, name, tier, type, region, industry, liveness_seconds, auto_provision
FROM platforms WHERE id = ANY(%s)
"""


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
    return row


async def fetch_platforms(conn: AsyncConnection[Any], ids: list[str]) -> dict[str, Platform]:
    async with conn.cursor(row_factory=class_row(Platform)) as cur:
        await cur.execute(SELECT_PLATFORMS, (ids,))
        return {p.id: p for p in await cur.fetchall()}
