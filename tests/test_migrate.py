"""Migrations on the real PostgreSQL: idempotent, recorded, and the partition functions work."""

from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

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


async def test_the_store_refuses_device_and_gateway_ids_outside_the_pattern(
    db: psycopg.AsyncConnection[Any],
) -> None:
    """The pattern is a domain's check since migration 0017 (not a table CHECK, which every
    connection event's UPDATE re-evaluated): it must still hold wherever an id is written."""
    await db.execute("INSERT INTO platforms (id, name) VALUES ('p1', 'P')")
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('p1', 'ok-1.a:b_c')")
    await db.execute("INSERT INTO gateways (platform_id, gateway_id) VALUES ('p1', 'gw-1')")
    for statement in (
        "INSERT INTO devices (platform_id, device_id) VALUES ('p1', %s)",
        "INSERT INTO gateways (platform_id, gateway_id) VALUES ('p1', %s)",
        "UPDATE devices SET device_id = %s",
        "UPDATE gateways SET gateway_id = %s",
    ):
        for bad in ("-leading-dash", "has space", "x" * 129, ""):
            with pytest.raises(psycopg.errors.CheckViolation):
                await db.execute(statement, (bad,))
    with pytest.raises(psycopg.errors.CheckViolation):  # raised as the COPY ends
        async with (
            db.cursor() as cur,
            cur.copy("COPY devices (platform_id, device_id) FROM STDIN") as copy,
        ):
            await copy.write_row(("p1", "bad/id"))
    assert await scalar(db, "SELECT count(*) FROM devices") == 1
    # The rows' other checks are still table CHECKs.
    with pytest.raises(psycopg.errors.CheckViolation):
        await db.execute("UPDATE devices SET state = 'maybe'")
