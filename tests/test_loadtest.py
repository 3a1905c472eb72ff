"""The load test itself, in small runs of a few seconds: it must pass on a healthy stack and
fail, saying why, when devices are refused. Each run is a subprocess (locust patches the
standard library with gevent, which this test process must not have) that starts `iiot run`
on the test's schema, broker and topic root."""

import asyncio
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer
from psycopg_pool import AsyncConnectionPool

from iiot.net import free_port
from ingest.kafka import KafkaIngest
from ingest.settings import IngestSettings
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import eventually, scalar

ROOT = Path(__file__).parent.parent


def run_loadtest(
    store: StoreSettings, mqtt_url: str, unique: str, out: Path, *extra: str
) -> tuple[int, dict[str, Any], str]:
    env = os.environ | {
        "IIOT_DATABASE_URL": str(store.database_url),
        "IIOT_DATABASE_SCHEMA": store.database_schema,
        "IIOT_MQTT_URL": mqtt_url,
        "IIOT_MQTT_TOPIC_ROOT": f"test/{unique}/iiot/v1",
        "IIOT_MQTT_CLIENT_ID": f"iiot-loadtest-{unique}",
        "IIOT_API_PORT": str(free_port()),
        "IIOT_STATE_DIR": str(out / "state"),
        # The enterprise figures are computed with each count sample: soon, for a short run.
        "IIOT_HISTORY_INTERVAL_SECONDS": "1",
    }
    args = [
        "--platform", f"lt-{unique}", "--gateways", "6", "--devices-per-gateway", "25",
        "--sparkplug-every", "3", "--reading-interval", "2", "--steady-seconds", "3",
        "--drop", "0.5", "--outage-seconds", "2", "--api-users", "1", "--out", str(out),
        *extra,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    return done.returncode, report, done.stdout + done.stderr


def test_a_small_fleet_is_counted_exactly_through_storm_disconnect_and_rebirth(
    store: StoreSettings, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    code, report, output = run_loadtest(store, mqtt_url, unique, tmp_path, "--timeout", "60")
    assert code == 0, output[-3000:]
    assert report["ok"] is True
    assert [(c["phase"], c["expected"], c["reported"]) for c in report["checks"]] == [
        ("storm", 150, 150),
        ("mass disconnect", 75, 75),
        ("rebirth", 150, 150),
        # 6 gateways owned in turn by 3 simulated enterprises; 2 more own none, of which the
        # first is not above designated size.
        ("enterprises served", 4, 4),
        ("enterprises connected 30 d", 3, 3),
    ]
    # Both kinds of gateway went down and came back (gw-00002 and gw-00005 speak Sparkplug).
    dropped = report["dropped_gateways"]
    assert len(dropped) == 3
    assert {"gw-00002", "gw-00005"} & set(dropped)
    assert set(dropped) - {"gw-00002", "gw-00005"}
    assert report["points_stored"] == report["points_sent"] > 150
    assert report["historical_points_sent"] > 0  # the back-fill after the outage
    assert (tmp_path / "locust.html").stat().st_size > 10_000
    assert "Result: PASS" in (tmp_path / "report.md").read_text()
    assert any(name.startswith("GET ") for name in report["requests"])  # the operator's reads


async def test_the_run_fails_and_says_why_when_devices_are_refused(
    store: StoreSettings, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    async with await psycopg.AsyncConnection.connect(
        str(store.database_url), autocommit=True, options=f"-c search_path={store.database_schema}"
    ) as conn:
        # The platform refuses unknown devices: nothing is stored, nobody is connected.
        await upsert_platform(conn, f"lt-{unique}", auto_provision=False)
    code, report, _ = run_loadtest(store, mqtt_url, unique, tmp_path, "--timeout", "4")
    assert code == 1
    assert report["ok"] is False
    assert report["points_stored"] == 0
    assert report["points_sent"] > 0
    # Declared enterprises are served, devices or not; none had a device connected.
    assert [c["ok"] for c in report["checks"]] == [False, False, False, True, False]
    assert any("gateways not linked" in e for e in report["errors"])
    assert "Result: FAIL" in (tmp_path / "report.md").read_text()


async def test_the_kafka_gateway_user_feeds_kafka_ingest_and_nothing_is_lost(
    kafka: str,
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    unique: str,
    tmp_path: Path,
) -> None:
    platform, topic = f"lk-{unique}", f"load-{unique}"
    await upsert_platform(db, platform)
    env = os.environ | {
        "IIOT_LOADTEST_KAFKA": kafka,
        "IIOT_LOADTEST_KAFKA_TOPIC": topic,
        "IIOT_LOADTEST_PLATFORM": platform,
        "IIOT_LOADTEST_DEVICES_PER_GATEWAY": "10",
        "IIOT_LOADTEST_READING_INTERVAL": "1",
    }
    locust = [
        sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
        "-u", "2", "-r", "2", "--run-time", "4s", "--csv", str(tmp_path / "kafka"),
        "KafkaGatewayUser",
    ]  # fmt: skip
    done = subprocess.run(  # noqa: ASYNC221 - our own interpreter; nothing else runs yet
        locust, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "kafka_stats.csv").open() as table:
        stats = {row["Name"]: row for row in csv.DictReader(table)}
    sent = int(stats["gateway record"]["Request Count"])
    assert sent >= 4  # two gateways: their first records and at least one tick each
    assert stats["gateway record"]["Failure Count"] == "0"

    # Every reading in the topic, counted by reading it back, ends up stored once.
    records: list[Any] = []
    batches: dict[Any, Any] = {}
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            while len(records) < sent or batches:  # until the topic has nothing more
                batches = await consumer.getmany(timeout_ms=1000)
                records += [r for part in batches.values() for r in part]
    finally:
        await consumer.stop()
    readings = sum(len(orjson.loads(r.value)["devices"]) for r in records)
    assert len(records) >= sent  # locust's CSV may miss the last record of the shutdown
    settings = ingest_settings.model_copy(
        update={
            "kafka_bootstrap": kafka,
            "kafka_topics": [topic],
            "kafka_group_id": f"iiot-{unique}",
            "kafka_client_id": f"iiot-test-{unique}",
        }
    )
    ingest = KafkaIngest(settings, pool)
    task = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: scalar(db, "SELECT count(*) FROM telemetry"), timeout=30)
        await eventually(
            lambda: scalar(db, "SELECT count(*) = %s FROM telemetry", readings), timeout=30
        )
    finally:
        ingest.stop()
        await asyncio.wait_for(task, 30)
    assert await scalar(db, "SELECT count(*) FROM devices") == 20
