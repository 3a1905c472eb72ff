"""The monitoring endpoints of an ingest process: `/metrics`, `/healthz`, `/readyz`.

A small Starlette app under uvicorn on `IIOT_METRICS_PORT`, run as one more service of the
process (start with `run()`, stop with `stop()`), so Kubernetes probes and Prometheus reach
every ingest process the same way they reach the API.
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.server import ApiServer


class Monitor:
    def __init__(
        self,
        *collectors: Collector,
        pool: AsyncConnectionPool,
        consumer_ready: Callable[[], bool],
        host: str,
        port: int,
    ) -> None:
        """`consumer_ready`: whether the consumer is connected and subscribed (or assigned)."""
        self._registry = CollectorRegistry()
        for collector in collectors:
            self._registry.register(collector)
        self._pool = pool
        self._consumer_ready = consumer_ready
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
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        """Ready when the consumer is connected and subscribed and the store answers."""
        problems = []
        if not self._consumer_ready():
            problems.append("the consumer is not connected and subscribed")
        try:
            async with self._pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            problems.append(f"the store does not answer: {type(exc).__name__}")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})
