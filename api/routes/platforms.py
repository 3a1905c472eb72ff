from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import Connection, PlatformId
from api.models import Page, PlatformCreate, PlatformOut, PlatformUpdate
from registry import platforms
from registry.ids import PLATFORM_ID_PATTERN
from registry.platforms import Tier

router = APIRouter(prefix="/platforms", tags=["platforms"])


@router.post(
    "",
    operation_id="create_platform",
    status_code=status.HTTP_201_CREATED,
    response_model=PlatformOut,
)
async def create_platform(body: PlatformCreate, conn: Connection) -> PlatformOut:
    """Create a platform; 409 if the id is taken."""
    created = await platforms.create_platform(conn, body.model_dump())
    return PlatformOut(**asdict(created))


@router.get("", operation_id="list_platforms", response_model=Page[PlatformOut])
async def list_platforms(
    conn: Connection,
    after: Annotated[str | None, Query(pattern=f"^{PLATFORM_ID_PATTERN}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    tier: Tier | None = None,
    region: Annotated[str | None, Query(pattern=r"^[0-9]{6}$")] = None,
) -> Page[PlatformOut]:
    """Platforms in id order, a page at a time."""
    found = await platforms.list_platforms(
        conn, after=after, limit=limit, tier=tier.value if tier else None, region=region
    )
    items = [PlatformOut(**asdict(p)) for p in found]
    return Page(items=items, next_after=items[-1].id if len(items) == limit else None)


@router.get("/{platform}", operation_id="get_platform", response_model=PlatformOut)
async def get_platform(platform: PlatformId, conn: Connection) -> PlatformOut:
    return PlatformOut(**asdict(await platforms.get_platform(conn, platform)))


@router.patch("/{platform}", operation_id="update_platform", response_model=PlatformOut)
async def update_platform(
    platform: PlatformId, body: PlatformUpdate, conn: Connection
) -> PlatformOut:
    """Change the given fields; the others keep their values."""
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    updated = await platforms.update_platform(conn, platform, changes)
    return PlatformOut(**asdict(updated))
