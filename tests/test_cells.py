"""Cells sharing brokers (docs/operations.md, "Cells"): two cells, each its own store (a schema
of the test database) and its own MQTT ingest, on one Mosquitto under one topic root; a plain
paho client publishes to platforms of both. Each cell stores exactly its own platforms' points
and dead-letters nothing of the other's; a platform created in a running cell is subscribed, one
moved away unsubscribed, without a restart. On Kafka, a topic shared by cells: records of
platforms this cell lacks are skipped and counted, never dead-lettered. Every count response and
health answer of the API names the cell."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import orjson
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from api.settings import ApiSettings
from iiot.net import free_port
from iiot.services import ingest_services, run_until
from ingest.kafka import KafkaIngest
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import INT64, MetricIn, encode_payload
from ingest.topics import TopicScheme
from registry.access import Role
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests.conftest import (
    KeyMaker,
    api_in_process,
    eventually,
    ingest_settings_of,
    publisher,
    running,
    scalar,
)
from tests.test_kafka_ingest import consuming, produce


@dataclass
class Cell:
    settings: IngestSettings
    db: psycopg.AsyncConnection[Any]
    ingest: MqttIngest

    async def points(self) -> list[tuple[str, str, float]]:
        """(platform, device, value) of every stored point."""
        cur = await self.db.execute(
            "SELECT d.platform_id, d.device_id, t.value FROM telemetry t"
            " JOIN devices d ON d.id = t.device_id ORDER BY 1, 2, 3"
        )
        return await cur.fetchall()

    async def dead_letters(self) -> list[tuple[str | None, str]]:
        cur = await self.db.execute("SELECT platform_id, reason FROM dead_letters ORDER BY id")
        return await cur.fetchall()


@asynccontextmanager
async def cells_on_one_broker(
    database_url: str, mqtt_url: str, unique: str, platforms: dict[str, list[str]]
) -> AsyncIterator[dict[str, Cell]]:
    """Each named cell: a migrated schema holding `platforms[name]`, and an ingest process's
    services (consumer, registry listener, ...) running on it, all under one topic root."""
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        cells: dict[str, Cell] = {}
        running = []
        for name, owned in platforms.items():
            store = StoreSettings(
                database_url=database_url, database_schema=f"t_{unique}_{name}", cell=name
            )
            await migrate(store)
            stack.push_async_callback(_drop, database_url, store.database_schema)
            settings = ingest_settings_of(
                store, mqtt_url, unique, client_id=f"iiot-{name}-{unique}"
            ).model_copy(update={"mqtt_moved_hold_seconds": 0})  # a move hands over at once
            db = await stack.enter_async_context(await connect(store, autocommit=True))
            for platform in owned:
                await upsert_platform(db, platform)
            pool = await stack.enter_async_context(create_pool(store, name=f"cell-{name}"))
            services = ingest_services(settings, pool)
            ingest = services[0]
            assert isinstance(ingest, MqttIngest)
            cells[name] = Cell(settings, db, ingest)
            running.append(asyncio.create_task(run_until(stop, services, grace_seconds=10)))
        try:
            async with asyncio.timeout(10):
                for cell in cells.values():
                    await cell.ingest.subscribed.wait()
            yield cells
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await asyncio.gather(*running)


async def _drop(database_url: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@asynccontextmanager
async def device_publisher(mqtt_url: str) -> AsyncIterator[Callable[..., Any]]:
    """A plain paho client, as a device's: `await publish(topic, value)` at QoS 1 (a gateway's:
    `device=` the device it speaks for), returning once the broker has the message."""
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()

    async def publish(topic: str, value: float, device: str | None = None) -> None:
        reading = {"metrics": {"v": value}}
        body = orjson.dumps(reading if device is None else {"devices": {device: reading}})
        sent = client.publish(topic, body, qos=1)
        await asyncio.to_thread(sent.wait_for_publish, 5)
        assert sent.is_published(), topic

    try:
        yield publish
    finally:
        client.disconnect()
        client.loop_stop()


async def subscribed_to(
    cell: Cell, platforms: set[str], *, gone: frozenset[str] = frozenset()
) -> bool:
    scope = cell.ingest.scope
    assert scope is not None
    return platforms <= scope.platforms and not gone & scope.platforms


async def test_two_cells_on_one_broker_each_store_their_own_platforms_and_follow_changes(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    owned = {"a": ["plant-a1", "plant-a2", "plant-m"], "b": ["plant-b1"]}
    topics = TopicScheme(f"test/{unique}/iiot/v1")
    async with (
        cells_on_one_broker(database_url, mqtt_url, unique, owned) as cells,
        device_publisher(mqtt_url) as publish,
    ):
        a, b = cells["a"], cells["b"]
        await publish(topics.telemetry("plant-a1", "d1"), 1)
        await publish(topics.gateway_telemetry("plant-a2", "gw1"), 0, device="d9")
        await publish(topics.telemetry("plant-a2", "d1"), 2)
        await publish(topics.telemetry("plant-b1", "d1"), 3)
        await publish(topics.telemetry("plant-m", "d1"), 4)
        await eventually(lambda: _count(a, 4))
        await eventually(lambda: _count(b, 1))

        # A platform created in cell b while it runs: b subscribes, and receives its traffic.
        await upsert_platform(b.db, "plant-b2")
        await eventually(lambda: subscribed_to(b, {"plant-b1", "plant-b2"}))
        await publish(topics.telemetry("plant-b2", "d1"), 5)
        await eventually(lambda: _count(b, 2))

        # plant-m moves from a to b (as `iiot platform import` and `--move-to` leave the two
        # stores): a stops receiving it, b starts.
        await upsert_platform(b.db, "plant-m")
        await a.db.execute(
            "UPDATE platforms SET moved_to = 'b', moved_at = now() WHERE id = 'plant-m'"
        )
        await eventually(lambda: subscribed_to(b, {"plant-m"}))
        await eventually(lambda: subscribed_to(a, {"plant-a1"}, gone=frozenset({"plant-m"})))
        await publish(topics.telemetry("plant-m", "d1"), 6)
        await publish(topics.telemetry("plant-a1", "d1"), 7)  # after it: a has read that far
        await eventually(lambda: _count(b, 3))
        await eventually(lambda: _count(a, 5))
        await asyncio.sleep(0.3)  # anything misrouted would have arrived by now

        assert await a.points() == [
            ("plant-a1", "d1", 1.0),
            ("plant-a1", "d1", 7.0),
            ("plant-a2", "d1", 2.0),
            ("plant-a2", "d9", 0.0),
            ("plant-m", "d1", 4.0),
        ]
        assert await b.points() == [
            ("plant-b1", "d1", 3.0),
            ("plant-b2", "d1", 5.0),
            ("plant-m", "d1", 6.0),
        ]
        # Neither cell refused anything: no `unknown_platform` for the other's traffic, and no
        # `platform_moved` for plant-m's, which reached only b after the move.
        assert await a.dead_letters() == []
        assert await b.dead_letters() == []


async def _count(cell: Cell, points: int) -> bool:
    return bool(await scalar(cell.db, "SELECT count(*) = %s FROM telemetry", points))


@pytest.mark.parametrize("scope", ["platforms", "all"])
async def test_kafka_records_of_other_cells_platforms_are_skipped_and_counted_on_shared_topics(
    kafka_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    scope: str,
) -> None:
    """A topic shared by cells (`IIOT_KAFKA_SCOPE=platforms`): a record for a platform this
    store lacks is another cell's, skipped and counted, and its offset stored with the rest;
    on a cell's own topic (`all`), the same record is refused as `unknown_platform`."""
    settings = kafka_settings.model_copy(update={"kafka_scope": scope})
    body = orjson.dumps({"metrics": {"v": 1}})
    records = [
        (f"{platform}/press-1".encode(), body),
        (b"other-cells-plant/press-1", body),
        (b"other-cells-plant/press-2", body),
        (f"{platform}/press-2".encode(), body),
    ]
    await produce(settings.require_kafka_bootstrap(), settings.kafka_topics[0], records)
    ingest = KafkaIngest(settings, pool)
    async with consuming(ingest):
        await eventually(lambda: scalar(db, "SELECT sum(next_offset) = 4 FROM kafka_offsets"))
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 2
    letters = await (await db.execute("SELECT platform_id, reason FROM dead_letters")).fetchall()
    if scope == "platforms":
        assert letters == []
        assert ingest.stats.foreign_records == 2
    else:
        assert letters == [("other-cells-plant", "unknown_platform")] * 2
        assert ingest.stats.foreign_records == 0


