"""Platforms' industry text mapped to GB/T 4754-2017 (migration 0031): a dictionary from text
to a section or division, looked up by the view `platform_industries`; a text it does not hold
is kept and flagged until an administrator maps it."""

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from registry import classification
from registry.errors import Invalid, NotFound

PLATFORM_INDUSTRY = "SELECT text, industry FROM platform_industries WHERE platform_id = %s"
UNMAPPED = """
SELECT text, count(*), array_agg(platform_id ORDER BY platform_id) FROM platform_industries
WHERE flagged GROUP BY text ORDER BY text
"""
SET_MAPPING = """
INSERT INTO industry_mappings (text, industry, mapped_by) VALUES (lower(btrim(%s)), %s, 'admin')
ON CONFLICT (text) DO UPDATE SET industry = excluded.industry, mapped_by = 'admin',
    mapped_at = now()
"""


@dataclass(frozen=True, slots=True)
class PlatformIndustry:
    text: str
    industry: str | None  # a section letter or a division; None: the text is not mapped


@dataclass(frozen=True, slots=True)
class Unmapped:
    text: str
    platforms: int
    platform_ids: list[str]


async def platform_industry(conn: AsyncConnection[Any], platform: str) -> PlatformIndustry:
    cur = await conn.execute(PLATFORM_INDUSTRY, (platform,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"platform {platform!r}")
    return PlatformIndustry(*row)


async def unmapped(conn: AsyncConnection[Any]) -> list[Unmapped]:
    """The industry texts of platforms that map to nothing, with the platforms using each."""
    cur = await conn.execute(UNMAPPED)
    return [Unmapped(*row) for row in await cur.fetchall()]


async def map_text(conn: AsyncConnection[Any], text: str, industry: str) -> str:
    """Maps an industry text (as platforms spell it, any case) to a section or division."""
    code = industry.strip().upper()
    if code not in classification.industries():
        raise Invalid(f"{industry!r} is not a GB/T 4754-2017 section letter or division")
    if not text.strip():
        raise Invalid("the text to map is empty")
    await conn.execute(SET_MAPPING, (text, code))
    return code
