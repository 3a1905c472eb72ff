"""Replaying dead letters: an operator fixes the cause (registers the platform, widens the time
window) and sends the refused messages through decoding and writing again.

Each dead letter is replayed on its own, and its outcome is recorded on its row in the same
transaction as the points it produced: `replay_outcome` is `stored` or `rejected: <reason>`.
A message refused again is not copied into a new dead letter. Points keep their original
arrival time (`received_at`) for the time window and for readings without `ts`. A Kafka record
is addressed by its key again; a Sparkplug message is not replayable (`not_replayable`): it
meant something only in its edge node's session.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import Decoded, MessageDecoder
from ingest.errors import Rejected
from ingest.settings import IngestSettings
from ingest.sparkplug import NAMESPACE
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import Refusals, TelemetryWriter

SELECT_DEAD_LETTERS = """
SELECT id, received_at, source, topic, platform_id, reason, detail, payload,
       replayed_at, replay_outcome, kafka_key, sparkplug_topic, kafka_headers, raw_topic
FROM dead_letters
WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
  AND (%(platform)s::text IS NULL OR platform_id = %(platform)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(include_replayed)s OR replayed_at IS NULL)
ORDER BY id
LIMIT %(limit)s
"""
MARK_REPLAYED = "UPDATE dead_letters SET replayed_at = now(), replay_outcome = %s WHERE id = %s"

# Wide enough for any back-fill an operator would replay; still a sanity bound.
_ANY_TIME = timedelta(days=365 * 100)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    received_at: Any
    source: str
    topic: str
    platform_id: str | None
    reason: str
    detail: str
    payload: bytes
    replayed_at: Any
    replay_outcome: str | None
    kafka_key: bytes | None = None
    sparkplug_topic: str | None = None
    kafka_headers: list[list[bytes | None]] | None = None  # [name, value] pairs
    raw_topic: bytes | None = None  # the topic as it arrived, when `topic` escapes it


@dataclass(slots=True)
class ReplayReport:
    stored: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    points_written: int = 0


async def list_dead_letters(
    conn: AsyncConnection[Any],
    *,
    ids: Sequence[int] | None = None,
    platform: str | None = None,
    reason: str | None = None,
    include_replayed: bool = False,
    limit: int = 100,
) -> list[DeadLetter]:
    cur = await conn.execute(
        SELECT_DEAD_LETTERS,
        {
            "ids": list(ids) if ids else None,
            "platform": platform,
            "reason": reason,
            "include_replayed": include_replayed,
            "limit": limit,
        },
    )
    return [DeadLetter(*row) for row in await cur.fetchall()]


async def replay(
    pool: AsyncConnectionPool,
    settings: IngestSettings,
    letters: Sequence[DeadLetter],
    *,
    ignore_time_window: bool = False,
) -> ReplayReport:
    limits = settings
    if ignore_time_window:
        limits = settings.model_copy(
            update={
                "time_window_past_seconds": int(_ANY_TIME.total_seconds()),
                "time_window_future_seconds": int(_ANY_TIME.total_seconds()),
            }
        )
    decode = MessageDecoder(TopicScheme(settings.mqtt_topic_root), limits)
    writer = TelemetryWriter(pool, stats=IngestStats())
    report = ReplayReport()
    root = settings.mqtt_topic_root
    for letter in letters:
        outcome: Decoded | Rejected
        topic = (
            letter.raw_topic.decode(errors="surrogateescape") if letter.raw_topic else letter.topic
        )
        if letter.sparkplug_topic is not None or topic.startswith(NAMESPACE):
            # Its meaning depends on the edge node's session at the time (aliases, seq, bdSeq).
            outcome = Rejected(
                "not_replayable",
                "a Sparkplug message is only valid in its session; the edge node's next "
                "BIRTH brings its state back",
                platform=letter.platform_id,
            )
        elif letter.source == "kafka":
            # A key that is not UTF-8 cannot name a device: refused again (bad_device_id).
            key = letter.kafka_key.decode(errors="replace") if letter.kafka_key else ""
            address = f"{root}/{key}/telemetry" if key else ""
            outcome = decode(address, letter.payload, letter.received_at)
        else:
            outcome = decode(topic, letter.payload, letter.received_at)
        message = Received(
            letter.source, topic, letter.payload, letter.received_at, outcome, letter.id
        )

        async def record(
            conn: AsyncConnection[Any], refused: Refusals, id_: int = letter.id
        ) -> None:
            verdict = f"rejected: {refused[0][1].reason}" if refused else "stored"
            await conn.execute(MARK_REPLAYED, (verdict, id_))
            if refused:
                report.rejected[id_] = refused[0][1].reason
            else:
                report.stored.append(id_)

        written = await writer.write([message], in_transaction=record, dead_letter=False)
        report.points_written += written.points_written
    return report
