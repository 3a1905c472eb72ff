"""The batch writer on the real PostgreSQL: rows, registration, duplicates and dead letters."""

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import Telemetry
from ingest.errors import Rejected
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.platforms import upsert_platform
from tests.conftest import scalar

NOW = datetime.now(UTC).replace(microsecond=0)


def telemetry(
    platform: str, device: str, *points: tuple[datetime, str, float], historical: bool = False
) -> Received[None]:
    times = [p[0] for p in points]
    outcome = Telemetry(platform, device, list(points), historical, min(times), max(times))
    return Received("mqtt", f"iiot/v1/{platform}/{device}/telemetry", b"{}", NOW, outcome, None)


async def rows(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await db.execute("""
        SELECT d.platform_id, d.device_id, m.name, t.time, t.value
        FROM telemetry t JOIN devices d ON d.id = t.device_id JOIN metrics m ON m.id = t.metric_id
        ORDER BY 1, 2, 3, 4""")
    return await cur.fetchall()


async def test_points_are_stored_and_devices_registered(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    stats = IngestStats()
    writer = TelemetryWriter(pool, stats=stats)
    yesterday = NOW - timedelta(days=1)
    report = await writer.write(
        [
            telemetry(platform, "a", (NOW, "temp", 20.5), (NOW, "rpm", 1450.0)),
            telemetry(platform, "b", (yesterday, "temp", -3.25), historical=True),
        ]
    )
    assert (report.points_written, report.duplicates_skipped, report.devices_registered) == (
        3,
        0,
        2,
    )
    assert await rows(db) == [
        (platform, "a", "rpm", NOW, 1450.0),
        (platform, "a", "temp", NOW, 20.5),
        (platform, "b", "temp", yesterday, -3.25),
    ]
    # Historical data is stored but is no evidence of a live device.
    cur = await db.execute("SELECT device_id, last_seen IS NOT NULL FROM devices ORDER BY 1")
    assert await cur.fetchall() == [("a", True), ("b", False)]
    assert stats.points_written == 3


async def test_redelivered_and_repeated_points_are_stored_once(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    message = telemetry(
        platform, "a", (NOW, "temp", 1.0), (NOW - timedelta(seconds=1), "temp", 2.0)
    )
    assert (await writer.write([message])).points_written == 2
    # A redelivery of the same message, plus the same point twice within one batch.
    again = await writer.write(
        [
            message,
            telemetry(platform, "a", (NOW, "new", 3.0)),
            telemetry(platform, "a", (NOW, "new", 3.0)),
        ]
    )
    assert (again.points_written, again.duplicates_skipped) == (1, 3)
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 3


async def test_unknown_platform_and_refused_devices_become_dead_letters(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await upsert_platform(db, "closed", auto_provision=False)
    stats = IngestStats()
    writer = TelemetryWriter(pool, stats=stats)
    bad = Received(
        "mqtt", "iiot/v1/x", b"{", NOW, Rejected("invalid_json", "eof", platform=platform), None
    )
    report = await writer.write(
        [
            telemetry("nowhere", "a", (NOW, "temp", 1.0)),
            telemetry("closed", "a", (NOW, "temp", 1.0)),
            bad,
            telemetry(platform, "ok", (NOW, "temp", 1.0)),
        ]
    )
    assert (report.points_written, report.dead_letters) == (1, 3)
    cur = await db.execute(
        "SELECT platform_id, reason, topic, payload FROM dead_letters ORDER BY id"
    )
    assert await cur.fetchall() == [
        (platform, "invalid_json", "iiot/v1/x", b"{"),
        ("nowhere", "unknown_platform", "iiot/v1/nowhere/a/telemetry", b"{}"),
        ("closed", "unknown_device", "iiot/v1/closed/a/telemetry", b"{}"),
    ]
    assert await scalar(db, "SELECT count(*) FROM devices") == 1
    assert stats.rejected == {
        ("nowhere", "unknown_platform"): 1,
        ("closed", "unknown_device"): 1,
        (platform, "invalid_json"): 1,
    }


async def test_a_platform_created_later_is_found(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any]
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    assert (await writer.write([telemetry("late", "a", (NOW, "t", 1.0))])).dead_letters == 1
    await upsert_platform(db, "late")
    assert (await writer.write([telemetry("late", "a", (NOW, "t", 1.0))])).points_written == 1
