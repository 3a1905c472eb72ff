"""Connections to the store: every connection runs with the iiot schema on its search path."""

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from registry.arrays import ADAPTERS
from registry.settings import StoreSettings


def connection_kwargs(schema: str, *, custom_plans: bool = True) -> dict[str, Any]:
    # The schema is validated as a plain identifier by StoreSettings.
    # Custom plans for batches: psycopg prepares statements it runs often, and PostgreSQL's
    # generic plan for `id = ANY($1)` over a batch of 10,000 ids scans the whole table, while
    # planning a batch costs little beside executing it. Requests are the other way round: a
    # count reads one row, and planning it each time costs more than the rest of the query.
    # `context`: psycopg's adapters plus the fast array dumpers of registry.arrays.
    options = f"-c search_path={schema},public"
    if custom_plans:
        options += " -c plan_cache_mode=force_custom_plan"
    return {"options": options, "autocommit": False, "context": ADAPTERS}


async def connect(
    settings: StoreSettings, *, autocommit: bool = False
) -> AsyncConnection[TupleRow]:
    kwargs = connection_kwargs(settings.database_schema)
    kwargs["autocommit"] = autocommit
    return await AsyncConnection.connect(settings.require_database_url(), **kwargs)


def create_pool(
    settings: StoreSettings,
    *,
    name: str,
    min_size: int = 1,
    autocommit: bool = False,
    check: bool = True,
    custom_plans: bool = True,
) -> AsyncConnectionPool:
    """A pool that the caller opens and closes (`async with pool:`); nothing connects here.

    `check`: test each connection when it is handed out (a round trip), so one broken by a
    database restart is replaced instead of failing a batch. Request handlers skip it: a broken
    connection fails one request with a 503 and the pool drops it. `custom_plans`: see
    connection_kwargs.
    """
    kwargs = connection_kwargs(settings.database_schema, custom_plans=custom_plans)
    kwargs["autocommit"] = autocommit
    return AsyncConnectionPool(
        settings.require_database_url(),
        kwargs=kwargs,
        min_size=min_size,
        max_size=max(min_size, settings.database_pool_max),
        name=name,
        open=False,
        check=AsyncConnectionPool.check_connection if check else None,
    )
