"""Structured logs: a refused message's line carries its batch, platform, reason and topic."""

import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from psycopg_pool import AsyncConnectionPool

from iiot import logs
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from tests.test_usage import TOPICS, message


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log line, rendered as JSON, into a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(logs.LogSettings(log_format="json"), stream=out)
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)


async def test_a_refused_message_is_logged_as_json_with_its_batch_and_platform(
    json_logs: io.StringIO, pool: AsyncConnectionPool, platform: str
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    topic = TOPICS.telemetry(platform, "d-1")
    await writer.write([message(topic, b"{not json")])
    await writer.write([message(topic, b"[1,")])
    lines = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    refused: list[dict[str, Any]] = [r for r in lines if r["event"].startswith("rejected")]
    assert [(r["platform"], r["reason"], r["topic"], r["level"]) for r in refused] == [
        (platform, "invalid_json", topic, "warning")
    ] * 2
    first, second = (r["batch"] for r in refused)
    assert first != second
    assert first.split("-")[0] == second.split("-")[0]  # the same writer, one batch each
