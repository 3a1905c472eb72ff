"""Official totals of industrial enterprises above designated size: the penetration rate's
denominators, imported from a CSV file with its source (`iiot enterprises import-totals`).

The file has a header and the columns `year`, `region` (a GB/T 2260 province or prefecture
code, or 000000 for the whole country), `industry` (empty for all industry, or a section B, C,
D, or an industrial division) and `enterprises`; other columns (names, notes) are ignored.
Every import is kept as a version; for a year the newest import holding it is in force. A file
with any bad row is refused whole, each bad row named with its line.
"""

import csv
import hashlib
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from registry import classification
from registry.errors import Invalid

COLUMNS: Final = ("year", "region", "industry", "enterprises")
MAX_ERRORS_SHOWN: Final = 20

INSERT_IMPORT = """
INSERT INTO enterprise_total_imports (source, file_name, sha256, rows) VALUES (%s, %s, %s, %s)
RETURNING id, imported_at
"""
INSERT_TOTALS = """
INSERT INTO enterprise_totals (import_id, year, region, industry, enterprises)
SELECT %s, * FROM unnest(%s::smallint[], %s::text[], %s::text[], %s::bigint[])
"""
ANY_TOTALS = "SELECT EXISTS (SELECT FROM enterprise_totals)"
LIST_IMPORTS = """
SELECT i.id, i.imported_at, i.source, i.file_name, i.sha256, i.rows,
       array_agg(DISTINCT t.year ORDER BY t.year)
FROM enterprise_total_imports i JOIN enterprise_totals t ON t.import_id = i.id
GROUP BY i.id ORDER BY i.id DESC
"""


@dataclass(frozen=True, slots=True)
class TotalsRow:
    year: int
    region: str
    industry: str
    enterprises: int


@dataclass(frozen=True, slots=True)
class TotalsImport:
    id: int
    imported_at: datetime
    source: str
    file_name: str
    sha256: str
    rows: int
    years: list[int]


def parse_totals(text: str) -> list[TotalsRow]:
    """The rows of a totals file; Invalid lists what is wrong, by line."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise Invalid(f"the totals file lacks the columns {', '.join(missing)} (in its header)")
    rows: list[TotalsRow] = []
    errors: list[str] = []
    seen: dict[tuple[int, str, str], int] = {}
    for record in reader:
        line = reader.line_num
        try:
            row = _row(record)
        except Invalid as exc:
            errors.append(f"line {line}: {exc}")
            continue
        key = (row.year, row.region, row.industry)
        if key in seen:
            errors.append(f"line {line}: repeats line {seen[key]} (same year, region, industry)")
            continue
        seen[key] = line
        rows.append(row)
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = len(errors) - MAX_ERRORS_SHOWN
        raise Invalid(f"{shown}{f'; and {more} more' if more > 0 else ''}")
    if not rows:
        raise Invalid("the totals file has no rows")
    return rows


def _row(record: dict[str, str | None]) -> TotalsRow:
    def field(name: str) -> str:
        return (record.get(name) or "").strip()

    try:
        year = int(field("year"))
        enterprises = int(field("enterprises"))
    except ValueError:
        raise Invalid("year and enterprises must be whole numbers") from None
    if not 1990 <= year <= 2100:
        raise Invalid(f"year {year} is out of range")
    if enterprises < 0:
        raise Invalid("enterprises cannot be negative")
    region = field("region")
    if region != classification.NATIONAL:
        classification.check_region(region)
        if not region.endswith("00"):
            raise Invalid(
                f"region {region} is a county: totals are national, per province or per prefecture"
            )
    industry = field("industry").upper()
    if industry:
        found = classification.industries().get(industry)
        if found is None or not found.industrial:
            raise Invalid(
                f"industry {industry!r} is not an industrial section (B, C, D) or division "
                "of GB/T 4754-2017"
            )
    return TotalsRow(year, region, industry, enterprises)


async def import_totals(
    conn: AsyncConnection[Any], text: str, *, source: str, file_name: str
) -> TotalsImport:
    """Checks and stores a totals file as a new version. Call within a transaction."""
    source = source.strip()
    if not source:
        raise Invalid("state the source of the totals (publication, table, date)")
    rows = parse_totals(text)
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    cur = await conn.execute(INSERT_IMPORT, (source, file_name, sha256, len(rows)))
    created = await cur.fetchone()
    assert created is not None
    import_id, imported_at = created
    await conn.execute(
        INSERT_TOTALS,
        (
            import_id,
            [r.year for r in rows],
            [r.region for r in rows],
            [r.industry for r in rows],
            [r.enterprises for r in rows],
        ),
    )
    years = sorted({r.year for r in rows})
    return TotalsImport(import_id, imported_at, source, file_name, sha256, len(rows), years)


async def list_imports(conn: AsyncConnection[Any]) -> list[TotalsImport]:
    cur = await conn.execute(LIST_IMPORTS)
    return [TotalsImport(*row) for row in await cur.fetchall()]


async def totals_imported(conn: AsyncConnection[Any]) -> bool:
    cur = await conn.execute(ANY_TOTALS)
    row = await cur.fetchone()
    return bool(row and row[0])
