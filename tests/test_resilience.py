"""Nothing accepted is lost: the consumer killed mid-stream, the database restarted mid-stream.

These tests kill or restart services, so they start private ones (a Mosquitto configured not to
drop queued QoS 1 messages, and a PostgreSQL of their own) and never touch the shared ones.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from iiot.embedded import EmbeddedPostgres, MosquittoBroker
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests.conftest import eventually, payload, publisher, running, scalar

# Every test here starts server processes of its own.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MosquittoBroker.available(), reason="needs the mosquitto binary for a private broker"
    ),
]


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    url = asyncio.run(broker.start())
    yield url
    broker.kill()


def stream(
    topics: TopicScheme, platform: str, messages: int, devices: int
) -> list[tuple[str, bytes]]:
    """`messages` messages of 10 points each, no two points alike."""
    base = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
    return [
        (
            topics.telemetry(platform, f"d{n % devices}"),
            payload({"ts": base + n, "metrics": {f"m{k}": n * 10 + k for k in range(10)}}),
        )
        for n in range(messages)
    ]


def expected_sum(messages: int) -> int:
    return sum(range(messages * 10))


async def test_kill_9_of_the_consumer_three_times_loses_and_duplicates_nothing(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: Any,
    platform: str,
    private_broker: str,
    tmp_path: Path,
) -> None:
    settings = ingest_settings.model_copy(update={"mqtt_url": private_broker})
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)):
        pass  # the persistent session exists from here on
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_MQTT_URL": private_broker,
        "IIOT_MQTT_CLIENT_ID": settings.mqtt_client_id,
        "IIOT_MQTT_TOPIC_ROOT": settings.mqtt_topic_root,
    }
    log = (tmp_path / "consumer.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "ingest", "mqtt"], env=env, stdout=log, stderr=log
        )

    messages = stream(topics, platform, 10_000, devices=500)  # 100,000 points
    consumer = start()
    kills = 0
    try:
        async with publisher(private_broker) as client:
            for n, (topic, body) in enumerate(messages):
                await client.publish(topic, body, qos=1)
                if n and n % 2_500 == 0:
                    # Kill it while it is consuming: once it has stored more than before.
                    floor = await scalar(db, "SELECT count(*) FROM telemetry")
                    await eventually(
                        lambda f=floor: scalar(db, "SELECT count(*) > %s FROM telemetry", f)
                    )
                    consumer.send_signal(signal.SIGKILL)
                    consumer.wait(10)
                    kills += 1
                    consumer = start()
        stored_before_drain = await scalar(db, "SELECT count(*) FROM telemetry")
        await eventually(lambda: scalar(db, "SELECT count(*) = 100000 FROM telemetry"), timeout=120)
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)
        log.close()
    assert kills == 3
    assert stored_before_drain < 100_000  # the kills really happened mid-stream
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == expected_sum(10_000)
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 0


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, StoreSettings]]:
    server = EmbeddedPostgres(tmp_path / "pg")
    url = await asyncio.to_thread(server.start)
    settings = StoreSettings(database_url=url)
    await migrate(settings)
    async with await connect(settings) as conn:
        await upsert_platform(conn, "plant-1")
        await conn.commit()
    yield server, settings
    await asyncio.to_thread(server.stop, mode="immediate")


async def test_a_database_restart_during_ingest_loses_nothing(
    private_postgres: tuple[EmbeddedPostgres, StoreSettings],
    private_broker: str,
    unique: str,
) -> None:
    server, store = private_postgres
    settings = IngestSettings(
        database_url=store.database_url,
        mqtt_url=private_broker,
        mqtt_client_id=f"iiot-test-{unique}",
        mqtt_topic_root=f"test/{unique}/iiot/v1",
        batch_max_delay_seconds=0.05,
    )
    topics = TopicScheme(settings.mqtt_topic_root)
    messages = stream(topics, "plant-1", 3_000, devices=100)
    async with create_pool(settings, name="test") as pool:
        async with running(MqttIngest(settings, pool)), publisher(private_broker) as client:
            for n, (topic, body) in enumerate(messages):
                await client.publish(topic, body, qos=1)
                if n == 1_000:
                    await asyncio.to_thread(server.stop, mode="immediate")  # a crash
                if n == 2_000:
                    await asyncio.to_thread(server.start)

            async def stored() -> Any:
                async with await connect(store) as conn:
                    return await scalar(conn, "SELECT count(*) = 30000 FROM telemetry")

            await eventually(stored, timeout=60, interval=0.2)
        async with await connect(store) as conn:
            total = await scalar(conn, "SELECT sum(value)::bigint FROM telemetry")
    assert total == expected_sum(3_000)


async def test_sigterm_drains_writes_and_acknowledges_what_it_holds(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: Any,
    platform: str,
    private_broker: str,
    tmp_path: Path,
) -> None:
    settings = ingest_settings.model_copy(update={"mqtt_url": private_broker})
    topics = TopicScheme(settings.mqtt_topic_root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_MQTT_URL": private_broker,
        "IIOT_MQTT_CLIENT_ID": settings.mqtt_client_id,
        "IIOT_MQTT_TOPIC_ROOT": settings.mqtt_topic_root,
        "IIOT_SHUTDOWN_GRACE_SECONDS": "10",
    }
    async with running(MqttIngest(settings, pool)):
        pass  # the persistent session exists from here on
    log = (tmp_path / "consumer.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "ingest", "mqtt"], env=env, stdout=log, stderr=log
        )

    consumer = start()
    try:
        messages = stream(topics, platform, 5_000, devices=100)
        async with publisher(private_broker) as client:
            for n, (topic, body) in enumerate(messages):
                await client.publish(topic, body, qos=1)
                if n == 2_500:
                    # Stop it while it is consuming.
                    await eventually(lambda: scalar(db, "SELECT count(*) > 0 FROM telemetry"))
                    consumer.send_signal(signal.SIGTERM)
        started = asyncio.get_running_loop().time()
        code = await asyncio.to_thread(consumer.wait, 15)
        took = asyncio.get_running_loop().time() - started
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(10)
        log.close()
    assert code == 0
    assert took < 12  # within the grace period (10 s) and the time to disconnect
    at_exit = await scalar(db, "SELECT count(*) FROM telemetry")
    assert at_exit < 50_000  # it was stopped mid-stream
    # What it stored it had acknowledged: the rest arrives after a restart, none of it twice.
    async with running(MqttIngest(settings, pool)) as ingest:
        await eventually(lambda: scalar(db, "SELECT count(*) = 50000 FROM telemetry"), timeout=60)
        await asyncio.sleep(0.5)
        assert ingest.stats.duplicates_skipped == 0
        assert ingest.stats.points_written == 50_000 - at_exit
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == expected_sum(5_000)
