"""The count API on the real PostgreSQL."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.activity import refresh_activity
from registry.platforms import upsert_platform
from registry.sweeper import Sweeper
from tests.test_writer import telemetry


async def test_counts_follow_each_platforms_liveness_window(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool
) -> None:
    await upsert_platform(db, "fast", liveness_seconds=60)
    await upsert_platform(db, "slow", liveness_seconds=3600)
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for platform, device in [("fast", "a"), ("fast", "b"), ("slow", "c")]:
        await writer.write([telemetry(platform, device, (now, "v", 1.0))])
    await writer.write([telemetry("fast", "old", (now, "v", 1.0), historical=True)])
    fast = (await api.get("/platforms/fast/devices/count")).json()
    assert "registered" in fast, fast
    assert (fast["registered"], fast["connected"], fast["ever_connected"]) == (3, 2, 2)
    assert fast["liveness_seconds"] == 60
    assert set(fast["definitions"]) == {
        "registered",
        "connected",
        "ever_connected",
        "active_24h",
        "active_30d",
    }
    assert fast["definitions_version"]

    # Two minutes later: the fast platform's window has passed, the slow one's has not.
    await Sweeper(pool, counter_shard=1).sweep_once(now + timedelta(seconds=120))
    fast = (await api.get("/platforms/fast/devices/count")).json()
    slow = (await api.get("/platforms/slow/devices/count")).json()
    assert (fast["registered"], fast["connected"], fast["ever_connected"]) == (3, 0, 2)
    assert (slow["registered"], slow["connected"]) == (1, 1)


async def test_a_platform_without_devices_counts_zero(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "empty")
    response = await api.get("/platforms/empty/devices/count")
    body = response.json()
    assert response.status_code == 200, body
    assert (body["registered"], body["connected"]) == (0, 0)


async def test_unknown_platform_is_a_problem_404(api: httpx.AsyncClient) -> None:
    response = await api.get("/platforms/nowhere/devices/count")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Not Found"


@pytest.mark.parametrize("bad", ["Upper", "a+b", "a%23b", "-x", "a'b"])
async def test_invalid_platform_ids_are_refused(api: httpx.AsyncClient, bad: str) -> None:
    response = await api.get(f"/platforms/{bad}/devices/count")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok", "cell": "default"}
    assert (await api.get("/readyz")).json() == {"status": "ready", "cell": "default"}


async def test_active_counts_cover_their_windows_and_national_counts_a_device_once(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "east")
    await upsert_platform(db, "west")
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for platform, device in [("east", d) for d in ("now", "h2", "d3", "d40", "never")] + [
        ("west", "twin")
    ]:
        await writer.write([telemetry(platform, device, (now, "v", 1.0))])
    await db.execute(
        'UPDATE devices SET metadata = \'{"global_id": "88.1/x"}\''
        " WHERE device_id IN ('now', 'twin')"
    )
    # Let the clock pass: the sweeper turns them offline when each one's data is that old.
    ages = {"h2": timedelta(hours=2), "d3": timedelta(days=3), "d40": timedelta(days=40)}
    for device, age in ages.items():
        await db.execute(
            "UPDATE devices SET last_seen = %s, expires_at = %s WHERE device_id = %s",
            (now - age, now - age + timedelta(minutes=5), device),
        )
    await db.execute(
        "UPDATE devices SET last_seen = NULL, first_seen = NULL, expires_at = %s"
        " WHERE device_id = 'never'",
        (now,),
    )
    await Sweeper(pool, counter_shard=1).sweep_once(now + timedelta(seconds=1))
    await db.execute(
        "UPDATE devices SET state_changed_at = last_seen + interval '5 minutes'"
        " WHERE device_id IN ('h2', 'd3', 'd40')"
    )
    await db.execute("UPDATE devices SET state_changed_at = NULL WHERE device_id = 'never'")
    before = (await api.get("/platforms/east/devices/count")).json()
    assert before["activity_as_of"] is None

    async with pool.connection() as conn:
        assert await refresh_activity(conn)
    east = (await api.get("/platforms/east/devices/count")).json()
    # now: connected; h2: 2 hours ago; d3: 3 days; d40: 40 days; never: no activity.
    assert (east["connected"], east["active_24h"], east["active_30d"]) == (1, 2, 3)
    assert east["activity_as_of"] is not None

    national = (await api.get("/counts/national")).json()
    assert (national["registered"], national["connected"], national["active_24h"]) == (6, 2, 3)
    # "now" on east and "twin" on west carry the same global id: one device.
    distinct = national["distinct"]
    assert (distinct["registered"], distinct["connected"], distinct["active_24h"]) == (5, 1, 2)
    assert distinct["active_30d"] == 3
    grouped = (await api.get("/counts/by/tier")).json()["groups"]
    assert [(g["key"], g["active_24h"], g["active_30d"]) for g in grouped] == [("basic", 3, 4)]
