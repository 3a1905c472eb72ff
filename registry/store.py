"""Connections to the store: every connection runs with the iiot schema on its search path."""

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from registry.settings import StoreSettings


def connection_kwargs(schema: str) -> dict[str, Any]:
    # The schema is validated as a plain identifier by StoreSettings.
    return {"options": f"-c search_path={schema},public", "autocommit": False}


async def connect(
    settings: StoreSettings, *, autocommit: bool = False
) -> AsyncConnection[TupleRow]:
    kwargs = connection_kwargs(settings.database_schema)
    kwargs["autocommit"] = autocommit
    return await AsyncConnection.connect(settings.require_database_url(), **kwargs)


def create_pool(settings: StoreSettings, *, name: str, min_size: int = 1) -> AsyncConnectionPool:
    """A pool that the caller opens and closes (`async with pool:`); nothing connects here."""
    return AsyncConnectionPool(
        settings.require_database_url(),
        kwargs=connection_kwargs(settings.database_schema),
        min_size=min_size,
        max_size=max(min_size, settings.database_pool_max),
        name=name,
        open=False,
        # A connection broken by a database restart is replaced instead of failing a batch.
        check=AsyncConnectionPool.check_connection,
    )
