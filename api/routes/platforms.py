from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from api.auth import Caller, PlatformScope, check_admin
from api.broker_control import clients_changed
from api.deps import Connection, PlatformId
from api.models import Page, PlatformCreate, PlatformOut, PlatformUpdate
from api.problems import Problem
from registry import platforms
from registry.access import Role, audit
from registry.ids import PLATFORM_ID_PATTERN
from registry.platforms import Tier

router = APIRouter(prefix="/platforms", tags=["platforms"])
CLASSIFICATION = frozenset({"tier", "type", "region", "industry"})


@router.post(
    "",
    operation_id="create_platform",
    status_code=status.HTTP_201_CREATED,
    response_model=PlatformOut,
)
async def create_platform(body: PlatformCreate, conn: Connection, caller: Caller) -> PlatformOut:
    """Create a platform (admin); 409 if the id is taken."""
    check_admin(caller)
    created = await platforms.create_platform(conn, body.model_dump())
    await audit(conn, "platform.create", created.id, key_id=caller.key_id, platform=created.id)
    # Read back: a write returns what it set, the read adds what derives from it.
    return PlatformOut.of(await platforms.get_platform(conn, created.id))


@router.get("", operation_id="list_platforms", response_model=Page[PlatformOut])
async def list_platforms(
    conn: Connection,
    caller: Caller,
    *,
    after: Annotated[str | None, Query(pattern=f"^{PLATFORM_ID_PATTERN}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    tier: Tier | None = None,
    region: Annotated[str | None, Query(pattern=r"^[0-9]{6}$")] = None,
) -> Page[PlatformOut]:
    """Platforms in id order, a page at a time (for a platform's key: its own)."""
    found = await platforms.list_platforms(
        conn,
        after=after,
        limit=limit,
        tier=tier.value if tier else None,
        region=region,
        only=caller.platform,
    )
    items = [PlatformOut.of(p) for p in found]
    return Page(items=items, next_after=items[-1].id if len(items) == limit else None)


@router.get(
    "/{platform}",
    operation_id="get_platform",
    response_model=PlatformOut,
    dependencies=[PlatformScope],
)
async def get_platform(platform: PlatformId, conn: Connection) -> PlatformOut:
    return PlatformOut.of(await platforms.get_platform(conn, platform))


@router.patch(
    "/{platform}",
    operation_id="update_platform",
    response_model=PlatformOut,
    dependencies=[PlatformScope],
)
async def update_platform(
    platform: PlatformId, body: PlatformUpdate, request: Request, conn: Connection, caller: Caller
) -> PlatformOut:
    """Change the given fields; the others keep their values. The classification (tier, type,
    region, industry) is the administrator's to change."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if caller.role is not Role.ADMIN and changes.keys() & CLASSIFICATION:
        raise Problem(403, "Forbidden", "only an admin key may change tier, type, region, industry")
    updated = await platforms.update_platform(conn, platform, changes)
    clients_changed(request, platform)  # auto-provisioning decides which clients stand
    await audit(
        conn, "platform.update", platform, key_id=caller.key_id, platform=platform, detail=changes
    )
    return PlatformOut.of(await platforms.get_platform(conn, updated.id))
