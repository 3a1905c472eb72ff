"""The classifications codes are named by (GB/T 4754-2017, GB/T 2260), and platforms' industry
text mapped to them (docs/enterprises.md)."""

from fastapi import APIRouter

from api.auth import Caller, PlatformScope, check_admin, check_national
from api.deps import Connection, PlatformId
from api.enterprise_models import (
    IndustryMapping,
    IndustryOut,
    IndustryRef,
    PlatformClassification,
    RegionOut,
    RegionRef,
    UnmappedIndustry,
)
from registry import classification, industry_mappings
from registry.access import audit
from registry.platforms import get_platform

router = APIRouter(prefix="/classification", tags=["classification"])
platform_router = APIRouter(
    prefix="/platforms/{platform}", tags=["classification"], dependencies=[PlatformScope]
)


@router.get("/industries", operation_id="industries", response_model=list[IndustryOut])
async def industries(caller: Caller) -> list[IndustryOut]:
    """GB/T 4754-2017 (2019 amendment): its sections and divisions with their names."""
    return [
        IndustryOut.model_validate(i, from_attributes=True)
        for i in classification.industries().values()
    ]


@router.get("/regions", operation_id="regions", response_model=list[RegionOut])
async def regions(caller: Caller) -> list[RegionOut]:
    """GB/T 2260: provinces and prefectures with their names."""
    return [
        RegionOut.model_validate(r, from_attributes=True) for r in classification.regions().values()
    ]


@router.get(
    "/unmapped-industries",
    operation_id="unmapped_industries",
    response_model=list[UnmappedIndustry],
)
async def unmapped_industries(conn: Connection, caller: Caller) -> list[UnmappedIndustry]:
    """Platforms' industry texts that map to no GB/T 4754 code yet (keys for all platforms)."""
    check_national(caller)
    return [
        UnmappedIndustry(text=u.text, platforms=u.platforms, platform_ids=u.platform_ids)
        for u in await industry_mappings.unmapped(conn)
    ]


@router.put("/industry-mappings", operation_id="map_industry", response_model=IndustryMapping)
async def map_industry(body: IndustryMapping, conn: Connection, caller: Caller) -> IndustryMapping:
    """Map an industry text (any case, as platforms spell it) to a section or division
    (admin); every platform with that text follows."""
    check_admin(caller)
    code = await industry_mappings.map_text(conn, body.text, body.industry)
    await audit(
        conn, "industry.map", body.text, key_id=caller.key_id, platform=None, detail={"to": code}
    )
    return IndustryMapping(text=body.text, industry=code)


@platform_router.get(
    "/classification", operation_id="platform_classification", response_model=PlatformClassification
)
async def platform_classification(platform: PlatformId, conn: Connection) -> PlatformClassification:
    """The platform's region and industry as codes with their names."""
    found = await get_platform(conn, platform)
    mapped = await industry_mappings.platform_industry(conn, platform)
    return PlatformClassification(
        platform=platform,
        region=RegionRef.of(found.region),
        industry_text=mapped.text,
        industry=IndustryRef.of(mapped.industry) if mapped.industry else None,
        industry_flagged=mapped.industry is None,
    )
