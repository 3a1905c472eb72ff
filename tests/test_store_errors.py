"""What the writer does with each kind of store error, each produced by the real PostgreSQL:
data errors (SQLSTATE classes 22, 23) isolate and dead-letter the message; errors about the
store (42 schema and permissions, 57 a killed backend, ...) leave the batch to be retried, and
never turn it into dead letters; a refusal whose dead letter is refused too stops, named."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Origin, Received
from ingest.errors import Rejected, Retryable, Unstorable
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.settings import StoreSettings
from registry.store import create_pool
from tests.conftest import eventually, scalar
from tests.test_writer import NOW, telemetry


def batch(platform: str, n: int = 6) -> list[Received[None]]:
    return [telemetry(platform, f"d{k}", (NOW, "v", float(k))) for k in range(n)]


async def dead_letters(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await db.execute("SELECT reason, kafka_key, kafka_offset FROM dead_letters ORDER BY id")
    return await cur.fetchall()


async def test_a_data_error_class_22_isolates_the_message(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    # A value the check's cast cannot hold: numeric_value_out_of_range (22003).
    await db.execute("ALTER TABLE telemetry ADD CONSTRAINT fits_int4 CHECK (value::int4 >= 0)")
    messages = batch(platform)
    messages[3] = telemetry(platform, "d3", (NOW, "v", 1e12))
    report = await TelemetryWriter(pool, stats=IngestStats()).write(messages)
    assert (report.points_written, report.dead_letters) == (5, 1)
    detail = await scalar(db, "SELECT detail FROM dead_letters")
    assert detail.startswith("NumericValueOutOfRange")


async def test_a_nul_byte_in_text_class_22_isolates_the_message(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    # Decoding refuses such a metric name; a message that got past it is refused when its name
    # is registered: text cannot hold a NUL, and psycopg raises DataError before sending it
    # (no SQLSTATE: classified by the exception's class).
    messages = batch(platform)
    messages[4] = telemetry(platform, "d4", (NOW, "v\x00", 4.0))
    report = await TelemetryWriter(pool, stats=IngestStats()).write(messages)
    assert (report.points_written, report.dead_letters) == (5, 1)
    cur = await db.execute("SELECT reason, topic, detail FROM dead_letters")
    reason, topic, detail = await cur.fetchone() or ((),) * 3
    assert (reason, topic) == ("store_refused", messages[4].topic)
    assert "0x00" in detail


@pytest.fixture
async def limited_role(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], database_url: str, unique: str
) -> AsyncIterator[str]:
    """A login role with every privilege on the test's schema except INSERT on telemetry (its
    partitions exist: creating them takes the table's owner)."""
    await db.execute("SELECT iiot_ensure_telemetry_partitions(%s, %s)", (NOW.date(), NOW.date()))
    role = sql.Identifier(f"t_{unique}_writer")
    schema = sql.Identifier(store.database_schema)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        for grant in (
            "GRANT ALL ON SCHEMA {schema} TO {role}",
            "GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}",
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
            "GRANT ALL ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}",
            "REVOKE INSERT ON {schema}.telemetry FROM {role}",
        ):
            await conn.execute(sql.SQL(grant).format(schema=schema, role=role))
        try:
            yield f"t_{unique}_writer"
        finally:
            await conn.execute(sql.SQL("DROP OWNED BY {}").format(role))
            await conn.execute(sql.SQL("DROP ROLE {}").format(role))


