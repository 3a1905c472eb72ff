"""The platform penetration rate and the platform indicators (docs/enterprises.md)."""

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.auth import Caller, check_national
from api.deps import Cell, Connection
from api.enterprise_models import (
    IndicatorsOut,
    IndustryRef,
    Penetration,
    PenetrationRow,
    PlatformIndicators,
    RegionRef,
    TotalsImportOut,
    TotalsVersion,
)
from registry import classification, penetration
from registry.errors import Invalid
from registry.official_totals import list_imports

router = APIRouter(prefix="/penetration", tags=["penetration"])
Year = Annotated[
    int | None, Query(ge=1990, le=2100, description="Totals of this year; default the latest.")
]
RegionQuery = Annotated[
    str | None,
    Query(pattern="^[0-9]{2}[0-9]{2}00$", description="Within a province or prefecture."),
]
IndustryQuery = Annotated[
    str | None,
    Query(pattern="^([BCD]|[0-9]{2})$", description="Within an industrial section or division."),
]
SortField = Literal[
    "platform",
    "tier",
    "devices_connected",
    "enterprises",
    "enterprises_above_size",
    "enterprises_connected_30d",
    "industries",
    "provinces",
    "prefectures",
    "devices_per_enterprise",
]


@router.get("", operation_id="national_penetration", response_model=Penetration)
async def national_penetration(
    conn: Connection,
    caller: Caller,
    cell: Cell,
    *,
    year: Year = None,
    region: RegionQuery = None,
    industry: IndustryQuery = None,
) -> Penetration:
    """The penetration rate nationally (or within a region and industry), by both definitions,
    numerator and denominator, beside the 2028 target (keys for all platforms)."""
    return await _penetration(
        conn,
        caller,
        cell,
        "national",
        year=year,
        region=region,
        industry=industry,
        sections=False,
    )


@router.get("/by/{grouping}", operation_id="grouped_penetration", response_model=Penetration)
async def grouped_penetration(
    grouping: Literal["province", "prefecture", "industry"],
    conn: Connection,
    caller: Caller,
    cell: Cell,
    *,
    year: Year = None,
    region: RegionQuery = None,
    industry: IndustryQuery = None,
    level: Annotated[
        Literal["section", "division"], Query(description="By industry: sections or divisions.")
    ] = "division",
) -> Penetration:
    """The penetration rate per province, per prefecture (of a province: `region`), or per
    industry (within `region` if given); each row with its numerators, official total and
    rates (keys for all platforms)."""
    if grouping == "prefecture" and (region is None or not region.endswith("0000")):
        raise Invalid("per prefecture needs the province: region=xx0000")
    sections = grouping == "industry" and level == "section"
    return await _penetration(
        conn,
        caller,
        cell,
        grouping,
        year=year,
        region=region,
        industry=industry,
        sections=sections,
    )


async def _penetration(
    conn: Connection,
    caller: Caller,
    cell: str,
    grouping: str,
    *,
    year: int | None,
    region: str | None,
    industry: str | None,
    sections: bool,
) -> Penetration:
    check_national(caller)
    if region is not None:
        classification.check_region(region)
    found = classification.industries().get(industry) if industry else None
    if industry is not None and (found is None or not found.industrial):
        raise Invalid(f"industry {industry!r} is not an industrial section or division")
    totals = await penetration.totals_in_force(conn, year)
    if year is not None and totals is None:
        raise Invalid(f"no official totals imported for {year}")
    rows = await penetration.rates(
        conn, grouping, totals, region=region, industry=industry, sections=sections
    )
    run = await penetration.last_run(conn)
    named = classification.industry_name if grouping == "industry" else classification.region_name
    return Penetration(
        cell=cell,
        definitions_version=penetration.DEFINITIONS_VERSION,
        definitions=penetration.DEFINITIONS,
        grouping=grouping,
        region=RegionRef.of(region) if region else None,
        industry=IndustryRef.of(industry) if industry else None,
        totals=TotalsVersion(
            import_id=totals.import_id,
            year=totals.year,
            source=totals.source,
            imported_at=totals.imported_at,
        )
        if totals
        else None,
        as_of=run.as_of if run else None,
        enterprises=run.enterprises if run else 0,
        disputed=run.disputed if run else 0,
        target_2028=penetration.TARGET_2028,
        rows=[
            PenetrationRow(
                key=r.key,
                name=named(r.key),
                served=r.served,
                connected_30d=r.connected_30d,
                total=r.total,
                served_rate=r.served_rate,
                connected_30d_rate=r.connected_30d_rate,
            )
            for r in rows
        ],
    )


@router.get("/totals", operation_id="totals_imports", response_model=list[TotalsImportOut])
async def totals_imports(conn: Connection, caller: Caller) -> list[TotalsImportOut]:
    """Every import of official totals, newest first: the versions of the denominators (keys
    for all platforms)."""
    check_national(caller)
    return [TotalsImportOut(**asdict(i)) for i in await list_imports(conn)]


@router.get("/indicators", operation_id="platform_indicators", response_model=IndicatorsOut)
async def platform_indicators(
    conn: Connection,
    caller: Caller,
    cell: Cell,
    sort: Annotated[SortField, Query(description="Sort by this field.")] = "platform",
    descending: bool = False,
) -> IndicatorsOut:
    """Per platform, beside its tier: devices connected, enterprises served (above designated
    size, with a device connected in 30 days), industries and regions covered, devices per
    enterprise (for a platform's key: its own)."""
    found = await penetration.platform_indicators(conn, caller.platform)
    items = [
        PlatformIndicators(
            **asdict(i)
            | {
                "region": RegionRef.of(i.region),
                "industry": IndustryRef.of(i.industry) if i.industry else None,
                "devices_per_enterprise": i.devices_per_enterprise,
            }
        )
        for i in found
    ]
    tiers = ("basic", "growth", "leading", "ecosystem")

    def key(item: PlatformIndicators) -> tuple[float, str]:
        if sort == "platform":
            return (0, item.platform)
        if sort == "tier":
            return (tiers.index(item.tier), item.platform)
        value = getattr(item, sort)
        return (-1 if value is None else value, item.platform)

    items.sort(key=key, reverse=descending)
    run = await penetration.last_run(conn)
    return IndicatorsOut(cell=cell, as_of=run.as_of if run else None, items=items)
