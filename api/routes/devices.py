from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, Response, status

from api.auth import Caller, PlatformScope, check_read, operator
from api.broker_control import clients_changed
from api.deps import (
    Cell,
    Connection,
    DeviceId,
    PlatformId,
    Settings,
    json_response,
    read_connection,
)
from api.models import (
    Affected,
    CountHistory,
    DeviceCounts,
    DeviceEventOut,
    DeviceEvents,
    DeviceIds,
    DeviceOut,
    DeviceRegistration,
    DeviceUpdate,
    DeviceView,
    HistoryPoint,
    Instant,
    LatestValue,
    Page,
)
from api.moved import refuse_moved
from registry import history as history_store
from registry import registration, telemetry
from registry.access import audit
from registry.counts import platform_counts
from registry.errors import Invalid, NotFound
from registry.history import history
from registry.ids import DEVICE_ID_PATTERN
from registry.json_limits import check_document
from registry.platforms import get_platform

router = APIRouter(
    prefix="/platforms/{platform}/devices", tags=["devices"], dependencies=[PlatformScope]
)
# The count, the API's hottest read, checks its platform in the handler instead of through the
# router's dependency: FastAPI's dependency resolution was a large share of its time.
# Included before `router`, so /count is matched before /{device} (`count` is a reserved
# device id in URLs, docs/contract.md).
count_router = APIRouter(prefix="/platforms/{platform}/devices", tags=["devices"])
MAX_BUCKETS = 5000


@count_router.get("/count", operation_id="platform_device_counts", response_model=DeviceCounts)
async def device_counts(platform: PlatformId, request: Request) -> Response:
    """How many of a platform's devices are registered and connected (docs/counts.md)."""
    check_read(await operator(request), platform)
    async with read_connection(request) as conn:
        counts = await platform_counts(conn, platform)
    if counts is None:  # no such platform here, or it moved (it counts in its new cell)
        await refuse_moved(request.app.state, platform)
        raise NotFound(f"platform {platform!r}")
    # Serialized here, not by FastAPI, which would validate the model it was just given again:
    # the count is the API's hottest read.
    return json_response(
        DeviceCounts(
            cell=request.app.state.settings.cell,
            platform=counts.platform,
            registered=counts.registered,
            connected=counts.connected,
            ever_connected=counts.ever_connected,
            active_24h=counts.active_24h,
            active_30d=counts.active_30d,
            activity_as_of=counts.activity_as_of,
            liveness_seconds=counts.liveness_seconds,
            as_of=counts.as_of,
        )
    )


@router.get("/count/history", operation_id="platform_count_history", response_model=CountHistory)
async def count_history(
    platform: PlatformId,
    conn: Connection,
    *,
    cell: Cell,
    start: Annotated[Instant, Query(description="Inclusive, RFC 3339.")],
    end: Annotated[Instant | None, Query(description="Exclusive; default now.")] = None,
    bucket_seconds: Annotated[int, Query(ge=60, le=86400 * 31)] = 3600,
) -> CountHistory:
    """Connected devices over time, from samples taken every minute: per bucket the lowest,
    highest and last sampled count."""
    await get_platform(conn, platform)
    stop = end or datetime.now(UTC)
    if stop <= start:
        raise Invalid("end must be after start")
    if (stop - start) / timedelta(seconds=bucket_seconds) > MAX_BUCKETS:
        raise Invalid(f"more than {MAX_BUCKETS} buckets: widen bucket_seconds")
    rows = await history(conn, platform, start, stop, timedelta(seconds=bucket_seconds))
    return CountHistory(
        cell=cell,
        platform=platform,
        bucket_seconds=bucket_seconds,
        buckets=[HistoryPoint(**asdict(r)) for r in rows],
    )


@router.post("", operation_id="register_devices", response_model=Affected)
async def register_devices(
    platform: PlatformId,
    body: DeviceRegistration,
    conn: Connection,
    settings: Settings,
    caller: Caller,
) -> Affected:
    """Register devices in bulk (up to 10,000); existing ones get their metadata merged, and
    decommissioned ones return to service. Returns how many are newly registered."""
    await get_platform(conn, platform)
    devices = [(d.device_id, d.metadata) for d in body.devices]
    async with conn.transaction():
        added = await registration.register_devices(
            conn, platform, devices, shard=settings.api_counter_shard
        )
        ids = [d for d, _ in devices]
        await audit(
            conn,
            "device.register",
            _subject(ids),
            key_id=caller.key_id,
            platform=platform,
            detail={"ids": ids},
        )
    return Affected(count=added)


