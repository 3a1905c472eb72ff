"""From a publisher through the real broker into the real PostgreSQL, and back out of the API."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.access import Role
from tests.conftest import ApiAs, KeyMaker, eventually, payload, publisher, running, scalar


async def test_published_points_are_stored_registered_and_counted(
    api_as: ApiAs,
    make_key: KeyMaker,
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    ts = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    async with running(MqttIngest(ingest_settings, pool)), publisher(mqtt_url) as client:
        await client.publish(
            topics.telemetry(platform, "press-7"),
            payload({"ts": ts.isoformat(), "metrics": {"temperature": 71.25, "running": True}}),
            qos=1,
        )
        await client.publish(
            topics.telemetry(platform, "press-8"),
            payload(
                [
                    {"ts": int(ts.timestamp() * 1000), "metrics": {"temperature": -4.5}},
                    {"ts": int(ts.timestamp() * 1000) + 1000, "metrics": {"temperature": -4.0}},
                ]
            ),
            qos=1,
        )
        await eventually(lambda: scalar(db, "SELECT count(*) = 4 FROM telemetry"))

    cur = await db.execute("""
        SELECT d.device_id, m.name, t.time, t.value FROM telemetry t
        JOIN devices d ON d.id = t.device_id JOIN metrics m ON m.id = t.metric_id
        ORDER BY 1, 2, 3""")
    assert await cur.fetchall() == [
        ("press-7", "running", ts, 1.0),
        ("press-7", "temperature", ts, 71.25),
        ("press-8", "temperature", ts, -4.5),
        ("press-8", "temperature", ts + timedelta(seconds=1), -4.0),
    ]
    async with api_as(await make_key(Role.VIEWER, platform)) as api:
        response = await api.get(f"/platforms/{platform}/devices/count")
    assert response.status_code == 200
    body = response.json()
    assert (body["registered"], body["connected"]) == (2, 2)


async def test_bad_messages_are_dead_lettered_while_the_stream_goes_on(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    root = ingest_settings.mqtt_topic_root
    good = payload({"metrics": {"v": 1}})
    stream = [
        (topics.telemetry(platform, "d1"), good),
        (topics.telemetry(platform, "d1"), b'{"metrics": {"v": '),  # truncated JSON
        (topics.telemetry("no-such-platform", "d1"), good),
        (f"{root}/{platform}/bad device/telemetry", good),
        (topics.telemetry(platform, "d2"), payload({"metrics": {"v": "high"}})),
        (topics.telemetry(platform, "d3"), good),
    ]
    # Every platform's topics: an unknown platform's message reaches ingest only so.
    ingest = MqttIngest(ingest_settings.model_copy(update={"mqtt_scope": "all"}), pool)
    async with running(ingest), publisher(mqtt_url) as client:
        for topic, body in stream:
            await client.publish(topic, body, qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 4 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM telemetry"))

    cur = await db.execute(
        "SELECT platform_id, reason, topic, payload FROM dead_letters ORDER BY id"
    )
    assert await cur.fetchall() == [
        (platform, "invalid_json", stream[1][0], stream[1][1]),
        ("no-such-platform", "unknown_platform", stream[2][0], good),
        (platform, "bad_device_id", stream[3][0], good),
        (platform, "invalid_value", stream[4][0], stream[4][1]),
    ]
    cur = await db.execute("SELECT device_id FROM devices ORDER BY 1")
    assert await cur.fetchall() == [("d1",), ("d3",)]
    assert ingest.stats.rejected[("no-such-platform", "unknown_platform")] == 1


async def test_large_and_small_messages_read_in_bulk_arrive_whole(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    """ingest reads the socket 64 KiB at a time (ingest/paho_speedups.py): a message of 7 MiB
    spans more reads than paho makes for one packet in one go, and the small messages after it
    wait in the read buffer, not on the socket."""
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    huge = payload({"metrics": {"v": 1}, "pad": "x" * (7 * 1024 * 1024)})
    async with running(MqttIngest(ingest_settings, pool)):
        pass  # creates the persistent session: what follows is queued, then sent in bursts
    async with publisher(mqtt_url) as client:
        for n in range(3):
            await client.publish(topics.telemetry(platform, f"big{n}"), huge, qos=1)
            for k in range(200):
                body = payload({"metrics": {"v": k}})
                await client.publish(topics.telemetry(platform, f"d{n}-{k}"), body, qos=1)
    async with running(MqttIngest(ingest_settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 600 FROM telemetry"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 3 FROM dead_letters"))
    cur = await db.execute("SELECT reason, length(payload) FROM dead_letters")
    assert await cur.fetchall() == [("payload_too_large", len(huge))] * 3
    assert await scalar(db, "SELECT sum(value) FROM telemetry") == 3 * sum(range(200))


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "paho-public"])
async def test_messages_are_acknowledged_only_after_their_batch_commits(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    database_url: str,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    speedups: bool,
) -> None:
    """With acknowledgement on receipt this loses the messages: the first consumer receives them
    and cannot commit, so only a broker redelivery to the second consumer can store them.
    On paho's public path too (`IIOT_MQTT_PAHO_SPEEDUPS` off, as when paho's internals are
    missing)."""
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    settings = ingest_settings.model_copy(
        update={"shutdown_grace_seconds": 0.5, "mqtt_paho_speedups": speedups}
    )
    # Warm up: the session exists and the partition for today is there.
    async with running(MqttIngest(settings, pool)), publisher(mqtt_url) as client:
        await client.publish(
            topics.telemetry(platform, "warm"), payload({"metrics": {"v": 0}}), qos=1
        )
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry"))

    blocker = await psycopg.AsyncConnection.connect(database_url)
    await blocker.execute(
        f"LOCK TABLE {settings.database_schema}.telemetry IN ACCESS EXCLUSIVE MODE"
    )
    first = MqttIngest(settings, pool)
    async with running(first), publisher(mqtt_url) as client:
        assert first.speedups is speedups
        for n in range(20):
            await client.publish(
                topics.telemetry(platform, f"d{n}"), payload({"metrics": {"v": n}}), qos=1
            )
        await eventually(lambda: asyncio.sleep(0, first.stats.messages == 20))
    # `first` received all 20 but could not commit within its grace period, so it stopped without
    # acknowledging them.
    await blocker.rollback()
    await blocker.close()
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 1

    async with running(MqttIngest(settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 21 FROM telemetry"))
    assert await scalar(db, "SELECT sum(value) FROM telemetry") == sum(range(20))


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "paho-public"])
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledged_messages_are_not_delivered_again(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    protocol: str,
    speedups: bool,
) -> None:
    """The acknowledgements of each batch go out as one write (ingest/paho_speedups.py), or one
    `ack` each on paho's public path: if the broker did not take them, it would deliver the 300
    messages again to the next session (which would store no duplicate, so only the count of
    messages received shows it)."""
    settings = ingest_settings.model_copy(
        update={"mqtt_protocol": protocol, "mqtt_paho_speedups": speedups}
    )
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)), publisher(mqtt_url, protocol) as client:
        for n in range(300):
            await client.publish(
                topics.telemetry(platform, f"d{n % 7}"),
                payload({"metrics": {"v": n, "w": -n}}),
                qos=1,
            )
        await eventually(lambda: scalar(db, "SELECT count(*) = 600 FROM telemetry"))
    async with (
        running(MqttIngest(settings, pool)) as second,
        publisher(mqtt_url, protocol) as client,
    ):
        await client.publish(
            topics.telemetry(platform, "marker"), payload({"metrics": {"v": 1}}), qos=1
        )
        await eventually(lambda: scalar(db, "SELECT count(*) = 601 FROM telemetry"))
        assert second.stats.messages == 1
        assert second.stats.duplicates_skipped == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_points_published_while_ingest_is_down_arrive_when_it_returns(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    protocol: str,
) -> None:
    settings = ingest_settings.model_copy(update={"mqtt_protocol": protocol})
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)):
        pass  # creates the persistent session and its subscription
    async with publisher(mqtt_url, protocol) as client:
        for n in range(50):
            await client.publish(
                topics.telemetry(platform, "d"),
                payload(
                    {
                        "ts": 1_000 * n + int(datetime.now(UTC).timestamp() * 1000) - 60_000,
                        "metrics": {"v": n},
                    }
                ),
                qos=1,
            )
    async with running(MqttIngest(settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 50 FROM telemetry"))


async def test_a_gateway_publishes_for_its_devices(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    message = {
        "devices": {
            f"plc-{n}": [{"ts": now_ms - 1000 * k, "metrics": {"v": n, "w": k}} for k in range(3)]
            for n in range(100)
        }
    }
    async with running(MqttIngest(ingest_settings, pool)), publisher(mqtt_url) as client:
        await client.publish(topics.gateway_telemetry(platform, "edge-1"), payload(message), qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 600 FROM telemetry"))
    cur = await db.execute("""
        SELECT count(*), count(DISTINCT d.via_gateway), min(g.gateway_id)
        FROM devices d JOIN gateways g ON g.id = d.via_gateway""")
    assert await cur.fetchone() == (100, 1, "edge-1")


async def test_ingest_processes_share_the_load_through_a_shared_subscription(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    unique: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    shared = {"mqtt_shared_group": f"g{unique}"}
    one = MqttIngest(
        ingest_settings.model_copy(update={**shared, "mqtt_client_id": f"a-{unique}"}), pool
    )
    two = MqttIngest(
        ingest_settings.model_copy(update={**shared, "mqtt_client_id": f"b-{unique}"}), pool
    )
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    async with running(one), running(two), publisher(mqtt_url) as client:
        for n in range(400):
            body = payload({"ts": now_ms - n, "metrics": {"v": n}})
            await client.publish(topics.telemetry(platform, f"d{n % 20}"), body, qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 400 FROM telemetry"))
    assert one.stats.messages + two.stats.messages == 400
    assert one.stats.messages > 0
    assert two.stats.messages > 0
