"""The FastAPI application: built by `create_app(settings)`, which owns the connection pool."""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api import problems
from api.auth import Authenticator, KeyMiddleware, document_security
from api.body_limit import BodyLimit
from api.broker_access import Standings, TopicRules
from api.broker_control import BrokerKicker
from api.moved import MovedPlatforms
from api.routes import (
    broker,
    classification,
    counts,
    credentials,
    dashboard,
    devices,
    enterprises,
    health,
    ingest,
    keys,
    metrics,
    penetration,
    platforms,
    telemetry,
    usage,
)
from api.settings import ApiSettings
from ingest.topics import TopicScheme
from registry.notifications import RegistryWatcher
from registry.store import create_pool


def create_app(
    settings: ApiSettings, *, consumers: Sequence[tuple[str, Callable[[], bool]]] = ()
) -> FastAPI:
    """`consumers`: (name, is it connected?) of consumers running in the same process, which
    `/readyz` reports on (`iiot run`)."""
    # Autocommit: a read is one round trip; api/deps.py wraps every change in a transaction.
    # Generic plans allowed: requests look up a few rows by key (registry/store.py).
    pool = create_pool(settings, name="api", autocommit=True, check=False, custom_plans=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        authenticator = Authenticator(settings)
        standings = Standings(settings.api_key_cache_seconds)
        moved = MovedPlatforms(settings.api_key_cache_seconds)

        def registry_changed(platform: str) -> None:
            standings.forget(platform)
            moved.forget(platform)

        # Revocations and client changes made through other API processes drop what this one
        # cached when their notification arrives (docs/access.md).
        watcher = RegistryWatcher(
            settings,
            registry_changed,
            on_key_revoked=lambda key: authenticator.forget(None if key == "*" else int(key)),
        )
        async with pool, AsyncExitStack() as stack:
            app.state.pool = pool
            app.state.settings = settings
            app.state.consumers = list(consumers)
            app.state.authenticator = authenticator
            app.state.moved_platforms = moved
            app.state.topic_rules = TopicRules(
                TopicScheme(settings.mqtt_topic_root), settings.sparkplug_platforms(), standings
            )
            kicker = BrokerKicker.configured(settings)
            app.state.kicker = kicker and await stack.enter_async_context(kicker)
            listening = asyncio.create_task(watcher.run(), name="api-registry-watcher")
            try:
                yield
            finally:
                watcher.stop()
                await listening

    app = FastAPI(
        title="iiot",
        version="0.1.0",
        summary="Industrial device registry, connection state and exact device counts.",
        lifespan=lifespan,
        responses=problems.ERROR_RESPONSES,
    )
    problems.install(app)
    app.add_middleware(KeyMiddleware)
    # Outermost: a body too large is refused before the key is checked or anything is read.
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_security(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # KeyMiddleware checks an API key on every request but health's (api/auth.py).
    # The broker hooks first: EMQX calls them for every connect and uncached publish, and
    # routes are matched in order (matching forty routes costs a request more than the hook).
    for module in (
        broker,
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
        dashboard,
        enterprises,
        penetration,
        classification,
    ):
        if module is devices:
            app.include_router(devices.count_router)
        if module is classification:
            app.include_router(classification.platform_router)
        app.include_router(module.router)
    return app
