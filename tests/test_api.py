"""The count API on the real PostgreSQL."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
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
    assert (fast["registered"], fast["connected"], fast["ever_connected"]) == (3, 2, 2)
    assert fast["liveness_seconds"] == 60
    assert set(fast["definitions"]) == {"registered", "connected", "ever_connected"}
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
    body = (await api.get("/platforms/empty/devices/count")).json()
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
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready"}