async def test_a_revoked_insert_privilege_class_42_pauses_the_batch_until_granted(
    store: StoreSettings,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    limited_role: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = psycopg.conninfo.make_conninfo(store.require_database_url(), user=limited_role)
    as_role = store.model_copy(update={"database_url": url})
    async with create_pool(as_role, name="limited") as pool:
        writer = TelemetryWriter(pool, stats=IngestStats())
        prepared = await writer.prepare(batch(platform))
        with caplog.at_level(logging.WARNING, logger="ingest.writer"):
            writing = asyncio.create_task(writer.commit_until_done(prepared))
            await eventually(lambda: asyncio.sleep(0, "42501" in caplog.text))
            # Retried, not refused: nothing is a dead letter, nothing was half written.
            assert not writing.done()
            assert await dead_letters(db) == []
            assert await scalar(db, "SELECT count(*) FROM telemetry") == 0
            await db.execute(
                sql.SQL("GRANT INSERT ON telemetry TO {}").format(sql.Identifier(limited_role))
            )
            async with asyncio.timeout(30):
                await writing
    assert "permission denied for table telemetry" in caplog.text
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 6
    assert await dead_letters(db) == []


async def test_a_dropped_column_class_42_is_retried_not_dead_lettered(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await db.execute("ALTER TABLE telemetry DROP COLUMN value")
    writer = TelemetryWriter(pool, stats=IngestStats())
    with pytest.raises(Retryable, match="42703"):
        await writer.write(batch(platform))
    assert await dead_letters(db) == []
    await db.execute("ALTER TABLE telemetry ADD COLUMN value float8 NOT NULL")
    report = await writer.write(batch(platform))
    assert (report.points_written, report.dead_letters) == (6, 0)


async def test_a_killed_backend_class_57_is_retried_with_nothing_committed(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], database_url: str, platform: str
) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    prepared = await writer.prepare(batch(platform))
    async with await psycopg.AsyncConnection.connect(database_url) as locker:
        # The commit waits for the lock; its backend is killed while it waits.
        await locker.execute(
            sql.SQL("LOCK TABLE {}.telemetry IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(await scalar(db, "SELECT current_schema()"))
            )
        )
        writing = asyncio.create_task(writer.commit(prepared))
        waiting = "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        pid = await eventually(lambda: scalar(db, waiting, locker.info.backend_pid))
        await db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(Retryable):
            async with asyncio.timeout(30):
                await writing
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 0
    assert await dead_letters(db) == []
    # The same prepared batch commits once the store answers again.
    report = await writer.commit(prepared)
    assert (report.points_written, report.dead_letters) == (6, 0)


def kafka_refusal(key: bytes, offset: int, reason: str = "bad_device_id") -> Received[None]:
    origin = Origin(2, offset, key, None, [("trace\x00id", b"\x00\xff"), ("empty", None)])
    return Received(
        "kafka",
        "telemetry-x",
        b"\x00\xfe{not json",
        NOW,
        Rejected(reason, f"device id {key.decode(errors='replace')!r}\x00 is not valid"),
        None,
        origin,
    )


async def test_a_refusal_with_a_nul_byte_is_dead_lettered_byte_for_byte(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    # A NUL in a text column is a class 22 error (character_not_in_repertoire): before dead
    # letters held bytes, the isolation of this refusal never ended.
    messages: list[Received[None]] = batch(platform, 4)
    messages[2:2] = [kafka_refusal(b"plant-1/a\x00b", 7), kafka_refusal(b"plant-1/\xff", 8)]
    report = await TelemetryWriter(pool, stats=IngestStats()).write(messages)
    assert (report.points_written, report.dead_letters) == (4, 2)
    cur = await db.execute(
        "SELECT kafka_key, kafka_headers, payload, detail FROM dead_letters ORDER BY id"
    )
    rows = await cur.fetchall()
    assert [row[0] for row in rows] == [b"plant-1/a\x00b", b"plant-1/\xff"]
    assert rows[0][1] == [[b"trace\x00id", b"\x00\xff"], [b"empty", None]]
    assert rows[0][2] == b"\x00\xfe{not json"
    assert rows[0][3] == "device id 'plant-1/a\\x00b'\\x00 is not valid"
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 4


async def test_a_refusal_the_store_will_not_record_stops_naming_the_record(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    # Any data error on the dead letter itself will do: a check constraint is a real one.
    await db.execute(
        "ALTER TABLE dead_letters ADD CONSTRAINT no_bad_ids CHECK (reason <> 'bad_device_id')"
    )
    offsets: list[object] = []

    async def store_offsets(conn: psycopg.AsyncConnection[Any], refused: object) -> None:
        offsets.append(refused)

    messages: list[Received[None]] = batch(platform, 4)
    messages.insert(3, kafka_refusal(b"plant-1/a\x00b", 41))
    writer = TelemetryWriter(pool, stats=IngestStats())
    with pytest.raises(Unstorable, match=r"telemetry-x\[2\] at offset 41.*no_bad_ids"):
        async with asyncio.timeout(30):
            await writer.write(messages, in_transaction=store_offsets)
    # Nothing that would acknowledge the record committed, and nothing looped.
    assert offsets == []
    assert await dead_letters(db) == []
