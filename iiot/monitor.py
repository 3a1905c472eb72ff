"""The monitoring endpoints of an ingest process: `/metrics`, `/healthz`, `/readyz`.

A small Starlette app under uvicorn on `IIOT_METRICS_PORT`, run as one more service of the
process (start with `run()`, stop with `stop()`), so Kubernetes probes and Prometheus reach
every ingest process the same way they reach the API.
"""

from collections.abc import Callable, Hashable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from iiot.server import ApiServer
from ingest.metrics import exposition
from ingest.progress import Progress


class Monitor:
    def __init__(
        self,
        *collectors: Collector,
        pool: AsyncConnectionPool,
        consumer_ready: Callable[[], bool],
        host: str,
        port: int,
        progress: Progress | None = None,
        stall_seconds: float = 120.0,
        cell: str = "default",
    ) -> None:
        """`consumer_ready`: whether the consumer is connected and subscribed (or assigned);
        `progress`: the consumer's, to find it stopped or stalled (no acknowledgement for
        `stall_seconds` while it holds messages); `cell`: named in every answer and metric."""
        self._cell = cell
        self._registry = CollectorRegistry()
        for collector in collectors:
            self._registry.register(collector)
        self._pool = pool
        self._consumer_ready = consumer_ready
        self._progress = progress
        self._stall_seconds = stall_seconds
        app = Starlette(
            routes=[
                Route("/metrics", self._metrics),
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
            ]
        )
        self._server = ApiServer(app, host=host, port=port)

    @property
    def started(self) -> bool:
        return self._server.started

    async def run(self) -> None:
        await self._server.run()

    def stop(self) -> None:
        self._server.stop()

    async def _metrics(self, request: Request) -> Response:
        return Response(exposition(self._registry, self._cell), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "cell": self._cell})

    async def _readyz(self, request: Request) -> Response:
        """Ready when the consumer is connected and subscribed, makes progress with what it
        holds, and the store answers."""
        problems = []
        progress = self._progress
        if progress is not None and progress.failure is not None:
            problems.append(f"the consumer stopped: {progress.failure}")
        if not self._consumer_ready():
            problems.append("the consumer is not connected and subscribed")
        if progress is not None:
            waiting = progress.oldest_waiting()
            for stream, seconds in sorted(progress.stalled().items(), key=str):
                if seconds >= self._stall_seconds:
                    problems.append(
                        f"no progress on {stream_name(stream)} for {seconds:.0f}s; its oldest "
                        f"message not yet acknowledged arrived {waiting[stream]:.0f}s ago"
                    )
        try:
            async with self._pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            problems.append(f"the store does not answer: {type(exc).__name__}")
        if problems:
            return JSONResponse(
                {"status": "not ready", "cell": self._cell, "problems": problems},
                status_code=503,
            )
        return JSONResponse({"status": "ready", "cell": self._cell})


def stream_name(stream: Hashable) -> str:
    """A Kafka partition as topic[partition]; MQTT's one stream by its name."""
    if isinstance(stream, tuple) and len(stream) == 2:
        return f"{stream[0]}[{stream[1]}]"
    return f"the {stream} session" if stream == "mqtt" else str(stream)
