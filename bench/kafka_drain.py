"""Kafka ingest drain benchmark: how fast a backlog of records is stored, beside raw COPY.

1. librdkafka's mock cluster (the only Kafka-protocol broker these machines have) in a helper
   process, and a schema of its own on the machine's PostgreSQL.
2. N records of 10 points each (default 200,000; 2,000,000 points) over 5,000 devices are
   produced to a 4-partition topic (gzip-compressed batches) before the consumer starts.
3. The consumer starts (in this process, in a consumer group); once the group has assigned it
   the partitions (the group join is reported apart: the broker waits 3 s for more members)
   the clock runs until every point is in the telemetry table. CPU time of this process,
   PostgreSQL and the broker is reported per million points.
4. Baseline, same run: binary COPY of the same rows, in the same order and batch size, into a
   second freshly migrated schema (same table, same primary key, same partitions); the faster
   of psycopg's row writer and ingest's own encoding.
"""

import argparse
import asyncio
import os
import resource
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg import sql

from bench.draining import Drain, until_stored
from bench.figures import Figure, record
from bench.mqtt_drain import POINTS_PER_MESSAGE, payloads, raw_copy
from iiot.kafka_mock import MockKafkaCluster
from iiot.loop import serve
from ingest.kafka import KafkaIngest
from ingest.settings import IngestSettings
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool

PARTITIONS = 4  # the mock cluster's topics have 4 partitions


# The mock cluster keeps about 5 MB per partition and deletes older records; compressed batches
# (as production producers send them) keep the whole backlog.
async def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        max_batch_size=1 << 20,
        acks=1,
        compression_type="gzip",
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = [
            await producer.send(topic, body, key=f"bench/{device}".encode())
            for device, body in records
        ]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def log_start(bootstrap: str, topic: str) -> list[int]:
    """Each partition's first offset (not 0: the mock deleted records)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return list((await consumer.beginning_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def drain(settings: IngestSettings, expected: int, broker: str) -> Drain:
    """Runs the consumer until `expected` points are stored, the clock starting once the group
    has assigned it the partitions."""
    async with create_pool(settings, name="bench") as pool:
        ingest = KafkaIngest(settings, pool)
        return await until_stored(
            ingest, settings, expected, broker=broker, clock_from=ingest.assigned
        )


async def main(records: int, devices: int) -> dict[str, Any]:
    database = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    tag = uuid.uuid4().hex[:8]
    ingest_schema, copy_schema = f"bench_{tag}", f"bench_{tag}_copy"
    expected = records * POINTS_PER_MESSAGE
    report: dict[str, Any] = {"records": records, "points": expected, "devices": devices}
    with MockKafkaCluster() as cluster:
        try:
            settings = IngestSettings(
                database_url=database,
                database_schema=ingest_schema,
                kafka_bootstrap=cluster.bootstrap,
                kafka_topics=[f"bench-{tag}"],
                kafka_group_id=f"bench-{tag}",
            )
            copy_settings = StoreSettings(database_url=database, database_schema=copy_schema)
            for s in (settings, copy_settings):
                await migrate(s)
            async with await connect(settings) as conn:
                await upsert_platform(conn, "bench")
                await conn.commit()

            base_ms = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
            bodies = payloads(records, devices, base_ms)
            seconds = await produce(cluster.bootstrap, settings.kafka_topics[0], bodies)
            report["produce_records_per_s"] = round(records / seconds)

            begin = await log_start(cluster.bootstrap, settings.kafka_topics[0])
            if any(begin):
                raise RuntimeError(f"the mock deleted records before the run: {begin}")
            drained = await drain(settings, expected, f"pid:{cluster.pid}")
            elapsed, cpu, split = drained.seconds, drained.cpu, drained.split
            report["group_join_seconds"] = round(drained.waited, 2)
            report["drain_seconds"] = round(elapsed, 2)
            report["drain_points_per_s"] = round(expected / elapsed)
            report["drain_seconds_include"] = "from the group's assignment on"
            report["ingest_cpu_s_per_million_points"] = round(cpu / expected * 1e6, 2)
            report.update(split.per_million(expected))

            async with await connect(settings) as conn:
                cur = await conn.execute("SELECT time, device_id, metric_id, value FROM telemetry")
                rows = await cur.fetchall()
            rows.sort(key=lambda r: (r[0], r[1], r[2]))
            copy_seconds = await raw_copy(copy_settings, rows, settings.batch_max_points)
            report["raw_copy_rows_per_s"] = round(len(rows) / copy_seconds)
            report["ratio_drain_to_copy"] = round(
                report["drain_points_per_s"] / report["raw_copy_rows_per_s"], 2
            )
            report["bench_process_max_rss_mib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
        finally:
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                for schema in (ingest_schema, copy_schema):
                    await conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                    )
    return report


def _figures(r: dict[str, Any]) -> list[Figure]:
    rows: list[Figure] = [
        (
            "records / points / devices",
            f"{r['records']:,} / {r['points']:,} / {r['devices']:,}",
            "",
        ),
        ("produce rate (records/s)", f"{r['produce_records_per_s']:,}", ""),
        ("drain: points stored /s", f"{r['drain_points_per_s']:,}", ">= the MQTT drain rate"),
        ("baseline: raw binary COPY rows/s", f"{r['raw_copy_rows_per_s']:,}", ""),
        ("ratio drain / raw COPY", f"{r['ratio_drain_to_copy']}", ">= 0.7"),
        ("group join before the clock starts (s)", f"{r['group_join_seconds']}", ""),
        ("ingest CPU s per million points", f"{r['ingest_cpu_s_per_million_points']}", ""),
        ("PostgreSQL CPU s per million points", f"{r['postgres_cpu_s_per_million_points']}", ""),
        ("broker CPU s per million points", f"{r['broker_cpu_s_per_million_points']}", ""),
        ("machine cores busy during the drain (of 2)", f"{r['machine_cores_busy']}", ""),
        ("bench process max RSS (MiB)", f"{r['bench_process_max_rss_mib']}", ""),
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="20,000 records")
    args = parser.parse_args()
    result = serve(main(20_000 if args.quick else args.records, args.devices))
    record("kafka_drain", result, _figures(result))
