"""Typed dependencies shared by the routes."""

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Path, Request, Response
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from api.problems import Problem
from api.settings import ApiSettings
from registry.ids import DEVICE_ID_PATTERN, PLATFORM_ID_PATTERN


async def _connection(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    """A pooled connection. Reads (GET, HEAD) run statement by statement (autocommit: one round
    trip each); any other request runs in one transaction, committed when the handler returns
    and before the response starts (the dependency's scope is the function): a 2xx answer means
    the change is stored, and a commit that fails answers a 5xx problem. Then the actions the
    handler left with `after_commit` run."""
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        if request.method in ("GET", "HEAD"):
            yield conn
            return
        handled = False
        try:
            async with conn.transaction():
                yield conn
                handled = True
        except psycopg.Error as exc:
            if not handled:
                raise  # the handler's own error, rolled back: its handler answers it
            raise _not_committed(exc) from exc
    for action in getattr(request.state, "after_commit", ()):
        done = action()
        if inspect.isawaitable(done):
            await done


def after_commit(request: Request, action: Callable[[], Awaitable[None] | None]) -> None:
    """Runs `action` once the request's transaction has committed, before the response starts
    (what must not happen for a change that is rolled back: dropping a cached key, kicking a
    client off the broker)."""
    if not hasattr(request.state, "after_commit"):
        request.state.after_commit = []
    request.state.after_commit.append(action)


def _not_committed(exc: psycopg.Error) -> Problem:
    if exc.sqlstate is None:  # the connection was lost: the commit may have been made or not
        return Problem(
            503,
            "Service Unavailable",
            "the store was lost while committing: the change may or may not have been made; "
            "read it back before retrying",
            headers={"Retry-After": "5"},
        )
    if exc.sqlstate.startswith("40"):  # serialization failure, deadlock: rolled back
        return Problem(
            503,
            "Service Unavailable",
            "the change conflicted with a concurrent one and was not made; retry",
            headers={"Retry-After": "1"},
        )
    detail = (exc.diag.message_primary or str(exc))[:500]
    return Problem(
        500,
        "Internal Server Error",
        f"the store refused to commit the change, which was not made: {detail}",
    )


def read_connection(request: Request) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
    """A pooled connection for a read, taken in the handler itself: the hottest reads skip
    the cost of a dependency with `yield`, a large share of a count request's time."""
    pool: AsyncConnectionPool = request.app.state.pool
    return pool.connection()


def json_response(model: BaseModel) -> Response:
    """A model as a JSON response, serialized once by pydantic-core (FastAPI would validate a
    returned model against the response model again first)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def _cell(request: Request) -> str:
    cell: str = request.app.state.settings.cell
    return cell


Connection = Annotated[AsyncConnection[Any], Depends(_connection, scope="function")]
Settings = Annotated[ApiSettings, Depends(_settings)]
Cell = Annotated[str, Depends(_cell)]
"""This deployment's cell (`IIOT_CELL`), named in every count response."""
PlatformId = Annotated[str, Path(pattern=f"^{PLATFORM_ID_PATTERN}$", description="Platform id")]
DeviceId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN}$", description="Device id")]
