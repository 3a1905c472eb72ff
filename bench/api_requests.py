"""API benchmark: requests/s and latency of the count and latest-values endpoints and of the
broker hooks, beside a FastAPI endpoint that returns a constant, in the same server process
with the same settings.

The API runs under uvicorn (one process, as `iiot api`) in a subprocess, on the machine's
PostgreSQL in a schema of its own (dropped at the end), with 1,000 registered devices and one
device holding 20 metrics of 500 points each. The load comes from `bench.http_load`'s lean
keep-alive client with 32 connections. Each endpoint is measured in rounds, constant first and
last, so a machine that slows down mid-run shows up as two different baselines. Every request
presents an API key (verified once, then cached, as in production), rate limits lifted. The
hooks are asked what EMQX asks most: may a device publish to its own telemetry topic (its
standing cached, as between changes), and may it connect with its own secret (read from the
store at every connect, as always).
"""

import argparse
import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.http_load import load, start_api
from iiot.net import free_port
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.access import CredentialKind, Role, create_key, issue_credential
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.registration import register_devices
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests.test_writer import telemetry

RESULTS = Path(__file__).parent / "results"
PATHS = {
    "constant": "/bench/constant",
    "count": "/platforms/plant-1/devices/count",
    "latest": "/platforms/plant-1/devices/press-0/latest",
    "authorize": "/broker/authorize",
    "authenticate": "/broker/authenticate",
}
COMPARED = [name for name in PATHS if name != "constant"]
HOOKS = ("authorize", "authenticate")
TARGETS = {"count": 0.5, "authorize": 0.8}


@dataclass(frozen=True)
class Seeded:
    viewer_key: str
    broker_key: str
    device_secret: str

    def request(self, name: str) -> tuple[dict[str, str], bytes | None]:
        """The headers and body of a request to endpoint `name`."""
        if name not in HOOKS:
            return {"Authorization": f"Bearer {self.viewer_key}"}, None
        body: dict[str, str] = {"clientid": "press-0", "username": "plant-1/press-0"}
        if name == "authorize":
            body |= {"topic": "iiot/v1/plant-1/press-0/telemetry", "action": "publish"}
        else:
            body["password"] = self.device_secret
        return {"Authorization": f"Bearer {self.broker_key}"}, json.dumps(body).encode()


async def seed(settings: StoreSettings) -> Seeded:
    await migrate(settings)
    async with await connect(settings) as conn:
        await upsert_platform(conn, "plant-1")
        await register_devices(conn, "plant-1", [(f"press-{n}", {}) for n in range(1000)], shard=0)
        _, key = await create_key(
            conn, role=Role.VIEWER, platform="plant-1", name="bench", created_by=None
        )
        _, broker_key = await create_key(
            conn, role=Role.BROKER, platform=None, name="bench broker", created_by=None
        )
        secret, _, _ = await issue_credential(
            conn, "plant-1", CredentialKind.DEVICE, "press-0", by=None
        )
        await conn.commit()
    async with create_pool(settings, name="bench-seed") as pool:
        writer = TelemetryWriter(pool, stats=IngestStats())
        now = datetime.now(UTC)
        for n in range(500):
            at = now - timedelta(seconds=n)
            points = [(at, f"metric_{m:02d}", float(n + m)) for m in range(20)]
            await writer.write([telemetry("plant-1", "press-0", *points)])
    return Seeded(key, broker_key, secret)


async def main(seconds: float, rounds: int, connections: int) -> dict[str, Any]:
    database = os.environ.get(
        "IIOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    settings = StoreSettings(database_url=database, database_schema=f"bench_{uuid.uuid4().hex[:8]}")
    report: dict[str, Any] = {"seconds_per_round": seconds, "connections": connections}
    api = None
    try:
        seeded = await seed(settings)
        port = free_port()
        api = start_api(settings, port, module="bench.api_server", args=())
        for name, path in PATHS.items():  # warm-up: caches, prepared statements, the keys
            headers, body = seeded.request(name)
            await load(port, path, headers=headers, body=body, connections=4, seconds=1)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
        order = [*PATHS, "constant"]
        for _ in range(rounds):
            for name in order:
                headers, body = seeded.request(name)
                runs[name].append(
                    await load(
                        port,
                        PATHS[name],
                        headers=headers,
                        body=body,
                        connections=connections,
                        seconds=seconds,
                    )
                )
        for name, results in runs.items():
            best = max(results, key=lambda r: r["requests_per_second"])
            report[name] = best | {"all_rounds_rps": [r["requests_per_second"] for r in results]}
        for name in COMPARED:
            ratio = report[name]["requests_per_second"] / report["constant"]["requests_per_second"]
            report[f"{name}_vs_constant"] = round(ratio, 2)
    finally:
        if api is not None:
            api.terminate()
            api.wait(10)
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            name = sql.Identifier(settings.database_schema)
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"  {'endpoint':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  rounds (req/s)")
    for name in PATHS:
        r = report[name]
        print(
            f"  {name:<12} {r['requests_per_second']:>8,} {r['p50_ms']:>8} {r['p99_ms']:>8}"
            f"  {r['all_rounds_rps']}"
        )
    for name in COMPARED:
        target = f"  (target >= {TARGETS[name]})" if name in TARGETS else ""
        print(f"  {name + ' / constant:':<26} {report[f'{name}_vs_constant']}{target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per endpoint and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 s per endpoint, one round")
    args = parser.parse_args()
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    result = asyncio.run(main(seconds, rounds, args.connections))
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api_requests-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
