"""Registry benchmark: connection events per second, and the cost of a count, at 1 million devices.

What it does, on the machine's PostgreSQL in schemas of its own (dropped at the end):
1. Two registries of 450 platforms: 1,000 devices in one, 1,000,000 in the other, seeded with
   COPY (counters set by the reconciler, which is how drift is corrected).
2. The count endpoint's latency (p50/p99) over HTTP against an `iiot api` subprocess for each,
   in alternating rounds so both see the same machine: a count reads maintained counters, so
   the two figures should match.
3. Connection events through ingest's own writer (decoded status messages, the path MQTT status
   and Wills take): every device connects, then every device disconnects, in batches.
   Events/s are reported, and the counters are checked against a full recount afterwards.
   Each writer is a process of its own, as an ingest process is; `--writers N` splits the
   devices over N of them with a counter shard each (results in
   registry_events-Nwriters-latest.json).
4. The writer processes' peak memory (one writer caches a million device ids).

Baseline in the same run: the same COPY-seeded rows recounted with COUNT(*) (what a count would
cost without maintained counters).
"""

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.draining import cpu_by_program, cpu_since
from bench.figures import Figure, record
from bench.http_load import latency_samples, percentiles, start_api
from iiot.loop import serve
from iiot.net import free_port
from ingest.batching import END, EndOfStream, Received
from ingest.decoding import Status
from ingest.stats import IngestStats
from ingest.writer import PreparedBatch, TelemetryWriter, write_ahead
from registry.access import Role, create_key
from registry.activity import refresh_activity
from registry.counts import platform_counts
from registry.migrate import migrate
from registry.reconcile import find_drift, reconcile
from registry.settings import StoreSettings
from registry.store import connect, create_pool

Queue = asyncio.Queue[Received[None] | EndOfStream]


async def count_latencies(
    apis: dict[str, tuple[int, str]], *, rounds: int = 10, requests: int = 200
) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of GET /platforms/p000/devices/count on each API (name -> port, key),
    sequential, in alternating rounds: both sizes are measured under the same conditions of
    a shared machine, not minutes apart. Through the lean client of bench/http_load.py: httpx
    spent 1 to 2 ms of this process's CPU on each request, the client's latency, not the
    endpoint's."""
    samples: dict[str, list[float]] = {name: [] for name in apis}
    for _ in range(rounds):
        for name, (port, key) in apis.items():
            samples[name] += await latency_samples(
                port,
                "/platforms/p000/devices/count",
                headers={"Authorization": f"Bearer {key}"},
                requests=requests,
            )
    return {name: percentiles(taken) for name, taken in samples.items()}


async def registry(settings: StoreSettings, platforms: int) -> str:
    """A migrated schema with `platforms` platforms; returns an admin API key."""
    await migrate(settings)
    async with await connect(settings) as conn:
        async with (
            conn.cursor() as cur,
            cur.copy("COPY platforms (id, name) FROM STDIN") as copy,
        ):
            for p in range(platforms):
                await copy.write_row((f"p{p:03d}", f"Platform {p}"))
        _, key = await create_key(
            conn, role=Role.ADMIN, platform=None, name="bench", created_by=None
        )
        await conn.commit()
    return key


async def seed(settings: StoreSettings, platforms: int, devices: int, start: int) -> None:
    """Registers devices [start, devices) spread over the platforms, with COPY."""
    async with await connect(settings) as conn:
        async with (
            conn.cursor() as cur,
            cur.copy("COPY devices (platform_id, device_id) FROM STDIN") as copy,
        ):
            for n in range(start, devices):
                await copy.write_row((f"p{n % platforms:03d}", f"d{n:07d}"))
        await conn.commit()
        await conn.execute("ANALYZE devices")
        await conn.commit()


async def settle(conn: psycopg.AsyncConnection[Any]) -> None:
    """Vacuums and analyzes the freshly seeded devices, as autovacuum would have long before
    anyone reads counts: started by the bulk load, it otherwise ran during the latency
    measurement, on the same two cores."""
    await conn.execute("VACUUM (ANALYZE) devices")


