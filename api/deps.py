"""Typed dependencies shared by the routes."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from api.settings import ApiSettings
from registry.ids import DEVICE_ID_PATTERN, PLATFORM_ID_PATTERN


async def _connection(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    """A pooled connection; the request's changes commit when the handler returns."""
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        yield conn


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


Connection = Annotated[AsyncConnection[Any], Depends(_connection)]
Settings = Annotated[ApiSettings, Depends(_settings)]
PlatformId = Annotated[str, Path(pattern=f"^{PLATFORM_ID_PATTERN}$", description="Platform id")]
DeviceId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN}$", description="Device id")]