def test_a_named_cell_has_its_own_clients_unless_told_otherwise() -> None:
    """Cells sharing a broker must not share an MQTT session or a Kafka consumer group."""
    named = IngestSettings(cell="east-1")
    assert named.mqtt_client_id == "iiot-east-1-ingest-0"
    assert named.kafka_topics == ["iiot.east-1.telemetry"]
    assert named.kafka_group_id == "iiot-east-1-ingest"
    lone = IngestSettings()
    assert (lone.mqtt_client_id, lone.kafka_topics) == ("iiot-ingest-0", ["iiot.telemetry"])
    told = IngestSettings(cell="east-1", mqtt_client_id="mine", kafka_topics=["t"])
    assert (told.mqtt_client_id, told.kafka_topics) == ("mine", ["t"])


async def test_a_platform_created_unannounced_is_subscribed_by_the_periodic_reread(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    """No registry listener runs here, so no notification arrives: the backstop alone finds
    the new platform."""
    settings = ingest_settings.model_copy(update={"mqtt_scope_refresh_seconds": 0.2})
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)) as ingest, device_publisher(mqtt_url) as send:
        scope = ingest.scope
        assert scope is not None
        assert scope.platforms == {platform}
        await upsert_platform(db, "plant-new")
        await eventually(lambda: asyncio.sleep(0, "plant-new" in scope.platforms))
        await send(topics.telemetry("plant-new", "d1"), 1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry"))
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 0


async def test_the_sparkplug_host_of_every_group_takes_only_its_cells_platforms(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    mqtt_url: str,
    unique: str,
) -> None:
    """`IIOT_SPARKPLUG_GROUPS=*` (each group the platform of its id): the host subscribes to the
    groups of the cell's platforms, so another cell's edge nodes on the broker are not its own
    `unknown_platform` dead letters."""
    ours, theirs = f"sp-{unique}", f"sq-{unique}"
    await upsert_platform(db, ours)
    settings = ingest_settings.model_copy(update={"sparkplug_groups": "*", "sparkplug_host_id": ""})
    host = MqttIngest(settings, pool, sparkplug_host=True)
    async with running(host), publisher(mqtt_url) as client:
        for group in (theirs, ours):
            birth = [MetricIn("bdSeq", 0, INT64), MetricIn("Temperature", 20.0, alias=1)]
            body = encode_payload(birth, seq=0, timestamp_ms=int(time.time() * 1000))
            await client.publish(f"spBv1.0/{group}/NBIRTH/e1", body, qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry"))
        await asyncio.sleep(0.3)  # theirs, published first, would have arrived by now
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 0
    assert await scalar(db, "SELECT array_agg(DISTINCT platform_id) FROM devices") == [ours]


async def test_every_count_response_and_health_answer_names_the_cell(
    store: StoreSettings, make_key: KeyMaker, platform: str
) -> None:
    settings = ApiSettings(
        **store.model_dump(include={"database_url", "database_schema"}), cell="north-2"
    )
    start = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    paths = [
        "/healthz",
        "/readyz",
        f"/platforms/{platform}/devices/count",
        f"/platforms/{platform}/devices/count/history?start={quote(start)}",
        "/counts/platforms",
        "/counts/by/tier",
        "/counts/national",
        "/penetration",
        "/penetration/by/province",
        "/penetration/indicators",
    ]
    async with api_in_process(settings, await make_key(Role.ADMIN, None)) as api:
        answers = {path: await api.get(path) for path in paths}
    assert {path: (r.status_code, r.json().get("cell")) for path, r in answers.items()} == {
        path: (200, "north-2") for path in paths
    }


async def test_without_the_store_at_connect_ingest_waits_for_it_instead_of_failing(
    ingest_settings: IngestSettings,
) -> None:
    """Subscribing per platform needs the served platforms: while the store does not answer,
    the session ends as a lost connection would, and ingest tries again until stopped."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    async with AsyncConnectionPool(nowhere, open=False, timeout=0.3) as pool:
        ingest = MqttIngest(ingest_settings, pool)
        task = asyncio.create_task(ingest.run())
        await asyncio.sleep(2)
        assert not task.done()
        assert not ingest.subscribed.is_set()
        ingest.stop()
        async with asyncio.timeout(15):
            await task
