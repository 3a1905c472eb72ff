"""The event loop every long-lived process role runs on."""

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

# Allocations between young-generation collections (CPython's default is 700), and young
# collections between middle ones (default 10). Ingest holds batches of tens of thousands of
# small objects that survive a few collections each, and the default thresholds had the
# collector walking them again and again. In the MQTT drain benchmark (bench/mqtt_drain.py,
# alternating runs): (50_000, 20) stored about 1.3 times the points per second of the
# defaults at 0.75 of the CPU per point; (200_000, 50) used 3.9 / 4.1 CPU s per million points
# against 4.5 / 4.5 for (50_000, 20), and (1_000_000, 20) was slower than (200_000, 50) in two
# runs of two. Reference counting still frees all but cyclic garbage at once, so memory stays
# flat.
GC_THRESHOLDS = (200_000, 50, 100)


def serve(main: Coroutine[Any, Any, T]) -> T:
    """Runs a process role on uvloop (the API answers markedly more requests on it than on
    asyncio's own loop: bench/api_requests.py), with the collector tuned for it."""
    tune_gc()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def tune_gc() -> None:
    """Sets GC_THRESHOLDS and moves what was allocated so far (modules, settings) out of the
    collector's way for good."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
