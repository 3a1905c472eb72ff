"""The national figures' routes (each needs a national viewer key, checked in national/app.py),
`/metrics`, and the dashboard's files. Lists answer CSV with `?format=csv`."""

import csv
import io
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path as FilePath
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from national import figures, history, penetration
from national.problems import Problem
from registry import classification
from registry import penetration as rates

router = APIRouter(tags=["national"])
public = APIRouter(include_in_schema=False)
Format = Annotated[Literal["json", "csv"], Query(description="`csv` for a spreadsheet")]
CellName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
# Routes with `format` answer JSON or, with `?format=csv`, CSV.
CSV: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}}
}

REFUSALS = """
SELECT id, received_at, cell, sequence, reason, detail, encode(body_sha256, 'hex'), body_bytes
FROM refusals WHERE (%(cell)s::text IS NULL OR cell = %(cell)s) AND id > %(after)s
ORDER BY id LIMIT %(limit)s
"""
CONFLICTS = """
SELECT id, at, platform, claimed_by, sequence, held_by, reason FROM conflicts
WHERE id > %(after)s ORDER BY id LIMIT %(limit)s
"""
MOVES = """
SELECT id, platform, from_cell, to_cell, released_at, release_sequence, claimed_at,
       claim_sequence FROM moves ORDER BY id DESC LIMIT %(limit)s
"""
CELL_SNAPSHOTS = """
SELECT sequence, taken_at, received_at, took_seconds, interval_seconds, definitions_version,
       encode(body_sha256, 'hex'), platforms, refused_platforms, registered, connected,
       ever_connected, active_24h, active_30d, identities, connected_without_identity
FROM snapshots WHERE cell = %(cell)s AND sequence > %(after)s ORDER BY sequence LIMIT %(limit)s
"""
SNAPSHOT_BODY = """
SELECT body, encode(signature, 'base64') FROM snapshots WHERE cell = %s AND sequence = %s
"""
METRIC_REFUSALS = "SELECT reason, count(*) FROM refusals GROUP BY reason"
METRIC_CONFLICTS = "SELECT count(*) FROM conflicts"
METRIC_MOVING = "SELECT count(*) FROM platforms WHERE released_to IS NOT NULL"


