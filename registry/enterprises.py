"""Enterprises a platform serves, and which of its devices and gateways belong to which.

A platform declares the enterprises it serves (each by its unified social credit code,
registry/uscc.py), with or without devices yet. A device belongs to an enterprise by, in
order: its own link; its gateway's link (devices behind a gateway follow it, also when they
move); the platform's rule, a metadata key holding the enterprise's code (for devices
provisioned by their first message, whose metadata an operator or integration sets). The view
`device_enterprises` resolves this in one place.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import class_row

from registry import classification, uscc
from registry.errors import Invalid, NotFound

MAX_BULK: Final = 10_000

COLUMNS = "code, name, industry, above_size, region, region_reason, created_at, updated_at"

# Declarations arrive sorted by code, so concurrent bulk declarations lock in one order.
UPSERT_ENTERPRISES = """
INSERT INTO enterprises AS e (platform_id, code, name, industry, above_size, region,
                              region_reason)
SELECT %(platform)s, * FROM unnest(%(codes)s::text[], %(names)s::text[], %(industries)s::text[],
                                   %(above_size)s::boolean[], %(regions)s::text[],
                                   %(reasons)s::text[])
ON CONFLICT (platform_id, code) DO UPDATE SET
    name = excluded.name, industry = excluded.industry, above_size = excluded.above_size,
    region = excluded.region, region_reason = excluded.region_reason, updated_at = now()
WHERE (e.name, e.industry, e.above_size, e.region, e.region_reason)
      IS DISTINCT FROM (excluded.name, excluded.industry, excluded.above_size, excluded.region,
                        excluded.region_reason)
RETURNING xmax = 0
"""
GET_ENTERPRISE = f"SELECT {COLUMNS} FROM enterprises WHERE platform_id = %s AND code = %s"
LIST_ENTERPRISES = f"""
SELECT {COLUMNS} FROM enterprises
WHERE platform_id = %(platform)s AND (%(after)s::text IS NULL OR code > %(after)s)
  AND (%(industry)s::text IS NULL OR industry = %(industry)s)
  AND (%(region)s::text IS NULL OR region LIKE %(region)s)
ORDER BY code LIMIT %(limit)s
"""
# Its links go with it; devices that named it by the platform's rule simply no longer resolve.
UNLINK_ALL = """
WITH d AS (UPDATE devices SET enterprise = NULL WHERE platform_id = %(platform)s
           AND enterprise = %(code)s RETURNING 1),
     g AS (UPDATE gateways SET enterprise = NULL WHERE platform_id = %(platform)s
           AND enterprise = %(code)s RETURNING 1)
SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM g)
"""
DELETE_ENTERPRISE = "DELETE FROM enterprises WHERE platform_id = %s AND code = %s RETURNING 1"

DECLARED = "SELECT code FROM enterprises WHERE platform_id = %s AND code = ANY(%s)"
# Links set (a code) or cleared (NULL) in id order; returns the ids found.
LINK = {
    "devices": """
UPDATE devices d SET enterprise = k.code
FROM unnest(%(ids)s::text[], %(codes)s::text[]) AS k(id, code)
WHERE d.platform_id = %(platform)s AND d.device_id = k.id AND d.decommissioned_at IS NULL
  AND d.enterprise IS DISTINCT FROM k.code
""",
    "gateways": """
UPDATE gateways g SET enterprise = k.code
FROM unnest(%(ids)s::text[], %(codes)s::text[]) AS k(id, code)
WHERE g.platform_id = %(platform)s AND g.gateway_id = k.id
  AND g.enterprise IS DISTINCT FROM k.code
""",
}
EXISTING = {
    "devices": """
SELECT device_id FROM devices
WHERE platform_id = %s AND device_id = ANY(%s) AND decommissioned_at IS NULL""",
    "gateways": "SELECT gateway_id FROM gateways WHERE platform_id = %s AND gateway_id = ANY(%s)",
}
LINKED_DEVICES = """
SELECT device_id, linked_by FROM device_enterprises
WHERE platform_id = %(platform)s AND enterprise = %(code)s
  AND (%(after)s::text IS NULL OR device_id > %(after)s)
