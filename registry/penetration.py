"""The platform penetration rate: industrial enterprises above designated size that use a
platform, divided by the official total, per province, prefecture, industry and nationally
(docs/enterprises.md).

The numerators need a pass over devices and declarations, so `refresh_penetration` computes
them with the other activity figures (registry/history.py, once per sampling interval, one
process at a time) and stores them: per enterprise code the declaration that counts, and those
added up per region and division (`penetration_cells`). A request adds up cells and reads the
official totals; it never counts enterprises or devices.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from registry import classification
from registry.activity import DEVICE_ACTIVITY

DEFINITIONS_VERSION: Final = "2026-12.1"
DEFINITIONS: Final = {
    "served": (
        "Industrial enterprises above designated size (规模以上工业企业: sections B, C, D of "
        "GB/T 4754-2017) that at least one platform has registered as an enterprise it serves, "
        "with or without devices; each unified social credit code counts once, however many "
        "platforms declare it."
    ),
    "connected_30d": (
        "Of those, the enterprises at least one of whose devices, on any platform, was connected "
        "at some moment in the last 30 days (as the device count active_30d); a device belongs "
        "to an enterprise by its own link, its gateway's, or its platform's metadata rule."
    ),
    "denominator": (
        "The official total of industrial enterprises above designated size for the region, "
        "industry and year, from the newest import of totals that holds the year."
    ),
    "attribution": (
        "An enterprise counts in the region and industry its platforms declare (the region is "
        "the code's characters 3-8 unless a platform states a reason for another). Where its "
        "platforms disagree on industry, size or region, the declaration most of them agree "
        "with counts, ties going to the earliest; such enterprises are counted as disputed."
    ),
}
TARGET_2028: Final = 0.55
GROUPINGS: Final = ("province", "prefecture", "industry")

REFRESH_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.penetration'))"
# Enterprises (per platform) with a device that was connected in the last 30 days.
ACTIVE = f"""
CREATE TEMPORARY TABLE active_enterprises ON COMMIT DROP AS
SELECT DISTINCT e.platform_id, e.enterprise AS code
FROM device_enterprises e JOIN ({DEVICE_ACTIVITY}) a ON a.id = e.id
WHERE e.enterprise IS NOT NULL
  AND (a.connected OR a.last_active >= now() - interval '30 days')
"""
CLEAR_USAGE = "DELETE FROM enterprise_usage"
REFRESH_USAGE = """
WITH declared AS (
    SELECT e.*, count(*) OVER (PARTITION BY code, industry, above_size, region) AS agreeing,
           count(*) OVER (PARTITION BY code) AS platforms,
           count(*) OVER (PARTITION BY code, industry, above_size, region)
               <> count(*) OVER (PARTITION BY code) AS disputed
    FROM enterprises e
    WHERE e.platform_id NOT IN (SELECT id FROM platforms WHERE moved_to IS NOT NULL)
)
INSERT INTO enterprise_usage
    (code, name, industry, above_size, region, platforms, connected_30d, disputed)
SELECT DISTINCT ON (d.code) d.code, d.name, d.industry, d.above_size, d.region, d.platforms,
       EXISTS (SELECT FROM active_enterprises a WHERE a.code = d.code), d.disputed
FROM declared d
ORDER BY d.code, d.agreeing DESC, d.created_at, d.platform_id
"""
CLEAR_CELLS = "DELETE FROM penetration_cells"
REFRESH_CELLS = """
INSERT INTO penetration_cells (region, industry, above_size, served, connected_30d)
SELECT region, industry, above_size, count(*), count(*) FILTER (WHERE connected_30d)
FROM enterprise_usage GROUP BY 1, 2, 3
"""
CLEAR_PLATFORM_STATS = "DELETE FROM platform_enterprise_stats"
REFRESH_PLATFORM_STATS = """
INSERT INTO platform_enterprise_stats (platform_id, enterprises, above_size, connected_30d,
    industries, provinces, prefectures, linked_devices)
SELECT p.id, count(e.code), count(*) FILTER (WHERE e.above_size),
       count(a.code), count(DISTINCT e.industry), count(DISTINCT left(e.region, 2)),
       count(DISTINCT left(e.region, 4)),
       (SELECT count(*) FROM device_enterprises d
        WHERE d.platform_id = p.id AND d.enterprise IS NOT NULL)
