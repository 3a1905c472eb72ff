"""Dead letters can be listed and replayed once their cause is fixed."""

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import MessageDecoder
from ingest.replay import list_dead_letters, replay
from ingest.settings import IngestSettings
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import TelemetryWriter
from registry.migrate import available_migrations
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests.conftest import scalar


async def refuse(
    pool: AsyncConnectionPool, settings: IngestSettings, *messages: tuple[str, Any]
) -> None:
    """Sends messages through decoding and writing, as ingest does."""
    decode = MessageDecoder(TopicScheme(settings.mqtt_topic_root), settings)
    now = datetime.now(UTC)
    batch = [
        Received(
            "mqtt", topic, orjson.dumps(body), now, decode(topic, orjson.dumps(body), now), None
        )
        for topic, body in messages
    ]
    await TelemetryWriter(pool, stats=IngestStats()).write(batch)


async def test_replay_after_the_cause_is_fixed(
    store: StoreSettings, pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any]
) -> None:
    settings = IngestSettings(
        database_url=store.database_url, database_schema=store.database_schema
    )
    old = int((datetime.now(UTC) - timedelta(days=30)).timestamp() * 1000)
    await upsert_platform(db, "known")
    await refuse(
        pool,
        settings,
        ("iiot/v1/later/d1/telemetry", {"metrics": {"v": 1}}),  # platform created later
        ("iiot/v1/known/d2/telemetry", {"ts": old, "metrics": {"v": 2}}),  # a month-old back-fill
        ("iiot/v1/known/d3/telemetry", {"metrics": {"v": "x"}}),  # bad for good
    )
    letters = await list_dead_letters(db)
    assert [d.reason for d in letters] == [  # in arrival order
        "unknown_platform",
        "timestamp_out_of_window",
        "invalid_value",
    ]

    await upsert_platform(db, "later")
    report = await replay(pool, settings, letters)
    assert sorted(report.stored) == [letters[0].id]
    assert report.rejected == {
        letters[1].id: "timestamp_out_of_window",
        letters[2].id: "invalid_value",
    }
    # Replayed letters are hidden from the default listing; a refused replay adds no new row.
    assert await list_dead_letters(db) == []
    assert await scalar(db, "SELECT count(*) FROM dead_letters") == 3

    # The operator accepts the old back-fill explicitly.
    again = await list_dead_letters(db, ids=[letters[1].id], include_replayed=True)
    report = await replay(pool, settings, again, ignore_time_window=True)
    assert report.stored == [letters[1].id]
    cur = await db.execute("SELECT id, replay_outcome FROM dead_letters ORDER BY id")
    assert await cur.fetchall() == [
        (letters[0].id, "stored"),
        (letters[1].id, "stored"),
        (letters[2].id, "rejected: invalid_value"),
    ]
    cur = await db.execute(
        "SELECT d.device_id, t.value FROM telemetry t JOIN devices d ON d.id = t.device_id "
        "ORDER BY 1"
    )
    assert await cur.fetchall() == [("d1", 1.0), ("d2", 2.0)]


async def test_kafka_dead_letters_from_before_0019_keep_their_keys_and_replay(
    database_url: str, unique: str
) -> None:
    """Migration 0019 turns the text keys of existing dead letters into their UTF-8 bytes."""
    store = StoreSettings(database_url=database_url, database_schema=f"t_{unique}_old")
    async with await connect(store, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(store.database_schema))
        )
        try:
            for migration in available_migrations():
                if migration.version < 19:
                    await conn.execute(migration.text.encode())
            ts = int(datetime.now(UTC).timestamp() * 1000)
            for key in ("later/pump-1", "later/pümp-2"):
                await conn.execute(
                    "INSERT INTO dead_letters (received_at, source, topic, platform_id, reason,"
                    " detail, payload, kafka_partition, kafka_offset, kafka_key)"
                    " VALUES (now(), 'kafka', 'telemetry', 'later', 'unknown_platform', '', %s,"
                    " 0, 7, %s)",
                    (orjson.dumps({"ts": ts, "metrics": {"v": 1}}), key),
                )
            await conn.execute(
                next(m for m in available_migrations() if m.version == 19).text.encode()
            )
            letter, other = await list_dead_letters(conn)
            assert (letter.kafka_key, other.kafka_key) == (b"later/pump-1", "later/pümp-2".encode())
            # The rest of the migrations, as `iiot migrate` applies them: today's ingest reads
            # columns added since (platforms.moved_to).
            for migration in available_migrations():
                if migration.version > 19:
                    await conn.execute(migration.text.encode())
            await upsert_platform(conn, "later")
            settings = IngestSettings(
                database_url=database_url, database_schema=store.database_schema
            )
            async with create_pool(store, name="old") as pool:
                report = await replay(pool, settings, [letter])
            assert report.stored == [letter.id]
            assert await scalar(conn, "SELECT device_id FROM devices") == "pump-1"
        finally:
            await conn.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(store.database_schema))
            )
