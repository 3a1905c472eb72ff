"""MQTT ingest drain benchmark: how fast a backlog of QoS 1 messages is stored, beside raw COPY.

1. A private Mosquitto (iiot's configuration: no limit on queued messages) and a schema of its
   own on the machine's PostgreSQL.
2. The consumer's persistent session is created, then the consumer stops.
3. N messages of 10 points each (default 200,000; 2,000,000 points) are published with QoS 1
   and queued by the broker: plain JSON over 5,000 devices. `--sparkplug-share` adds Sparkplug B
   (50 edge nodes with 20 devices each: NBIRTH, DBIRTHs, then DDATA by alias, each edge node on
   one connection so its seq stays in order); off by default since the Sparkplug host has a
   clean session of its own (Sparkplug 3.0) and the broker queues nothing for it.
4. The consumer starts (the same client id, in this process) and the clock runs until every
   point is in the telemetry table. CPU time of this process is reported per million points.
5. Baseline, same run: binary COPY of the same rows, in the same order and batch size, into a
   second freshly migrated schema (same table, same primary key, same partitions); the faster
   of psycopg's row writer and ingest's own encoding.
"""

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import resource
import threading
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from bench.draining import Drain, until_stored
from bench.figures import Figure, record
from iiot.embedded import MosquittoBroker
from iiot.loop import serve
from ingest.copy_encoding import COPY_TELEMETRY, TELEMETRY_TYPES, encode_rows
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import INT64, MetricIn, encode_payload
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool

T = TypeVar("T")
POINTS_PER_MESSAGE = 10
SPARKPLUG_NODES, SPARKPLUG_DEVICES = 50, 20