FROM platforms p
LEFT JOIN enterprises e ON e.platform_id = p.id
LEFT JOIN active_enterprises a ON a.platform_id = e.platform_id AND a.code = e.code
WHERE p.moved_to IS NULL
GROUP BY p.id
"""
RECORD_RUN = """
INSERT INTO penetration_runs (as_of, enterprises, disputed)
SELECT now(), count(*), count(*) FILTER (WHERE disputed) FROM enterprise_usage
ON CONFLICT (only_row) DO UPDATE SET
    as_of = excluded.as_of, enterprises = excluded.enterprises, disputed = excluded.disputed
"""
LAST_RUN = "SELECT as_of, enterprises, disputed FROM penetration_runs"

# `by`: province, prefecture or industry (a division), else one national row. `within`: a LIKE
# pattern of the regions counted; `divisions`: the divisions counted (NULL: all).
NUMERATORS = """
SELECT CASE %(by)s WHEN 'province' THEN left(region, 2) || '0000'
                   WHEN 'prefecture' THEN left(region, 4) || '00'
                   WHEN 'industry' THEN industry
                   ELSE '000000' END,
       sum(served)::bigint, sum(connected_30d)::bigint
FROM penetration_cells
WHERE above_size
  AND (%(within)s::text IS NULL OR region LIKE %(within)s)
  AND (%(divisions)s::text[] IS NULL OR industry = ANY(%(divisions)s))
