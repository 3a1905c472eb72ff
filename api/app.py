"""The FastAPI application: built by `create_app(settings)`, which owns the connection pool."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import problems
from api.routes import counts, devices, health, ingest, metrics, platforms, telemetry
from api.settings import ApiSettings
from registry.store import create_pool


def create_app(settings: ApiSettings) -> FastAPI:
    pool = create_pool(settings, name="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool:
            app.state.pool = pool
            app.state.settings = settings
            yield

    app = FastAPI(
        title="iiot",
        version="0.1.0",
        summary="Industrial device registry, connection state and exact device counts.",
        lifespan=lifespan,
    )
    problems.install(app)
    for module in (health, metrics, platforms, devices, telemetry, counts, ingest):
        app.include_router(module.router)
    return app
