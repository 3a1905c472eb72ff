"""Schemathesis against the API's own OpenAPI schema: no 5xx, no answer that breaks the schema.

The API runs under uvicorn on a schema of its own with a few platforms, devices and points, and
an admin key (so every operation is reached, not stopped at 401). Each operation gets valid
requests (positive) and requests that break its schema (negative: each must be refused with a
4xx inside the schema, never a 5xx). Hypothesis' budget per operation keeps the whole run to
about a minute.
"""

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from psycopg import sql
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from api.settings import ApiSettings
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.access import Role, create_key
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.store import connect, create_pool
from tests.conftest import served_api
from tests.test_writer import telemetry

EXAMPLES_PER_OPERATION = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 15}


async def _seed(settings: ApiSettings) -> str:
    await migrate(settings)
    async with await connect(settings, autocommit=True) as conn:
        for platform in ("plant-1", "plant-2"):
            await upsert_platform(conn, platform)
        # A second admin key first: schemathesis may revoke key 1 (DELETE /keys/{key_id}).
        await create_key(conn, role=Role.ADMIN, platform=None, name="decoy", created_by=None)
        _, key = await create_key(conn, role=Role.ADMIN, platform=None, name="st", created_by=None)
    async with create_pool(settings, name="seed") as pool:
        writer = TelemetryWriter(pool, stats=IngestStats())
        now = datetime.now(UTC)
        for n in range(5):
            point = (now - timedelta(minutes=n), "temperature", 20.0 + n)
            await writer.write([telemetry("plant-1", f"d-{n}", point)])
    return key


@pytest.fixture(scope="module")
def served(database_url: str) -> Iterator[tuple[str, str]]:
    """(base URL, admin key) of the API under uvicorn in a thread of its own."""
    settings = ApiSettings(
        database_url=database_url,
        database_schema=f"t_st_{uuid.uuid4().hex[:10]}",
        api_rate_per_second=1e6,
        api_rate_burst=1_000_000,
        # The decoy key may be revoked mid-run; the real one must keep working.
        api_key_cache_seconds=0,
    )
    key = asyncio.run(_seed(settings))
    try:
        with served_api(settings) as base:
            yield base, key
    finally:

        async def drop() -> None:
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
                name = sql.Identifier(settings.database_schema)
                await c.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(name))

        asyncio.run(drop())


def test_every_operation_answers_within_its_schema(served: tuple[str, str]) -> None:
    base, key = served
    tried, failures = exercise_every_operation(base, {"Authorization": f"Bearer {key}"})
    assert len(tried) > 30
    assert not failures, "\n\n".join(failures)


def exercise_every_operation(base: str, headers: dict[str, str]) -> tuple[list[str], list[str]]:
    """Schemathesis on every operation of the schema at `base`: (operations tried, failures)."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    tried, failures = [], []
    # Each operation on its own, so one failing operation does not hide another's failures.
    # (Schemathesis' pytest plugin does not run under pytest 9; hypothesis drives it here.)
    for result in schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)
        for mode, examples in EXAMPLES_PER_OPERATION.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: Any) -> None:
                case.call_and_validate(base_url=base, headers=headers, checks=checks)

            try:
                exercise()
            except Unsatisfiable:
                # An operation without parameters or body has no request that breaks it.
                raw = operation.definition.raw
                if (
                    mode is not GenerationMode.NEGATIVE
                    or raw.get("parameters")
                    or "requestBody" in raw
                ):
                    raise
            except (Exception, BaseExceptionGroup) as failure:
                failures.append(f"{operation.label} ({mode}): {failure}")
    return tried, failures
