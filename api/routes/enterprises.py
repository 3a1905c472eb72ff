"""A platform's enterprises and which of its devices and gateways belong to them
(docs/enterprises.md). Every path names the platform, so a key sees its own platform's
declarations only."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from api.auth import Caller, PlatformScope
from api.deps import Connection, DeviceId, PlatformId
from api.enterprise_models import (
    DeclarationResult,
    DeviceEnterprise,
    EnterpriseDeclarations,
    EnterpriseLinks,
    EnterpriseOut,
    EnterpriseRule,
    LinkedDevice,
    LinksChanged,
)
from api.models import Page
from registry import enterprises
from registry.access import audit
from registry.errors import Invalid
from registry.platforms import get_platform

router = APIRouter(
    prefix="/platforms/{platform}", tags=["enterprises"], dependencies=[PlatformScope]
)
Code = Annotated[str, Path(pattern="^[0-9A-Za-z]{18}$", description="Unified social credit code")]
CODE_QUERY = "^[0-9A-Z]{18}$"


@router.post("/enterprises", operation_id="declare_enterprises", response_model=DeclarationResult)
async def declare_enterprises(
    platform: PlatformId, body: EnterpriseDeclarations, conn: Connection, caller: Caller
) -> DeclarationResult:
    """Declare enterprises the platform serves (up to 10,000), with or without devices yet;
    declared ones are updated. All or nothing: a bad code or field refuses the request, naming
    the enterprise and the reason."""
    await get_platform(conn, platform)
    declarations = []
    for n, e in enumerate(body.enterprises):
        try:
            declarations.append(
                enterprises.declare(
                    e.code,
                    name=e.name,
                    industry=e.industry,
                    above_size=e.above_size,
                    region=e.region,
                    region_reason=e.region_reason,
                )
            )
        except Invalid as exc:
            raise Invalid(f"enterprises[{n}] ({e.code}): {exc}") from None
    added, changed = await enterprises.upsert_enterprises(conn, platform, declarations)
    codes = [d.code for d in declarations]
    await audit(
        conn,
        "enterprise.declare",
        codes[0] if len(codes) == 1 else f"{len(codes)} enterprises",
        key_id=caller.key_id,
        platform=platform,
        detail={"codes": codes},
    )
    return DeclarationResult(added=added, changed=changed)


@router.get("/enterprises", operation_id="list_enterprises", response_model=Page[EnterpriseOut])
async def list_enterprises(
    platform: PlatformId,
    conn: Connection,
    *,
    industry: Annotated[str | None, Query(pattern="^[0-9]{2}$", description="Division")] = None,
    region: Annotated[
        str | None, Query(pattern="^[0-9]{6}$", description="Province, prefecture or county")
    ] = None,
    after: Annotated[str | None, Query(pattern=CODE_QUERY)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Page[EnterpriseOut]:
    """The enterprises the platform declared, in code order, a page at a time."""
    await get_platform(conn, platform)
    found = await enterprises.list_enterprises(
        conn, platform, after=after, industry=industry, region=region, limit=limit
    )
    items = [EnterpriseOut.of(e) for e in found]
    return Page(items=items, next_after=items[-1].code if len(items) == limit else None)


@router.get("/enterprises/{code}", operation_id="get_enterprise", response_model=EnterpriseOut)
async def get_enterprise(platform: PlatformId, code: Code, conn: Connection) -> EnterpriseOut:
    return EnterpriseOut.of(await enterprises.get_enterprise(conn, platform, code.upper()))


@router.delete(
    "/enterprises/{code}",
    operation_id="delete_enterprise",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def delete_enterprise(
    platform: PlatformId, code: Code, conn: Connection, caller: Caller
) -> None:
    """The platform no longer serves the enterprise: its declaration ends, and so do the links
    of its devices and gateways to it."""
    devices, gateways = await enterprises.delete_enterprise(conn, platform, code.upper())
    await audit(
        conn,
        "enterprise.delete",
        code.upper(),
        key_id=caller.key_id,
        platform=platform,
        detail={"devices_unlinked": devices, "gateways_unlinked": gateways},
    )


@router.get(
    "/enterprises/{code}/devices",
    operation_id="enterprise_devices",
    response_model=Page[LinkedDevice],
)
async def enterprise_devices(
    platform: PlatformId,
    code: Code,
    conn: Connection,
    after: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Page[LinkedDevice]:
    """The platform's devices in service that belong to the enterprise, and how each is linked
    (its own link, its gateway's, the platform's rule)."""
    await enterprises.get_enterprise(conn, platform, code.upper())
    found = await enterprises.linked_devices(conn, platform, code.upper(), after=after, limit=limit)
    items = [LinkedDevice.model_validate({"device_id": d, "linked_by": how}) for d, how in found]
    return Page(items=items, next_after=items[-1].device_id if len(items) == limit else None)


@router.post("/enterprise-links", operation_id="link_enterprises", response_model=LinksChanged)
async def link_enterprises(
    platform: PlatformId, body: EnterpriseLinks, conn: Connection, caller: Caller
) -> LinksChanged:
    """Set (a code) or clear (null) the enterprise of devices and gateways in bulk. Devices
    behind a gateway without a link of their own follow the gateway's. All or nothing: unknown
    devices or gateways and enterprises the platform has not declared refuse the request."""
    await get_platform(conn, platform)
    devices = await enterprises.link(conn, platform, "devices", dict(body.devices))
    gateways = await enterprises.link(conn, platform, "gateways", dict(body.gateways))
    await audit(
        conn,
        "enterprise.link",
        f"{len(body.devices)} devices, {len(body.gateways)} gateways",
        key_id=caller.key_id,
        platform=platform,
        detail={"devices": body.devices, "gateways": body.gateways},
    )
    return LinksChanged(devices=devices, gateways=gateways)


@router.get(
    "/devices/{device}/enterprise",
    operation_id="device_enterprise",
    response_model=DeviceEnterprise,
)
async def device_enterprise(
    platform: PlatformId, device: DeviceId, conn: Connection
) -> DeviceEnterprise:
    """The enterprise a device belongs to, and how (its own link, its gateway's, the rule)."""
    code, how = await enterprises.device_enterprise(conn, platform, device)
    return DeviceEnterprise.model_validate(
        {"device_id": device, "enterprise": code, "linked_by": how}
    )


@router.get("/enterprise-rule", operation_id="get_enterprise_rule", response_model=EnterpriseRule)
async def get_enterprise_rule(platform: PlatformId, conn: Connection) -> EnterpriseRule:
    await get_platform(conn, platform)
    return EnterpriseRule(metadata_key=await enterprises.get_rule(conn, platform))


@router.put("/enterprise-rule", operation_id="set_enterprise_rule", response_model=EnterpriseRule)
async def set_enterprise_rule(
    platform: PlatformId, body: EnterpriseRule, conn: Connection, caller: Caller
) -> EnterpriseRule:
    """The platform's rule for devices without a link of their own or through a gateway (such
    as devices provisioned by their first message): the metadata key holding the code."""
    await get_platform(conn, platform)
    await enterprises.set_rule(conn, platform, body.metadata_key)
    await audit(
        conn,
        "enterprise.rule",
        platform,
        key_id=caller.key_id,
        platform=platform,
        detail={"metadata_key": body.metadata_key},
    )
    return body
