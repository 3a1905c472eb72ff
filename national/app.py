"""The aggregator's HTTP API (`iiot national serve`): the cells' intake (`POST /snapshots`,
authenticated by each snapshot's signature), the national figures for national viewer keys,
`/metrics`, and the dashboard page. `create_app(settings)` owns the pool and the sampler."""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool

from national import format as wire
from national import problems, views
from national.history import Sampler
from national.intake import Intake
from national.keys import verify_viewer_key
from national.migrate import connection_options
from national.problems import Problem
from national.settings import NationalSettings

_MAX_CACHED = 10_000


class Viewers:
    """Checks national viewer keys (`Authorization: Bearer` or `X-API-Key`), with a short cache:
    a revoked key stops working within `key_cache_seconds`."""

    def __init__(self, pool: AsyncConnectionPool, ttl: float) -> None:
        self._pool = pool
        self._ttl = ttl
        self._verified: dict[bytes, float] = {}

    async def check(self, request: Request) -> None:
        key = request.headers.get("x-api-key") or ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
        if not key:
            raise Problem(401, "send a national viewer key: Authorization: Bearer iiotn_...")
        fingerprint = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        if self._verified.get(fingerprint, 0.0) > now:
            return
        async with self._pool.connection() as conn:
            found = await verify_viewer_key(conn, key)
        if found is None:
            self._verified.pop(fingerprint, None)
            raise Problem(401, "the key is not a live national viewer key")
        if len(self._verified) >= _MAX_CACHED:
            self._verified.clear()
        self._verified[fingerprint] = now + self._ttl


async def viewer(request: Request) -> None:
    viewers: Viewers = request.app.state.viewers
    await viewers.check(request)


def create_pool(settings: NationalSettings) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        settings.require_database_url(),
        kwargs={
            "options": connection_options(settings.database_schema),
            "autocommit": True,
            # Names its sessions in pg_stat_activity (the benchmark reads their CPU by it).
            "application_name": f"iiot-national:{settings.database_schema}",
        },
        min_size=1,
        max_size=settings.database_pool_max,
        name="national",
        open=False,
    )


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(
            413, f"the snapshot is larger than {limit} bytes (IIOT_NATIONAL_MAX_BODY_BYTES)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"the snapshot is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: NationalSettings) -> FastAPI:
    pool = create_pool(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool:
            app.state.pool = pool
            app.state.settings = settings
            app.state.intake = Intake(pool, settings)
            app.state.viewers = Viewers(pool, settings.key_cache_seconds)
            sampler = Sampler(pool, settings)
            app.state.sampler = sampler
            sampling = asyncio.create_task(sampler.run(), name="national-sampler")
            try:
                yield
            finally:
                sampler.stop()
                await sampling

    app = FastAPI(
        title="iiot national aggregator",
        version="0.1.0",
        summary="National totals of connected industrial devices, from every cell's signed "
        "snapshots (docs/national.md).",
        lifespan=lifespan,
        responses=problems.ERROR_RESPONSES,
    )
    problems.install(app)

    @app.post(
        "/snapshots",
        tags=["intake"],
        operation_id="receive_snapshot",
        status_code=202,
        responses={200: {"description": "A duplicate: the same bytes again (a retry)"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Snapshot"},
                    }
                },
            }
        },
    )
    async def receive_snapshot(request: Request) -> JSONResponse:
        """A cell's signed snapshot (national/format.py): headers `IIOT-Cell` and
        `IIOT-Signature: ed25519=<base64>` of the exact body bytes. 202 accepted, 200 a
        duplicate; refusals are recorded and answered as problem+json."""
        intake: Intake = request.app.state.intake
        body = await _body(request, settings.max_body_bytes)
        taken = await intake.receive(
            request.headers.get(wire.CELL_HEADER),
            request.headers.get(wire.SIGNATURE_HEADER),
            body,
        )
        return JSONResponse(taken.body(), status_code=202 if taken.status == "accepted" else 200)

    @app.get("/healthz", tags=["health"], operation_id="healthz")
    async def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], operation_id="readyz")
    async def readyz(request: Request) -> dict[str, str]:
        """The aggregator's database answers."""
        async with request.app.state.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return {"status": "ready"}

    app.include_router(views.router, dependencies=[Depends(viewer)])
    app.include_router(views.public)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            snapshot = wire.Snapshot.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(snapshot.pop("$defs", {}))
            schemas["Snapshot"] = snapshot
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "iiotn_..."},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


Viewer = Annotated[None, Depends(viewer)]
