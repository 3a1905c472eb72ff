"""Poison records never stop a stream: bytes that are not text end in dead_letters with the
records around them stored once; a refusal the store will not record stops the consumer with
the record named and /readyz failing; a consumer that holds messages without progress shows it
in /metrics and /readyz. Producers and publishers here share no code with iiot (librdkafka
through confluent-kafka, paho-mqtt)."""

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import paho.mqtt.client as paho
import psycopg
import pytest
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from iiot.net import free_port
from iiot.services import ingest_services, run_until
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from tests.conftest import answers_ok, eventually, payload, running, scalar
from tests.test_metrics import samples

Headers = list[tuple[str, bytes | None]]


def produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes, Headers]]) -> None:
    """Every record to partition 0, in order, acknowledged by the broker."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in records:
        producer.produce(topic, value, key, partition=0, headers=headers or None)
    assert producer.flush(30) == 0


def good(n: int, base_ms: int) -> tuple[bytes, bytes, Headers]:
    return f"plant-1/d{n % 3}".encode(), payload({"ts": base_ms + n, "metrics": {"v": n}}), []


@pytest.fixture
def monitored(kafka_settings: IngestSettings) -> IngestSettings:
    """Ingest's settings (Kafka and MQTT), with a monitor and a short stall limit."""
    return kafka_settings.model_copy(update={"metrics_port": free_port(), "stall_seconds": 0.5})


@asynccontextmanager
async def serving(
    settings: IngestSettings, pool: AsyncConnectionPool, consumer: Literal["mqtt", "kafka"]
) -> AsyncIterator[httpx.AsyncClient]:
    """An ingest process's services (consumer, monitor) until the block ends; yields a client
    of its monitoring port, once it has answered."""
    stop = asyncio.Event()
    process = asyncio.create_task(run_until(stop, ingest_services(settings, pool, consumer)))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.metrics_port}") as http:
            await eventually(lambda: answers_ok(http, "/healthz"))
            yield http
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await process


async def ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def unready(http: httpx.AsyncClient, because: str) -> list[str] | None:
    """The problems /readyz names, once it fails `because` (the first problem starts so)."""
    response = await http.get("/readyz")
    if response.status_code != 503:
        return None
    problems: list[str] = response.json()["problems"]
    return problems if problems[0].startswith(because) else None


async def test_kafka_keys_headers_and_payloads_that_are_not_text_are_dead_lettered_in_line(
    monitored: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    topic = monitored.kafka_topics[0]
    base = int(datetime.now(UTC).timestamp() * 1000) - 60_000
    ok = payload({"ts": base, "metrics": {"v": 1}})
    poison: list[tuple[bytes, bytes, Headers]] = [
        (b"plant-1/a\x00b", ok, [("trace", b"\x00\xff"), ("no-value", None)]),  # NUL in key
        (b"plant-1/\xff\xfe", ok, []),  # key not UTF-8
        (b"plant-1/d1", b'{"ts": 1, "metrics": {"v\x00": 1}}', []),  # NUL in payload
        (b"plant-1/d1", b'{"metrics": {"\xff": 1}}', []),  # payload not UTF-8
        (b"plant-1/d2", ok, [("iiot-sparkplug-topic", b"spBv1.0/g\x00/DDATA/e\xff")]),
        (b"plant-1/count", ok, []),  # a device id the API cannot address
    ]
    records = [good(n, base) for n in range(10)] + poison
    records += [good(n, base) for n in range(10, 20)]
    await asyncio.to_thread(produce, monitored.require_kafka_bootstrap(), topic, records)
    async with serving(monitored, pool, "kafka") as http:
        await eventually(lambda: scalar(db, "SELECT count(*) = 6 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 20 FROM telemetry"))
        await eventually(lambda: scalar(db, "SELECT sum(next_offset) = 26 FROM kafka_offsets"))
        assert await ready(http)

    # Each good record stored once, those after the poison too.
    stored = await (await db.execute("SELECT value FROM telemetry ORDER BY value")).fetchall()
    assert [v for (v,) in stored] == list(range(20))
    cur = await db.execute(
        "SELECT kafka_offset, reason, kafka_key, kafka_headers, payload, sparkplug_topic"
        " FROM dead_letters ORDER BY kafka_offset"
    )
    rows = await cur.fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        (10, "bad_device_id"),
        (11, "bad_key"),
        (12, "invalid_json"),
        (13, "invalid_json"),
        (14, "sparkplug_off"),
        (15, "reserved_device_id"),
    ]
    # What arrived, byte for byte.
    assert [(r[2], r[4]) for r in rows] == [(key, value) for key, value, _ in poison]
    assert rows[0][3] == [[b"trace", b"\x00\xff"], [b"no-value", None]]
    assert rows[4][3] == [[b"iiot-sparkplug-topic", b"spBv1.0/g\x00/DDATA/e\xff"]]


