"""Telemetry queries: latest values, ranges raw and bucketed, and the streamed CSV export."""

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from psycopg_pool import AsyncConnectionPool

from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.platforms import upsert_platform
from tests.test_writer import telemetry

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


async def store(pool: AsyncConnectionPool, platform: str) -> None:
    """press: temp every 10 s for 10 minutes (values 0..59), rpm at three times; other: one."""
    writer = TelemetryWriter(pool, stats=IngestStats())
    temp = [(T0 + timedelta(seconds=10 * n), "temp", float(n)) for n in range(60)]
    rpm = [(T0 + timedelta(minutes=n), "rpm", 1000.0 + n) for n in (0, 5, 9)]
    await writer.write([telemetry(platform, "press", *temp, *rpm, historical=True)])
    await writer.write([telemetry(platform, "other", (T0, "temp", 99.0), historical=True)])


async def test_latest_values_of_each_metric(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    await store(pool, platform)
    body = (await api.get(f"/platforms/{platform}/devices/press/latest")).json()
    assert [(v["metric"], v["value"]) for v in body["values"]] == [("rpm", 1009.0), ("temp", 59.0)]
    assert datetime.fromisoformat(body["values"][1]["time"]) == T0 + timedelta(seconds=590)
    empty = await api.get(f"/platforms/{platform}/devices/press-2/latest")
    assert empty.status_code == 404


async def test_a_range_raw_page_by_page_and_bucketed(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    await store(pool, platform)
    url = f"/platforms/{platform}/devices/press/telemetry"
    window = {"start": T0.isoformat(), "end": (T0 + timedelta(minutes=10)).isoformat()}
    seen: list[float] = []
    after = None
    while True:
        params = {**window, "metric": "temp", "limit": "25"} | ({"after": after} if after else {})
        page = (await api.get(url, params=params)).json()
        seen += [p["value"] for p in page["points"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == [float(n) for n in range(60)]

    bucketed = (
        await api.get(url, params={**window, "metric": "temp", "bucket_seconds": "120"})
    ).json()
    assert [(b["min"], b["max"], b["count"], b["avg"]) for b in bucketed["buckets"]] == [
        (12.0 * k, 12.0 * k + 11, 12, 12.0 * k + 5.5) for k in range(5)
    ]
    assert bucketed["points"] is None


async def test_bad_ranges_and_unknown_things_are_refused(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    await store(pool, platform)
    url = f"/platforms/{platform}/devices/press/telemetry"
    start = T0.isoformat()
    backwards = {"metric": "temp", "start": start, "end": (T0 - timedelta(hours=1)).isoformat()}
    for params, status in [
        (backwards, 422),
        ({"metric": "temp", "start": "2026-11-23T08:00:00"}, 422),  # no offset
        ({"metric": "temp", "start": start, "bucket_seconds": "1"}, 422),  # too many buckets
        ({"metric": "nope", "start": start}, 404),
        ({"metric": "temp", "start": "yesterday"}, 422),
        ({"start": start}, 422),
    ]:
        response = await api.get(url, params=params)
        assert response.status_code == status, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    response = await api.get(
        f"/platforms/{platform}/devices/ghost/telemetry", params={"metric": "temp", "start": start}
    )
    assert response.status_code == 404


async def test_csv_export_streams_every_point_of_the_range(
    api: httpx.AsyncClient,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    await store(pool, platform)
    url = f"/platforms/{platform}/devices/press/telemetry.csv"
    window = {"start": T0.isoformat(), "end": (T0 + timedelta(minutes=10)).isoformat()}
    async with api.stream("GET", url, params=window) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        text = "".join([chunk async for chunk in response.aiter_text()])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["time", "metric", "value"]
    assert len(rows) == 1 + 60 + 3
    assert {r[1] for r in rows[1:]} == {"temp", "rpm"}
    only = (await api.get(url, params={**window, "metric": "rpm"})).text
    assert [r[2] for r in list(csv.reader(io.StringIO(only)))[1:]] == ["1000.0", "1005.0", "1009.0"]
    too_long = {"start": T0.isoformat(), "end": (T0 + timedelta(days=400)).isoformat()}
    assert (await api.get(url, params=too_long)).status_code == 422


async def test_devices_are_listed_and_searched_a_page_at_a_time(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    registered = await api.post(
        f"/platforms/{platform}/devices",
        json={
            "devices": [
                {"device_id": f"m{n:02d}", "metadata": {"line": n % 3, "vendor": "acme"}}
                for n in range(12)
            ]
        },
    )
    assert registered.status_code in (200, 201), registered.text
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    await writer.write([telemetry(platform, "m01", (now, "v", 1.0))])  # connected now
    url = f"/platforms/{platform}/devices"
    ids: list[str] = []
    after = None
    while True:
        params = {"limit": "5"} | ({"after": after} if after else {})
        page = (await api.get(url, params=params)).json()
        ids += [d["device_id"] for d in page["items"]]
        if (after := page["next_after"]) is None:
            break
    assert ids == [f"m{n:02d}" for n in range(12)]
    line1 = (await api.get(url, params={"metadata": '{"line": 1}'})).json()["items"]
    assert [d["device_id"] for d in line1] == ["m01", "m04", "m07", "m10"]
    online = (await api.get(url, params={"connected": "true"})).json()["items"]
    assert [d["device_id"] for d in online] == ["m01"]
    offline = (await api.get(url, params={"connected": "false", "metadata": '{"line": 1}'})).json()
    assert [d["device_id"] for d in offline["items"]] == ["m04", "m07", "m10"]
    assert (await api.get(url, params={"gateway": "gw-1"})).json()["items"] == []
    assert (await api.get(url, params={"metadata": "[1]"})).status_code == 422
    assert (await api.get(url, params={"metadata": "{"})).status_code == 422
    assert (await api.get("/platforms/no-such/devices")).status_code == 404


async def test_times_without_an_offset_are_refused_not_failed(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-9")
    for path, params in (
        ("/platforms/plant-9/devices/count/history", {"start": "2026-01-01T00:00:00"}),
        ("/platforms/plant-9/devices/d/telemetry", {"metric": "v", "start": "2026-01-01T00:00:00"}),
        ("/platforms/plant-9/devices/d/telemetry.csv", {"start": "2026-01-01T00:00:00"}),
    ):
        response = await api.get(path, params=params)
        assert response.status_code == 422, (path, response.text)