ORDER BY device_id LIMIT %(limit)s
"""
DEVICE_ENTERPRISE = """
SELECT enterprise, linked_by FROM device_enterprises WHERE platform_id = %s AND device_id = %s
"""
GET_RULE = "SELECT metadata_key FROM enterprise_rules WHERE platform_id = %s"
SET_RULE = """
INSERT INTO enterprise_rules (platform_id, metadata_key) VALUES (%s, %s)
ON CONFLICT (platform_id) DO UPDATE SET metadata_key = excluded.metadata_key
"""
CLEAR_RULE = "DELETE FROM enterprise_rules WHERE platform_id = %s"


@dataclass(frozen=True, slots=True)
class Declaration:
    """What a platform says of an enterprise it serves, checked (see `declare`)."""

    code: str
    name: str
    industry: str
    above_size: bool
    region: str
    region_reason: str | None


@dataclass(frozen=True, slots=True)
class Enterprise(Declaration):
    """A declaration as stored."""

    created_at: datetime
    updated_at: datetime


def declare(
    code: str,
    *,
    name: str,
    industry: str,
    above_size: bool,
    region: str | None = None,
    region_reason: str | None = None,
) -> Declaration:
    """Checks a declaration; Invalid says what is wrong.

    The region is the code's characters 3-8; another region needs a reason (an enterprise that
    moved, a division merged since the code was issued)."""
    parsed = uscc.parse(code)
    division = classification.division(industry)
    if above_size and not division.industrial:
        raise Invalid(
            f"above designated size applies to industrial enterprises (sections B, C, D); "
            f"division {division.code} is in section {division.section}"
        )
    name = name.strip()
    if not name:
        raise Invalid("an enterprise needs its registered name")
    reason = region_reason.strip() if region_reason else None
    if region is None or region == parsed.division:
        if reason:
            raise Invalid("a region reason is for a region other than the code's characters 3-8")
        classification.check_region(parsed.division, what="the code's division (characters 3-8)")
        return Declaration(parsed.code, name, division.code, above_size, parsed.division, None)
    classification.check_region(region)
    if not reason:
        raise Invalid(
            f"region {region} differs from the code's characters 3-8 ({parsed.division}): "
            "state the reason (region_reason)"
        )
    return Declaration(parsed.code, name, division.code, above_size, region, reason)


async def upsert_enterprises(
    conn: AsyncConnection[Any], platform: str, declarations: list[Declaration]
) -> tuple[int, int]:
    """Declares (or updates) enterprises the platform serves; returns (added, changed)."""
    ordered = sorted({d.code: d for d in declarations}.values(), key=lambda d: d.code)
    cur = await conn.execute(
        UPSERT_ENTERPRISES,
        {
            "platform": platform,
            "codes": [d.code for d in ordered],
            "names": [d.name for d in ordered],
            "industries": [d.industry for d in ordered],
            "above_size": [d.above_size for d in ordered],
            "regions": [d.region for d in ordered],
            "reasons": [d.region_reason for d in ordered],
        },
    )
    inserted = [row[0] for row in await cur.fetchall()]
    return sum(inserted), len(inserted) - sum(inserted)


async def get_enterprise(conn: AsyncConnection[Any], platform: str, code: str) -> Enterprise:
    async with conn.cursor(row_factory=class_row(Enterprise)) as cur:
        await cur.execute(GET_ENTERPRISE, (platform, code))
        found = await cur.fetchone()
    if found is None:
        raise NotFound(f"enterprise {code!r} on platform {platform!r}")
    return found


async def list_enterprises(
    conn: AsyncConnection[Any],
    platform: str,
    *,
    after: str | None = None,
    industry: str | None = None,
    region: str | None = None,
    limit: int = 500,
) -> list[Enterprise]:
    """`region`: a province or prefecture code matches the enterprises within it."""
    pattern = region
    if region is not None and region.endswith("0000"):
        pattern = region[:2] + "%"
    elif region is not None and region.endswith("00"):
        pattern = region[:4] + "%"
    args = {
        "platform": platform,
        "after": after,
        "industry": industry,
        "region": pattern,
        "limit": limit,
    }
    async with conn.cursor(row_factory=class_row(Enterprise)) as cur:
        await cur.execute(LIST_ENTERPRISES, args)
        return await cur.fetchall()


async def delete_enterprise(
    conn: AsyncConnection[Any], platform: str, code: str
) -> tuple[int, int]:
    """Ends the declaration and its links; returns the (devices, gateways) unlinked."""
    cur = await conn.execute(UNLINK_ALL, {"platform": platform, "code": code})
    row = await cur.fetchone()
    assert row is not None
    cur = await conn.execute(DELETE_ENTERPRISE, (platform, code))
    if await cur.fetchone() is None:
        raise NotFound(f"enterprise {code!r} on platform {platform!r}")
    return int(row[0]), int(row[1])


async def link(
    conn: AsyncConnection[Any], platform: str, kind: str, links: dict[str, str | None]
) -> int:
    """Sets (a code) or clears (None) the enterprise of devices or gateways (`kind`); all or
    nothing: Invalid names the ids that do not exist and the codes the platform has not
    declared. Returns how many links changed."""
    ids = sorted(links)
    cur = await conn.execute(EXISTING[kind], (platform, ids))
    found = {row[0] for row in await cur.fetchall()}
    missing = [i for i in ids if i not in found]
    if missing:
        raise Invalid(f"no such {kind} on platform {platform!r}: {', '.join(missing[:20])}")
    codes = sorted({c for c in links.values() if c is not None})
    cur = await conn.execute(DECLARED, (platform, codes))
    declared = {row[0] for row in await cur.fetchall()}
    undeclared = [c for c in codes if c not in declared]
    if undeclared:
        raise Invalid(
            f"enterprises not declared by platform {platform!r} (declare them first): "
            + ", ".join(undeclared[:20])
        )
    cur = await conn.execute(
        LINK[kind], {"platform": platform, "ids": ids, "codes": [links[i] for i in ids]}
    )
    return cur.rowcount


async def linked_devices(
    conn: AsyncConnection[Any], platform: str, code: str, *, after: str | None, limit: int
) -> list[tuple[str, str]]:
    """The enterprise's devices (device id, how linked) in id order."""
    args = {"platform": platform, "code": code, "after": after, "limit": limit}
    cur = await conn.execute(LINKED_DEVICES, args)
    return [(row[0], row[1]) for row in await cur.fetchall()]


async def device_enterprise(
    conn: AsyncConnection[Any], platform: str, device: str
) -> tuple[str | None, str | None]:
    """The device's enterprise and how it was linked (None, None: none)."""
    cur = await conn.execute(DEVICE_ENTERPRISE, (platform, device))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"device {device!r} on platform {platform!r}")
    return row[0], row[1]


async def get_rule(conn: AsyncConnection[Any], platform: str) -> str | None:
    cur = await conn.execute(GET_RULE, (platform,))
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def set_rule(conn: AsyncConnection[Any], platform: str, metadata_key: str | None) -> None:
    if metadata_key is None:
        await conn.execute(CLEAR_RULE, (platform,))
    else:
        await conn.execute(SET_RULE, (platform, metadata_key))
