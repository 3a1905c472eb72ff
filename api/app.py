"""The FastAPI application: built by `create_app(settings)`, which owns the connection pool."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import problems
from api.auth import Authenticator
from api.broker_access import TopicRules
from api.routes import (
    broker,
    counts,
    credentials,
    devices,
    health,
    ingest,
    keys,
    metrics,
    platforms,
    telemetry,
    usage,
)
from api.settings import ApiSettings
from ingest.topics import TopicScheme
from registry.store import create_pool


def create_app(settings: ApiSettings) -> FastAPI:
    pool = create_pool(settings, name="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pool:
            app.state.pool = pool
            app.state.settings = settings
            app.state.authenticator = Authenticator(settings)
            app.state.topic_rules = TopicRules(
                TopicScheme(settings.mqtt_topic_root), settings.sparkplug_platforms()
            )
            yield

    app = FastAPI(
        title="iiot",
        version="0.1.0",
        summary="Industrial device registry, connection state and exact device counts.",
        lifespan=lifespan,
        responses=problems.ERROR_RESPONSES,
    )
    problems.install(app)
    # Every router but health's checks an API key on each request (api/auth.py).
    for module in (
        health,
        metrics,
        platforms,
        devices,
        telemetry,
        credentials,
        counts,
        ingest,
        usage,
        keys,
        broker,
    ):
        app.include_router(module.router)
    return app