GROUP BY 1
"""

LATEST_YEAR = "SELECT max(year) FROM enterprise_totals"
TOTALS = """
WITH version AS (SELECT max(import_id) AS id FROM enterprise_totals WHERE year = %(year)s)
SELECT t.region, t.industry, t.enterprises, i.id, i.source, i.imported_at
FROM enterprise_totals t JOIN enterprise_total_imports i ON i.id = t.import_id
WHERE t.import_id = (SELECT id FROM version) AND t.year = %(year)s
"""


async def refresh_penetration(conn: AsyncConnection[Any]) -> bool:
    """Recomputes the numerators and platform indicators; False if another process is."""
    async with conn.transaction():
        cur = await conn.execute(REFRESH_LOCK)
        row = await cur.fetchone()
        if not row or not row[0]:
            return False
        for statement in (
            ACTIVE,
            CLEAR_USAGE,
            REFRESH_USAGE,
            CLEAR_CELLS,
            REFRESH_CELLS,
            CLEAR_PLATFORM_STATS,
            REFRESH_PLATFORM_STATS,
            RECORD_RUN,
        ):
            await conn.execute(statement)
    return True


@dataclass(frozen=True, slots=True)
class Totals:
    """The official totals in force for a year: one import's rows, keyed (region, industry)."""

    year: int
    import_id: int
    source: str
    imported_at: datetime
    enterprises: dict[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class Rate:
    """One row of figures: `key` a region code or an industry code."""

    key: str
    served: int
    connected_30d: int
    total: int | None  # the official total; None: none imported for this row

    @property
    def served_rate(self) -> float | None:
        return self.served / self.total if self.total else None

    @property
    def connected_30d_rate(self) -> float | None:
        return self.connected_30d / self.total if self.total else None


@dataclass(frozen=True, slots=True)
class Run:
    as_of: datetime
    enterprises: int
    disputed: int


async def last_run(conn: AsyncConnection[Any]) -> Run | None:
    cur = await conn.execute(LAST_RUN)
    row = await cur.fetchone()
    return Run(*row) if row else None


async def totals_in_force(conn: AsyncConnection[Any], year: int | None) -> Totals | None:
    """The totals of `year` (default: the latest year imported), or None."""
    if year is None:
        cur = await conn.execute(LATEST_YEAR)
        row = await cur.fetchone()
        year = row[0] if row else None
        if year is None:
            return None
    cur = await conn.execute(TOTALS, {"year": year})
    rows = await cur.fetchall()
    if not rows:
        return None
    _, _, _, import_id, source, imported_at = rows[0]
    return Totals(year, import_id, source, imported_at, {(r[0], r[1]): r[2] for r in rows})


def _within(region: str | None) -> str | None:
    if region is None or region == classification.NATIONAL:
        return None
    if region.endswith("0000"):
        return region[:2] + "%"
    if region.endswith("00"):
        return region[:4] + "%"
    return region


def _divisions(industry: str | None) -> list[str] | None:
    if industry is None:
        return None
    table = classification.industries()
    found = table[industry]
    if found.level == "division":
        return [industry]
    return [c for c, i in table.items() if i.level == "division" and i.section == found.section]


async def rates(
    conn: AsyncConnection[Any],
    by: str,
    totals: Totals | None,
    *,
    region: str | None = None,
    industry: str | None = None,
    sections: bool = False,
) -> list[Rate]:
    """Penetration figures grouped `by` province, prefecture, industry or national, counted
    within `region` (a province or prefecture code) and `industry` (a section or division);
    each with the official total of its row. `sections`: by industry, per section rather than
    per division. Rows with enterprises or a total, in key order."""
    args = {"by": by, "within": _within(region), "divisions": _divisions(industry)}
    cur = await conn.execute(NUMERATORS, args)
    counted: dict[str, tuple[int, int]] = {}
    for division_or_region, served, connected in await cur.fetchall():
        key = division_or_region
        if sections:
            key = classification.section_of(key) or key
        before = counted.get(key, (0, 0))
        counted[key] = (before[0] + served, before[1] + connected)
    rows = _Rows(by, region or classification.NATIONAL, industry or "", sections)
    official = totals.enterprises if totals else {}
    if by not in GROUPINGS:  # one row, named for the region counted within
        values = counted.values()
        counted = {rows.place: (sum(c[0] for c in values), sum(c[1] for c in values))}
    keys = set(counted) | {k for r, i in official if (k := rows.key_of(r, i)) is not None}
    return [Rate(k, *counted.get(k, (0, 0)), official.get(rows.cell(k))) for k in sorted(keys)]


@dataclass(frozen=True, slots=True)
class _Rows:
    """How a grouping's rows meet the official totals' (region, industry) cells."""

    by: str
    place: str  # the region counted within (NATIONAL: all)
    branch: str  # the industry counted within ("": all industry)
    sections: bool

    def cell(self, key: str) -> tuple[str, str]:
        """The totals cell of a row."""
        if self.by in ("province", "prefecture"):
            return key, self.branch
        if self.by == "industry":
            return self.place, key
        return self.place, self.branch

    def key_of(self, region: str, industry: str) -> str | None:
        """The row a totals cell belongs to, or None if it belongs to none."""
        if self.by == "industry":
            wanted = region == self.place and industry != ""
            return industry if wanted and industry.isalpha() == self.sections else None
        inside = self.place == classification.NATIONAL or region.startswith(self.place[:2])
        if industry != self.branch or self.by not in GROUPINGS or not inside:
            return None
        if self.by == "province":
            is_province = region.endswith("0000") and region != classification.NATIONAL
            return region if is_province else None
        is_prefecture = region.endswith("00") and not region.endswith("0000")
        return region if is_prefecture else None


INDICATORS = """
SELECT t.id, p.name, t.tier, t.type, t.region, t.industry, i.industry, t.registered, t.connected,
       coalesce(s.enterprises, 0), coalesce(s.above_size, 0), coalesce(s.connected_30d, 0),
       coalesce(s.industries, 0), coalesce(s.provinces, 0), coalesce(s.prefectures, 0),
       coalesce(s.linked_devices, 0)
FROM platform_totals t
JOIN platforms p ON p.id = t.id
JOIN platform_industries i ON i.platform_id = t.id
LEFT JOIN platform_enterprise_stats s ON s.platform_id = t.id
WHERE %(only)s::text IS NULL OR t.id = %(only)s
ORDER BY t.id
"""


@dataclass(frozen=True, slots=True)
class Indicators:
    """A platform's figures for the four-level cultivation system."""

    platform: str
    name: str
    tier: str
    type: str
    region: str
    industry_text: str
    industry: str | None  # the text mapped to GB/T 4754 (migration 0031); None: unmapped
    devices_registered: int
    devices_connected: int
    enterprises: int
    enterprises_above_size: int
    enterprises_connected_30d: int
    industries: int
    provinces: int
    prefectures: int
    linked_devices: int

    @property
    def devices_per_enterprise(self) -> float | None:
        """Devices linked to an enterprise per enterprise served."""
        return self.linked_devices / self.enterprises if self.enterprises else None


async def platform_indicators(conn: AsyncConnection[Any], only: str | None) -> list[Indicators]:
    """Every platform's indicators (`only`: just that platform's), in id order."""
    cur = await conn.execute(INDICATORS, {"only": only})
    return [Indicators(*row) for row in await cur.fetchall()]
