"""Schemathesis against the aggregator's own OpenAPI schema (as tests/test_openapi.py does for
the cell API), on `iiot national serve` with a cell and a snapshot: no 5xx, every answer inside
the schema, errors as problem+json; the intake and the snapshot format are in the schema."""

import asyncio
from pathlib import Path

import pytest

from tests.national import SimCell, aggregator_process, platform
from tests.test_openapi import exercise_every_operation

pytestmark = pytest.mark.slow


async def test_every_national_operation_answers_within_its_schema(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    async with aggregator_process(
        database_url, f"n_{unique}", tmp_path / "national.log"
    ) as aggregator:
        cell = SimCell("east", 60)
        await aggregator.register(cell)
        async with aggregator.client() as http:
            await cell.push(http, cell.body([platform("p1", connected=3)]))
            schema = (await http.get("/openapi.json")).json()
        intake = schema["paths"]["/snapshots"]["post"]
        assert intake["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Snapshot"
        }
        assert {"ProblemDetails", "Snapshot", "PlatformFigures"} <= set(
            schema["components"]["schemas"]
        )
        tried, failures = await asyncio.to_thread(
            exercise_every_operation,
            aggregator.url,
            {"Authorization": f"Bearer {aggregator.key}"},
        )
    assert len(tried) >= 14
    assert not failures, "\n\n".join(failures)
