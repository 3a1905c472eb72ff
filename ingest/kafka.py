"""The Kafka consumer: fetch, decode, batch, write with the offsets, then commit (docs/contract.md,
"Kafka").

Exactly-once effect: the offset each partition has reached is stored in PostgreSQL
(`kafka_offsets`) in the same transaction as the rows its records produced, and a partition
that is assigned to us is read from the stored offset. Auto-commit is off: aiokafka's
auto-commit would also commit on rebalance and on stop, past records fetched but not written.
Committing to Kafka as well happens after the database commit, only so that the usual lag
tools see progress; the database stays the source of truth.

Ownership: every assignment of a partition opens a new epoch. A batch keeps only the records
fetched in their partition's current epoch (records fetched before a revocation are
abandoned; the next owner reads them again from the stored offset), and the offsets are
advanced by compare-and-set against the value this consumer last read or wrote, so a consumer
that lost a partition without noticing cannot write it twice: its transaction rolls back
(`Fenced`) and it starts a new session.

Lanes: the owned partitions are spread over `kafka_write_lanes` writers, a partition always to
the same one (by topic and number), so each partition's records are still written in order and
its offsets advanced by one writer; the lanes' transactions run side by side on connections of
their own, each adding to a counter shard of its own.

Back-pressure: between fetch and each lane sits a bounded queue; while one is full the assigned
partitions are paused, so aiokafka's own prefetch (bounded by its fetch sizes) is all that
waits in memory.
"""

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.batching import END, EndOfStream, Origin, Received
from ingest.decoding import Decoded, MessageDecoder
from ingest.errors import Rejected, Unstorable
from ingest.progress import Progress
from ingest.settings import IngestSettings
from ingest.sparkplug_host import SparkplugHost
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import PreparedBatch, Refusals, TelemetryWriter, write_ahead
from registry.devices import DeviceDirectory

log = logging.getLogger(__name__)

LOAD_OFFSETS = """
SELECT topic, partition, next_offset FROM kafka_offsets
WHERE group_id = %(group)s AND topic = ANY(%(topics)s)
"""
# Compare-and-set: the row must still hold what this consumer last read or wrote.
ADVANCE_OFFSETS = """
UPDATE kafka_offsets o
SET next_offset = w.next_offset, log_end_offset = w.log_end_offset, updated_at = now()
FROM unnest(%(topics)s::text[], %(partitions)s::int4[], %(expected)s::int8[],
            %(next)s::int8[], %(ends)s::int8[])
     AS w(topic, partition, expected, next_offset, log_end_offset)
WHERE o.group_id = %(group)s AND o.topic = w.topic AND o.partition = w.partition
  AND o.next_offset = w.expected
"""
FIRST_OFFSETS = """
INSERT INTO kafka_offsets (group_id, topic, partition, next_offset, log_end_offset)
SELECT %(group)s, w.topic, w.partition, w.next_offset, w.log_end_offset
FROM unnest(%(topics)s::text[], %(partitions)s::int4[], %(next)s::int8[], %(ends)s::int8[])
     AS w(topic, partition, next_offset, log_end_offset)
ON CONFLICT DO NOTHING
"""

_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0
_YIELD_EVERY = 50  # records the fetcher decodes before it lets other tasks run
# A record whose header names a Sparkplug topic carries a Sparkplug B payload (docs/contract.md).
SPARKPLUG_HEADER = "iiot-sparkplug-topic"


@dataclass(frozen=True, slots=True)
class KafkaAck:
    """What a record's batch needs to advance its partition."""

    partition: TopicPartition
    offset: int
    epoch: int


class Fenced(Exception):
    """Another consumer advanced a partition we were writing: roll back and start over."""


