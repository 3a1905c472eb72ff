"""The MQTT drain of bench/mqtt_drain.py, consumed by several `iiot ingest mqtt` processes.

As deploy/compose runs them: each process is the real command with its own client id, all of
them sharing the JSON topics through the MQTT 5 shared subscription `$share/bench/...`, and the
Sparkplug group on the first process only (an edge node's stream must reach one process).
The backlog (the same messages as bench/mqtt_drain.py) is queued for their persistent sessions
while they are stopped; then they start and the clock runs from their start (imports and
connection included) until every point is committed. Progress is read from the usage ledger,
which each batch's transaction appends to. Baseline, same run: the raw COPY of bench/mqtt_drain.py.
"""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psycopg
from psycopg import sql

from bench.draining import cpu_by_program, cpu_since, process_cpu
from bench.figures import Figure, record
from bench.mqtt_drain import backlog, publish, raw_copy
from iiot.embedded import MosquittoBroker
from iiot.loop import serve
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect

PROGRESS = "SELECT coalesce(sum(points + duplicate_points), 0) FROM usage_ledger"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Consumers:
    """`processes` x `iiot ingest mqtt`, started and stopped together."""

    def __init__(self, processes: int, env: dict[str, str], tag: str) -> None:
        self._envs = []
        for k in range(processes):
            port = _free_port()
            self._envs.append(
                env
                | {
                    "IIOT_MQTT_CLIENT_ID": f"bench-{tag}-{k}",
                    "IIOT_MQTT_SHARED_GROUP": "bench",
                    # Sparkplug on the first process only; the others take no Sparkplug topics.
                    "IIOT_SPARKPLUG_GROUPS": "bench=bench" if k == 0 else "",
                    "IIOT_SPARKPLUG_HOST_ID": "",
                    "IIOT_METRICS_PORT": str(port),
                    "IIOT_LOG_LEVEL": "WARNING",
                }
            )
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        command = [sys.executable, "-m", "iiot.cli", "ingest", "mqtt"]
        self._running = [subprocess.Popen(command, env=e) for e in self._envs]  # noqa: S603

    def ready(self, within: float = 60) -> None:
        """Waits until every process answers /readyz (subscribed) with 200."""
        deadline = time.monotonic() + within
        for env in self._envs:
            url = f"http://127.0.0.1:{env['IIOT_METRICS_PORT']}/readyz"
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=1) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} not ready")
                time.sleep(0.2)

    def cpu(self) -> float:
        return sum(process_cpu(str(p.pid)) for p in self._running)

    def stop(self) -> None:
        for process in self._running:
            process.send_signal(signal.SIGTERM)
        for process in self._running:
            if process.wait(60) != 0:
                raise RuntimeError(f"an ingest process exited with {process.returncode}")


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
            consumers = Consumers(processes, env, tag)
            consumers.start()  # creates the persistent sessions and their subscriptions
            await asyncio.to_thread(consumers.ready)
            consumers.stop()

            base_ms = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
            streams, json_messages, expected = backlog(
                messages, devices, sparkplug_share, root, base_ms
            )
            sent = sum(len(stream) for stream in streams)
            report |= {"messages": sent, "sparkplug_messages": sent - json_messages}
            report["points"] = expected
            await asyncio.to_thread(publish, broker.port or 1883, streams)

            rows = await _drain(consumers, settings, expected, report)
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


async def _drain(
    consumers: Consumers, settings: StoreSettings, expected: int, report: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Starts the consumers on their backlog and times them until every point is committed;
    returns the stored rows (for the baseline)."""
    machine = cpu_by_program("mosquitto")
    started = time.perf_counter()
    consumers.start()
    async with await connect(settings, autocommit=True) as conn:
        # Polling the store: the points are committed by other processes.
        while (await (await conn.execute(PROGRESS)).fetchone() or (0,))[0] < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - started
        used = consumers.cpu()
        split = cpu_since(machine, elapsed, broker="mosquitto")
        consumers.stop()
        stored = await (await conn.execute("SELECT count(*) FROM telemetry")).fetchone()
        if not stored or stored[0] != expected:
            raise RuntimeError(f"{stored} points stored, {expected:,} expected")
        cur = await conn.execute("SELECT count(*) FROM dead_letters")
        report["dead_letters"] = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute("SELECT time, device_id, metric_id, value FROM telemetry")
        rows = await cur.fetchall()
    report["drain_seconds"] = round(elapsed, 2)
    report["drain_points_per_s"] = round(expected / elapsed)
    report["ingest_cpu_s_per_million_points"] = round(used / expected * 1e6, 2)
    report |= split.per_million(expected)
    return rows


def _figures(r: dict[str, Any]) -> list[Figure]:
    rows: list[Figure] = [
        ("ingest processes (iiot ingest mqtt, $share)", f"{r['processes']}", ""),
        ("messages / points", f"{r['messages']:,} / {r['points']:,}", ""),
        (
            "drain: points stored /s (process start included)",
            f"{r['drain_points_per_s']:,}",
            ">= 150,000",
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
    parser.add_argument("--sparkplug-share", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="20,000 messages")
    args = parser.parse_args()
    messages = 20_000 if args.quick else args.messages
    result = serve(main(args.processes, messages, args.devices, args.sparkplug_share))
    record("mqtt_scaleout", result, _figures(result))
