from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.auth import PlatformScope
from api.deps import Connection, DeviceId, PlatformId
from api.models import (
    Instant,
    LatestValue,
    LatestValues,
    TelemetryBucket,
    TelemetryPoint,
    TelemetryRange,
)
from registry import telemetry
from registry.errors import Invalid, NotFound

router = APIRouter(
    prefix="/platforms/{platform}/devices/{device}",
    tags=["telemetry"],
    dependencies=[PlatformScope],
)
MAX_BUCKETS = 10_000
MAX_EXPORT = timedelta(days=366)


@router.get("/latest", operation_id="latest_values", response_model=LatestValues)
async def latest_values(platform: PlatformId, device: DeviceId, conn: Connection) -> LatestValues:
    """The newest stored point of each of the device's metrics."""
    row = await telemetry.device_row(conn, platform, device)
    values = [
        LatestValue(metric=v.metric, time=v.time, value=v.value)
        for v in await telemetry.latest(conn, row)
    ]
    return LatestValues(platform=platform, device=device, values=values)


@router.get("/telemetry", operation_id="telemetry_range", response_model=TelemetryRange)
async def telemetry_range(
    platform: PlatformId,
    device: DeviceId,
    conn: Connection,
    *,
    metric: Annotated[str, Query(min_length=1, max_length=128)],
    start: Annotated[Instant, Query(description="Inclusive, RFC 3339 with an offset.")],
    end: Annotated[Instant | None, Query(description="Exclusive; default now.")] = None,
    bucket_seconds: Annotated[
        int | None, Query(ge=1, le=86400 * 31, description="Aggregate per bucket; omit for raw.")
    ] = None,
    after: Annotated[Instant | None, Query(description="Raw pages: the last time seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> TelemetryRange:
    """One metric of a device over a time range: raw points a page at a time, or per bucket
    the average, minimum, maximum and count."""
    stop = end or datetime.now(UTC)
    _check_range(start, stop)
    row = await telemetry.device_row(conn, platform, device)
    ids = await telemetry.metric_ids(conn, [metric])
    if metric not in ids:
        raise NotFound(f"metric {metric!r}")
    result = TelemetryRange(
        platform=platform,
        device=device,
        metric=metric,
        start=start,
        end=stop,
        bucket_seconds=bucket_seconds,
        points=None,
        buckets=None,
        next_after=None,
    )
    if bucket_seconds is not None:
        bucket = timedelta(seconds=bucket_seconds)
        if (stop - start) / bucket > MAX_BUCKETS:
            raise Invalid(f"more than {MAX_BUCKETS} buckets: widen bucket_seconds")
        found = await telemetry.buckets(conn, row, ids[metric], start, stop, bucket=bucket)
        result.buckets = [
            TelemetryBucket(start=b.start, avg=b.avg, min=b.min, max=b.max, count=b.count)
            for b in found
        ]
        return result
    page = await telemetry.points(conn, row, ids[metric], start, stop, after=after, limit=limit)
    result.points = [TelemetryPoint(time=t, value=v) for t, v in page]
    result.next_after = page[-1][0] if len(page) == limit else None
    return result


@router.get(
    "/telemetry.csv",
    operation_id="telemetry_export",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "time,metric,value rows"}},
)
async def telemetry_export(
    request: Request,
    platform: PlatformId,
    device: DeviceId,
    *,
    start: Annotated[Instant, Query(description="Inclusive, RFC 3339 with an offset.")],
    end: Annotated[Instant | None, Query(description="Exclusive; default now.")] = None,
    metric: Annotated[
        list[str] | None, Query(description="Repeat for several; all if none.")
    ] = None,
) -> StreamingResponse:
    """A device's points over a range as CSV (`time,metric,value`), streamed from a database
    cursor, for building datasets. At most a year per request."""
    stop = end or datetime.now(UTC)
    _check_range(start, stop)
    if stop - start > MAX_EXPORT:
        raise Invalid("at most 366 days per export")
    pool = request.app.state.pool
    # The stream outlives the handler: it holds its own connection until the last row.
    async with pool.connection() as conn:
        row = await telemetry.device_row(conn, platform, device)
        ids = list((await telemetry.metric_ids(conn, metric)).values()) if metric else None

    async def rows() -> AsyncIterator[str]:
        async with pool.connection() as conn:
            async for chunk in telemetry.export_csv(conn, row, start, stop, ids):
                yield chunk

    filename = f"{platform}_{device}_{start:%Y%m%dT%H%M%S}.csv".replace(":", "-")
    return StreamingResponse(
        rows(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _check_range(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise Invalid("times need a UTC offset (RFC 3339)")
    if end <= start:
        raise Invalid("end must be after start")