def _csv(columns: Sequence[str], rows: Iterable[Sequence[Any]], name: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            [v.isoformat() if isinstance(v, datetime) else "" if v is None else v for v in row]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def _dicts_csv(rows: list[dict[str, Any]], name: str, first: Sequence[str] = ()) -> Response:
    columns = list(first) or (list(rows[0]) if rows else [])
    return _csv(columns, ([r.get(c) for c in columns] for r in rows), name)


def _covered(coverage: dict[str, Any]) -> dict[str, Any]:
    """The coverage a CSV row carries, so a figure never travels without it."""
    return {
        "as_of": coverage["as_of"],
        "cells_covered": coverage["cells_covered"],
        "stale_cells": " ".join(c["cell"] for c in coverage["stale_cells"]),
        "oldest_snapshot_age_seconds": coverage["oldest_snapshot_age_seconds"],
    }


async def _read(request: Request) -> figures.National:
    async with request.app.state.pool.connection() as conn:
        return await figures.read(conn)


@router.get("/national/totals", operation_id="national_totals", responses=CSV)
async def totals(request: Request, format: Format = "json") -> Any:
    """National totals: exact sums over the platforms of fresh cells, the distinct connected
    devices (an estimate with its bounds and sketch), coverage, and stale cells' last figures
    apart."""
    now = await _read(request)
    answer = now.totals()
    if format == "csv":
        row = answer["totals"] | _covered(answer["coverage"])
        row |= {
            "distinct_connected": answer["distinct"]["connected_devices"],
            "distinct_lower_95": answer["distinct"]["lower_bound"],
            "distinct_upper_95": answer["distinct"]["upper_bound"],
        }
        return _dicts_csv([row], "national-totals")
    return answer


@router.get("/national/by/{dimension}", operation_id="national_breakdown", responses=CSV)
async def breakdown(
    request: Request,
    dimension: Literal["tier", "type", "province", "prefecture", "industry", "cell"],
    format: Format = "json",
) -> Any:
    """The totals by tier, type, province, prefecture (from each platform's 6-digit region),
    industry (GB/T 4754 division; `unmapped`) or cell; stale cells' rows apart."""
    answer = (await _read(request)).breakdown(dimension)
    if format == "csv":
        covered = _covered(answer["coverage"])
        rows = [r | {"counted": True} | covered for r in answer["rows"]]
        rows += [r | {"counted": False} | covered for r in answer["stale_rows"]]
        return _dicts_csv(rows, f"national-by-{dimension}")
    return answer


@router.get("/national/cells", operation_id="national_cells", responses=CSV)
async def cells(request: Request, format: Format = "json") -> Any:
    """Every cell: fresh or stale, the age of its latest snapshot, and its figures."""
    answer = (await _read(request)).per_cell()
    if format == "csv":
        return _dicts_csv(answer["cells"], "national-cells")
    return answer


@router.get("/national/platforms", operation_id="national_platforms", responses=CSV)
async def platforms(request: Request, format: Format = "json") -> Any:
    """Every platform counted: its cell, whether it is counted, moving or its cell is stale."""
    answer = (await _read(request)).per_platform()
    if format == "csv":
        covered = _covered(answer["coverage"])
        return _dicts_csv([p | covered for p in answer["platforms"]], "national-platforms")
    return answer


@router.get("/national/history", operation_id="national_history", responses=CSV)
async def national_history(
    request: Request,
    since: datetime | None = None,
    until: datetime | None = None,
    format: Format = "json",
) -> Any:
    """National samples: one per minute for the last week, one per hour before (`resolution`).
    Default: the last 24 hours."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=1)
    async with request.app.state.pool.connection() as conn:
        rows = await history.history(conn, since, until)
    if format == "csv":
        return _csv(history.COLUMNS, rows, "national-history")
    return {
        "since": since,
        "until": until,
        "distinct": "distinct_* are the HLL union estimate and its 95 % bounds (docs/national.md)",
        "samples": [dict(zip(history.COLUMNS, r, strict=True)) for r in rows],
    }


@router.get(
    "/national/cells/{cell}/snapshots", operation_id="national_cell_snapshots", responses=CSV
)
async def cell_snapshots(
    request: Request,
    cell: CellName,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: Format = "json",
) -> Any:
    """A cell's accepted snapshots in sequence order (complete: a gap cannot be accepted)."""
    columns = (
        "sequence",
        "taken_at",
        "received_at",
        "took_seconds",
        "interval_seconds",
        "definitions_version",
        "body_sha256",
        "platforms",
        "refused_platforms",
        *figures.FIGURES,
        "identities",
        "connected_without_identity",
    )
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(CELL_SNAPSHOTS, {"cell": cell, "after": after, "limit": limit})
        rows = await cur.fetchall()
    if format == "csv":
        return _csv(columns, rows, f"snapshots-{cell}")
    return {"cell": cell, "snapshots": [dict(zip(columns, r, strict=True)) for r in rows]}


@router.get(
    "/national/cells/{cell}/snapshots/{sequence}",
    operation_id="national_snapshot_body",
    response_class=Response,
)
async def snapshot_body(
    request: Request, cell: CellName, sequence: Annotated[int, Path(ge=1, le=2**62)]
) -> Response:
    """The exact bytes the cell signed, with its signature (`IIOT-Signature`): anyone holding
    the cell's public key can verify them again."""
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(SNAPSHOT_BODY, (cell, sequence))
        row = await cur.fetchone()
    if row is None:
        raise Problem(404, f"no snapshot {sequence} of cell {cell}")
    if row[0] is None:
        raise Problem(404, f"snapshot {sequence} of cell {cell}: body past its retention")
    signature = "".join(row[1].split())
    return Response(
        bytes(row[0]),
        media_type="application/json",
        headers={"IIOT-Signature": f"ed25519={signature}", "IIOT-Cell": cell},
    )


def _listing(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, r, strict=True)) for r in rows]


@router.get("/national/refusals", operation_id="national_refusals", responses=CSV)
async def refusals(
    request: Request,
    cell: Annotated[str | None, Query(max_length=200)] = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    format: Format = "json",
) -> Any:
    """Every refused snapshot (and duplicate), oldest first: cell, sequence, reason, digest."""
    columns = (
        "id",
        "received_at",
        "cell",
        "sequence",
        "reason",
        "detail",
        "body_sha256",
        "body_bytes",
    )
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(REFUSALS, {"cell": cell, "after": after, "limit": limit})
        rows = await cur.fetchall()
    if format == "csv":
        return _csv(columns, rows, "national-refusals")
    return {"refusals": _listing(columns, rows)}


