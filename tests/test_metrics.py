"""Ingest's /metrics after real traffic: counts, rejections by reason, histograms, queue depth."""

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from iiot.monitor import Monitor
from iiot.net import free_port
from iiot.services import ingest_services, run_until
from ingest.metrics import IngestCollector
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.platforms import Tier, upsert_platform
from registry.reconcile import Reconciler
from registry.settings import StoreSettings
from tests.conftest import answers_ok, eventually, payload, publisher, scalar
from tests.test_connection_state import Feed


def samples(
    text: str, cell: str = "default"
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample by name and labels; each must carry the `cell` label of `cell` (left out of
    the key), and `iiot_cell_info` name that cell."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("cell", None) == cell, sample
            found[sample.name, frozenset(labels.items())] = sample.value
    assert found["iiot_cell_info", frozenset()] == 1
    return found


async def test_ingest_metrics_count_what_was_stored_and_refused(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    port = free_port()
    settings = ingest_settings.model_copy(update={"metrics_port": port, "cell": "north"})
    base = f"http://127.0.0.1:{port}"
    now = datetime.now(UTC).replace(microsecond=0)
    stop = asyncio.Event()
    process = asyncio.create_task(run_until(stop, ingest_services(settings, pool)))
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            await eventually(lambda: answers_ok(http, "/readyz"))
            assert (await http.get("/healthz")).json() == {"status": "ok", "cell": "north"}
            async with publisher(mqtt_url) as client:
                await client.publish(
                    topics.telemetry(platform, "m-1"),
                    payload({"ts": now.isoformat(), "metrics": {"a": 1, "b": 2}}),
                    qos=1,
                )
                await client.publish(topics.telemetry(platform, "m-1"), b"{not json", qos=1)
                await client.publish(
                    topics.telemetry(platform, "m-2"),
                    payload({"ts": now.isoformat(), "metrics": {"a": 3}}),
                    qos=1,
                )
            await eventually(lambda: scalar(db, "SELECT count(*) = 3 FROM telemetry"))
            await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM dead_letters"))
            response = await http.get("/metrics")
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await process

    assert response.status_code == 200
    got = samples(response.text, "north")
    mqtt = frozenset({("source", "mqtt")})
    assert got[("iiot_mqtt_subscribed_platforms", mqtt)] == 1  # the test's one platform
    assert got[("iiot_messages_received_total", mqtt)] == 3
    assert got[("iiot_points_stored_total", mqtt)] == 3
    assert got[("iiot_devices_registered_total", mqtt)] == 2
    assert got[("iiot_duplicates_skipped_total", mqtt)] == 0
    assert got[("iiot_queue_depth", mqtt)] == 0
    rejected = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "iiot_messages_rejected_total"
    }
    assert rejected == {"invalid_json": 1}
    # Every stored row went through a committed batch, and each batch was timed.
    assert got[("iiot_batch_points_sum", mqtt)] >= 3
    batches = got[("iiot_batch_points_count", mqtt)]
    assert batches >= 1
    assert got[("iiot_batch_write_seconds_count", mqtt)] == batches
    assert got[("iiot_ingest_delay_seconds_count", mqtt)] == batches
    assert 0 < got[("iiot_ingest_delay_seconds_sum", mqtt)] < 10 * batches
    assert got[("iiot_batch_points_bucket", mqtt | {("le", "+Inf")})] == batches


async def test_readyz_says_what_is_not_ready(pool: AsyncConnectionPool) -> None:
    port = free_port()
    monitor = Monitor(
        IngestCollector([]), pool=pool, consumer_ready=lambda: False, host="127.0.0.1", port=port
    )
    task = asyncio.create_task(monitor.run())
    try:
        await eventually(lambda: asyncio.sleep(0, monitor.started))
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/readyz")
    finally:
        monitor.stop()
        await task
    assert response.status_code == 503
    assert response.json()["problems"] == ["the consumer is not connected and subscribed"]


async def test_api_metrics_show_counts_per_platform_and_the_drift_reconciliation_fixed(
    api: httpx.AsyncClient,
    store: StoreSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    await upsert_platform(db, "plant-2", name="Plant 2", tier=Tier.LEADING, region="310000")
    feed = Feed(pool, platform)
    await feed.send(feed.data("a"), feed.data("b"), feed.status("c", "offline", 1))
    await db.execute(
        "UPDATE platform_counters SET connected = connected + 5 "
        "WHERE platform_id = %s AND shard = 3",
        (platform,),
    )
    assert await Reconciler(store, shard=9).run_once()

    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)

    def labels(name: str, tier: str, region: str) -> frozenset[tuple[str, str]]:
        return frozenset(
            {("platform", name), ("tier", tier), ("type", "professional"), ("region", region)}
        )

    plant_1, plant_2 = labels(platform, "basic", "000000"), labels("plant-2", "leading", "310000")
    assert got[("iiot_devices_registered", plant_1)] == 3
    assert got[("iiot_devices_connected", plant_1)] == 2
    assert got[("iiot_devices_registered", plant_2)] == 0
    assert got[("iiot_devices_connected", plant_2)] == 0
    drift = frozenset({("platform", platform), ("count", "connected")})
    assert got[("iiot_counter_drift", drift)] == 5
    assert got[("iiot_reconciliation_timestamp_seconds", frozenset())] > 0
    assert (
        got[("iiot_maintenance_last_success_timestamp_seconds", frozenset({("task", "reconcile")}))]
        == (got[("iiot_reconciliation_timestamp_seconds", frozenset())])
    )
