"""HTTP load for the API benchmarks: the API in a subprocess, and a lean keep-alive client.

The client speaks just enough HTTP/1.1 over asyncio streams (uvloop) to keep the server, not
itself, the bottleneck on a 2-core machine: each connection sends a request, reads the status
line, headers and Content-Length body, and records the time.
"""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from registry.settings import StoreSettings


def start_api(
    settings: StoreSettings,
    port: int,
    *,
    module: str = "iiot.cli",
    args: tuple[str, ...] = ("api",),
) -> subprocess.Popen[bytes]:
    """`iiot api` (or another server module) on `port`, rate limits lifted for measuring."""
    env = {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_API_PORT": str(port),
        "IIOT_API_RATE_PER_SECOND": "1000000000",
        "IIOT_API_RATE_BURST": "1000000000",
    }
    return start_server((module, *args), env, f"http://127.0.0.1:{port}/healthz")


def start_server(
    args: tuple[str, ...], env: dict[str, str], ready_url: str
) -> subprocess.Popen[bytes]:
    """`python -m *args` with `env` added, once `ready_url` answers 200 (30 s at most)."""
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", *args],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(ready_url, timeout=1).raise_for_status()
        except httpx.HTTPError:
            time.sleep(0.2)
        else:
            return process
    process.kill()
    raise RuntimeError(f"{' '.join(args)} did not start")


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    """Sends one request and reads its answer; returns the status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(head[9:12])


def _request(path: str, headers: dict[str, str], body: bytes | None = None) -> bytes:
    """A GET, or a POST of a JSON `body`."""
    lines = [f"{'GET' if body is None else 'POST'} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99 in ms of latencies in seconds."""
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1] * 1000, 3),
    }


async def _connection(
    port: int, request: bytes, until: float, samples: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            status = await _exchange(reader, writer, request)
            samples.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def latency_samples(
    port: int, path: str, *, headers: dict[str, str], requests: int, warm_up: int = 50
) -> list[float]:
    """Seconds each of `requests` GETs of `path` took, one after another on one connection."""
    request = _request(path, headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples: list[float] = []
    try:
        for n in range(warm_up + requests):
            started = time.perf_counter()
            status = await _exchange(reader, writer, request)
            if n >= warm_up:
                samples.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}")
    finally:
        writer.close()
    return samples


async def load(
    port: int,
    path: str,
    *,
    headers: dict[str, str],
    connections: int,
    seconds: float,
    body: bytes | None = None,
) -> dict[str, Any]:
    """Requests/s and latency of GET `path` (POST `body`, when given) from `connections`
    keep-alive connections."""
    request = _request(path, headers, body)
    samples: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(
        *(_connection(port, request, until, samples, errors) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} answers to {path} were not 200 (e.g. {errors[0]})")
    return {
        "requests": len(samples),
        "requests_per_second": round(len(samples) / elapsed),
    } | {k: round(v, 2) for k, v in percentiles(samples).items()}
