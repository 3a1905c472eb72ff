"""The Kafka drain of bench/kafka_drain.py, consumed by several `iiot ingest kafka` processes.

Scaling out as the Kafka ingest issue asks, by adding consumers: each process is the real
command with its own client id and a share of the topic's 4 partitions. The partitions are
assigned statically (`IIOT_KAFKA_PARTITIONS`, as one range per StatefulSet replica), because
librdkafka's mock cluster fails a second group member's SyncGroup (tests/test_kafka_ingest.py);
with a real broker the group assigns the same shares. The backlog (the same records as
bench/kafka_drain.py) is produced before the processes start; the clock runs from the moment
every process answers /readyz (assigned, as bench/kafka_drain.py's clock starts at its
consumer's assignment) until every point is committed; what was committed before that moment
is left out, and the rate from the processes' start (imports included) is printed too. Progress is
read from the usage ledger. Baseline, same run: the raw COPY of bench/mqtt_drain.py.
"""

import argparse
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from bench.draining import IngestProcesses, processes_until_stored
from bench.figures import Figure, record
from bench.kafka_drain import PARTITIONS, log_start, produce
from bench.mqtt_drain import POINTS_PER_MESSAGE, payloads, raw_copy
from iiot.kafka_mock import MockKafkaCluster
from iiot.loop import serve
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect


def consumers(processes: int, env: dict[str, str], topic: str, tag: str) -> IngestProcesses:
    """`processes` x `iiot ingest kafka`, the partitions dealt out among them."""
    envs = [
        env
        | {
            "IIOT_KAFKA_CLIENT_ID": f"bench-{tag}-{k}",
            "IIOT_KAFKA_PARTITIONS": ",".join(
                f"{topic}:{p}" for p in range(PARTITIONS) if p % processes == k
            ),
        }
        for k in range(processes)
    ]
    return IngestProcesses("kafka", envs)


async def main(processes: int, records: int, devices: int) -> dict[str, Any]:
    database = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    tag = uuid.uuid4().hex[:8]
    ingest_schema, copy_schema = f"bench_{tag}", f"bench_{tag}_copy"
    expected = records * POINTS_PER_MESSAGE
    report: dict[str, Any] = {
        "processes": processes,
        "records": records,
        "points": expected,
        "devices": devices,
    }
    with MockKafkaCluster() as cluster:
        try:
            settings = StoreSettings(database_url=database, database_schema=ingest_schema)
            copy_settings = StoreSettings(database_url=database, database_schema=copy_schema)
            for s in (settings, copy_settings):
                await migrate(s)
            async with await connect(settings) as conn:
                await upsert_platform(conn, "bench")
                await conn.commit()
            topic = f"bench-{tag}"
            base_ms = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
            await produce(cluster.bootstrap, topic, payloads(records, devices, base_ms))
            begin = await log_start(cluster.bootstrap, topic)
            if any(begin):
                raise RuntimeError(f"the mock deleted records before the run: {begin}")

            env = dict(os.environ) | {
                "IIOT_DATABASE_URL": database,
                "IIOT_DATABASE_SCHEMA": ingest_schema,
                "IIOT_KAFKA_BOOTSTRAP": cluster.bootstrap,
                "IIOT_KAFKA_TOPICS": topic,
                "IIOT_KAFKA_GROUP_ID": f"bench-{tag}",
            }
            running = consumers(processes, env, topic, tag)
            drained = await processes_until_stored(
                running, settings, expected, broker=f"pid:{cluster.pid}"
            )
            report |= drained.report()
            rows = drained.rows

            rows.sort(key=lambda r: (r[0], r[1], r[2]))  # type: ignore[operator]
            copy_seconds = await raw_copy(copy_settings, rows, 50_000)
            report["raw_copy_rows_per_s"] = round(len(rows) / copy_seconds)
            report["ratio_drain_to_copy"] = round(
                report["drain_points_per_s"] / report["raw_copy_rows_per_s"], 2
            )
        finally:
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                for schema in (ingest_schema, copy_schema):
                    await conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                    )
    return report


def _figures(r: dict[str, Any]) -> list[Figure]:
    return [
        ("ingest processes (iiot ingest kafka, 4 partitions)", f"{r['processes']}", ""),
        ("records / points", f"{r['records']:,} / {r['points']:,}", ""),
        (
            "drain: points stored /s (from every process ready)",
            f"{r['drain_points_per_s']:,}",
            ">= the MQTT drain rate",
        ),
        (
            "points /s from the processes' start (imports included)",
            f"{r['points_per_s_from_process_start']:,}",
            "",
        ),
        ("baseline: raw binary COPY rows/s", f"{r['raw_copy_rows_per_s']:,}", ""),
        ("ratio drain / raw COPY", f"{r['ratio_drain_to_copy']}", ">= 0.7"),
        (
            "ingest CPU s per million points (all processes)",
            f"{r['ingest_cpu_s_per_million_points']}",
            "",
        ),
        ("PostgreSQL CPU s per million points", f"{r['postgres_cpu_s_per_million_points']}", ""),
        ("broker CPU s per million points", f"{r['broker_cpu_s_per_million_points']}", ""),
        ("machine cores busy during the drain (of 2)", f"{r['machine_cores_busy']}", ""),
        ("dead letters", f"{r['dead_letters']}", "0"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="20,000 records")
    args = parser.parse_args()
    records = 20_000 if args.quick else args.records
    result = serve(main(args.processes, records, args.devices))
    record("kafka_scaleout", result, _figures(result))
