from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import Connection
from api.models import GroupCountsRow, GroupedCounts, NationalCounts, Page, PlatformCountsRow
from registry import counts
from registry.ids import PLATFORM_ID_PATTERN

router = APIRouter(prefix="/counts", tags=["counts"])


@router.get(
    "/platforms", operation_id="all_platform_counts", response_model=Page[PlatformCountsRow]
)
async def all_platform_counts(
    conn: Connection,
    after: Annotated[str | None, Query(pattern=f"^{PLATFORM_ID_PATTERN}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Page[PlatformCountsRow]:
    """Every platform's counts, in id order, a page at a time."""
    rows = await counts.all_platform_counts(conn, after=after, limit=limit)
    items = [
        PlatformCountsRow(
            platform=r.key,
            registered=r.registered,
            connected=r.connected,
            ever_connected=r.ever_connected,
        )
        for r in rows
    ]
    return Page(items=items, next_after=items[-1].platform if len(items) == limit else None)


@router.get("/by/{dimension}", operation_id="grouped_counts", response_model=GroupedCounts)
async def grouped_counts(
    dimension: Literal["tier", "type", "region", "industry"], conn: Connection
) -> GroupedCounts:
    """Counts added up per platform tier, type, region or industry."""
    rows = await counts.grouped_counts(conn, dimension)
    groups = [
        GroupCountsRow(
            key=r.key,
            platforms=r.platforms,
            registered=r.registered,
            connected=r.connected,
            ever_connected=r.ever_connected,
        )
        for r in rows
    ]
    return GroupedCounts(dimension=dimension, groups=groups)


@router.get("/national", operation_id="national_counts", response_model=NationalCounts)
async def national_counts(conn: Connection) -> NationalCounts:
    """All platforms together (a device registered on two platforms counts on each)."""
    total, as_of = await counts.national_counts(conn)
    return NationalCounts(
        platforms=total.platforms,
        registered=total.registered,
        connected=total.connected,
        ever_connected=total.ever_connected,
        as_of=as_of,
    )
