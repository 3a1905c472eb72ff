"""Migrations on the real PostgreSQL: idempotent, recorded, and the partition functions work."""

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from registry.migrate import available_migrations, migrate
from registry.settings import StoreSettings
from tests.conftest import scalar


async def test_migrate_is_idempotent_and_records_versions(
    store: StoreSettings, db: psycopg.AsyncConnection[Any]
) -> None:
    assert await migrate(store) == []  # the fixture applied everything already
    cur = await db.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    assert await cur.fetchall() == [(m.version, m.name) for m in available_migrations()]


async def test_plain_postgresql_gets_a_partitioned_table(db: psycopg.AsyncConnection[Any]) -> None:
    assert await scalar(db, "SELECT relkind FROM pg_class WHERE oid = 'telemetry'::regclass") == "p"


async def test_partitions_are_created_once_per_utc_day(db: psycopg.AsyncConnection[Any]) -> None:
    first = date(2026, 1, 30)
    assert (
        await scalar(
            db, "SELECT iiot_ensure_telemetry_partitions(%s, %s)", first, first + timedelta(2)
        )
        == 3
    )
    assert (
        await scalar(
            db, "SELECT iiot_ensure_telemetry_partitions(%s, %s)", first, first + timedelta(3)
        )
        == 1
    )
    # A point at 23:59:59 UTC lands in its UTC day's partition whatever the session time zone.
    await db.execute("SET TIME ZONE 'Asia/Shanghai'")
    await db.execute(
        "INSERT INTO telemetry VALUES (%s, 1, 1, 1.0)",
        (datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC),),
    )
    assert await scalar(db, "SELECT count(*) FROM telemetry_20260131") == 1


async def test_retention_drops_whole_old_days(db: psycopg.AsyncConnection[Any]) -> None:
    today = datetime.now(UTC).date()
    await db.execute(
        "SELECT iiot_ensure_telemetry_partitions(%s, %s)", (today - timedelta(10), today)
    )
    assert await scalar(db, "SELECT iiot_apply_telemetry_retention(5)") == 5
    remaining = await scalar(
        db, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass"
    )
    assert remaining == 6
