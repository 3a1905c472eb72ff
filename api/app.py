"""The FastAPI application: built by `create_app(settings)`, which owns the connection pool."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from api import problems
from api.problems import not_found
from api.settings import ApiSettings
from registry.counts import DEFINITIONS, DEFINITIONS_VERSION, platform_counts
from registry.ids import PLATFORM_ID_PATTERN
from registry.store import create_pool

PlatformId = Annotated[str, Path(pattern=f"^{PLATFORM_ID_PATTERN}$", description="Platform slug")]


class DeviceCounts(BaseModel):
    platform: str
    registered: int
    connected: int
    ever_connected: int
    liveness_seconds: int
    as_of: datetime
    definitions_version: str
    definitions: dict[str, str]


class Health(BaseModel):
    status: str


async def _connection(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


Connection = Annotated[AsyncConnection[Any], Depends(_connection)]


def create_app(settings: ApiSettings) -> FastAPI:
    pool = create_pool(settings, name="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool:
            app.state.pool = pool
            yield

    app = FastAPI(title="iiot", version="0.1.0", lifespan=lifespan)
    problems.install(app)

    @app.get("/healthz", operation_id="health", response_model=Health)
    async def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @app.get("/readyz", operation_id="ready", response_model=Health)
    async def readyz(conn: Connection) -> Health:
        """The process can reach the store."""
        await conn.execute("SELECT 1")
        return Health(status="ready")

    @app.get(
        "/platforms/{platform}/devices/count",
        operation_id="platform_device_counts",
        response_model=DeviceCounts,
        responses={404: {"description": "No such platform"}},
    )
    async def device_counts(platform: PlatformId, conn: Connection) -> DeviceCounts:
        """How many of a platform's devices are registered and connected (docs/counts.md)."""
        counts = await platform_counts(conn, platform)
        if counts is None:
            raise not_found(f"platform {platform!r}")
        return DeviceCounts(
            platform=counts.platform,
            registered=counts.registered,
            connected=counts.connected,
            ever_connected=counts.ever_connected,
            liveness_seconds=counts.liveness_seconds,
            as_of=counts.as_of,
            definitions_version=DEFINITIONS_VERSION,
            definitions=DEFINITIONS,
        )

    return app
