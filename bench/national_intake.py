"""National intake benchmark: what the aggregator's intake of one minute of snapshots from 120
cells carrying 450 platforms costs, beside the irreducible part of it measured in the same run.

`iiot national serve` runs as a process of its own on the machine's PostgreSQL (a schema of its
own, dropped at the end). 120 simulated cells each hold 3 or 4 of the 450 platforms, a sketch
of 2,000 national identities (DataSketches HLL lg_k 12, HLL_8) and 200 enterprises; every
snapshot is built and signed before the clock starts. Each round pushes one minute of snapshots
(one per cell) over 8 keep-alive connections as fast as they are taken, and reads the
aggregator's CPU time (utime + stime from /proc) before and after, so the figure is the intake's
CPU per snapshot and per minute of the whole country. Baselines, same run, same snapshots:
verifying the Ed25519 signature and parsing the snapshot alone (in this process), and the
server's CPU per request of `/healthz` (HTTP and routing alone).
"""

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import time
import uuid
from typing import Any

import datasketches
import httpx
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from psycopg import sql

from bench.figures import record
from bench.http_load import start_server
from iiot.net import free_port
from national import format as wire
from national.keys import add_cell, create_viewer_key
from national.migrate import connection_options, migrate
from national.settings import NationalSettings

CELLS = 120
PLATFORMS = 450
CONCURRENCY = 8
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sketch(cell: int, identities: int) -> dict[str, Any]:
    hll = datasketches.hll_sketch(12, datasketches.tgt_hll_type.HLL_8)
    for n in range(identities):
        hll.update(f"device-{cell}-{n}")
    return {
        "lg_k": 12,
        "target": "HLL_8",
        "data": base64.b64encode(hll.serialize_compact()).decode(),
        "identities": identities,
        "connected_without_identity": 100,
    }


def snapshots(rounds: int, identities: int, enterprises: int) -> list[list[tuple[str, bytes, str]]]:
    """Per round, per cell: (cell, body, signature header)."""
    keys = [Ed25519PrivateKey.generate() for _ in range(CELLS)]
    devices = [sketch(c, identities) for c in range(CELLS)]
    listed = [
        {
            "key_id": "bench",
            "definitions_version": "2026-12.1",
            "items": [
                {
                    "code_hmac": f"{c:04x}{n:060x}",
                    "region": "320505",
                    "industry_code": "36",
                    "above_designated_size": True,
                    "active_30d": n % 2 == 0,
                    "served": True,
                }
                for n in range(enterprises)
            ],
        }
        for c in range(CELLS)
    ]
    out = []
    for r in range(rounds):
        taken = time.time()
        minute = []
        for c, key in enumerate(keys):
            platforms = [
                {
                    "id": f"p-{p}",
                    "name": f"Platform {p}",
                    "tier": "basic",
                    "type": "professional",
                    "region": "320505",
                    "industry_code": "36",
                    "industry_text": "汽车制造业",
                    "registered": 1000 + r,
                    "connected": 800 + r,
                    "ever_connected": 1000,
                    "active_24h": 900,
                    "active_30d": 950,
                    "activity_as_of": None,
                }
                for p in range(c, PLATFORMS, CELLS)
            ]
            document = {
                "cell": f"cell-{c}",
                "sequence": r + 1,
                "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(taken)),
                "took_seconds": 0.2,
                "interval_seconds": 60,
                "definitions_version": "2026-12.1",
                "platforms": platforms,
                "devices": devices[c],
                "enterprises": listed[c],
            }
            body = wire.Snapshot.model_validate(document).model_dump_json().encode()
            signature = wire.SIGNATURE_PREFIX + base64.b64encode(key.sign(body)).decode()
            minute.append((f"cell-{c}", body, signature))
        out.append(minute)
    out.append([(f"cell-{c}", b"", "") for c in range(CELLS)])  # keys, for registration
    for c, key in enumerate(keys):
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        out[-1][c] = (f"cell-{c}", public, "")
    return out


def verify_and_parse(minute: list[tuple[str, bytes, str]], keys: dict[str, bytes]) -> float:
    """CPU seconds (this process) to verify and parse one minute of snapshots."""
    public = {cell: Ed25519PublicKey.from_public_bytes(raw) for cell, raw in keys.items()}
    started = time.process_time()
    for cell, body, signature in minute:
        public[cell].verify(base64.b64decode(signature.removeprefix(wire.SIGNATURE_PREFIX)), body)
        wire.Snapshot.model_validate_json(body)
    return time.process_time() - started


def start_aggregator(database_url: str, schema: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        "IIOT_NATIONAL_DATABASE_URL": database_url,
        "IIOT_NATIONAL_DATABASE_SCHEMA": schema,
        "IIOT_NATIONAL_PORT": str(port),
        "IIOT_NATIONAL_KEY_CACHE_SECONDS": "300",
    }
    return start_server(("iiot.cli", "national", "serve"), env, f"http://127.0.0.1:{port}/readyz")