@router.post("/decommission", operation_id="decommission_devices", response_model=Affected)
async def decommission_devices(
    platform: PlatformId,
    body: DeviceIds,
    request: Request,
    *,
    conn: Connection,
    settings: Settings,
    caller: Caller,
) -> Affected:
    """Take devices out of service in bulk: no longer registered or connected (disconnected
    from the broker where EMQX's API is configured), their data refused. Returns how many were
    in service."""
    await get_platform(conn, platform)
    async with conn.transaction():
        removed = await registration.decommission_devices(
            conn, platform, body.device_ids, shard=settings.api_counter_shard
        )
        ids = body.device_ids
        clients_changed(request, platform, [f"{platform}/{device}" for device in ids])
        await audit(
            conn,
            "device.decommission",
            _subject(ids),
            key_id=caller.key_id,
            platform=platform,
            detail={"ids": ids},
        )
    return Affected(count=removed)


@router.get("", operation_id="list_devices", response_model=Page[DeviceOut])
async def list_devices(
    platform: PlatformId,
    conn: Connection,
    *,
    connected: Annotated[bool | None, Query(description="Connected now, or not.")] = None,
    gateway: Annotated[str | None, Query(pattern=f"^{DEVICE_ID_PATTERN}$")] = None,
    metadata: Annotated[
        str | None, Query(max_length=2000, description='JSON the metadata contains: {"line": 3}')
    ] = None,
    after: Annotated[str | None, Query(pattern=f"^{DEVICE_ID_PATTERN}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> Page[DeviceOut]:
    """A platform's devices in id order, a page at a time, searched by connection, gateway and
    metadata."""
    await get_platform(conn, platform)
    wanted: dict[str, Any] | None = None
    if metadata is not None:
        try:
            wanted = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            raise Invalid("metadata must be a JSON object") from None
        if not isinstance(wanted, dict):
            raise Invalid("metadata must be a JSON object")
        try:
            check_document(wanted, "the metadata searched for")
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    found = await registration.list_devices(
        conn,
        platform,
        after=after,
        gateway=gateway,
        connected=connected,
        metadata=wanted,
        limit=limit,
    )
    items = [DeviceOut(**asdict(d)) for d in found]
    return Page(items=items, next_after=items[-1].device_id if len(items) == limit else None)


@router.get("/{device}", operation_id="get_device", response_model=DeviceView)
async def get_device(platform: PlatformId, device: DeviceId, conn: Connection) -> DeviceView:
    """A device with its connection state, when it was last seen, and its latest values."""
    found = await registration.get_device(conn, platform, device)
    row = await telemetry.device_row(conn, platform, device)
    latest = [LatestValue(**asdict(v)) for v in await telemetry.latest(conn, row)]
    return DeviceView(**asdict(found), latest=latest)


@router.get("/{device}/events", operation_id="device_events", response_model=DeviceEvents)
async def device_events(
    platform: PlatformId,
    device: DeviceId,
    conn: Connection,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeviceEvents:
    """The device's connection state history, newest first: its own events and its gateway's
    (a gateway's death or rebirth is one event for all the devices behind it)."""
    await registration.get_device(conn, platform, device)
    events = await history_store.device_events(conn, platform, device, limit)
    return DeviceEvents(
        platform=platform,
        device=device,
        events=[DeviceEventOut(**asdict(e)) for e in events],
    )


@router.patch("/{device}", operation_id="update_device", response_model=DeviceOut)
async def update_device(
    platform: PlatformId, device: DeviceId, body: DeviceUpdate, conn: Connection, caller: Caller
) -> DeviceOut:
    """Merge the given metadata into the device's."""
    updated = await registration.update_device_metadata(conn, platform, device, body.metadata)
    await audit(
        conn,
        "device.update",
        device,
        key_id=caller.key_id,
        platform=platform,
        detail={"metadata": body.metadata},
    )
    return DeviceOut(**asdict(updated))


@router.delete(
    "/{device}", operation_id="decommission_device", status_code=status.HTTP_204_NO_CONTENT
)
async def decommission_device(
    platform: PlatformId,
    device: DeviceId,
    request: Request,
    *,
    conn: Connection,
    settings: Settings,
    caller: Caller,
) -> None:
    async with conn.transaction():
        removed = await registration.decommission_devices(
            conn, platform, [device], shard=settings.api_counter_shard
        )
        if not removed:
            raise NotFound(f"device {device!r} on platform {platform!r}")
        clients_changed(request, platform, [f"{platform}/{device}"])
        await audit(conn, "device.decommission", device, key_id=caller.key_id, platform=platform)


def _subject(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else f"{len(ids)} devices"
