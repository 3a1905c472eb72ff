"""The id caches of ingest are bounded (IIOT_DEVICE_CACHE_MAX): the oldest-cached ids go first,
a mapping already handed out stays whole, and ids dropped are read from the store again, so
counts and rows stay right on the real PostgreSQL."""

from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ingest.kafka import KafkaIngest
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.devices import (
    REGISTER_DEVICES,
    SELECT_DEVICE_IDS,
    DeviceDirectory,
    Identities,
    Key,
)
from tests.conftest import scalar
from tests.test_writer import telemetry


def keys(platform: str, first: int, count: int) -> dict[Key, int]:
    return {(platform, f"d{i}"): i for i in range(first, first + count)}


async def test_the_oldest_cached_ids_are_dropped_and_handed_out_mappings_stay_whole(
    db: psycopg.AsyncConnection[Any],
) -> None:
    ids = Identities(SELECT_DEVICE_IDS, REGISTER_DEVICES, max_cached=100)
    ids.remember(keys("p", 0, 60))
    everything = set(keys("p", 0, 60))
    handed_out, new, registered = await ids.resolve(db, everything, provision=set())
    assert (new, registered) == ({}, [])  # all cached: the cache itself, no query
    ids.remember(keys("p", 60, 60))
    # A quarter of the bound (25) dropped, oldest first: the newest 35 of the first 60 stay.
    assert len(ids) == 95
    kept, _, _ = await ids.resolve(db, set(keys("p", 25, 95)), provision=set())
    assert all(kept[k] == i for k, i in keys("p", 25, 95).items())
    assert set(handed_out) == everything  # unchanged by the eviction


def test_the_gateway_each_device_was_seen_through_is_bounded_too() -> None:
    directory = DeviceDirectory(max_cached_ids=1000)
    for start in range(0, 5000, 500):
        directory.remember_via({d: 1 for d in range(start, start + 500)})
    # Dropped ones count as moved (their gateway is written again); the newest are known.
    assert directory.moved({4999: 1, 0: 1}) == {0: 1}
    assert len(directory.moved({d: 1 for d in range(5000)})) >= 4000


async def test_devices_dropped_from_the_cache_are_read_again_not_registered_twice(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    writer = TelemetryWriter(
        pool, stats=IngestStats(), directory=DeviceDirectory(max_cached_ids=1000)
    )
    now = datetime.now(UTC).replace(microsecond=0)
    for rounds in range(2):
        for start in range(0, 3000, 500):
            batch = [
                telemetry(platform, f"dev-{i}", (now.replace(second=rounds), "t", float(i)))
                for i in range(start, start + 500)
            ]
            await writer.write(batch)
        assert len(writer.directory.devices) <= 1000
    assert await scalar(db, "SELECT count(*) FROM devices") == 3000
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 6000
    registered = await scalar(
        db, "SELECT sum(registered) FROM platform_counters WHERE platform_id = %s", platform
    )
    assert registered == 3000


async def test_the_setting_bounds_every_writer_of_a_consumer(
    ingest_settings: IngestSettings, pool: AsyncConnectionPool
) -> None:
    settings = ingest_settings.model_copy(update={"device_cache_max": 5000, "kafka_write_lanes": 3})
    mqtt = MqttIngest(settings, pool)
    assert mqtt._writer.directory.max_cached_ids == 5000
    kafka = KafkaIngest(settings, pool)
    assert {w.directory.max_cached_ids for w in kafka._writers} == {5000}
    assert len({id(w.directory) for w in kafka._writers}) == 1  # the lanes share one cache
