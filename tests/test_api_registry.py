"""Platform and device management and the count endpoints, through the API on the real store."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.history import sample
from registry.notifications import RegistryWatcher
from registry.reconcile import TRY_LOCK, UNLOCK, Reconciler, find_drift
from registry.settings import StoreSettings
from tests.conftest import eventually
from tests.test_writer import telemetry


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


async def test_platforms_are_created_read_updated_and_listed(api: httpx.AsyncClient) -> None:
    body = {
        "id": "acme-steel",
        "name": "Acme Steel",
        "tier": "growth",
        "type": "industry",
        "region": "320000",
        "industry": "steel",
        "liveness_seconds": 120,
    }
    created = await api.post("/platforms", json=body)
    assert created.status_code == 201
    assert created.json() | body == created.json()
    problem(await api.post("/platforms", json=body), 409)

    updated = await api.patch("/platforms/acme-steel", json={"tier": "leading"})
    assert (updated.json()["tier"], updated.json()["region"]) == ("leading", "320000")
    assert (await api.get("/platforms/acme-steel")).json()["tier"] == "leading"
    problem(await api.get("/platforms/nowhere"), 404)
    problem(await api.patch("/platforms/nowhere", json={"tier": "basic"}), 404)

    for n in range(5):
        await api.post("/platforms", json={"id": f"p{n}", "name": f"P{n}"})
    first = (await api.get("/platforms", params={"limit": 4})).json()
    assert [p["id"] for p in first["items"]] == ["acme-steel", "p0", "p1", "p2"]
    rest = (await api.get("/platforms", params={"limit": 4, "after": first["next_after"]})).json()
    assert ([p["id"] for p in rest["items"]], rest["next_after"]) == (["p3", "p4"], None)
    leading = (await api.get("/platforms", params={"tier": "leading"})).json()
    assert [p["id"] for p in leading["items"]] == ["acme-steel"]


@pytest.mark.parametrize(
    "body",
    [
        {"id": "Bad Id", "name": "x"},
        {"id": "ok", "name": "x", "tier": "platinum"},
        {"id": "ok", "name": "x", "region": "32"},
        {"id": "ok", "name": "x", "liveness_seconds": 0},
        {"id": "ok", "name": ""},
        {"id": "ok", "name": "x", "unknown": 1},
    ],
)
async def test_invalid_platforms_are_refused(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    problem(await api.post("/platforms", json=body), 422)


async def test_devices_are_registered_updated_and_decommissioned(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await api.post("/platforms", json={"id": "plant", "name": "Plant"})
    devices = [{"device_id": f"d{n}", "metadata": {"line": n % 2}} for n in range(10)]
    added = await api.post("/platforms/plant/devices", json={"devices": devices})
    assert added.json() == {"count": 10}
    again = await api.post("/platforms/plant/devices", json={"devices": devices[:3]})
    assert again.json() == {"count": 0}  # already registered: metadata merged, not counted
    count = (await api.get("/platforms/plant/devices/count")).json()
    assert (count["registered"], count["connected"]) == (10, 0)

    patched = await api.patch("/platforms/plant/devices/d1", json={"metadata": {"vendor": "x"}})
    assert patched.json()["metadata"] == {"line": 1, "vendor": "x"}
    device = (await api.get("/platforms/plant/devices/d1")).json()
    assert (device["state"], device["connected"], device["gateway"]) == ("offline", False, None)

    assert (await api.delete("/platforms/plant/devices/d1")).status_code == 204
    problem(await api.delete("/platforms/plant/devices/d1"), 404)
    problem(await api.get("/platforms/plant/devices/d1"), 404)
    bulk = await api.post(
        "/platforms/plant/devices/decommission", json={"device_ids": ["d2", "d3", "nope"]}
    )
    assert bulk.json() == {"count": 2}
    assert (await api.get("/platforms/plant/devices/count")).json()["registered"] == 7
    # Registering a decommissioned device returns it to service.
    back = await api.post("/platforms/plant/devices", json={"devices": [{"device_id": "d1"}]})
    assert back.json() == {"count": 1}
    assert (await api.get("/platforms/plant/devices/count")).json()["registered"] == 8
    assert await find_drift(db) == []


async def test_a_decommissioned_devices_data_is_refused_by_running_ingest(
    api: httpx.AsyncClient,
    store: StoreSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
) -> None:
    await api.post("/platforms", json={"id": "plant", "name": "Plant"})
    writer = TelemetryWriter(pool, stats=IngestStats())
    watcher = RegistryWatcher(store, lambda _: writer.directory.forget())
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.listening.wait(), 10)
        now = datetime.now(UTC)
        await writer.write([telemetry("plant", "d", (now, "v", 1.0))])  # cached from here on
        assert (await api.get("/platforms/plant/devices/count")).json()["connected"] == 1
        assert (await api.delete("/platforms/plant/devices/d")).status_code == 204
        assert (await api.get("/platforms/plant/devices/count")).json()["connected"] == 0

        async def refused() -> bool:
            report = await writer.write([telemetry("plant", "d", (datetime.now(UTC), "v", 2.0))])
            return report.dead_letters == 1

        await eventually(refused, timeout=5, interval=0.1)
    finally:
        watcher.stop()
        await task
    count = (await api.get("/platforms/plant/devices/count")).json()
    assert (count["registered"], count["connected"]) == (0, 0)
    assert await find_drift(db) == []


async def test_counts_per_platform_grouped_and_national(
    api: httpx.AsyncClient, pool: AsyncConnectionPool
) -> None:
    for pid, tier, region in [
        ("a", "basic", "110000"),
        ("b", "basic", "320000"),
        ("c", "leading", "320000"),
    ]:
        await api.post("/platforms", json={"id": pid, "name": pid, "tier": tier, "region": region})
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for pid, devices in [("a", 1), ("b", 2), ("c", 3)]:
        await writer.write([telemetry(pid, f"d{n}", (now, "v", 1.0)) for n in range(devices)])
    await api.post("/platforms/c/devices", json={"devices": [{"device_id": "idle"}]})

    listed = (await api.get("/counts/platforms")).json()
    assert [(r["platform"], r["registered"], r["connected"]) for r in listed["items"]] == [
        ("a", 1, 1),
        ("b", 2, 2),
        ("c", 4, 3),
    ]
    by_tier = (await api.get("/counts/by/tier")).json()
    assert [(g["key"], g["platforms"], g["connected"]) for g in by_tier["groups"]] == [
        ("basic", 2, 3),
        ("leading", 1, 3),
    ]
    by_region = (await api.get("/counts/by/region")).json()
    assert [(g["key"], g["registered"]) for g in by_region["groups"]] == [
        ("110000", 1),
        ("320000", 6),
    ]
    national = (await api.get("/counts/national")).json()
    assert (national["platforms"], national["registered"], national["connected"]) == (3, 7, 6)
    assert national["ever_connected"] == 6
    problem(await api.get("/counts/by/colour"), 422)


async def test_count_history_is_sampled_and_bucketed(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any]
) -> None:
    await api.post("/platforms", json={"id": "plant", "name": "Plant"})
    writer = TelemetryWriter(pool, stats=IngestStats())
    async with pool.connection() as conn:
        assert await sample(conn, timedelta(minutes=1)) == 1
        assert await sample(conn, timedelta(minutes=1)) == 0  # one sample per slot, whoever
    await writer.write(
        [telemetry("plant", f"d{n}", (datetime.now(UTC), "v", 1.0)) for n in range(3)]
    )
    # Samples as if taken over the past hours, to exercise bucketing.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for minute, connected in [(0, 1), (30, 5), (59, 2), (60, 7), (125, 3)]:
        await db.execute(
            "INSERT INTO count_history VALUES (%s, 'plant', 10, %s, 10)",
            (start + timedelta(minutes=minute), connected),
        )
    body = (
        await api.get(
            "/platforms/plant/devices/count/history",
            params={"start": start.isoformat(), "end": (start + timedelta(hours=3)).isoformat()},
        )
    ).json()
    assert [
        (b["connected_min"], b["connected_max"], b["connected_last"], b["samples"])
        for b in body["buckets"]
    ] == [(1, 5, 2, 3), (7, 7, 7, 1), (3, 3, 3, 1)]
    problem(
        await api.get(
            "/platforms/plant/devices/count/history",
            params={"start": start.isoformat(), "end": start.isoformat()},
        ),
        422,
    )
    problem(
        await api.get(
            "/platforms/plant/devices/count/history",
            params={"start": start.isoformat(), "bucket_seconds": 60},
        ),
        422,
    )


async def test_the_reconciler_records_each_run_and_one_runs_at_a_time(
    store: StoreSettings, api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await api.post("/platforms", json={"id": "plant", "name": "Plant"})
    await db.execute("UPDATE platform_counters SET registered = registered + 2")
    first, second = Reconciler(store, shard=1), Reconciler(store, shard=2)
    async with await psycopg.AsyncConnection.connect(
        str(store.database_url), autocommit=True
    ) as other:
        await other.execute(f"SET search_path = {store.database_schema}")
        await other.execute(TRY_LOCK)  # another process is reconciling
        assert await first.run_once() is None
        await other.execute(UNLOCK)
    drift = await first.run_once()
    assert drift is not None
    assert [(d.platform, d.registered) for d in drift] == [("plant", 2)]
    assert await second.run_once() == []
    cur = await db.execute(
        "SELECT platforms, jsonb_array_length(drift) FROM reconciliations ORDER BY id"
    )
    assert await cur.fetchall() == [(1, 1), (1, 0)]
    runs = (await api.get("/counts/reconciliations")).json()
    assert [[(d["platform"], d["registered"]) for d in r["drift"]] for r in runs] == [
        [],
        [("plant", 2)],
    ]
    drifted = (await api.get("/counts/reconciliations", params={"drift_only": "true"})).json()
    assert [r["id"] for r in drifted] == [runs[1]["id"]]
