"""Reading stored telemetry: latest values, a time range raw or in buckets, a CSV export.

Every query goes through the primary key (device, metric, time), on plain PostgreSQL
partitions and TimescaleDB hypertables alike; buckets use `date_bin`, which both have.
"""

import csv
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from registry.csv_cells import text_cell
from registry.errors import NotFound

DEVICE_ROW = "SELECT id FROM devices WHERE platform_id = %s AND device_id = %s"
METRIC_IDS = "SELECT name, id FROM metrics WHERE name = ANY(%s)"

# The newest point of each of the device's metrics: a skip scan over the key's metric ids
# (one index probe per metric), then one probe per metric for its newest time.
LATEST = """
WITH RECURSIVE metric AS (
    (SELECT metric_id FROM telemetry WHERE device_id = %(device)s ORDER BY metric_id LIMIT 1)
    UNION ALL
    SELECT (SELECT t.metric_id FROM telemetry t
            WHERE t.device_id = %(device)s AND t.metric_id > metric.metric_id
            ORDER BY t.metric_id LIMIT 1)
    FROM metric WHERE metric.metric_id IS NOT NULL
)
SELECT m.name, last.time, last.value
FROM metric
JOIN metrics m ON m.id = metric.metric_id
CROSS JOIN LATERAL (
    SELECT time, value FROM telemetry
    WHERE device_id = %(device)s AND metric_id = metric.metric_id
    ORDER BY time DESC LIMIT 1
) last
ORDER BY m.name
"""

POINTS = """
SELECT time, value FROM telemetry
WHERE device_id = %(device)s AND metric_id = %(metric)s
  AND time >= %(start)s AND time < %(end)s
  AND time > coalesce(%(after)s::timestamptz, '-infinity')
ORDER BY time
LIMIT %(limit)s
"""

BUCKETS = """
SELECT date_bin(%(bucket)s, time, %(origin)s) AS bucket,
       avg(value), min(value), max(value), count(*)
FROM telemetry
WHERE device_id = %(device)s AND metric_id = %(metric)s AND time >= %(start)s AND time < %(end)s
GROUP BY 1
ORDER BY 1
"""

EXPORT = """
SELECT t.time, m.name, t.value
FROM telemetry t JOIN metrics m ON m.id = t.metric_id
WHERE t.device_id = %(device)s AND t.time >= %(start)s AND t.time < %(end)s
  AND (%(metrics)s::int4[] IS NULL OR t.metric_id = ANY(%(metrics)s))
ORDER BY t.metric_id, t.time
"""

_ORIGIN = datetime.fromisoformat("2000-01-01T00:00:00+00:00")


@dataclass(frozen=True, slots=True)
class Latest:
    metric: str
    time: datetime
    value: float


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    avg: float
    min: float
    max: float
    count: int


async def device_row(conn: AsyncConnection[Any], platform: str, device: str) -> int:
    cur = await conn.execute(DEVICE_ROW, (platform, device))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"device {device!r} on platform {platform!r}")
    return int(row[0])


async def metric_ids(conn: AsyncConnection[Any], names: Sequence[str]) -> dict[str, int]:
    cur = await conn.execute(METRIC_IDS, (list(names),))
    return {name: id_ for name, id_ in await cur.fetchall()}


async def latest(conn: AsyncConnection[Any], device: int) -> list[Latest]:
    cur = await conn.execute(LATEST, {"device": device})
    return [Latest(*row) for row in await cur.fetchall()]


async def points(
    conn: AsyncConnection[Any],
    device: int,
    metric: int,
    start: datetime,
    end: datetime,
    *,
    after: datetime | None,
    limit: int,
) -> list[tuple[datetime, float]]:
    """Raw points in time order; page with `after` (the last time seen)."""
    cur = await conn.execute(
        POINTS,
        {
            "device": device,
            "metric": metric,
            "start": start,
            "end": end,
            "after": after,
            "limit": limit,
        },
    )
    return [(t, v) for t, v in await cur.fetchall()]


async def buckets(
    conn: AsyncConnection[Any],
    device: int,
    metric: int,
    start: datetime,
    end: datetime,
    *,
    bucket: timedelta,
) -> list[Bucket]:
    cur = await conn.execute(
        BUCKETS,
        {
            "device": device,
            "metric": metric,
            "start": start,
            "end": end,
            "bucket": bucket,
            "origin": _ORIGIN,
        },
    )
    return [Bucket(*row) for row in await cur.fetchall()]


async def export_csv(
    conn: AsyncConnection[Any],
    device: int,
    start: datetime,
    end: datetime,
    metrics: Sequence[int] | None,
    *,
    rows_per_chunk: int = 5000,
) -> AsyncIterator[str]:
    """`time,metric,value` lines, read through a server-side cursor: memory stays flat
    whatever the range holds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("time", "metric", "value"))
    async with conn.transaction(), conn.cursor(name="telemetry_export") as cur:
        await cur.execute(
            EXPORT,
            {
                "device": device,
                "start": start,
                "end": end,
                "metrics": list(metrics) if metrics is not None else None,
            },
        )
        while rows := await cur.fetchmany(rows_per_chunk):
            writer.writerows((t.isoformat(), text_cell(name), repr(v)) for t, name, v in rows)
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    if out.tell():
        yield out.getvalue()