def payloads(messages: int, devices: int, base_ms: int) -> list[tuple[str, bytes]]:
    """(device, payload); every point distinct in (device, metric, time)."""
    out = []
    for n in range(messages):
        device = f"d{n % devices:05d}"
        ts = base_ms + (n // devices) * 1000
        metrics = {f"m{k}": (n * POINTS_PER_MESSAGE + k) / 10 for k in range(POINTS_PER_MESSAGE)}
        out.append((device, orjson.dumps({"ts": ts, "metrics": metrics})))
    return out


def sparkplug_streams(
    messages: int, nodes: int, devices_per_node: int, base_ms: int, clients: int
) -> list[list[tuple[str, bytes]]]:
    """Per publishing connection, Sparkplug messages of the edge nodes it carries, in seq order:
    NBIRTH, a DBIRTH per device (10 metrics with aliases), then DDATA by alias."""
    streams: list[list[tuple[str, bytes]]] = [[] for _ in range(clients)]
    aliases = range(1, POINTS_PER_MESSAGE + 1)
    per_node = messages // nodes
    for node in range(nodes):
        edge, out = f"e{node:03d}", streams[node % clients]
        seq = 0
        birth = [MetricIn("bdSeq", 0, INT64)]
        out.append(
            (f"spBv1.0/bench/NBIRTH/{edge}", encode_payload(birth, seq=seq, timestamp_ms=base_ms))
        )
        for d in range(devices_per_node):
            seq += 1
            metrics = [MetricIn(f"s{k}", float(k), alias=k) for k in aliases]
            out.append(
                (
                    f"spBv1.0/bench/DBIRTH/{edge}/d{d:03d}",
                    encode_payload(metrics, seq=seq % 256, timestamp_ms=base_ms),
                )
            )
        for n in range(per_node):
            seq += 1
            device = f"d{n % devices_per_node:03d}"
            ts = base_ms + 1 + n // devices_per_node
            metrics = [MetricIn(None, (n * 10 + k) / 10, alias=k) for k in aliases]
            body = encode_payload(metrics, seq=seq % 256, timestamp_ms=ts)
            out.append((f"spBv1.0/bench/DDATA/{edge}/{device}", body))
    return streams


def backlog(
    messages: int,
    devices: int,
    sparkplug_share: float,
    root: str,
    base_ms: int,
    *,
    clients: int = 4,
) -> tuple[list[list[tuple[str, bytes]]], int, int]:
    """(per-connection streams, JSON messages, points expected) of the whole backlog."""
    json_messages = messages - int(messages * sparkplug_share)
    bodies = [
        (f"{root}/bench/{device}/telemetry", body)
        for device, body in payloads(json_messages, devices, base_ms)
    ]
    streams: list[list[tuple[str, bytes]]] = [[] for _ in range(clients)]
    data = births = 0
    if json_messages < messages:
        streams = sparkplug_streams(
            messages - json_messages, SPARKPLUG_NODES, SPARKPLUG_DEVICES, base_ms, clients
        )
        data = (messages - json_messages) // SPARKPLUG_NODES * SPARKPLUG_NODES
        births = SPARKPLUG_NODES * SPARKPLUG_DEVICES
    for i in range(clients):
        streams[i] += bodies[i::clients]
    expected = (json_messages + data + births) * POINTS_PER_MESSAGE
    return streams, json_messages, expected


def publish(url_port: int, streams: list[list[tuple[str, bytes]]]) -> float:
    """Publishes each stream with QoS 1 over its own connection; returns when every PUBACK is
    in. One connection per stream keeps each edge node's messages in order."""
    done = threading.Semaphore(0)
    started = time.perf_counter()

    def run(part: list[tuple[str, bytes]], index: int) -> None:
        acked = threading.Event()
        remaining = [len(part)]
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}")
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)

        def on_publish(*_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                acked.set()

        client.on_publish = on_publish
        client.connect("127.0.0.1", url_port)
        client.loop_start()
        for topic, body in part:
            client.publish(topic, body, qos=1)
        acked.wait(600)
        client.loop_stop()
        client.disconnect()
        done.release()

    threads = [threading.Thread(target=run, args=(part, i)) for i, part in enumerate(streams)]
    for t in threads:
        t.start()
    for _ in threads:
        done.acquire()
    return time.perf_counter() - started


async def drain(settings: IngestSettings, expected: int) -> Drain:
    """Runs the consumer until `expected` points are stored; returns (seconds, CPU seconds)."""
    async with create_pool(settings, name="bench") as pool:
        return await until_stored(
            MqttIngest(settings, pool), settings, expected, broker="mosquitto"
        )


async def profiled(work: Awaitable[T], *, enabled: bool) -> T:
    """Awaits `work`, under cProfile when enabled (prints the top functions by own time)."""
    if not enabled:
        return await work
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return await work
    finally:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


async def raw_copy(settings: StoreSettings, rows: list[tuple[Any, ...]], batch: int) -> float:
    """Seconds to COPY the rows in batches of `batch`, each committed: the best of psycopg's
    row writer and two runs of the writer's own encoding (`encode_rows`), each into an empty
    table. The best of three, because a slow moment of the shared machine during a single
    baseline run had made a drain look as fast as raw COPY (1.01)."""
    async with await connect(settings) as conn:
        days = sorted({r[0].date() for r in rows})
        await conn.execute("SELECT iiot_ensure_telemetry_partitions(%s, %s)", (days[0], days[-1]))
        await conn.commit()
        timings = []
        for encode in (False, True, True):
            await conn.execute("TRUNCATE telemetry")
            await conn.commit()
            started = time.perf_counter()
            for first in range(0, len(rows), batch):
                async with conn.cursor() as cur, cur.copy(COPY_TELEMETRY) as copy:
                    if encode:
                        await copy.write(encode_rows(rows[first : first + batch]))
                    else:
                        copy.set_types(TELEMETRY_TYPES)
                        for row in rows[first : first + batch]:
                            await copy.write_row(row)
                await conn.commit()
            timings.append(time.perf_counter() - started)
        return min(timings)


async def main(
    messages: int, devices: int, sparkplug_share: float, *, profile: bool = False
) -> dict[str, Any]:
    database = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    tag = uuid.uuid4().hex[:8]
    ingest_schema, copy_schema = f"bench_{tag}", f"bench_{tag}_copy"
    expected = messages * POINTS_PER_MESSAGE
    report: dict[str, Any] = {"messages": messages, "points": expected, "devices": devices}
    with TemporaryDirectory() as state:
        broker = MosquittoBroker(Path(state))
        url = await broker.start()
        try:
            settings = IngestSettings(
                database_url=database,
                database_schema=ingest_schema,
                mqtt_url=url,
                mqtt_client_id=f"bench-{tag}",
                mqtt_topic_root=f"bench/{tag}",
                # Sparkplug group "bench" is the platform "bench".
                sparkplug_groups="bench=bench",
                sparkplug_host_id="",
            )
            copy_settings = StoreSettings(database_url=database, database_schema=copy_schema)
            for s in (settings, copy_settings):
                await migrate(s)
            async with await connect(settings) as conn:
                await upsert_platform(conn, "bench")
                await conn.commit()
            async with create_pool(settings, name="bench") as pool:
                ingest = MqttIngest(settings, pool)
                task = asyncio.create_task(ingest.run())
                await asyncio.wait_for(ingest.subscribed.wait(), 30)
                ingest.stop()
                await task

            base_ms = int(datetime.now(UTC).timestamp() * 1000) - 3_600_000
            streams, json_messages, expected = backlog(
                messages, devices, sparkplug_share, settings.mqtt_topic_root, base_ms
            )
            sent = sum(len(stream) for stream in streams)
            report["points"] = expected
            report["messages"] = sent
            report["sparkplug_messages"] = sent - json_messages
            seconds = await asyncio.to_thread(publish, broker.port or 1883, streams)
            report["publish_msgs_per_s"] = round(sent / seconds)

            # The benchmark's own data (payloads, streams) is no garbage: keep the collector
            # from walking it again and again while the consumer runs.
            gc.freeze()
            drained = await profiled(drain(settings, expected), enabled=profile)
            report["drain_seconds"] = round(drained.seconds, 2)
            report["drain_points_per_s"] = round(expected / drained.seconds)
            report["ingest_cpu_s_per_million_points"] = round(drained.cpu / expected * 1e6, 2)
            report.update(drained.split.per_million(expected))

            # The same rows, with the ids ingest gave them, for the baseline.
            async with await connect(settings) as conn:
                cur = await conn.execute("SELECT count(*) FROM dead_letters")
                report["dead_letters"] = (await cur.fetchone() or (0,))[0]
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
            await broker.stop()
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                for schema in (ingest_schema, copy_schema):
                    await conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                    )
    return report


