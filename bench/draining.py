"""Runs ingest until a backlog is stored, in this process or as `iiot ingest` processes:
shared by the drain benchmarks."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ingest.stats import IngestStats
from registry.settings import StoreSettings
from registry.store import connect


@dataclass
class Drain:
    seconds: float  # from the start (or `clock_from`) until every point was committed
    cpu: float  # this process's CPU seconds meanwhile
    split: "CpuSplit"
    waited: float  # seconds before the clock started (`clock_from`)


class Consumer(Protocol):
    stats: IngestStats

    async def run(self) -> None: ...
    def stop(self) -> None: ...


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: str) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_by_program(broker: str) -> dict[str, float]:
    """CPU seconds used so far by every process, summed by program name, plus the machine's
    busy seconds (all cores) under "machine" and, for `pid:N`, that process's."""
    used: dict[str, float] = {}
    if broker.startswith("pid:"):
        used[broker] = process_cpu(broker.removeprefix("pid:"))
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            used[name] = used.get(name, 0.0) + process_cpu(entry.name)
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    idle = int(cpu[3]) + int(cpu[4])
    used["machine"] = (sum(int(v) for v in cpu[:8]) - idle) / _TICKS
    return used


@dataclass
class CpuSplit:
    """Where the machine's CPU went while a drain ran (every process on the machine counts:
    the machine is shared, so other tenants show up under "machine" too)."""

    seconds: float
    machine: float
    postgres: float
    broker: float

    def per_million(self, points: int) -> dict[str, float]:
        scale = 1e6 / points
        return {
            "machine_cores_busy": round(self.machine / self.seconds, 2),
            "postgres_cpu_s_per_million_points": round(self.postgres * scale, 2),
            "broker_cpu_s_per_million_points": round(self.broker * scale, 2),
        }


def cpu_since(before: dict[str, float], seconds: float, *, broker: str) -> CpuSplit:
    """`broker`: its program name, or `pid:N` for one process."""
    after = cpu_by_program(broker)
    return CpuSplit(
        seconds,
        after["machine"] - before["machine"],
        after.get("postgres", 0.0) - before.get("postgres", 0.0),
        after.get(broker, 0.0) - before.get(broker, 0.0),
    )


async def until_stored(
    consumer: Consumer,
    settings: StoreSettings,
    expected: int,
    *,
    broker: str,
    clock_from: asyncio.Event | None = None,
) -> Drain:
    """Runs `consumer` until `expected` points are committed (`broker`: the broker's program
    name, or `pid:N`, for the CPU split). With `clock_from`, the clock starts when that event
    is set (a Kafka consumer's group join: the broker waits 3 s for more members first).

    Progress comes from the consumer's own count of committed points: polling
    `count(*)` of the growing table instead cost PostgreSQL up to 150 ms a time, on the same
    two cores as the consumer. The table is counted once at the end.
    """
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    if clock_from is not None:
        await asyncio.wait_for(clock_from.wait(), 60)
    waited = time.perf_counter() - started
    machine = cpu_by_program(broker)
    started, cpu = time.perf_counter(), time.process_time()
    stats = consumer.stats
    while stats.points_written + stats.duplicates_skipped < expected:
        if task.done():
            task.result()
            raise RuntimeError("the consumer stopped before the backlog was stored")
        await asyncio.sleep(0.05)
    elapsed, used = time.perf_counter() - started, time.process_time() - cpu
    split = cpu_since(machine, elapsed, broker=broker)
    consumer.stop()
    await task
    async with await connect(settings, autocommit=True) as conn:
        row = await (await conn.execute("SELECT count(*) FROM telemetry")).fetchone()
    stored = row[0] if row else 0
    if stored != expected:
        raise RuntimeError(f"{stored:,} points stored, {expected:,} expected")
    return Drain(elapsed, used, split, waited)


# Committed points, read from the usage ledger that each batch's transaction appends to (the
# points are committed by other processes, whose own counts this process cannot read).
PROGRESS = "SELECT coalesce(sum(points + duplicate_points), 0) FROM usage_ledger"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class IngestProcesses:
    """`iiot ingest {transport}` processes, one per environment, started and stopped together;
    each serves /readyz on a port of its own."""

    def __init__(self, transport: Literal["mqtt", "kafka"], envs: list[dict[str, str]]) -> None:
        self._command = [sys.executable, "-m", "iiot.cli", "ingest", transport]
        self._envs = [
            env | {"IIOT_METRICS_PORT": str(_free_port()), "IIOT_LOG_LEVEL": "WARNING"}
            for env in envs
        ]
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self._running = [subprocess.Popen(self._command, env=e) for e in self._envs]  # noqa: S603

    def ready(self, within: float = 60) -> None:
        """Waits until every process answers /readyz (subscribed or assigned) with 200."""
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
                time.sleep(0.05)

    def cpu(self) -> float:
        return sum(process_cpu(str(p.pid)) for p in self._running)

    def stop(self) -> None:
        for process in self._running:
            process.send_signal(signal.SIGTERM)
        for process in self._running:
            if process.wait(60) != 0:
                raise RuntimeError(f"an ingest process exited with {process.returncode}")


@dataclass
class ProcessesDrain:
    drain: Drain  # from the moment every process was ready (`waited`: from their start)
    points: int  # committed from that moment on: the drain's points
    total: int  # every point of the backlog
    dead_letters: int
    rows: list[tuple[object, ...]]  # every stored row, for the baseline

    def report(self) -> dict[str, Any]:
        drain, points = self.drain, self.points
        return {
            "dead_letters": self.dead_letters,
            "start_seconds": round(drain.waited, 2),
            "drain_seconds": round(drain.seconds, 2),
            "drain_points": points,
            "drain_points_per_s": round(points / drain.seconds),
            "points_per_s_from_process_start": round(self.total / (drain.waited + drain.seconds)),
            "ingest_cpu_s_per_million_points": round(drain.cpu / points * 1e6, 2),
        } | drain.split.per_million(points)


async def processes_until_stored(
    processes: IngestProcesses, settings: StoreSettings, expected: int, *, broker: str
) -> ProcessesDrain:
    """Starts the processes on their backlog and stops them once every point is committed.
    The clock, the points and the CPU count from the moment every process is ready (connected
    and subscribed or assigned, as the single-consumer benchmarks count from their consumer's
    assignment): a process's start, about 1.3 CPU s of imports here, is not the drain's cost.
    What was committed before that moment is left out of the drain's points."""
    started = time.perf_counter()
    processes.start()
    processes.ready()
    machine = cpu_by_program(broker)
    ready, before = time.perf_counter(), processes.cpu()
    async with await connect(settings, autocommit=True) as conn:
        already = int((await (await conn.execute(PROGRESS)).fetchone() or (0,))[0])
        if already >= expected:
            raise RuntimeError(
                "every point was committed before the processes were ready: the "
                "backlog is too small to time"
            )
        while (await (await conn.execute(PROGRESS)).fetchone() or (0,))[0] < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - ready
        used = processes.cpu() - before
        split = cpu_since(machine, elapsed, broker=broker)
        processes.stop()
        stored = await (await conn.execute("SELECT count(*) FROM telemetry")).fetchone()
        if not stored or stored[0] != expected:
            raise RuntimeError(f"{stored} points stored, {expected:,} expected")
        cur = await conn.execute("SELECT count(*) FROM dead_letters")
        dead_letters = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute("SELECT time, device_id, metric_id, value FROM telemetry")
        rows = await cur.fetchall()
    drain = Drain(elapsed, used, split, ready - started)
    return ProcessesDrain(drain, expected - already, expected, dead_letters, rows)
