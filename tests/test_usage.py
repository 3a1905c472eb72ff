"""Usage metering and quotas through the real writer and the API (docs/usage.md)."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import MessageDecoder
from ingest.settings import Limits
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import TelemetryWriter, WriteReport
from registry.platforms import Tier, upsert_platform
from tests.conftest import scalar

TOPICS = TopicScheme("iiot/v1")
DECODE = MessageDecoder(TOPICS, Limits())
NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()


def message(topic: str, body: Any, source: str = "mqtt") -> Received[None]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Received(source, topic, raw, NOW, DECODE(topic, raw, NOW), None)


def data(platform: str, device: str, *seconds: int) -> Received[None]:
    """One message with one point per second offset (distinct times: distinct points)."""
    body = [
        {"ts": int((NOW - timedelta(seconds=s)).timestamp() * 1000), "metrics": {"v": s}}
        for s in seconds
    ]
    return message(TOPICS.telemetry(platform, device), body)


@pytest.fixture
async def plants(db: psycopg.AsyncConnection[Any]) -> None:
    await upsert_platform(db, "plant-1", tier=Tier.BASIC)
    await upsert_platform(db, "plant-2", tier=Tier.LEADING)


async def test_each_batch_is_metered_in_its_transaction_and_points_never_twice(
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    api: httpx.AsyncClient,
    plants: None,
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats(), counter_shard=2)
    first = [data("plant-1", "a", 1, 2, 3), data("plant-1", "b", 4), data("plant-2", "c", 5)]
    bad = message(TOPICS.telemetry("plant-1", "a"), b"{not json")
    await writer.write([*first, bad])
    # The broker redelivers the first message (its acknowledgement was lost) with a new one.
    redelivered, later = data("plant-1", "a", 1, 2, 3), data("plant-1", "a", 6, 7)
    await writer.write([redelivered, later])

    stored = await scalar(
        db,
        "SELECT count(*) FROM telemetry t JOIN devices d ON d.id = t.device_id "
        "WHERE d.platform_id = 'plant-1'",
    )
    assert stored == 6
    body = (await api.get("/platforms/plant-1/usage")).json()
    (day,) = body["days"]
    accepted = [*first[:2], redelivered, later]
    assert day | {"connected_device_days": 0, "sampled_seconds": 0} == {
        "platform": "plant-1",
        "day": TODAY.isoformat(),
        "messages": 4,  # the redelivery was a delivery too
        "bytes": sum(len(m.payload) for m in accepted),
        "points": 6,  # exactly what was stored
        "duplicate_points": 3,
        "refused_messages": 1,
        "connected_device_days": 0,
        "sampled_seconds": 0,
        "soft_quota": None,
        "hard_quota": None,
        "over_soft_quota": False,
    }
    # The ledger has one row per batch and platform, adding up to the daily totals.
    ledger = await scalar(
        db, "SELECT array_agg(points ORDER BY id) FROM usage_ledger WHERE platform_id = 'plant-1'"
    )
    assert ledger == [4, 2]
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        await db.execute("UPDATE usage_ledger SET points = 0")
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        await db.execute("DELETE FROM usage_ledger")

    # A failed batch meters nothing: the ledger commits with the points or not at all.
    await db.execute("ALTER TABLE usage_daily ADD CONSTRAINT no_more CHECK (messages < 5)")
    report = await writer.write([data("plant-1", "z", 9)])
    assert report.dead_letters == 1  # refused by the store, kept as a dead letter
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 7
    assert await scalar(db, "SELECT count(*) FROM usage_ledger") == 3 + 1  # + the refusal


async def test_quotas_flag_at_the_soft_limit_and_refuse_at_the_hard_one(
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    api: httpx.AsyncClient,
    plants: None,
) -> None:
    quota = {"soft_points_per_day": 2, "hard_points_per_day": 4}
    assert (await api.put("/quotas/basic", json=quota)).status_code == 200
    inverted = {"soft_points_per_day": 9, "hard_points_per_day": 3}
    assert (await api.put("/quotas/growth", json=inverted)).status_code == 422
    writer = TelemetryWriter(pool, stats=IngestStats())

    async def write(*batch: Received[None]) -> WriteReport:
        return await writer.write(list(batch))

    assert (await write(data("plant-1", "a", 1, 2, 3))).dead_letters == 0
    flagged = (await api.get("/platforms/plant-1/usage")).json()["days"][0]
    assert (flagged["points"], flagged["over_soft_quota"]) == (3, True)
    # Under the hard quota still: the next batch is stored, and overshoots it.
    assert (await write(data("plant-1", "a", 4, 5))).dead_letters == 0
    # At the hard quota: points are refused with a reason, status still goes through, and
    # the leading tier (no quota) is untouched.
    status = message(TOPICS.status("plant-1", "a"), b"offline")
    report = await write(data("plant-1", "a", 6), status, data("plant-2", "c", 7))
    assert (report.dead_letters, report.points_written) == (1, 1)
    reason, detail = await scalar(
        db, "SELECT array[reason, detail] FROM dead_letters WHERE platform_id = 'plant-1'"
    )
    assert reason == "quota_exceeded"
    assert "hard quota is 4 points per day" in detail
    assert await scalar(db, "SELECT state FROM devices WHERE device_id = 'a'") == "offline"
    day = (await api.get("/platforms/plant-1/usage")).json()["days"][0]
    assert (day["points"], day["refused_messages"], day["hard_quota"]) == (5, 1, 4)
    assert (await api.get("/quotas")).json() == [{"tier": "basic", **quota}]


async def test_connected_device_days_integrate_the_count_samples(
    db: psycopg.AsyncConnection[Any], api: httpx.AsyncClient, plants: None
) -> None:
    midnight = datetime.combine(TODAY - timedelta(days=1), datetime.min.time(), UTC)
    # 12 devices for the first half of yesterday, 4 for six hours, no samples after.
    samples = [(midnight + timedelta(minutes=m), 12) for m in range(0, 720, 60)]
    samples += [(midnight + timedelta(hours=12, minutes=m), 4) for m in range(0, 360, 60)]
    for time, connected in samples:
        await db.execute(
            "INSERT INTO count_history (time, platform_id, registered, connected, "
            "ever_connected, seconds) VALUES (%s, 'plant-1', 20, %s, 20, 3600)",
            (time, connected),
        )
    params = {"start": (TODAY - timedelta(days=1)).isoformat(), "end": TODAY.isoformat()}
    (day,) = (await api.get("/platforms/plant-1/usage", params=params)).json()["days"]
    assert day["connected_device_days"] == pytest.approx((12 * 12 + 4 * 6) / 24)
    assert day["sampled_seconds"] == 18 * 3600

    csv = await api.get("/platforms/plant-1/usage.csv", params=params)
    assert csv.headers["content-type"].startswith("text/csv")
    header, row = csv.text.strip().split("\n")
    assert header.startswith("platform,day,messages,bytes,points,")
    assert row.startswith(f"plant-1,{params['start']},0,0,0,0,0,7.0,64800,")
    everyone = await api.get("/usage.csv", params=params)
    assert everyone.text.count("\n") == 2  # plant-2 had no samples and no traffic


async def test_usage_ranges_outside_the_calendar_are_refused_not_failed(
    api: httpx.AsyncClient, plants: None
) -> None:
    for params in ({"end": "0001-01-01"}, {"start": "0001-01-01"}, {"end": "1970-01-01"}):
        for path in ("/platforms/plant-1/usage", "/platforms/plant-1/usage.csv", "/usage.csv"):
            response = await api.get(path, params=params)
            assert response.status_code in (200, 422), (path, params, response.text)
    assert (await api.get("/usage.csv", params={"end": "0001-01-01"})).status_code == 422