async def test_a_refusal_the_store_will_not_record_stops_kafka_ingest_and_fails_readiness(
    monitored: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    await db.execute(
        "ALTER TABLE dead_letters ADD CONSTRAINT no_bad_ids CHECK (reason <> 'bad_device_id')"
    )
    topic = monitored.kafka_topics[0]
    base = int(datetime.now(UTC).timestamp() * 1000) - 60_000
    records = [good(n, base) for n in range(3)]
    records += [(b"plant-1/a\x00b", payload({"ts": base, "metrics": {"v": 1}}), [])]
    records += [good(n, base) for n in range(3, 6)]
    await asyncio.to_thread(produce, monitored.require_kafka_bootstrap(), topic, records)
    async with serving(monitored, pool, "kafka") as http:
        problems = await eventually(lambda: unready(http, "the consumer stopped"))
        got = samples((await http.get("/metrics")).text)
    assert problems[0].startswith(f"the consumer stopped: Kafka record {topic}[0] at offset 3:")
    assert "no_bad_ids" in problems[0]
    assert got[("iiot_ingest_failed", frozenset({("source", "kafka")}))] == 1
    # Nothing at or after the record was committed as read.
    assert (await scalar(db, "SELECT max(next_offset) FROM kafka_offsets") or 0) <= 3
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 0


@pytest.mark.parametrize("source", ["mqtt", "kafka"])
async def test_a_consumer_holding_messages_without_progress_shows_it_and_is_unready(
    source: Literal["mqtt", "kafka"],
    monitored: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    database_url: str,
    platform: str,
    mqtt_url: str,
) -> None:
    base = int(datetime.now(UTC).timestamp() * 1000) - 60_000
    async with (
        serving(monitored, pool, source) as http,
        await psycopg.AsyncConnection.connect(database_url) as locker,
    ):
        await eventually(lambda: ready(http))
        schema = sql.Identifier(await scalar(db, "SELECT current_schema()"))
        # The store holds every write (a long migration, a stuck lock): no error, no progress.
        await locker.execute(
            sql.SQL("LOCK TABLE {}.telemetry IN ACCESS EXCLUSIVE MODE").format(schema)
        )
        if source == "kafka":
            topic = monitored.kafka_topics[0]
            records = [good(n, base) for n in range(5)]
            await asyncio.to_thread(produce, monitored.require_kafka_bootstrap(), topic, records)
        else:
            topics = TopicScheme(monitored.mqtt_topic_root)
            messages = [
                (topics.telemetry(platform, key.decode().split("/")[1]), value)
                for key, value, _ in (good(n, base) for n in range(5))
            ]
            await asyncio.to_thread(publish, mqtt_url, messages)
        stream = f"{monitored.kafka_topics[0]}[0]" if source == "kafka" else "the mqtt session"
        await eventually(lambda: unready(http, f"no progress on {stream} for "))
        got = samples((await http.get("/metrics")).text)
        labels = frozenset({("source", source)})
        assert got[("iiot_ingest_stalled_seconds", labels)] >= monitored.stall_seconds
        assert got[("iiot_oldest_unacked_seconds", labels)] >= monitored.stall_seconds
        if source == "kafka":
            ages = [
                v for (name, _), v in got.items() if name == "iiot_kafka_oldest_uncommitted_seconds"
            ]
            assert max(ages) >= monitored.stall_seconds
        await locker.rollback()  # the lock goes: the writer goes on
        await eventually(lambda: scalar(db, "SELECT count(*) = 5 FROM telemetry"))
        await eventually(lambda: ready(http))
        got = samples((await http.get("/metrics")).text)
        assert got[("iiot_ingest_stalled_seconds", labels)] == 0
        assert got[("iiot_oldest_unacked_seconds", labels)] == 0


def publish(mqtt_url: str, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publishes at QoS 1 with paho directly and waits for every PUBACK."""
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    try:
        for topic, value in messages:
            client.publish(topic, value, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def publish_raw(mqtt_url: str, topic: bytes, body: bytes) -> bytes:
    """One MQTT 3.1.1 PUBLISH (QoS 0) with a topic of any bytes, over a plain socket (paho
    encodes topics as UTF-8 itself); returns what the broker sent until it closed."""
    host, port = mqtt_url.removeprefix("mqtt://").split(":")

    def packet(kind: int, data: bytes) -> bytes:
        assert len(data) < 128
        return bytes([kind, len(data)]) + data

    def string(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value

    with socket.create_connection((host, int(port)), timeout=10) as sock:
        connect = (
            string(b"MQTT") + bytes([4, 2, 0, 60]) + string(b"raw-" + os.urandom(4).hex().encode())
        )
        sock.sendall(packet(0x10, connect) + packet(0x30, string(topic) + body))
        answer = b""
        while chunk := sock.recv(1024):
            answer += chunk
        return answer


async def test_mqtt_payloads_that_are_not_text_are_dead_lettered_in_line(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    now = int(datetime.now(UTC).timestamp() * 1000)
    bad = [
        b'{"metrics": {"v\x00": 1}}',  # a raw NUL: not JSON
        b'{"metrics": {"\xff\xfe": 1}}',  # not UTF-8
        b'{"metrics": {"v\\u0000": 1}}',  # a NUL, escaped: JSON, but no metric name
        b"\x00" * 16,
    ]
    messages = [(topics.telemetry(platform, "d1"), payload({"ts": now, "metrics": {"v": 0}}))]
    messages += [(topics.telemetry(platform, "d1"), body) for body in bad]
    messages += [(topics.telemetry(platform, "d1"), payload({"ts": now + 1, "metrics": {"v": 1}}))]
    async with running(MqttIngest(ingest_settings, pool)):
        await asyncio.to_thread(publish, mqtt_url, messages)
        # Topics that are not text never get through Mosquitto: it closes the connection
        # (after its CONNACK) instead of delivering them.
        for topic in (b"a\x00b", b"a\xffb"):
            raw = f"{topics.root}/{platform}/".encode() + topic + b"/telemetry"
            answer = await asyncio.to_thread(publish_raw, mqtt_url, raw, b'{"metrics": {"v": 9}}')
            assert answer == b"\x20\x02\x00\x00", answer
        await asyncio.to_thread(
            publish,
            mqtt_url,
            [(topics.telemetry(platform, "d1"), payload({"ts": now + 2, "metrics": {"v": 2}}))],
        )
        await eventually(lambda: scalar(db, "SELECT count(*) = 3 FROM telemetry"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 4 FROM dead_letters"))
    cur = await db.execute("SELECT reason, payload FROM dead_letters ORDER BY id")
    assert await cur.fetchall() == [
        ("invalid_json", bad[0]),
        ("invalid_json", bad[1]),
        ("invalid_metric_name", bad[2]),
        ("invalid_json", bad[3]),
    ]
    stored = await (await db.execute("SELECT value FROM telemetry ORDER BY value")).fetchall()
    assert stored == [(0.0,), (1.0,), (2.0,)]


async def test_mqtt_ingest_stops_on_a_refusal_it_cannot_record_and_acknowledges_nothing_after(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    await db.execute(
        "ALTER TABLE dead_letters ADD CONSTRAINT no_json_errors CHECK (reason <> 'invalid_json')"
    )
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    topic = topics.telemetry(platform, "d1")
    now = int(datetime.now(UTC).timestamp() * 1000)
    messages = [(topic, payload({"ts": now + n, "metrics": {"v": n}})) for n in range(6)]
    messages.insert(3, (topic, b"{not json"))
    ingest = MqttIngest(ingest_settings, pool)
    async with running(ingest):
        await asyncio.to_thread(publish, mqtt_url, messages)
        failure = await eventually(lambda: asyncio.sleep(0, ingest.progress.failure))
        assert not ingest.subscribed.is_set()
    assert failure.startswith(f"MQTT message on {topic!r} (packet id ")
    assert "no_json_errors" in failure
    # The operator fixes the cause and restarts: the broker delivers again what was not
    # acknowledged, and everything is stored once.
    await db.execute("ALTER TABLE dead_letters DROP CONSTRAINT no_json_errors")
    async with running(MqttIngest(ingest_settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 6 FROM telemetry"))
    assert await scalar(db, "SELECT payload FROM dead_letters") == b"{not json"
