from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.auth import Caller, check_national
from api.deps import Cell, Connection
from api.models import (
    DistinctCountsOut,
    DriftOut,
    GroupCountsRow,
    GroupedCounts,
    NationalCounts,
    PlatformCountsPage,
    PlatformCountsRow,
    ReconciliationOut,
    counts_out,
)
from registry import counts
from registry.ids import PLATFORM_ID_PATTERN
from registry.reconcile import recent_reconciliations

router = APIRouter(prefix="/counts", tags=["counts"])


@router.get("/platforms", operation_id="all_platform_counts", response_model=PlatformCountsPage)
async def all_platform_counts(
    conn: Connection,
    caller: Caller,
    cell: Cell,
    after: Annotated[str | None, Query(pattern=f"^{PLATFORM_ID_PATTERN}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> PlatformCountsPage:
    """Every platform's counts, in id order, a page at a time (for a platform's key: its own)."""
    rows = await counts.all_platform_counts(conn, after=after, limit=limit, only=caller.platform)
    items = [PlatformCountsRow(platform=r.key, **counts_out(r)) for r in rows]
    after_last = items[-1].platform if len(items) == limit else None
    return PlatformCountsPage(cell=cell, items=items, next_after=after_last)


@router.get("/by/{dimension}", operation_id="grouped_counts", response_model=GroupedCounts)
async def grouped_counts(
    dimension: Literal["tier", "type", "region", "industry"],
    conn: Connection,
    caller: Caller,
    cell: Cell,
) -> GroupedCounts:
    """Counts added up per platform tier, type, region or industry (keys for all platforms)."""
    check_national(caller)
    rows = await counts.grouped_counts(conn, dimension)
    groups = [GroupCountsRow(key=r.key, platforms=r.platforms, **counts_out(r)) for r in rows]
    return GroupedCounts(cell=cell, dimension=dimension, groups=groups)


@router.get("/national", operation_id="national_counts", response_model=NationalCounts)
async def national_counts(conn: Connection, caller: Caller, cell: Cell) -> NationalCounts:
    """All platforms together: summed per registration, and each device once (`distinct`)
    (keys for all platforms)."""
    check_national(caller)
    total, distinct, as_of = await counts.national_counts(conn)
    return NationalCounts(
        cell=cell,
        platforms=total.platforms,
        as_of=as_of,
        distinct=DistinctCountsOut(**asdict(distinct)) if distinct else None,
        **counts_out(total),
    )


@router.get(
    "/reconciliations", operation_id="reconciliations", response_model=list[ReconciliationOut]
)
async def reconciliations(
    conn: Connection,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    drift_only: Annotated[bool, Query(description="Only runs that found drift.")] = False,
) -> list[ReconciliationOut]:
    """The latest checks of the maintained counters against a full recount (every 5 minutes by
    default), newest first: the drift each found and corrected, per platform (keys for all
    platforms)."""
    check_national(caller)
    runs = await recent_reconciliations(conn, limit=limit, drift_only=drift_only)
    return [
        ReconciliationOut(
            id=r.id,
            time=r.time,
            platforms=r.platforms,
            drift=[DriftOut(**asdict(d)) for d in r.drift],
        )
        for r in runs
    ]
