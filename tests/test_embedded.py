"""The services `make run` starts when none is configured, and `iiot run` itself."""

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from iiot.embedded import EmbeddedPostgres
from iiot.net import free_port
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.migrate import migrate
from registry.settings import StoreSettings
from tests.conftest import eventually, payload, publisher, running, scalar
from tests.services import amqtt_in_thread
from tests.test_kafka_ingest import produce


@pytest.fixture(scope="module")
def amqtt_url() -> Iterator[str]:
    with amqtt_in_thread() as url:
        yield url


async def test_ingest_works_over_mqtt_311_with_the_python_broker(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    amqtt_url: str,
) -> None:
    settings = ingest_settings.model_copy(update={"mqtt_url": amqtt_url, "mqtt_protocol": "3.1.1"})
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)), publisher(amqtt_url, "3.1.1") as client:
        for n in range(10):
            await client.publish(
                topics.telemetry(platform, f"d{n}"), payload({"metrics": {"v": n}}), qos=1
            )
        await eventually(lambda: scalar(db, "SELECT count(*) = 10 FROM telemetry"))
    assert await scalar(db, "SELECT count(*) FROM devices WHERE last_seen IS NOT NULL") == 10


def test_embedded_postgres_starts_restarts_and_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    try:
        url = server.start()
        asyncio.run(migrate(StoreSettings(database_url=url)))
        server.stop()
        assert not (tmp_path / "pg" / "postmaster.pid").exists()
        server.port = None
        url = server.start()  # same data directory, new port
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM iiot.schema_migrations").fetchone()
        assert row is not None
        assert row[0] >= 3
    finally:
        server.stop()


def test_iiot_run_brings_up_the_whole_stack_and_stops_cleanly(tmp_path: Path, kafka: str) -> None:
    port = free_port()
    # With a Kafka cluster configured, the stack reads its topic too: one device sends there.
    topic = f"iiot-run-{port}"
    record = payload({"metrics": {"v": 1}})
    asyncio.run(produce(kafka, topic, [(b"demo/from-kafka", record)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_STATE_DIR": str(tmp_path / "state"),
        "IIOT_API_PORT": str(port),
        "IIOT_SIMULATE_DEVICES": "7",
        "IIOT_SIMULATE_INTERVAL_SECONDS": "0.5",
        "IIOT_MQTT_CLIENT_ID": f"iiot-run-test-{port}",
        "IIOT_KAFKA_BOOTSTRAP": kafka,
        "IIOT_KAFKA_TOPICS": topic,
        "IIOT_KAFKA_GROUP_ID": f"iiot-run-{port}",
        "IIOT_KAFKA_CLIENT_ID": f"iiot-run-{port}",
    }
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:

        async def connected() -> Any:
            # The admin key `iiot run` prints with the URLs.
            printed = re.search(r"Admin API key: +(iiot_\S+)", (tmp_path / "run.log").read_text())
            if printed is None:
                assert process.poll() is None, (tmp_path / "run.log").read_text()
                return False
            url = f"http://127.0.0.1:{port}/platforms/demo/devices/count"
            try:
                async with httpx.AsyncClient() as http:
                    assert (await http.get(url)).status_code == 401
                    # Ready: the store answers, the MQTT consumer is subscribed and the Kafka
                    # consumer assigned.
                    ready = await http.get(f"http://127.0.0.1:{port}/readyz")
                    if ready.status_code != 200:
                        return False
                    response = await http.get(
                        url, headers={"Authorization": f"Bearer {printed.group(1)}"}
                    )
                # The simulator's 7 devices and the one that sent through Kafka.
                return response.status_code == 200 and response.json()["connected"] == 8
            except httpx.TransportError:
                assert process.poll() is None, (tmp_path / "run.log").read_text()
                return False

        asyncio.run(eventually(connected, timeout=60, interval=0.2))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "run.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert f"http://127.0.0.1:{port}" in output
    assert not (tmp_path / "state" / "postgres" / "postmaster.pid").exists(), (
        "PostgreSQL left running"
    )