async def push(url: str, minute: list[tuple[str, bytes, str]]) -> list[float]:
    queue: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue()
    for item in minute:
        queue.put_nowait(item)
    latencies: list[float] = []

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not queue.empty():
                cell, body, signature = queue.get_nowait()
                started = time.perf_counter()
                answer = await http.post(
                    "/snapshots",
                    content=body,
                    headers={wire.CELL_HEADER: cell, wire.SIGNATURE_HEADER: signature},
                )
                latencies.append(time.perf_counter() - started)
                if answer.status_code != 202:
                    raise RuntimeError(f"{cell}: {answer.status_code} {answer.text[:300]}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return latencies


BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"


async def backends_cpu(database_url: str, schema: str) -> float:
    """CPU seconds so far of the aggregator's PostgreSQL sessions (the server is local)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(BACKENDS, (f"iiot-national:{schema}",))
        pids = [row[0] for row in await cur.fetchall()]
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except FileNotFoundError:  # a session that ended: its CPU is lost to the figure
            continue
    return total


async def request_cpu(
    url: str, pid: int, path: str, requests: int, headers: dict[str, str] | None = None
) -> float:
    """The server's CPU seconds per GET of `path`."""
    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=60) as http:
        before = cpu_seconds(pid)
        for _ in range(requests):
            (await http.get(path)).raise_for_status()
        return (cpu_seconds(pid) - before) / requests


async def main(quick: bool) -> None:
    rounds = 2 if quick else 6
    identities, enterprises = (200, 20) if quick else (2000, 200)
    database_url = os.environ.get("IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    schema = f"bench_national_{uuid.uuid4().hex[:8]}"
    settings = NationalSettings(database_url=database_url, database_schema=schema)
    print(f"building and signing {rounds} minutes of {CELLS} cells' snapshots ...")
    built = snapshots(rounds, identities, enterprises)
    keys = {cell: raw for cell, raw, _ in built.pop()}
    await migrate(settings)
    async with await psycopg.AsyncConnection.connect(
        database_url, options=connection_options(schema), autocommit=True
    ) as conn:
        for cell, raw in keys.items():
            await add_cell(conn, cell, raw)
        _, viewer = await create_viewer_key(conn, "bench")
    port = free_port()
    process = start_aggregator(database_url, schema, port)
    url = f"http://127.0.0.1:{port}"
    try:
        per_round = []
        for minute in built:
            cpu_before, wall_before = cpu_seconds(process.pid), time.perf_counter()
            database_before = await backends_cpu(database_url, schema)
            latencies = await push(url, minute)
            per_round.append(
                {
                    "cpu_seconds": cpu_seconds(process.pid) - cpu_before,
                    "postgresql_cpu_seconds": await backends_cpu(database_url, schema)
                    - database_before,
                    "wall_seconds": time.perf_counter() - wall_before,
                    "p50_ms": statistics.median(latencies) * 1000,
                    "p99_ms": sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000,
                }
            )
        baseline = min(verify_and_parse(built[-1], keys) for _ in range(3))
        health = await request_cpu(url, process.pid, "/healthz", 500)
        reading = await request_cpu(
            url, process.pid, "/national/totals", 50, {"Authorization": f"Bearer {viewer}"}
        )
    finally:
        process.terminate()
        process.wait(10)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    # The first round creates every platform and enterprise row; later ones update them.
    steady = per_round[1:]
    cpu_minute = statistics.median(r["cpu_seconds"] for r in steady)
    database_minute = statistics.median(r["postgresql_cpu_seconds"] for r in steady)
    wall_minute = statistics.median(r["wall_seconds"] for r in steady)
    body_bytes = statistics.mean(len(b) for _, b, _ in built[-1])
    result = {
        "cells": CELLS,
        "platforms": PLATFORMS,
        "identities_per_cell": identities,
        "enterprises_per_cell": enterprises,
        "snapshot_bytes_mean": round(body_bytes),
        "rounds": per_round,
        "intake_cpu_seconds_per_minute": cpu_minute,
        "intake_cpu_ms_per_snapshot": cpu_minute / CELLS * 1000,
        "postgresql_cpu_seconds_per_minute": database_minute,
        "intake_wall_seconds_per_minute": wall_minute,
        "snapshots_per_second": CELLS / wall_minute,
        "baseline_verify_parse_ms_per_snapshot": baseline / CELLS * 1000,
        "baseline_healthz_cpu_ms_per_request": health * 1000,
        "national_totals_cpu_ms_per_request": reading * 1000,
        "quick": quick,
    }
    record(
        "national-intake",
        result,
        [
            ("snapshot size (mean)", f"{body_bytes / 1024:.1f} KiB", ""),
            (
                "aggregator CPU per minute of 120 cells",
                f"{cpu_minute:.3f} s ({cpu_minute / 60:.2%} core)",
                "",
            ),
            ("its PostgreSQL sessions' CPU per minute", f"{database_minute:.3f} s", ""),
            ("aggregator CPU per snapshot", f"{cpu_minute / CELLS * 1000:.2f} ms", ""),
            ("baseline: verify + parse alone", f"{baseline / CELLS * 1000:.2f} ms", ""),
            ("baseline: /healthz request", f"{health * 1000:.2f} ms", ""),
            ("reading /national/totals (120 sketches merged)", f"{reading * 1000:.1f} ms", ""),
            ("a minute's snapshots taken in", f"{wall_minute:.2f} s wall", "<= 60 s"),
            (
                "latency p50 / p99 (last round)",
                f"{per_round[-1]['p50_ms']:.0f} / {per_round[-1]['p99_ms']:.0f} ms",
                "",
            ),
        ],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller cells: a smoke run")
    asyncio.run(main(parser.parse_args().quick))