async def drive_events(
    settings: StoreSettings, platforms: int, devices: int, batch: int, writers: int = 1
) -> dict[str, Any]:
    """Every device connects, then disconnects; through `writers` writer processes (as many
    ingest processes would: each with its own counter shard, its share of the devices and its
    own cache of device ids), each in batches of `batch`, each batch prepared while the one
    before it commits. The processes start and connect before the clock, then drive each phase
    on a signal; the clock stops when the last one reports."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, as ingest has
    pipes, processes = [], []
    for k in range(writers):
        ours, theirs = spawn.Pipe()
        share = _Share(
            settings.require_database_url(),
            settings.database_schema,
            shard=1 + k,
            first=k,
            step=writers,
            devices=devices,
            platforms=platforms,
            batch=batch,
        )
        process = spawn.Process(target=_writer_process, args=(theirs, share), daemon=True)
        process.start()
        theirs.close()  # the child's end: a child that dies then ends our recv with EOFError
        pipes.append(ours)
        processes.append(process)
    results: dict[str, Any] = {}
    try:
        await _replies(pipes)  # connected
        for online, label in ((True, "connect"), (False, "disconnect")):
            machine = cpu_by_program("postgres")
            started = time.perf_counter()
            for pipe in pipes:
                pipe.send((online, datetime.now(UTC)))
            writer_cpu = sum(await _replies(pipes))
            elapsed = time.perf_counter() - started
            split = cpu_since(machine, elapsed, broker="postgres")
            results[label] = {
                "events": devices,
                "writers": writers,
                "seconds": round(elapsed, 2),
                "events_per_s": round(devices / elapsed),
                "writer_cpu_s": round(writer_cpu, 2),
                "postgres_cpu_s": round(split.postgres, 2),
                "machine_cores_busy": round(split.machine / elapsed, 2),
            }
            async with await connect(settings) as conn:
                counts = await platform_counts(conn, "p000")
                assert counts is not None
                results[label]["p000_connected"] = counts.connected
        for pipe in pipes:
            pipe.send(None)
        results["writer_max_rss_mib"] = max(await _replies(pipes))
    finally:
        for pipe in pipes:
            pipe.close()  # a writer still waiting for a phase ends (EOFError)
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return results


async def _replies(pipes: list[Connection]) -> list[Any]:
    """One reply from each writer process; one that failed sends its traceback, one that died
    closes its end."""
    replies = []
    for k, pipe in enumerate(pipes):
        try:
            reply = await asyncio.to_thread(pipe.recv)
        except EOFError:
            raise RuntimeError(f"writer process {k} ended without replying") from None
        if isinstance(reply, _Failed):
            raise RuntimeError(f"writer process {k} failed:\n{reply.traceback}")  # noqa: TRY004
        replies.append(reply)
    return replies


@dataclass(frozen=True)
class _Failed:
    traceback: str


@dataclass(frozen=True)
class _Share:
    """What one writer process drives: devices first, first + step, ... below devices."""

    database_url: str
    schema: str
    shard: int
    first: int
    step: int
    devices: int
    platforms: int
    batch: int


def _writer_process(pipe: Connection, share: _Share) -> None:
    try:
        serve(_writer_main(pipe, share))
    except EOFError:
        return  # the benchmark stopped waiting for this writer
    except BaseException:
        pipe.send(_Failed(traceback.format_exc()))
        raise


async def _writer_main(pipe: Connection, share: _Share) -> None:
    """A writer process: connects, then drives a phase per (online, now) received, replying
    with the phase's CPU seconds; on None replies with its peak memory in MiB and ends."""
    settings = StoreSettings(database_url=share.database_url, database_schema=share.schema)
    # Two connections, as the writer uses them: one prepares a batch while the other commits.
    async with create_pool(settings, name="bench", min_size=2) as pool:
        await pool.wait()
        writer = TelemetryWriter(pool, stats=IngestStats(), counter_shard=share.shard)
        pipe.send("connected")
        while (phase := await asyncio.to_thread(pipe.recv)) is not None:
            online, now = phase
            cpu = time.process_time()
            await _drive(writer, share, online=online, now=now)
            pipe.send(time.process_time() - cpu)
    pipe.send(_peak_memory_mib())


def _peak_memory_mib() -> int:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries the
    parent's peak into a child it forks, and exec keeps it."""
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return round(int(kib) / 1024)


async def _drive(writer: TelemetryWriter, share: _Share, *, online: bool, now: datetime) -> None:
    """One writer's share of the events, run as a consumer runs the writer (write_ahead), with
    the status messages made as they are received (the decoding's stand-in)."""
    queue: Queue = asyncio.Queue(2 * share.batch)

    async def receive() -> None:
        for n in range(share.first, share.devices, share.step):
            status = Status(f"p{n % share.platforms:03d}", online, 1, device=f"d{n:07d}")
            await queue.put(Received("mqtt", "", b"", now, [status], None))
        await queue.put(END)

    async def commit(prepared: PreparedBatch) -> None:
        await writer.commit(prepared)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(receive())
        await write_ahead(queue, writer, commit, max_points=share.batch, max_delay=1.0)


