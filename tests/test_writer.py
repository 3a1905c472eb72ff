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
    return Received("mqtt", f"iiot/v1/{platform}/{device}/telemetry", b"{}", NOW, [outcome], None)


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
        # In arrival order.
        ("nowhere", "unknown_platform", "iiot/v1/nowhere/a/telemetry", b"{}"),
        ("closed", "unknown_device", "iiot/v1/closed/a/telemetry", b"{}"),
        (platform, "invalid_json", "iiot/v1/x", b"{"),
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


def via_gateway(platform: str, gateway: str, *devices: tuple[str, float]) -> Received[None]:
    outcome = [
        Telemetry(platform, device, [(NOW, "v", value)], False, NOW, NOW, gateway)
        for device, value in devices
    ]
    topic = f"iiot/v1/{platform}/gateways/{gateway}/telemetry"
    return Received("mqtt", topic, b"{}", NOW, outcome, None)


async def test_devices_seen_through_a_gateway_are_registered_with_it(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    report = await writer.write([via_gateway(platform, "edge-1", ("a", 1.0), ("b", 2.0))])
    assert (report.points_written, report.devices_registered) == (2, 2)
    # A device that moves to another gateway follows it.
    await writer.write([via_gateway(platform, "edge-2", ("b", 3.0))])
    cur = await db.execute("""
        SELECT d.device_id, g.gateway_id, g.last_seen IS NOT NULL
        FROM devices d JOIN gateways g ON g.id = d.via_gateway ORDER BY 1""")
    assert await cur.fetchall() == [("a", "edge-1", True), ("b", "edge-2", True)]


async def test_a_closed_platform_refuses_unknown_gateways(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "closed", auto_provision=False)
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('closed', 'a')")
    writer = TelemetryWriter(pool, stats=IngestStats())
    report = await writer.write([via_gateway("closed", "edge-1", ("a", 1.0))])
    assert (report.points_written, report.dead_letters) == (0, 1)
    assert await scalar(db, "SELECT reason FROM dead_letters") == "unknown_gateway"


async def test_a_message_the_store_refuses_is_dead_lettered_and_the_rest_stored(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    # Any refusal that is not about availability will do; a check constraint is a real one.
    await db.execute("ALTER TABLE telemetry ADD CONSTRAINT no_666 CHECK (value <> 666)")
    writer = TelemetryWriter(pool, stats=IngestStats())
    calls: list[int] = []

    async def record_offsets(conn: psycopg.AsyncConnection[Any], refused: object) -> None:
        calls.append(1)
        await conn.execute("CREATE TABLE IF NOT EXISTS hook_ran (n int)")
        await conn.execute("INSERT INTO hook_ran VALUES (1)")

    batch = [telemetry(platform, f"d{n}", (NOW, "v", 666.0 if n == 5 else n)) for n in range(8)]
    report = await writer.write(batch, in_transaction=record_offsets)
    assert (report.points_written, report.dead_letters) == (7, 1)
    assert await scalar(db, "SELECT reason FROM dead_letters") == "store_refused"
    assert "no_666" in await scalar(db, "SELECT detail FROM dead_letters")
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 7
    # The caller's statements committed exactly once, with the end of the batch.
    assert await scalar(db, "SELECT count(*) FROM hook_ran") == 1