class KafkaIngest:
    """Consumes telemetry records from Kafka topics until `stop()`; reconnects on its own.

    Partitions come from the consumer group, or, when `partitions` is given (or set with
    `assign`), from the caller: static assignment, as in a StatefulSet with one partition
    range per replica, and on brokers without group support.
    """

    def __init__(
        self,
        settings: IngestSettings,
        pool: AsyncConnectionPool,
        *,
        stats: IngestStats | None = None,
        partitions: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self.stats = stats or IngestStats()
        # One writer per lane, sharing what they know of the registry; distinct counter shards,
        # so that concurrent transactions never wait for each other's counter rows.
        foreign = settings.kafka_scope == "platforms"  # topics shared by cells
        first = TelemetryWriter(
            pool,
            stats=self.stats,
            counter_shard=settings.kafka_shard,
            directory=DeviceDirectory(max_cached_ids=settings.device_cache_max),
            renew_seconds=settings.activity_renew_seconds,
            skip_unknown_platforms=foreign,
        )
        self._writers = [first] + [
            TelemetryWriter(
                pool,
                stats=self.stats,
                counter_shard=(settings.kafka_shard + lane) % 64,
                directory=first.directory,
                renew_seconds=settings.activity_renew_seconds,
                skip_unknown_platforms=foreign,
            )
            for lane in range(1, settings.kafka_write_lanes)
        ]
        self._topics = TopicScheme(settings.mqtt_topic_root)
        self._decode = MessageDecoder(self._topics, settings)
        groups = settings.sparkplug_platforms()
        # Rebirth requests cannot travel back over Kafka: they are counted (sessions.stats).
        self.sparkplug = SparkplugHost(settings, groups) if groups is not None else None
        self._static = [TopicPartition(t, p) for t, p in partitions] if partitions else None
        self._consumer: AIOKafkaConsumer | None = None
        # Per owned partition: its epoch and the offset stored for it (None: no row yet).
        self._epochs: dict[TopicPartition, int] = {}
        self._stored: dict[TopicPartition, int | None] = {}
        # Per owned partition: the offset after the last record queued in this epoch.
        self._next: dict[TopicPartition, int] = {}
        self._epoch = 0
        self._queued = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._queues: list[asyncio.Queue[Any]] = []
        self.assigned = asyncio.Event()
        """Set while partitions are assigned and positioned (tests and readiness wait on it)."""
        self.skipped_offsets = 0
        """Offsets that were missing from the log when read (see the warning it logs)."""
        self.pauses = 0
        """How often fetching was paused because the writer was behind."""
        self.lag: dict[TopicPartition, int] = {}
        """Records behind each owned partition's end, as of the last fetch."""
        self.progress = Progress()
        """Per owned partition, what was fetched and not yet committed; why consuming stopped,
        if it did."""

    def registry_changed(self, platform: str) -> None:
        """An operator changed the registry: forget what was cached about it."""
        self._writers[0].directory.forget()

    def queue_depth(self) -> int:
        """Messages received and not yet written (metrics)."""
        return sum(queue.qsize() for queue in self._queues)

    def subscribed_platforms(self) -> None:
        """Kafka subscribes to topics, not platforms (metrics)."""

    def partition_lag(self) -> dict[tuple[str, int], int]:
        """Records behind each owned partition's end, as of the last fetch (metrics)."""
        return {(tp.topic, tp.partition): behind for tp, behind in self.lag.items()}

    def stop(self) -> None:
        """Asks `run()` to stop fetching, write and commit what it holds, and return."""
        self._stopping.set()

    async def assign(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Replaces a static assignment (for example, taking over a stopped consumer's)."""
        self._static = [TopicPartition(t, p) for t, p in partitions]
        if self._consumer is not None:
            dropped = self._epochs.keys() - set(self._static)
            if dropped:
                await self._give_up(sorted(dropped))
            self._consumer.assign(self._static)
            await self._take(self._consumer, self._static)

    async def run(self) -> None:
        delay = _RETRY_FIRST
        if self.sparkplug is not None:
            await self.sparkplug.restore(self._pool)
        while not self._stopping.is_set():
            try:
                await self._session()
                delay = _RETRY_FIRST
            except* (KafkaError, Fenced) as group:
                log.warning(
                    "Kafka session ended (%s); starting again in %.1fs", group.exceptions[0], delay
                )
            except* Unstorable as group:
                self.progress.failure = str(Unstorable.first(group))
            self.assigned.clear()
            if self.progress.failure is not None:
                # Nothing after the record can be committed before it: stay down, unready
                # (/readyz says why), until an operator has looked (docs/contract.md).
                log.critical("Kafka ingest stopped: %s", self.progress.failure)
                await self._stopping.wait()
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, _RETRY_MAX)

    async def _session(self) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.require_kafka_bootstrap(),
            group_id=s.kafka_group_id,
            client_id=s.kafka_client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.kafka_max_records,
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(1000, s.kafka_session_timeout_ms // 3),
            **s.kafka_client_options(),
        )
        await consumer.start()
        self._consumer = consumer
        self._epochs.clear()
        self._stored.clear()
        self._next.clear()
        self._queued = 0
        self._idle.set()
        try:
            if self._static is not None:
                consumer.assign(self._static)
                await self._take(consumer, self._static)
            else:
                consumer.subscribe(s.kafka_topics, listener=_Listener(self, consumer))
            size = max(1, s.queue_max_messages // len(self._writers))
            queues: list[asyncio.Queue[Received[KafkaAck] | EndOfStream]] = [
                asyncio.Queue(size) for _ in self._writers
            ]
            self._queues = list(queues)
            async with asyncio.TaskGroup() as tasks:
                fetching = tasks.create_task(self._fetch(consumer, queues))
                writing = tasks.create_task(self._write(consumer, queues))
                stopping = tasks.create_task(self._stopping.wait())
                await asyncio.wait((stopping, writing), return_when=asyncio.FIRST_COMPLETED)
                fetching.cancel()
                for queue in queues:
                    await queue.put(END)
                try:
                    async with asyncio.timeout(s.shutdown_grace_seconds):
                        await writing
                except TimeoutError:
                    log.error(  # noqa: TRY400 - expected; a traceback would not help
                        "drain did not finish within the grace period; the records will be "
                        "read again from the stored offsets"
                    )
                    writing.cancel()
        finally:
            self._consumer = None
            self.assigned.clear()
            for tp in self._epochs:
                self.progress.forget(tp)
            await consumer.stop()

    async def _take(self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
        """Positions the assigned partitions: those already owned where this consumer left off
        (same epoch), new ones, in a new epoch, at their stored offsets."""
        owned = [tp for tp in partitions if tp in self._epochs]
        new = [tp for tp in partitions if tp not in self._epochs]
        # A partition's start: the stored offset, else the log's start (never what was committed
        # to Kafka). `seek` takes effect at once; aiokafka's `seek_to_beginning` resets lazily
        # and can rewind past records it already returned.
        stored = await self._load_offsets({tp.topic for tp in new}) if new else {}
        missing = [tp for tp in new if tp not in stored]
        start = stored | (await consumer.beginning_offsets(missing) if missing else {})
        self._epoch += 1
        for tp in new:
            self._epochs[tp] = self._epoch
            self._stored[tp] = stored.get(tp)
            self._next[tp] = start[tp]
            self.progress.start(tp, start[tp])
        for tp in partitions:
            consumer.seek(tp, self._next[tp])
        log.info(
            "assigned %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{self._next[tp]}" for tp in partitions),
        )
        if owned:
            log.info("kept %d partitions where they were", len(owned))
        self.assigned.set()

    async def _give_up(self, partitions: Sequence[TopicPartition]) -> None:
        """Revocation: let the batches already fetched commit (bounded), then drop ownership."""
        try:
            async with asyncio.timeout(self._settings.shutdown_grace_seconds):
                await self._idle.wait()
        except TimeoutError:
            log.warning("revoked partitions while a batch was in flight; abandoning it")
        for tp in partitions:
            self._epochs.pop(tp, None)
            self._stored.pop(tp, None)
            self._next.pop(tp, None)
            self.lag.pop(tp, None)
            self.progress.forget(tp)
        self.assigned.clear()

    async def _load_offsets(self, topics: set[str]) -> dict[TopicPartition, int]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                LOAD_OFFSETS, {"group": self._settings.kafka_group_id, "topics": sorted(topics)}
            )
            return {TopicPartition(t, p): o for t, p, o in await cursor.fetchall()}

    async def _fetch(
        self,
        consumer: AIOKafkaConsumer,
        queues: "list[asyncio.Queue[Received[KafkaAck] | EndOfStream]]",
    ) -> None:
        decode = self._decode
        root = self._topics.root
        while True:
            fetched = await consumer.getmany(timeout_ms=1000)
            now = datetime.now(UTC)  # once per fetch: the records' times are the producer's
            fetched_at = self.progress.now()
            for tp, records in fetched.items():
                epoch = self._epochs.get(tp)
                if epoch is None:
                    continue  # revoked meanwhile
                queue = queues[_lane(tp, len(queues))]
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    self.lag[tp] = max(highwater - records[-1].offset - 1, 0)
                next_offset = self._next.get(tp, 0)
                self.progress.received(tp, records[-1].offset + 1, fetched_at)
                for record in records:
                    if record.offset < next_offset:
                        continue  # queued already in this epoch (a re-fetch): once is enough
                    if record.offset > next_offset:
                        # Compaction, transaction markers, or retention that deleted records
                        # before they were stored: say so, the records are gone from Kafka.
                        self.skipped_offsets += record.offset - next_offset
                        log.warning(
                            "%s[%d]: offsets %d..%d are not in the log (retention or "
                            "compaction); going on from %d",
                            tp.topic,
                            tp.partition,
                            next_offset,
                            record.offset - 1,
                            record.offset,
                        )
                    next_offset = record.offset + 1
                    self._next[tp] = next_offset
                    message = _received(
                        record, tp, epoch, root, decode, now=now, sparkplug=self.sparkplug
                    )
                    if queue.full():
                        # The writer is behind: stop fetching until it catches up.
                        paused = consumer.assignment()
                        consumer.pause(*paused)
                        self.pauses += 1
                        try:
                            await queue.put(message)
                        finally:
                            consumer.resume(*paused)
                    else:
                        queue.put_nowait(message)
                    self._queued += 1
                    self._idle.clear()
                    self.stats.messages += 1
                    if self.stats.messages % _YIELD_EVERY == 0:
                        # Let the writer go on as soon as the store answers a statement:
                        # decoding a fetch in one go would leave PostgreSQL idle meanwhile.
                        await asyncio.sleep(0)

    async def _write(
        self,
        consumer: AIOKafkaConsumer,
        queues: "list[asyncio.Queue[Received[KafkaAck] | EndOfStream]]",
    ) -> None:
        async with asyncio.TaskGroup() as lanes:
            for queue, writer in zip(queues, self._writers, strict=True):
                lanes.create_task(self._write_lane(consumer, queue, writer))

    async def _write_lane(
        self,
        consumer: AIOKafkaConsumer,
        queue: "asyncio.Queue[Received[KafkaAck] | EndOfStream]",
        writer: TelemetryWriter,
    ) -> None:
        async def commit(prepared: PreparedBatch) -> None:
            collected = prepared.collected
            current = self._current(collected)
            if len(current) != len(prepared.batch):
                # A rebalance while the batch was prepared: write what is still ours.
                prepared = await writer.prepare(current)
            if current:
                advanced = await self._write_until_committed(consumer, writer, prepared)
                for tp, n in advanced.items():
                    if tp in self._epochs:
                        self._stored[tp] = n
                        self.progress.acknowledged(tp, n)
                with contextlib.suppress(KafkaError):
                    # Only for lag tools; the database holds the truth.
                    await consumer.commit({tp: offset for tp, offset in advanced.items()})
            self._queued -= len(collected)
            if self._queued == 0:
                self._idle.set()

        s = self._settings
        await write_ahead(
            queue,
            writer,
            commit,
            max_points=s.batch_max_points,
            max_delay=s.batch_max_delay_seconds,
            keep=self._current,
        )

    def _current(self, batch: Sequence[Received[KafkaAck]]) -> list[Received[KafkaAck]]:
        """The records of partitions still owned in the epoch they were fetched in (records
        fetched before their partition changed hands are left to the new epoch)."""
        return [m for m in batch if self._epochs.get(m.ack.partition) == m.ack.epoch]

    async def _write_until_committed(
        self, consumer: AIOKafkaConsumer, writer: TelemetryWriter, prepared: PreparedBatch
    ) -> dict[TopicPartition, int]:
        """Writes the batch and its offsets in one transaction; returns the new offsets."""
        batch: Sequence[Received[KafkaAck]] = prepared.batch
        advanced: dict[TopicPartition, int] = {}
        for message in batch:
            tp = message.ack.partition
            advanced[tp] = max(advanced.get(tp, 0), message.ack.offset + 1)
        ends = {tp: consumer.highwater(tp) for tp in advanced}
        expected = {tp: self._stored.get(tp) for tp in advanced}
        group = self._settings.kafka_group_id

        keep_births = SparkplugHost.keep_births if self.sparkplug is not None else None

        async def store_offsets(conn: AsyncConnection[Any], _: Refusals) -> None:
            if keep_births is not None:
                await keep_births(conn, batch)
            await _advance(conn, group, expected, advanced, ends)

        await writer.commit_until_done(prepared, in_transaction=store_offsets, noun="records")
        return advanced


async def _advance(
    conn: AsyncConnection[Any],
    group: str,
    expected: dict[TopicPartition, int | None],
    advanced: dict[TopicPartition, int],
    ends: dict[TopicPartition, int | None],
) -> None:
    """Moves the stored offsets on, or raises Fenced if another consumer moved them first."""
    known = [tp for tp in advanced if expected[tp] is not None]
    new = [tp for tp in advanced if expected[tp] is None]
    async with conn.cursor() as cur:
        if known:
            await cur.execute(
                ADVANCE_OFFSETS,
                {
                    "group": group,
                    "topics": [tp.topic for tp in known],
                    "partitions": [tp.partition for tp in known],
                    "expected": [expected[tp] for tp in known],
                    "next": [advanced[tp] for tp in known],
                    "ends": [ends[tp] for tp in known],
                },
            )
            if cur.rowcount != len(known):
                raise Fenced(f"stored offsets of group {group!r} moved under us")
        if new:
            await cur.execute(
                FIRST_OFFSETS,
                {
                    "group": group,
                    "topics": [tp.topic for tp in new],
                    "partitions": [tp.partition for tp in new],
                    "next": [advanced[tp] for tp in new],
                    "ends": [ends[tp] for tp in new],
                },
            )
            if cur.rowcount != len(new):
                raise Fenced(f"another consumer of group {group!r} stored offsets first")


def _lane(tp: TopicPartition, lanes: int) -> int:
    """The lane that writes a partition: the same for as long as this process runs."""
    return (zlib.crc32(str(tp.topic).encode()) + int(tp.partition)) % lanes


def _received(
    record: "ConsumerRecord[bytes, bytes]",
    tp: TopicPartition,
    epoch: int,
    root: str,
    decode: MessageDecoder,
    *,
    now: datetime,
    sparkplug: SparkplugHost | None,
) -> Received[KafkaAck]:
    """Decodes one record: its key names the device (or gateway) as in the MQTT topic, or a
    header names the Sparkplug topic of a Sparkplug payload."""
    # The producer's time, not ours: a backlog read hours later is judged (time window,
    # liveness) by when it was sent. Never later than now.
    sent = datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else now
    received_at = min(sent, now)
    payload = record.value if record.value is not None else b""
    key = _text(record.key)
    sparkplug_topic = _header(record, SPARKPLUG_HEADER)
    outcome: Decoded | Rejected
    if sparkplug_topic is not None:
        if sparkplug is None:
            outcome = Rejected("sparkplug_off", "Sparkplug is off (IIOT_SPARKPLUG_GROUPS)")
        else:
            outcome = sparkplug.decode(sparkplug_topic, payload, received_at)
    elif record.key is None:
        outcome = Rejected("missing_key", "a record's key names its device: {platform}/{device}")
    elif key is None:
        outcome = Rejected("bad_key", "the record key is not UTF-8")
    else:
        outcome = decode(f"{root}/{key}/telemetry", payload, received_at)
        if isinstance(outcome, Rejected) and outcome.reason == "bad_topic":
            outcome = Rejected(
                "bad_key",
                f"key {key[:80]!r} is not {{platform}}/{{device}} or "
                "{platform}/gateways/{gateway}",
                platform=outcome.platform,
            )
    ack = KafkaAck(tp, record.offset, epoch)
    origin = Origin(tp.partition, record.offset, record.key, sparkplug_topic, record.headers)
    return Received("kafka", tp.topic, payload, received_at, outcome, ack, origin)


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _header(record: "ConsumerRecord[bytes, bytes]", name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return _text(value) or ""
    return None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingest: KafkaIngest, consumer: AIOKafkaConsumer) -> None:
        self._ingest = ingest
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._ingest._give_up(sorted(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._ingest._take(self._consumer, sorted(assigned))
