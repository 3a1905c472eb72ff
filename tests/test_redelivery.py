"""Messages without `ts` are stored once when the broker redelivers them (ingest/redelivery.py),
and identical readings sent twice stay two points.

The kill test publishes with paho directly (not our client) to a private Mosquitto (it kills the
consumer, never the shared broker) and kills `iiot ingest mqtt` right after commits, while it
drains a backlog.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg_pool import AsyncConnectionPool

from iiot.embedded import MosquittoBroker
from ingest.batching import Received
from ingest.decoding import MessageDecoder, Telemetry
from ingest.mqtt import MqttIngest
from ingest.redelivery import RedeliveryRecord
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from tests.conftest import eventually, payload, running, scalar


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not MosquittoBroker.available():
        pytest.skip("needs the mosquitto binary for a private broker")
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    url = asyncio.run(broker.start())
    yield url
    broker.kill()


async def test_a_redelivery_gets_the_recorded_time_only_from_the_last_two_batches(
    ingest_settings: IngestSettings, pool: AsyncConnectionPool, platform: str
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    decode = MessageDecoder(topics, ingest_settings)
    record = RedeliveryRecord(
        pool, ingest_settings.mqtt_client_id, keep=timedelta(days=1), decode=decode
    )
    start = datetime.now(UTC) - timedelta(minutes=1)

    def message(
        mid: int, value: int, second: int, *, dup: bool = False, ts: bool = False
    ) -> Received[Any]:
        topic = topics.telemetry(platform, "d1")
        at = start + timedelta(seconds=second)
        reading: dict[str, Any] = {"metrics": {"v": value}}
        if ts:
            reading["ts"] = int(at.timestamp() * 1000)
        body = payload(reading)
        return Received("mqtt", topic, body, at, decode(topic, body, at), (mid, 1), None, dup)

    record.connected()
    batches = [
        [message(1, 1, 1)],
        [message(2, 2, 2)],
        [message(3, 3, 3), message(5, 5, 3), message(7, 7, 3)],
        [message(4, 4, 4, ts=True)],  # nothing to record: the connection's last batch moves on
    ]
    for batch in batches:
        async with pool.connection() as conn, conn.transaction():
            await record.record(conn, batch)
    record.connected()  # the session resumes: the broker redelivers with DUP
    redelivered = [
        message(1, 1, 10, dup=True),  # batch 1: its packet id may have been reused since
        message(2, 2, 10, dup=True),  # batch 2: two batches committed after it
        message(3, 3, 10, dup=True),  # batch 3: may be unacknowledged
        message(5, 99, 10, dup=True),  # batch 3's packet id, another message
        message(7, 7, 10),  # no DUP: a new message, never a redelivery
    ]
    revised = await record.recorded_times(redelivered)
    times = [(m.received_at - start).seconds for m in revised]
    assert times == [10, 10, 3, 10, 10]
    # The message decoded again: its readings carry the recorded time.
    outcome = revised[2].outcome
    assert isinstance(outcome, list)
    (telemetry,) = outcome
    assert isinstance(telemetry, Telemetry)
    assert telemetry.points == [(start + timedelta(seconds=3), "v", 3)]


async def test_records_go_with_their_connection_after_the_window(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    topics = TopicScheme(ingest_settings.mqtt_topic_root)
    decode = MessageDecoder(topics, ingest_settings)
    client = ingest_settings.mqtt_client_id
    topic, body = topics.telemetry(platform, "d1"), payload({"metrics": {"v": 1}})
    now = datetime.now(UTC)
    stored = Received("mqtt", topic, body, now, decode(topic, body, now), (1, 1))
    record = RedeliveryRecord(pool, client, keep=timedelta(0), decode=decode)
    for _ in range(2):  # each connection's first batch prunes what is older than `keep`
        record.connected()
        async with pool.connection() as conn, conn.transaction():
            await record.record(conn, [stored])
    # Only the second connection's row is left, and the record now under it.
    assert await scalar(db, "SELECT count(*) FROM mqtt_redelivery_connections") == 1
    assert await scalar(db, "SELECT count(*) FROM mqtt_redeliveries") == 1


def publish_all(url: str, messages: list[tuple[str, bytes]], protocol: str) -> None:
    """Publishes with QoS 1 through paho itself; returns once the broker acknowledged all.

    Under MQTT 5 every third message carries a user property, which the broker forwards: ingest
    leaves such packets to paho's own reader, so both of its receive paths see redeliveries."""
    host, port = url.removeprefix("mqtt://").split(":")
    version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=version)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    tagged = None
    if protocol == "5":
        tagged = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        tagged.UserProperty = [("sent-by", "paho")]
    try:
        infos = [
            client.publish(topic, body, qos=1, properties=tagged if n % 3 == 0 else None)
            for n, (topic, body) in enumerate(messages)
        ]
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow  # starts a broker and consumer processes of its own
@pytest.mark.parametrize(
    ("protocol", "speedups"),
    [("5", True), ("3.1.1", True), ("5", False)],
    ids=["5", "3.1.1", "5-paho-public"],
)
async def test_kills_after_commits_store_every_message_once_and_repeats_twice(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    private_broker: str,
    tmp_path: Path,
    protocol: str,
    speedups: bool,
) -> None:
    """`5-paho-public`: on paho's public path (as when paho's internals are missing), the DUP
    flag and acknowledgement after the commit must hold all the same."""
    settings = ingest_settings.model_copy(
        update={"mqtt_url": private_broker, "mqtt_protocol": protocol}
    )
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)):
        pass  # the persistent session exists from here on
    # A backlog: value n marks message n; every other message has no `ts`, and every 40th one
    # without `ts` is sent twice on purpose (a sensor repeating a reading): two points.
    base = int(datetime.now(UTC).timestamp() * 1000) - 60_000
    messages, expected = [], {}
    for n in range(12_000):
        reading: dict[str, Any] = {"metrics": {"v": n}}
        if n % 2:
            reading["ts"] = base + n
        sent = payload(reading)
        copies = 2 if n % 80 == 0 else 1
        messages += [(topics.telemetry(platform, f"d{n % 50}"), sent)] * copies
        expected[n] = copies
    await asyncio.to_thread(publish_all, private_broker, messages, protocol)

    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_MQTT_URL": private_broker,
        "IIOT_MQTT_PROTOCOL": protocol,
        "IIOT_MQTT_CLIENT_ID": settings.mqtt_client_id,
        "IIOT_MQTT_TOPIC_ROOT": settings.mqtt_topic_root,
        "IIOT_SPARKPLUG_GROUPS": "",
        "IIOT_BATCH_MAX_POINTS": "400",  # many commits to kill after
        "IIOT_MQTT_PAHO_SPEEDUPS": str(speedups).lower(),
    }
    log = (tmp_path / "consumer.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "ingest", "mqtt"], env=env, stdout=log, stderr=log
        )

    rows = "SELECT count(*) FROM telemetry"
    kills = 0
    consumer = start()
    try:
        for _ in range(5):
            # Kill it as soon as a commit becomes visible: its PUBACKs are not (all) out yet.
            floor = await scalar(db, rows)
            deadline = time.monotonic() + 60
            while await scalar(db, rows) == floor:
                assert time.monotonic() < deadline, "the consumer stored nothing"
                await asyncio.sleep(0.001)
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(10)
            kills += 1
            consumer = start()
        stored_at_last_kill = await scalar(db, rows)
        await eventually(
            lambda: scalar(db, "SELECT count(*) >= %s FROM telemetry", len(messages)),
            timeout=120,
            interval=0.2,
        )
        await asyncio.sleep(1)  # anything redelivered late would be stored by now
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)
        log.close()
    assert kills == 5
    assert ("taking paho's public path" in (tmp_path / "consumer.log").read_text()) is not speedups
    assert stored_at_last_kill < len(messages)  # the kills happened mid-backlog
    cur = await db.execute("SELECT value::int, count(*) FROM telemetry GROUP BY 1")
    assert dict(await cur.fetchall()) == expected
    # The ledger bills each stored point once, redeliveries as duplicates (there were some: the
    # kills did land between commits and acknowledgements).
    assert await scalar(db, "SELECT sum(points)::int FROM usage_daily") == len(messages)
    assert await scalar(db, "SELECT sum(duplicate_points)::int FROM usage_daily") > 0
