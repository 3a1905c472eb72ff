"""The MQTT drain of bench/mqtt_drain.py, consumed by several `iiot ingest mqtt` processes.

As deploy/compose runs them: each process is the real command with its own client id, all of
them sharing the JSON topics through the MQTT 5 shared subscription `$share/bench/...`, and the
Sparkplug group on the first process only (an edge node's stream must reach one process).
The backlog (the same messages as bench/mqtt_drain.py) is queued for their persistent sessions
while they are stopped; then they start, and the clock runs from the moment every process
answers /readyz (connected and subscribed, as bench/mqtt_drain.py's clock starts at its
consumer's start) until every point is committed; what was committed before that moment is
left out, and the rate from the processes' start (about 1.3 CPU s of imports each) is printed
too. Progress is read from the usage ledger, which each batch's transaction appends to.
Baseline, same run: the raw COPY of bench/mqtt_drain.py.
"""

import argparse
import asyncio
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psycopg
from psycopg import sql

from bench.draining import IngestProcesses, processes_until_stored
from bench.figures import Figure, record
from bench.mqtt_drain import backlog, publish, raw_copy
from iiot.embedded import MosquittoBroker
from iiot.loop import serve
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect


def consumers(processes: int, env: dict[str, str], tag: str) -> IngestProcesses:
    """`processes` x `iiot ingest mqtt` sharing the JSON topics; Sparkplug on the first only
    (an edge node's stream must reach one process)."""
    envs = [
        env
        | {
            "IIOT_MQTT_CLIENT_ID": f"bench-{tag}-{k}",
            "IIOT_MQTT_SHARED_GROUP": "bench",
            "IIOT_SPARKPLUG_GROUPS": "bench=bench" if k == 0 else "",
            "IIOT_SPARKPLUG_HOST_ID": "",
        }
        for k in range(processes)
    ]
    return IngestProcesses("mqtt", envs)


async def main(
    processes: int, messages: int, devices: int, sparkplug_share: float
) -> dict[str, Any]:
    database = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    tag = uuid.uuid4().hex[:8]
    ingest_schema, copy_schema = f"bench_{tag}", f"bench_{tag}_copy"
    report: dict[str, Any] = {"processes": processes, "devices": devices}
    with TemporaryDirectory() as state:
        broker = MosquittoBroker(Path(state))
        url = await broker.start()
        try:
            settings = StoreSettings(database_url=database, database_schema=ingest_schema)
            copy_settings = StoreSettings(database_url=database, database_schema=copy_schema)
            for s in (settings, copy_settings):
                await migrate(s)
            async with await connect(settings) as conn:
                await upsert_platform(conn, "bench")
                await conn.commit()
            root = f"bench/{tag}"
            env = dict(os.environ) | {
                "IIOT_DATABASE_URL": database,
                "IIOT_DATABASE_SCHEMA": ingest_schema,
                "IIOT_MQTT_URL": url,
                "IIOT_MQTT_TOPIC_ROOT": root,
            }
            running = consumers(processes, env, tag)
            running.start()  # creates the persistent sessions and their subscriptions
            await asyncio.to_thread(running.ready)
            running.stop()

            base_ms = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
            streams, json_messages, expected = backlog(
                messages, devices, sparkplug_share, root, base_ms
            )
            sent = sum(len(stream) for stream in streams)
            report |= {"messages": sent, "sparkplug_messages": sent - json_messages}
            report["points"] = expected
            await asyncio.to_thread(publish, broker.port or 1883, streams)

            drained = await processes_until_stored(running, settings, expected, broker="mosquitto")
            report |= drained.report()
            rows = drained.rows
            rows.sort(key=lambda r: (r[0], r[1], r[2]))
            copy_seconds = await raw_copy(copy_settings, rows, 50_000)
            report["raw_copy_rows_per_s"] = round(len(rows) / copy_seconds)
            report["ratio_drain_to_copy"] = round(
                report["drain_points_per_s"] / report["raw_copy_rows_per_s"], 2
            )
        finally:
            await broker.stop()
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                for schema in (ingest_schema, copy_schema):
                    await conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                    )
    return report


def _figures(r: dict[str, Any]) -> list[Figure]:
    rows: list[Figure] = [
        ("ingest processes (iiot ingest mqtt, $share)", f"{r['processes']}", ""),
        ("messages / points", f"{r['messages']:,} / {r['points']:,}", ""),
        (
            "drain: points stored /s (from every process ready)",
            f"{r['drain_points_per_s']:,}",
            ">= 150,000",
        ),
        (
            "points /s from the processes' start (imports included)",
            f"{r['points_per_s_from_process_start']:,}",
            "",
        ),
        ("baseline: raw binary COPY rows/s", f"{r['raw_copy_rows_per_s']:,}", ""),
        ("ratio drain / raw COPY", f"{r['ratio_drain_to_copy']}", ">= 0.6"),
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
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=5_000)
    # 0: the Sparkplug host's clean session gets no backlog (bench/mqtt_drain.py).
    parser.add_argument("--sparkplug-share", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="20,000 messages")
    args = parser.parse_args()
    messages = 20_000 if args.quick else args.messages
    result = serve(main(args.processes, messages, args.devices, args.sparkplug_share))
    record("mqtt_scaleout", result, _figures(result))
