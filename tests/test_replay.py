"""Dead letters can be listed and replayed once their cause is fixed."""

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import MessageDecoder
from ingest.replay import list_dead_letters, replay
from ingest.settings import IngestSettings
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import TelemetryWriter
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
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