def _figures(r: dict[str, Any]) -> list[Figure]:
    rows: list[Figure] = [
        (
            "messages / points / devices",
            f"{r['messages']:,} / {r['points']:,} / {r['devices']:,}",
            "",
        ),
        ("of which Sparkplug B (births and DDATA)", f"{r['sparkplug_messages']:,}", ""),
        ("publish rate (QoS 1, msg/s)", f"{r['publish_msgs_per_s']:,}", ""),
        ("drain: points stored /s", f"{r['drain_points_per_s']:,}", ">= 150,000"),
        ("baseline: raw binary COPY rows/s", f"{r['raw_copy_rows_per_s']:,}", ""),
        ("ratio drain / raw COPY", f"{r['ratio_drain_to_copy']}", ">= 0.6"),
        ("ingest CPU s per million points", f"{r['ingest_cpu_s_per_million_points']}", ""),
        ("PostgreSQL CPU s per million points", f"{r['postgres_cpu_s_per_million_points']}", ""),
        ("broker CPU s per million points", f"{r['broker_cpu_s_per_million_points']}", ""),
        ("machine cores busy during the drain (of 2)", f"{r['machine_cores_busy']}", ""),
        ("bench process max RSS (MiB)", f"{r['bench_process_max_rss_mib']}", ""),
        ("dead letters", f"{r['dead_letters']}", "0"),
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=5_000)
    # 0: the Sparkplug host has a clean session (Sparkplug 3.0), so the broker queues no
    # backlog for it; a share above 0 only measures what the JSON consumer leaves of it.
    parser.add_argument("--sparkplug-share", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="20,000 messages")
    parser.add_argument("--profile", action="store_true", help="cProfile the drain")
    args = parser.parse_args()
    messages = 20_000 if args.quick else args.messages
    result = serve(main(messages, args.devices, args.sparkplug_share, profile=args.profile))
    record("mqtt_drain", result, _figures(result))
