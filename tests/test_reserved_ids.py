"""Device ids the API's paths and the broker's topics give a meaning of their own (`count`,
`decommission`, `gateways`) are refused everywhere as `reserved_device_id`: by ingest (MQTT
topics, gateway payloads, Kafka keys in tests/test_poison.py), by registration, by the broker's
hooks."""

from typing import Any

import httpx
import orjson
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.access import Role
from registry.ids import RESERVED_DEVICE_IDS
from registry.platforms import upsert_platform
from tests.conftest import ApiAs, KeyMaker, eventually, publisher, running, scalar
from tests.test_api_registry import problem
from tests.test_broker_access import connect, may


async def test_mqtt_messages_naming_a_reserved_device_are_dead_lettered(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    reading = orjson.dumps({"metrics": {"v": 1}})
    cases = [
        (topics.telemetry(platform, "count"), reading),
        (f"{topics.root}/{platform}/gateways/telemetry", reading),  # a device named gateways
        (topics.status(platform, "decommission"), orjson.dumps({"state": "online"})),
        (
            topics.gateway_telemetry(platform, "gw-1"),
            orjson.dumps({"devices": {"ok-2": {"metrics": {"v": 2}}, "count": {"metrics": {}}}}),
        ),
    ]
    async with running(MqttIngest(ingest_settings, pool)), publisher(mqtt_url) as client:
        await client.publish(topics.telemetry(platform, "ok-1"), reading, qos=1)
        for topic, body in cases:
            await client.publish(topic, body, qos=1)
        await client.publish(topics.telemetry(platform, "ok-3"), reading, qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 4 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM telemetry"))
    cur = await db.execute("SELECT topic, reason FROM dead_letters ORDER BY id")
    assert await cur.fetchall() == [(topic, "reserved_device_id") for topic, _ in cases]
    cur = await db.execute("SELECT device_id FROM devices ORDER BY 1")
    assert await cur.fetchall() == [("ok-1",), ("ok-3",)]


async def test_the_api_refuses_to_register_a_reserved_device_id(api: httpx.AsyncClient) -> None:
    assert (await api.post("/platforms", json={"id": "plant", "name": "P"})).status_code == 201
    for reserved in sorted(RESERVED_DEVICE_IDS):
        body = {"devices": [{"device_id": "fine-1"}, {"device_id": reserved}]}
        refused = problem(await api.post("/platforms/plant/devices", json=body), 422)
        assert refused["detail"].startswith(f"reserved_device_id: device id {reserved!r}")
    # Nothing of a refused request was registered; `count` still answers the platform's count.
    count = await api.get("/platforms/plant/devices/count")
    assert count.status_code == 200
    assert count.json()["registered"] == 0


@pytest.fixture
async def broker(api_as: ApiAs, make_key: KeyMaker) -> httpx.AsyncClient:
    return api_as(await make_key(Role.BROKER, None))


async def test_the_broker_hooks_refuse_a_reserved_device_id(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=True)
    provisioning = (await api.post("/platforms/plant-1/provisioning-credential")).json()["secret"]
    assert await connect(broker, "plant-1/ok-1", provisioning) == "allow"
    for reserved in sorted(RESERVED_DEVICE_IDS):
        assert await connect(broker, f"plant-1/{reserved}", provisioning) == "deny", reserved
        topic = f"iiot/v1/plant-1/{reserved}/telemetry"
        assert await may(broker, f"plant-1/{reserved}", topic, "publish") == "deny", reserved
