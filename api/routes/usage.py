"""Usage for pay-after-use billing, per platform and UTC day, and the tiers' quotas
(docs/usage.md)."""

import csv
import io
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.auth import Caller, PlatformScope, check_admin, check_national
from api.deps import Connection, PlatformId
from api.models import MinuteOut, QuotaIn, QuotaOut, RecentIngest, UsageDayOut, UsageDays
from registry import usage
from registry.access import audit
from registry.csv_cells import text_cell
from registry.errors import Invalid
from registry.platforms import Tier, get_platform

router = APIRouter(tags=["usage"])
MAX_DAYS = 366
CSV_COLUMNS = (
    "platform",
    "day",
    "messages",
    "bytes",
    "points",
    "duplicate_points",
    "refused_messages",
    "connected_device_days",
    "sampled_seconds",
    "soft_quota",
    "hard_quota",
    "over_soft_quota",
)
# Days from 1970 on: earlier ones hold nothing, and a default start a month before year 1's
# first days would not be a date.
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 31)
Start = Annotated[
    date | None,
    Query(ge=FIRST_DAY, le=LAST_DAY, description="First UTC day; default 31 days before end."),
]
End = Annotated[
    date | None,
    Query(ge=FIRST_DAY, le=LAST_DAY, description="Day after the last; default tomorrow (UTC)."),
]


def _range(start: date | None, end: date | None) -> tuple[date, date]:
    stop = end or datetime.now(UTC).date() + timedelta(days=1)
    first = start or stop - timedelta(days=31)
    if stop <= first:
        raise Invalid("end must be after start")
    if (stop - first).days > MAX_DAYS:
        raise Invalid(f"at most {MAX_DAYS} days per request")
    return first, stop


def _out(day: usage.UsageDay) -> UsageDayOut:
    return UsageDayOut(**asdict(day), over_soft_quota=day.over_soft_quota)


def _cell(value: object) -> object:
    if value is None:
        return ""
    return text_cell(value) if isinstance(value, str) else value


def _csv(days: list[usage.UsageDay], filename: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for d in days:
        row = _out(d).model_dump()
        writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/platforms/{platform}/usage",
    operation_id="platform_usage",
    response_model=UsageDays,
    dependencies=[PlatformScope],
)
async def platform_usage(
    platform: PlatformId, conn: Connection, start: Start = None, end: End = None
) -> UsageDays:
    """What the platform used per UTC day: messages, bytes, points newly stored (the billed
    quantity), duplicates not stored again, refused messages, connected-device-days, and its
    tier's quotas with whether the soft one was passed. At most 366 days."""
    await get_platform(conn, platform)
    first, stop = _range(start, end)
    days = await usage.usage_days(conn, platform=platform, start=first, end=stop)
    return UsageDays(platform=platform, start=first, end=stop, days=[_out(d) for d in days])


@router.get(
    "/platforms/{platform}/ingest/recent",
    operation_id="recent_ingest",
    response_model=RecentIngest,
    dependencies=[PlatformScope],
)
async def recent_ingest(
    platform: PlatformId,
    conn: Connection,
    minutes: Annotated[int, Query(ge=1, le=1440)] = 60,
) -> RecentIngest:
    """The platform's ingest per minute over the last `minutes`: messages accepted, points
    stored and messages refused (dead-lettered), from the usage ledger."""
    await get_platform(conn, platform)
    rows = await usage.recent_minutes(conn, platform, timedelta(minutes=minutes))
    return RecentIngest(platform=platform, minutes=[MinuteOut(**asdict(m)) for m in rows])


@router.get(
    "/platforms/{platform}/usage.csv",
    operation_id="platform_usage_export",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per day"}},
    dependencies=[PlatformScope],
)
async def platform_usage_export(
    platform: PlatformId, conn: Connection, start: Start = None, end: End = None
) -> Response:
    """The same as CSV, one row per day."""
    await get_platform(conn, platform)
    first, stop = _range(start, end)
    days = await usage.usage_days(conn, platform=platform, start=first, end=stop)
    return _csv(days, f"usage_{platform}_{first}_{stop}.csv")


@router.get(
    "/usage.csv",
    operation_id="usage_export",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per platform and day"}},
)
async def usage_export(
    conn: Connection, caller: Caller, start: Start = None, end: End = None
) -> Response:
    """Every platform's usage as CSV, one row per platform and day (keys for all platforms)."""
    check_national(caller)
    first, stop = _range(start, end)
    days = await usage.usage_days(conn, platform=None, start=first, end=stop)
    return _csv(days, f"usage_{first}_{stop}.csv")


@router.get("/quotas", operation_id="list_quotas", response_model=list[QuotaOut])
async def list_quotas(conn: Connection, caller: Caller) -> list[QuotaOut]:
    """Each tier's daily points quotas (tiers without a row have none)."""
    return [QuotaOut(**asdict(q)) for q in (await usage.quotas(conn)).values()]


@router.put("/quotas/{tier}", operation_id="set_quota", response_model=QuotaOut)
async def set_quota(tier: Tier, body: QuotaIn, conn: Connection, caller: Caller) -> QuotaOut:
    """Set a tier's quotas (admin): over the soft one a day is flagged, at the hard one the
    platform's messages with points are refused (dead-lettered `quota_exceeded`, counted)."""
    check_admin(caller)
    soft, hard = body.soft_points_per_day, body.hard_points_per_day
    if soft is not None and hard is not None and soft > hard:
        raise Invalid("the soft quota cannot exceed the hard one")
    quota = usage.Quota(tier.value, body.soft_points_per_day, body.hard_points_per_day)
    await usage.set_quota(conn, quota)
    await audit(
        conn, "quota.set", tier.value, key_id=caller.key_id, platform=None, detail=asdict(quota)
    )
    return QuotaOut(**asdict(quota))
