"""Memory of ingest's id caches per million devices (DeviceDirectory: device and gateway ids,
the gateway each device was last seen through; the writer's activity renewals).

Fills each cache as ingest does (keys decoded per row, as psycopg returns them) and reports
what it holds: tracemalloc's count of the bytes allocated, and, in a process of its own
without tracemalloc, the growth of the peak resident size (VmHWM). The result goes to
bench/results/id_cache_memory-latest.json.

    .venv/bin/python -m bench.id_cache_memory [--devices 1000000]
"""

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from registry.devices import DeviceDirectory, Key

RESULTS = Path(__file__).parent / "results" / "id_cache_memory-latest.json"
MIB = 1024 * 1024


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rows(count: int, platforms: int, prefix: str) -> Iterator[dict[Key, int]]:
    """Batches of 10,000 (platform, id) -> internal id as a SELECT returns them: every string a
    new object, decoded from bytes (psycopg decodes each value of each row)."""
    for start in range(0, count, 10_000):
        batch = {}
        for i in range(start, min(start + 10_000, count)):
            platform = f"plant-{i % platforms:04d}".encode().decode()
            batch[(platform, f"{prefix}-{i:09d}".encode().decode())] = i + 1
        yield batch


def fillers(n: int, platforms: int) -> dict[str, Callable[[], Any]]:
    def device_ids() -> DeviceDirectory:
        directory = DeviceDirectory(max_cached_ids=n)
        for batch in rows(n, platforms, "device"):
            directory.devices.remember(batch)
        return directory

    def via_gateway() -> DeviceDirectory:
        directory = DeviceDirectory(max_cached_ids=n)
        for start in range(0, n, 10_000):
            directory.remember_via({d: d // 1000 for d in range(start, min(start + 10_000, n))})
        return directory

    def activity_renewals() -> dict[int, float]:
        # TelemetryWriter._renewed: device id -> when its activity was last renewed.
        renewed: dict[int, float] = {}
        at = time.time()
        for start in range(0, n, 10_000):
            renewed.update(dict.fromkeys(range(start, min(start + 10_000, n)), at))
        return renewed

    return {f.__name__: f for f in (device_ids, via_gateway, activity_renewals)}


def rss_growth(name: str, n: int, platforms: int) -> float:
    """MiB the peak resident size grows by while `name` fills, in a fresh process."""
    child = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "bench.id_cache_memory", "--devices", str(n),
         "--platforms", str(platforms), "--child", name],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(child.stdout)


def measure(name: str, n: int, platforms: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    kept = fillers(n, platforms)[name]()
    seconds = time.perf_counter() - started
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    result = {
        "traced_mib": round(current / MIB, 1),
        "peak_rss_growth_mib": round(rss_growth(name, n, platforms), 1),
        "fill_seconds_traced": round(seconds, 2),
    }
    print(f"{name}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--platforms", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.devices
    if args.child:
        before = peak_rss()
        kept = fillers(n, args.platforms)[args.child]()
        print((peak_rss() - before) / MIB)
        del kept
        return
    results: dict[str, Any] = {"devices": n, "platforms": args.platforms}
    for name in fillers(n, args.platforms):
        results[name] = measure(name, n, args.platforms)
    traced = sum(results[name]["traced_mib"] for name in fillers(n, args.platforms))
    rss = sum(results[name]["peak_rss_growth_mib"] for name in fillers(n, args.platforms))
    results["per_million_devices_traced_mib"] = round(traced * 1_000_000 / n, 1)
    results["per_million_devices_rss_mib"] = round(rss * 1_000_000 / n, 1)
    print(
        f"all three, per million devices: {results['per_million_devices_traced_mib']} MiB "
        f"traced, {results['per_million_devices_rss_mib']} MiB peak resident"
    )
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