@router.get("/national/conflicts", operation_id="national_conflicts")
async def conflicts(
    request: Request,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Platforms' figures refused because another cell holds them (`held`), or because the
    cell released them itself (`released`)."""
    columns = ("id", "at", "platform", "claimed_by", "sequence", "held_by", "reason")
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(CONFLICTS, {"after": after, "limit": limit})
        return {"conflicts": _listing(columns, await cur.fetchall())}


@router.get("/national/moves", operation_id="national_moves")
async def moves(request: Request, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> Any:
    """Platforms moved between cells, newest first; `claimed_at` empty while moving."""
    columns = (
        "id",
        "platform",
        "from_cell",
        "to_cell",
        "released_at",
        "release_sequence",
        "claimed_at",
        "claim_sequence",
    )
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(MOVES, {"limit": limit})
        return {"moves": _listing(columns, await cur.fetchall())}


@router.get("/national/penetration", operation_id="national_penetration", responses=CSV)
async def national_penetration(
    request: Request,
    *,
    by: Literal["national", "province", "prefecture", "industry"] = "province",
    year: Annotated[int | None, Query(ge=1990, le=2100)] = None,
    region: Annotated[str | None, Query(pattern=r"^\d{6}$")] = None,
    industry: str | None = None,
    disagreements: Annotated[int, Query(ge=0, le=10_000)] = 100,
    format: Format = "json",
) -> Any:
    """Penetration of platforms among industrial enterprises above designated size, by
    definition (`active`: a device connected within 30 days; `served`), against the official
    totals in force for `year` (default: the latest imported)."""
    if industry is not None and industry not in classification.industries():
        raise Problem(422, f"industry {industry!r} is not a GB/T 4754 section or division")
    async with request.app.state.pool.connection() as conn:
        run = await penetration.last_run(conn)
        in_force = await rates.totals_in_force(conn, year)
        found = await rates.rates(conn, by, in_force, region=region, industry=industry)
        listed = await penetration.disagreements(conn, disagreements)
        coverage = (await figures.read(conn)).coverage()
    rows = [
        {
            "key": r.key,
            "name": classification.industry_name(r.key)
            if by == "industry"
            else classification.region_name(r.key),
            "active": r.connected_30d,
            "served": r.served,
            "official_total": r.total,
            "active_rate": r.connected_30d_rate,
            "served_rate": r.served_rate,
        }
        for r in found
    ]
    if format == "csv":
        return _dicts_csv([r | _covered(coverage) for r in rows], f"national-penetration-{by}")
    return {
        "coverage": coverage,
        "computed": run,
        "totals": None
        if in_force is None
        else {
            "year": in_force.year,
            "import_id": in_force.import_id,
            "source": in_force.source,
            "imported_at": in_force.imported_at,
        },
        "definitions": penetration.DEFINITIONS,
        "rows": rows,
        "disagreements": {
            "count": run["disagreements"] if run else 0,
            "rule": "the industry most cells report, ties to the smallest code",
            "listed": listed,
        },
    }


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Any:
        return iter(self._families)


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """The aggregator's intake and coverage in Prometheus' text format."""
    now = await _read(request)
    accepted = CounterMetricFamily(
        "iiot_national_snapshots_accepted", "Snapshots accepted, per cell.", labels=["cell"]
    )
    stale = GaugeMetricFamily(
        "iiot_national_cell_stale", "1 when the cell is stale (3 intervals).", labels=["cell"]
    )
    age = GaugeMetricFamily(
        "iiot_national_cell_snapshot_age_seconds", "Age of the latest snapshot.", labels=["cell"]
    )
    for cell in now.cells:
        accepted.add_metric([cell.name], cell.sequence)
        stale.add_metric([cell.name], 0 if cell.fresh else 1)
        if cell.age_seconds is not None:
            age.add_metric([cell.name], cell.age_seconds)
    refused = CounterMetricFamily(
        "iiot_national_snapshots_refused",
        "Snapshots refused (and duplicates), per reason.",
        labels=["reason"],
    )
    async with request.app.state.pool.connection() as conn:
        cur = await conn.execute(METRIC_REFUSALS)
        for reason, count in await cur.fetchall():
            refused.add_metric([reason], count)
        cur = await conn.execute(METRIC_CONFLICTS)
        conflicts_row = await cur.fetchone()
        cur = await conn.execute(METRIC_MOVING)
        moving_row = await cur.fetchone()
    conflicts_total = CounterMetricFamily(
        "iiot_national_platform_conflicts",
        "Platform claims refused because another cell holds the platform.",
        value=conflicts_row[0] if conflicts_row else 0,
    )
    moving = GaugeMetricFamily(
        "iiot_national_platforms_moving",
        "Platforms released by one cell and not yet claimed by the other.",
        value=moving_row[0] if moving_row else 0,
    )
    totals_now = figures.sums(now.counted())
    national = GaugeMetricFamily(
        "iiot_national_devices", "National totals over fresh cells.", labels=["figure"]
    )
    for name in figures.FIGURES:
        national.add_metric([name], totals_now[name])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([accepted, refused, stale, age, conflicts_total, moving, national]))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


FILES: Final = FilePath(__file__).parent / "dashboard"
# Same-origin only, no inline script, nothing fetched from elsewhere.
HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


PAGES: Final = {
    "/dashboard": ("index.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/style.css": ("style.css", "text/css"),
}


def _page(name: str, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def serve() -> FileResponse:
        return FileResponse(FILES / name, media_type=media_type, headers=HEADERS)

    return serve


for _path, (_name, _media_type) in PAGES.items():
    public.add_api_route(_path, _page(_name, _media_type), methods=["GET"])
