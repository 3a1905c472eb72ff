"""The national penetration rate (docs/national.md, "Penetration"): distinct enterprises above
designated size using a platform, over the official totals imported into the aggregator.

The cells send their enterprises as keyed hashes (HMAC-SHA256 of the credit code under a key the
cells share and the aggregator never holds), so an enterprise served in two cells counts once.
Only the fresh cells' latest lists count, and only those under the key most of them use (a
cell under another key cannot be matched: it is listed as excluded). Where cells disagree on
an enterprise's industry (or region), the value most cells report counts, ties going to the
smallest code; the disagreements are counted and listed.

The numerators land in the same `penetration_cells` table a cell's store has, so the rates
are read with registry/penetration.py's `rates` against the official totals in force.
"""

from typing import Any, Final

from psycopg import AsyncConnection

from national.settings import STALE_INTERVALS

LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.national_penetration'))"
FRESH_KEYS = """
SELECT e.key_id, array_agg(DISTINCT e.cell ORDER BY e.cell)
FROM cell_enterprises e JOIN cells c ON c.name = e.cell
WHERE now() - c.last_taken_at <= make_interval(secs => c.interval_seconds * %s)
  AND c.retired_at IS NULL
GROUP BY e.key_id
"""
CLEAR = ("DELETE FROM penetration_cells", "DELETE FROM penetration_disagreements")
# The value most cells report, ties to the smallest code.
VOTES = """
CREATE TEMPORARY TABLE counted_enterprises ON COMMIT DROP AS
WITH e AS (
    SELECT * FROM cell_enterprises WHERE cell = ANY(%(cells)s) AND key_id = %(key_id)s
),
industry AS (
    SELECT DISTINCT ON (code_hmac) code_hmac, industry_code
    FROM (SELECT code_hmac, industry_code, count(*) AS cells FROM e
          WHERE industry_code IS NOT NULL GROUP BY 1, 2) v
    ORDER BY code_hmac, cells DESC, industry_code
),
region AS (
    SELECT DISTINCT ON (code_hmac) code_hmac, region
    FROM (SELECT code_hmac, region, count(*) AS cells FROM e GROUP BY 1, 2) v
    ORDER BY code_hmac, cells DESC, region
)
SELECT code_hmac, r.region, coalesce(i.industry_code, '') AS industry,
       bool_or(e.above_size) AS above_size, bool_or(e.active_30d) AS active_30d,
       bool_or(e.served) AS served,
       count(DISTINCT e.industry_code) > 1 AS industry_disputed,
       jsonb_object_agg(e.cell, e.industry_code) AS reported
FROM e JOIN region r USING (code_hmac) LEFT JOIN industry i USING (code_hmac)
GROUP BY code_hmac, r.region, i.industry_code
"""
FILL_CELLS = """
INSERT INTO penetration_cells (region, industry, above_size, served, connected_30d)
SELECT region, industry, above_size, count(*) FILTER (WHERE served OR active_30d),
       count(*) FILTER (WHERE active_30d)
FROM counted_enterprises GROUP BY 1, 2, 3
"""
FILL_DISAGREEMENTS = """
INSERT INTO penetration_disagreements (code_hmac, industry, reported)
SELECT code_hmac, nullif(industry, ''), reported FROM counted_enterprises WHERE industry_disputed
"""
RECORD_RUN = """
INSERT INTO penetration_runs (as_of, key_id, enterprises, disagreements, cells, excluded_cells)
SELECT now(), %(key_id)s, count(*), count(*) FILTER (WHERE industry_disputed), %(cells)s,
       %(excluded)s
FROM counted_enterprises
ON CONFLICT (only_row) DO UPDATE SET (as_of, key_id, enterprises, disagreements, cells,
    excluded_cells) = (excluded.as_of, excluded.key_id, excluded.enterprises,
    excluded.disagreements, excluded.cells, excluded.excluded_cells)
"""
LAST_RUN = """
SELECT as_of, key_id, enterprises, disagreements, cells, excluded_cells FROM penetration_runs
"""
DISAGREEMENTS = """
SELECT code_hmac, industry, reported FROM penetration_disagreements ORDER BY code_hmac LIMIT %s
"""

DEFINITIONS: Final = {
    "active": (
        "Industrial enterprises above designated size (as the cells report them) at least one "
        "of whose devices, on a platform of any fresh cell, was connected in the last 30 days; "
        "each counted once nationally by its keyed hash."
    ),
    "served": (
        "Industrial enterprises above designated size that a platform of any fresh cell has "
        "registered as an enterprise it serves (or that were active), counted once nationally."
    ),
    "denominator": (
        "The official total of industrial enterprises above designated size for the region, "
        "industry and year, from the newest import of totals into the aggregator holding the year."
    ),
    "attribution": (
        "An enterprise counts in the industry (GB/T 4754 division) and region most of the cells "
        "reporting it give, ties to the smallest code; an enterprise some cell reports above "
        "designated size counts as such. Enterprises whose cells report different industries "
        "are counted as disagreements and listed."
    ),
}


async def refresh(conn: AsyncConnection[Any]) -> bool:
    """Recomputes the numerators from the fresh cells' enterprises; False if another process
    is doing it now."""
    async with conn.transaction():
        cur = await conn.execute(LOCK)
        row = await cur.fetchone()
        if not row or not row[0]:
            return False
        cur = await conn.execute(FRESH_KEYS, (STALE_INTERVALS,))
        keys = sorted(await cur.fetchall(), key=lambda r: (-len(r[1]), r[0]))
        key_id, cells = keys[0] if keys else ("", [])
        excluded = sorted({c for _, others in keys[1:] for c in others})
        for statement in CLEAR:
            await conn.execute(statement)
        await conn.execute(VOTES, {"cells": cells, "key_id": key_id})
        await conn.execute(FILL_CELLS)
        await conn.execute(FILL_DISAGREEMENTS)
        await conn.execute(
            RECORD_RUN, {"key_id": key_id or None, "cells": cells, "excluded": excluded}
        )
    return True


async def last_run(conn: AsyncConnection[Any]) -> dict[str, Any] | None:
    cur = await conn.execute(LAST_RUN)
    row = await cur.fetchone()
    if row is None:
        return None
    names = ("as_of", "key_id", "enterprises", "disagreements", "cells", "excluded_cells")
    return dict(zip(names, row, strict=True))


async def disagreements(conn: AsyncConnection[Any], limit: int) -> list[dict[str, Any]]:
    cur = await conn.execute(DISAGREEMENTS, (limit,))
    return [
        {"code_hmac": code, "counted_industry": industry, "reported_by_cell": reported}
        for code, industry, reported in await cur.fetchall()
    ]
