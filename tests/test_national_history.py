"""The aggregator's upkeep, run in process on its own schema: minute samples older than
`minute_history_days` become one sample per hour (the last of each hour), and snapshot bodies
past their retention are dropped but for each cell's latest, digests and figures kept."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from national.app import create_pool
from national.history import Sampler, history
from national.migrate import connection_options, migrate
from national.settings import NationalSettings
from tests.conftest import scalar

SAMPLE = """
INSERT INTO national_samples VALUES ('minute', %s, 1, 0, 5, 1, 10, %s, 10, 10, 10, %s, %s, %s)
"""
CELL = "INSERT INTO cells (name, public_key, next_sequence) VALUES ('east', %s, 3)"
SNAPSHOT = """
INSERT INTO snapshots VALUES ('east', %s, %s, %s, 0.1, 60, 'v', '\\x00', '\\x00', 'body', 0, 0,
    0, 0, 0, 0, 0, '\\x00', 12, 'HLL_8', 0, 0)
"""


@pytest.fixture
async def national(database_url: str, unique: str) -> AsyncIterator[NationalSettings]:
    settings = NationalSettings(
        database_url=database_url,
        database_schema=f"n_{unique}",
        minute_history_days=7,
        body_retention_days=7,
    )
    await migrate(settings)
    yield settings
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.database_schema))
        )


@pytest.fixture
async def db(national: NationalSettings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(
        national.require_database_url(),
        options=connection_options(national.database_schema),
        autocommit=True,
    ) as conn:
        yield conn


async def test_minutes_older_than_a_week_become_hours_and_old_bodies_go(
    national: NationalSettings, db: psycopg.AsyncConnection[Any]
) -> None:
    old = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=8)
    # Two hours of minute samples, 8 days ago: connected = the minute of the hour.
    for minute in range(120):
        at = old + timedelta(minutes=minute)
        await db.execute(SAMPLE, (at, minute % 60, minute, minute - 1, minute + 1))
    await db.execute(CELL, (b"k" * 32,))
    for sequence, days in ((1, 10), (2, 9)):
        taken = datetime.now(UTC) - timedelta(days=days)
        await db.execute(SNAPSHOT, (sequence, taken, taken))

    async with create_pool(national) as pool:
        await Sampler(pool, national).once()

    rows = await history(db, old - timedelta(hours=1), datetime.now(UTC))
    old_rows = [r for r in rows if r[1] < old + timedelta(hours=3)]
    assert [(r[0], r[1], r[7]) for r in old_rows] == [
        ("hour", old, 59),
        ("hour", old + timedelta(hours=1), 59),
    ]
    assert (
        await scalar(db, "SELECT count(*) FROM national_samples WHERE resolution = 'minute'")
        == 1  # this minute's, sampled just now
    )
    # The older body is gone, the cell's latest kept; both digests stay.
    kept = await db.execute("SELECT sequence, body IS NOT NULL FROM snapshots ORDER BY sequence")
    assert await kept.fetchall() == [(1, False), (2, True)]
