"""Kafka ingest on a Kafka-protocol broker (librdkafka's mock cluster) and the real PostgreSQL.

The mock lacks one thing these tests would use: a second member of a consumer group fails
SyncGroup, so tests with two consumers (handover, kill -9) assign partitions explicitly
(`IIOT_KAFKA_PARTITIONS`, a supported deployment mode); the single-consumer tests use the group.
Topics appear on first use with 4 partitions.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg_pool import AsyncConnectionPool

from ingest.kafka import KafkaIngest
from ingest.replay import list_dead_letters, replay
from ingest.settings import IngestSettings
from ingest.sparkplug import INT64, MetricIn, encode_payload
from registry.counts import platform_counts
from registry.kafka_offsets import partition_lag
from registry.platforms import upsert_platform
from tests.conftest import eventually, payload, scalar

PARTITIONS = 4


@pytest.fixture
def settings(kafka_settings: IngestSettings) -> IngestSettings:
    return kafka_settings


@asynccontextmanager
async def consuming(ingest: KafkaIngest) -> AsyncIterator[KafkaIngest]:
    task = asyncio.create_task(ingest.run())
    try:
        async with asyncio.timeout(30):
            await ingest.assigned.wait()
        yield ingest
    finally:
        ingest.stop()
        async with asyncio.timeout(30):
            await task


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def stream(platform: str, records: int, devices: int, first: int = 0) -> list[tuple[bytes, bytes]]:
    """`records` records of 10 points each, no two points alike; values 10n..10n+9."""
    base = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
    return [
        (
            f"{platform}/d{n % devices}".encode(),
            payload({"ts": base + n, "metrics": {f"m{k}": n * 10 + k for k in range(10)}}),
        )
        for n in range(first, first + records)
    ]


def value_sum(records: int) -> int:
    return sum(range(records * 10))


async def test_records_are_stored_with_their_offsets_and_bad_ones_dead_lettered(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: Any,
    platform: str,
    api: httpx.AsyncClient,
) -> None:
    topic = settings.kafka_topics[0]
    ts = int(datetime.now(UTC).timestamp() * 1000)
    good = payload({"ts": ts, "metrics": {"temp": 21.5}})
    records: list[tuple[bytes | None, bytes]] = [
        (b"plant-1/press-1", good),
        (None, good),  # no key
        (b"\xff\xfe", good),  # key not UTF-8
        (b"plant-1/press-1/extra", good),  # key with a path in it
        (b"plant-1/+", good),  # wildcard as a device id
        (b"plant-1/press-2", b'{"ts": 1, "metr'),  # truncated JSON
        (b"nowhere/press-1", good),  # unknown platform
        (b"plant-1/press-3", payload({"ts": ts, "metrics": {"temp": "hot"}})),
        (
            b"plant-1/gateways/gw-1",
            payload({"devices": {"press-4": {"ts": ts, "metrics": {"rpm": 7}}}}),
        ),
        (b"plant-1/press-5", good),
    ]
    await produce(settings.require_kafka_bootstrap(), topic, records)
    async with consuming(KafkaIngest(settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 7 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 3 FROM telemetry"))

    rows = await (
        await db.execute(
            "SELECT reason, topic, source, kafka_partition IS NOT NULL, kafka_offset IS NOT NULL,"
            " kafka_key FROM dead_letters ORDER BY reason, kafka_key NULLS FIRST"
        )
    ).fetchall()
    assert [(r[0], r[5]) for r in rows] == [
        ("bad_device_id", b"plant-1/+"),
        ("bad_key", b"plant-1/press-1/extra"),
        ("bad_key", b"\xff\xfe"),  # kept as it arrived
        ("invalid_json", b"plant-1/press-2"),
        ("invalid_value", b"plant-1/press-3"),
        ("missing_key", None),
        ("unknown_platform", b"nowhere/press-1"),
    ]
    assert all(r[1] == topic and r[2] == "kafka" and r[3] and r[4] for r in rows)
    # Every record's offset is stored with the data: the sum of next offsets is the count.
    assert await scalar(db, "SELECT sum(next_offset)::int FROM kafka_offsets") == len(records)
    lag = await partition_lag(db, settings.kafka_group_id)
    assert lag
    assert all(p.lag == 0 for p in lag)
    served = (await api.get("/ingest/kafka/lag", params={"group": settings.kafka_group_id})).json()
    assert sorted((p["partition"], p["next_offset"], p["lag"]) for p in served) == sorted(
        (p.partition, p.next_offset, 0) for p in lag
    )
    # Devices first seen on Kafka are registered (one behind its gateway) and connected.
    devices = await (
        await db.execute(
            "SELECT d.device_id, g.gateway_id FROM devices d"
            " LEFT JOIN gateways g ON g.id = d.via_gateway ORDER BY d.device_id"
        )
    ).fetchall()
    assert devices == [("press-1", None), ("press-4", "gw-1"), ("press-5", None)]
    counts = await platform_counts(db, "plant-1")
    assert counts is not None
    assert (counts.registered, counts.connected) == (3, 3)

    # The operator registers the missing platform and replays: the record's key addresses it.
    await upsert_platform(db, "nowhere")
    letters = await list_dead_letters(db, reason="unknown_platform")
    report = await replay(pool, settings, letters)
    assert report.stored == [letters[0].id]
    assert await scalar(db, "SELECT count(*) FROM devices WHERE platform_id = 'nowhere'") == 1


async def test_the_store_not_kafka_decides_where_reading_resumes(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    topic = settings.kafka_topics[0]
    bootstrap = settings.require_kafka_bootstrap()
    await produce(bootstrap, topic, stream(platform, 8_000, devices=200))
    # Someone commits the group's offsets to the end in Kafka (as aiokafka's auto-commit would
    # after fetching): nothing is stored yet, so ingest must still read everything.
    rogue = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await rogue.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await rogue.end_offsets(partitions)
        await rogue.commit(ends)
    finally:
        await rogue.stop()

    async with consuming(KafkaIngest(settings, pool)) as first:
        await eventually(lambda: scalar(db, "SELECT count(*) = 80000 FROM telemetry"), timeout=60)
        await asyncio.sleep(0.5)
        # Each record read once, from the log's start (not rewound by a lazy reset).
        assert first.stats.messages == 8_000
        assert first.stats.duplicates_skipped == 0
    # Stopped; more arrives; a new consumer goes on from the stored offsets: nothing twice.
    await produce(bootstrap, topic, stream(platform, 400, devices=200, first=8_000))
    async with consuming(KafkaIngest(settings, pool)) as ingest:
        await eventually(lambda: scalar(db, "SELECT count(*) = 84000 FROM telemetry"))
        await asyncio.sleep(0.5)
        assert ingest.stats.duplicates_skipped == 0
        assert ingest.stats.messages == 400  # read from the stored offsets, not from 0
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == value_sum(8_400)


async def test_a_stopped_consumers_partitions_are_taken_over_without_loss_or_duplicates(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    topic = settings.kafka_topics[0]
    bootstrap = settings.require_kafka_bootstrap()
    halves = [[(topic, 0), (topic, 1)], [(topic, 2), (topic, 3)]]
    a = KafkaIngest(
        settings.model_copy(update={"kafka_client_id": "a"}), pool, partitions=halves[0]
    )
    b = KafkaIngest(
        settings.model_copy(update={"kafka_client_id": "b"}), pool, partitions=halves[1]
    )
    records = stream(platform, 6_000, devices=200)
    async with consuming(b):
        async with consuming(a):
            await produce(bootstrap, topic, records[:3_000])
            await eventually(lambda: scalar(db, "SELECT count(*) > 5000 FROM telemetry"))
        # a stopped mid-stream (drained what it held); b takes over a's partitions.
        await b.assign(halves[0] + halves[1])
        await produce(bootstrap, topic, records[3_000:])
        await eventually(lambda: scalar(db, "SELECT count(*) = 60000 FROM telemetry"), timeout=60)
        await asyncio.sleep(0.5)
    assert a.stats.messages + b.stats.messages == 6_000  # each record read once in all
    assert a.stats.duplicates_skipped + b.stats.duplicates_skipped == 0
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == value_sum(6_000)


async def test_two_consumers_on_the_same_partitions_write_each_record_once(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    # A misconfiguration (both given every partition): the offsets' compare-and-set fences one
    # of them on every conflict, so even the dead letters, which have no natural key, are
    # stored once.
    topic = settings.kafka_topics[0]
    every = [(topic, p) for p in range(PARTITIONS)]
    records: list[tuple[bytes | None, bytes]] = list(stream(platform, 2_000, devices=50))
    records[::100] = [(b"plant-1/poison", b"not json")] * len(records[::100])
    await produce(settings.require_kafka_bootstrap(), topic, records)
    a = KafkaIngest(settings.model_copy(update={"kafka_client_id": "a"}), pool, partitions=every)
    b = KafkaIngest(settings.model_copy(update={"kafka_client_id": "b"}), pool, partitions=every)
    async with consuming(a), consuming(b):
        await eventually(
            lambda: scalar(db, "SELECT sum(next_offset) = 2000 FROM kafka_offsets"), timeout=60
        )
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 20
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 1_980 * 10


async def test_the_partitions_are_written_by_two_lanes_each_with_a_counter_shard(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    assert settings.kafka_write_lanes == 2  # the default
    await produce(
        settings.require_kafka_bootstrap(),
        settings.kafka_topics[0],
        stream(platform, 2_000, devices=200),
    )
    async with consuming(KafkaIngest(settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 20000 FROM telemetry"))
    cursor = await db.execute(
        "SELECT shard, registered FROM platform_counters "
        "WHERE platform_id = %s AND registered > 0 ORDER BY shard",
        (platform,),
    )
    by_shard = dict(await cursor.fetchall())
    # Each device's records sit in one partition, so one lane registered it, once.
    assert len(by_shard) == 2, by_shard
    assert sum(by_shard.values()) == 200
    assert await scalar(db, "SELECT sum(next_offset) FROM kafka_offsets") == 2_000
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == value_sum(2_000)


async def test_a_slow_writer_pauses_fetching_and_loses_nothing(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    tight = settings.model_copy(update={"queue_max_messages": 8, "batch_max_points": 50})
    await produce(
        settings.require_kafka_bootstrap(),
        settings.kafka_topics[0],
        stream(platform, 1_000, devices=10),
    )
    async with consuming(KafkaIngest(tight, pool)) as ingest:
        await eventually(lambda: scalar(db, "SELECT count(*) = 10000 FROM telemetry"), timeout=60)
        assert ingest.pauses > 0


async def test_kill_9_of_the_consumer_three_times_stores_every_point_once(
    settings: IngestSettings, db: Any, platform: str, tmp_path: Path
) -> None:
    topic = settings.kafka_topics[0]
    bootstrap = settings.require_kafka_bootstrap()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_KAFKA_BOOTSTRAP": bootstrap,
        "IIOT_KAFKA_TOPICS": topic,
        "IIOT_KAFKA_GROUP_ID": settings.kafka_group_id,
        "IIOT_KAFKA_PARTITIONS": ",".join(f"{topic}:{p}" for p in range(PARTITIONS)),
        "IIOT_BATCH_MAX_POINTS": "5000",
    }
    log = (tmp_path / "consumer.log").open("w")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "ingest", "kafka"], env=env, stdout=log, stderr=log
        )

    records = stream(platform, 10_000, devices=500)  # 100,000 points
    consumer = start()
    kills = 0
    try:
        for chunk in range(4):
            await produce(bootstrap, topic, records[chunk * 2_500 : (chunk + 1) * 2_500])
            if chunk < 3:
                floor = await scalar(db, "SELECT count(*) FROM telemetry")
                await eventually(
                    lambda f=floor: scalar(db, "SELECT count(*) > %s FROM telemetry", f),
                    timeout=60,
                )
                consumer.send_signal(signal.SIGKILL)
                consumer.wait(10)
                kills += 1
                consumer = start()
        stored_before_drain = await scalar(db, "SELECT count(*) FROM telemetry")
        await eventually(
            lambda: scalar(db, "SELECT count(*) = 100000 FROM telemetry"), timeout=120, interval=0.2
        )
        await eventually(
            lambda: scalar(db, "SELECT sum(next_offset) = 10000 FROM kafka_offsets"), timeout=30
        )
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)
        log.close()
    assert kills == 3
    assert stored_before_drain < 100_000
    assert await scalar(db, "SELECT sum(value)::bigint FROM telemetry") == value_sum(10_000)
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 0


async def test_sparkplug_payloads_named_by_a_header_are_decoded_as_on_mqtt(
    settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str, unique: str
) -> None:
    group = f"sp-{unique}"
    spb = settings.model_copy(update={"sparkplug_groups": f"{group}={platform}"})
    topic = spb.kafka_topics[0]
    ms = int(datetime.now(UTC).timestamp() * 1000)
    node = f"spBv1.0/{group}/NBIRTH/e1"
    records = [
        (
            node,
            encode_payload(
                [MetricIn("bdSeq", 1, INT64), MetricIn("T", 1.0, alias=1)], seq=0, timestamp_ms=ms
            ),
        ),
        (
            f"spBv1.0/{group}/DBIRTH/e1/press",
            encode_payload([MetricIn("S", 2.0, alias=2)], seq=1, timestamp_ms=ms + 1),
        ),
        (
            f"spBv1.0/{group}/NDATA/e1",
            encode_payload([MetricIn(None, 3.0, alias=1)], seq=2, timestamp_ms=ms + 2),
        ),
        (
            f"spBv1.0/{group}/DDATA/e1/press",
            encode_payload([MetricIn(None, 4.0, alias=2)], seq=3, timestamp_ms=ms + 3),
        ),
        (f"spBv1.0/{group}/NDEATH/e1", encode_payload([MetricIn("bdSeq", 0, INT64)])),  # stale
        (f"spBv1.0/{group}/NDATA/e1", b"\xff\xff\xff"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=spb.require_kafka_bootstrap())
    await producer.start()
    try:
        for sparkplug_topic, body in records:
            # Keyed by edge node, so that one edge node's messages stay in order.
            await producer.send_and_wait(
                topic,
                body,
                key=f"{group}/e1".encode(),
                headers=[("iiot-sparkplug-topic", sparkplug_topic.encode())],
            )
    finally:
        await producer.stop()
    async with consuming(KafkaIngest(spb, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 4 FROM telemetry"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM dead_letters"))
        await eventually(lambda: scalar(db, "SELECT sum(next_offset) = 6 FROM kafka_offsets"))
    values = await (await db.execute("SELECT value FROM telemetry ORDER BY time")).fetchall()
    assert [v[0] for v in values] == [1.0, 2.0, 3.0, 4.0]
    letters = await (
        await db.execute("SELECT reason, topic, kafka_offset FROM dead_letters ORDER BY id")
    ).fetchall()
    assert [(r[0], r[1], r[2]) for r in letters] == [
        ("stale_death", topic, 4),
        ("invalid_protobuf", topic, 5),
    ]
    # The BIRTHs are kept for a restart, as on MQTT; the stale death removed nothing.
    assert await scalar(db, "SELECT count(*) FROM sparkplug_births") == 2
    counts = await platform_counts(db, platform)
    assert counts is not None
    assert counts.connected == 2  # the edge node's own device and press
    report = await replay(pool, spb, await list_dead_letters(db))
    assert set(report.rejected.values()) == {"not_replayable"}