async def main(devices: int, batch: int, writers: int = 1) -> dict[str, Any]:
    base_url = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    run = uuid.uuid4().hex[:8]
    settings = StoreSettings(database_url=base_url, database_schema=f"bench_{run}")
    small = StoreSettings(database_url=base_url, database_schema=f"bench_{run}_1k")
    platforms = 450
    report: dict[str, Any] = {"devices": devices, "platforms": platforms, "batch": batch}
    apis: list[subprocess.Popen[bytes]] = []
    try:
        small_key = await registry(small, platforms)
        await seed(small, platforms, 1000, 0)
        key = await registry(settings, platforms)
        started = time.perf_counter()
        await seed(settings, platforms, devices, 0)
        report["seed_seconds"] = round(time.perf_counter() - started, 1)
        for store in (small, settings):
            async with await connect(store, autocommit=True) as conn:
                await reconcile(conn, shard=0)
                await settle(conn)
        async with await connect(settings, autocommit=True) as conn:
            started = time.perf_counter()
            await conn.execute("SELECT count(*) FROM devices WHERE platform_id = 'p000'")
            per_platform = time.perf_counter() - started
            started = time.perf_counter()
            await conn.execute("SELECT count(*) FROM devices")
            report["baseline_count_star_ms"] = {
                "one_platform": round(per_platform * 1000, 2),
                "all_devices": round((time.perf_counter() - started) * 1000, 2),
            }
        measured = {
            "count_at_1k": (small, small_key),
            f"count_at_{devices // 1000}k": (settings, key),
        }
        ports: dict[str, int] = {}
        for name, (store, _) in measured.items():
            # Each port taken once the API before it listens: two free_port() calls in a row
            # may return the same port, and then one API answers for both registries (a
            # --quick run failed with 401, as the other registry's key would get).
            ports[name] = free_port()
            apis.append(start_api(store, ports[name]))
        report |= await count_latencies(
            {name: (ports[name], k) for name, (_, k) in measured.items()}
        )

        report["events"] = await drive_events(settings, platforms, devices, batch, writers)
        async with await connect(settings, autocommit=True) as conn:
            started = time.perf_counter()
            drift = await find_drift(conn)
            report["recount_seconds"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            await refresh_activity(conn)
            report["activity_pass_seconds"] = round(time.perf_counter() - started, 2)
        report["drift"] = [d.platform for d in drift]
    finally:
        for api in apis:
            api.terminate()
            api.wait(10)
        async with await psycopg.AsyncConnection.connect(base_url, autocommit=True) as conn:
            for store in (settings, small):
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(store.database_schema)
                    )
                )
    return report


def _per_million(report: dict[str, Any], phase: str, key: str) -> float:
    events = report["events"][phase]
    return round(events[key] * 1e6 / events["events"], 2)


def _figures(report: dict[str, Any]) -> list[Figure]:
    big = next(k for k in report if k.startswith("count_at_") and k != "count_at_1k")
    small, large = report["count_at_1k"], report[big]
    rows: list[Figure] = [
        ("devices / platforms", f"{report['devices']:,} / {report['platforms']}", ""),
        ("connect events/s", f"{report['events']['connect']['events_per_s']:,}", ">= 50,000"),
        ("disconnect events/s", f"{report['events']['disconnect']['events_per_s']:,}", ">= 50,000"),
        (
            "CPU s per million, writer / PG (connect)",
            f"{_per_million(report, 'connect', 'writer_cpu_s')} / "
            f"{_per_million(report, 'connect', 'postgres_cpu_s')}",
            "",
        ),
        (
            "CPU s per million, writer / PG (disconnect)",
            f"{_per_million(report, 'disconnect', 'writer_cpu_s')} / "
            f"{_per_million(report, 'disconnect', 'postgres_cpu_s')}",
            "",
        ),
        (
            "cores busy (connect / disconnect)",
            f"{report['events']['connect']['machine_cores_busy']} / "
            f"{report['events']['disconnect']['machine_cores_busy']}",
            "of 2",
        ),
        ("count p50 / p99 at 1k (ms)", f"{small['p50_ms']} / {small['p99_ms']}", "p99 <= 5"),
        (
            f"count p50 / p99 at {big[9:]} (ms)",
            f"{large['p50_ms']} / {large['p99_ms']}",
            "p99 <= 5",
        ),
        ("p99 ratio large / 1k", f"{large['p99_ms'] / small['p99_ms']:.2f}", "<= 1.2"),
        (
            "baseline COUNT(*) one platform / all (ms)",
            f"{report['baseline_count_star_ms']['one_platform']} / "
            f"{report['baseline_count_star_ms']['all_devices']}",
            "",
        ),
        ("full recount (s)", f"{report['recount_seconds']}", ""),
        ("activity and national distinct pass (s)", f"{report['activity_pass_seconds']}", "< 60"),
        ("drift after the events", f"{report['drift'] or 'none'}", "none"),
        ("writer process max RSS (MiB)", f"{report['events']['writer_max_rss_mib']}", ""),
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=1, help="writers, one counter shard each")
    parser.add_argument("--quick", action="store_true", help="100,000 devices")
    args = parser.parse_args()
    result = serve(main(100_000 if args.quick else args.devices, args.batch, args.writers))
    name = "registry_events" if args.writers == 1 else f"registry_events-{args.writers}writers"
    record(name, result, _figures(result))
