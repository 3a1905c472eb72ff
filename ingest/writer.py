"""Writes a batch of received messages to the store.

Per batch: resolve platforms, gateways, devices (registering new ones) and metric names in a
short transaction of their own (ingest/resolution.py); encode the points for COPY
(ingest/copy_encoding.py); make sure the telemetry partitions exist; then, in one
transaction, COPY the points, record gateways and liveness, store the dead letters, and run the
caller's own statements (for example Kafka offsets). Only after that commit may the consumer
acknowledge the batch.

Duplicates (a redelivered message, or the same point twice in a batch) make the fast path's COPY
fail on the primary key; the batch is then written again through a staging table with
`ON CONFLICT DO NOTHING`, so a point (device, metric, time) is stored once (docs/adr/0002).

What the store refuses is sorted by SQLSTATE (ingest/isolation.py): a data error isolates the
message that caused it into a dead letter and stores the rest; any other error is about the
store and raises Retryable with nothing committed, so that the batch waits.
"""

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg_pool import AsyncConnectionPool

from ingest.batching import END, AckT, EndOfStream, Received, collect
from ingest.copy_encoding import COPY_TELEMETRY, TelemetryCopy
from ingest.errors import Rejected, Retryable
from ingest.isolation import copy_dead_letters, is_data_error, isolate
from ingest.metering import meter_key
from ingest.resolution import Resolved, Resolver
from ingest.stats import IngestStats
from registry.connection import (
    Counters,
    apply_sessions,
    lock_gateways,
    record_activity,
)
from registry.devices import DeviceDirectory
from registry.usage import record_usage

log = logging.getLogger(__name__)

CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS telemetry_staging
    (time timestamptz, device_id int8, metric_id int4, value float8) ON COMMIT DELETE ROWS
"""
COPY_STAGING = (
    "COPY telemetry_staging (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
)
MERGE_STAGING = """
WITH added AS (
    INSERT INTO telemetry (time, device_id, metric_id, value)
    SELECT DISTINCT ON (device_id, metric_id, time) time, device_id, metric_id, value
    FROM telemetry_staging
    ORDER BY device_id, metric_id, time
    ON CONFLICT DO NOTHING
    RETURNING device_id
)
SELECT device_id, count(*) FROM added GROUP BY device_id
"""
ENSURE_PARTITIONS = "SELECT iiot_ensure_telemetry_partitions(%s, %s)"
_ENCODE_SLICE = 500
_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0  # seconds between attempts while the store is down
UNKNOWN_PLATFORM = "unknown_platform"  # ingest/resolution.py's refusal of a platform not held
Refusals = list[tuple[Received[Any], Rejected]]
InTransaction = Callable[[AsyncConnection[Any], Refusals], Awaitable[None]]
"""Statements a caller runs in the batch's transaction (for example, storing Kafka offsets),
given the messages of the batch that were refused."""


@dataclass(slots=True)
class WriteReport:
    points_written: int = 0
    duplicates_skipped: int = 0
    dead_letters: int = 0
    devices_registered: int = 0

    def add(self, other: "WriteReport") -> "WriteReport":
        return WriteReport(
            self.points_written + other.points_written,
            self.duplicates_skipped + other.duplicates_skipped,
            self.dead_letters + other.dead_letters,
            self.devices_registered + other.devices_registered,
        )


@dataclass(slots=True)
class PreparedBatch:
    """A batch resolved and encoded by `TelemetryWriter.prepare`, ready to commit."""

    batch: Sequence[Received[Any]]
    name: str  # the batch's id in the logs
    started: float
    report: WriteReport = field(default_factory=WriteReport)
    # None: not resolved yet (the store was unavailable); commit resolves it.
    resolved: Resolved | None = None
    # A refusal of the store while resolving: commit isolates the message it refuses.
    failure: psycopg.Error | None = None
    points: bytes = b""  # the points as binary COPY data
    rows: int = 0
    days: tuple[date, date] | None = None  # first and last UTC day of the points
    gateways: set[int] = field(default_factory=set)  # gateways that sent data
    live_devices: set[int] = field(default_factory=set)  # devices that sent live data
    via: dict[int, int] = field(default_factory=dict)  # device -> the gateway it came through
    # What the consumer collected (batch may be a part of it): what it acknowledges.
    collected: Sequence[Received[Any]] = ()


class TelemetryWriter:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        stats: IngestStats,
        counter_shard: int = 0,
        directory: DeviceDirectory | None = None,
        renew_seconds: float = 0.0,
        skip_unknown_platforms: bool = False,
    ) -> None:
        """`skip_unknown_platforms`: a message for a platform the store does not hold belongs
        to another cell (a Kafka topic shared by cells): counted in `stats.foreign_records`,
        not dead-lettered."""
        self._pool = pool
        self._skip_unknown = skip_unknown_platforms
        self._stats = stats
        self._shard = counter_shard
        self.directory = directory or DeviceDirectory()
        self._resolver = Resolver(self.directory, counter_shard=counter_shard)
        self._partition_days: set[date] = set()
        self._id = uuid.uuid4().hex[:8]  # names this writer's batches in the logs
        self._batches = 0
        # Devices' activity renewals are written at most once per renew_seconds: when each
        # device's expiry was last renewed by this writer (the sweeper allows for the lag).
        self._renew = renew_seconds
        self._renewed: dict[int, float] = {}

    async def write(
        self,
        batch: Sequence[Received[Any]],
        *,
        in_transaction: InTransaction | None = None,
        dead_letter: bool = True,
    ) -> WriteReport:
        """Commits the batch; raises Retryable (nothing committed) if the store is unavailable.

        `dead_letter=False` leaves refused messages out of the dead-letter table (a replay of
        dead letters records the outcome on the original rows instead).
        """
        prepared = await self.prepare(batch)
        return await self.commit(prepared, in_transaction=in_transaction, dead_letter=dead_letter)

    async def prepare(self, batch: Sequence[Received[Any]]) -> PreparedBatch:
        """The first half of `write`, which a consumer runs for the next batch while the
        previous one commits: resolves platforms, gateways, devices (registering new ones) and
        metric names, and encodes the points for COPY. Never raises for the store: a batch
        that could not be prepared is prepared again by `commit`."""
        self._batches += 1
        prepared = PreparedBatch(batch, f"{self._id}-{self._batches}", time.perf_counter())
        with structlog.contextvars.bound_contextvars(batch=prepared.name):
            try:
                async with self._pool.connection() as conn:
                    resolved = await self._resolver.resolve(conn, batch)
            except psycopg.Error as exc:
                # Any other error: the commit tries again, and reports the store's state.
                if is_data_error(exc):
                    prepared.failure = exc
                return prepared
        await _encode(prepared, resolved)
        return prepared

    async def commit(
        self,
        prepared: PreparedBatch,
        *,
        in_transaction: InTransaction | None = None,
        dead_letter: bool = True,
    ) -> WriteReport:
        """Writes a prepared batch in one transaction (see `write`); may be called again with
        the same batch after it raised Retryable."""
        batch = prepared.batch
        if prepared.failure is not None:
            return await self._isolate(batch, in_transaction, dead_letter, prepared.failure)
        try:
            with structlog.contextvars.bound_contextvars(batch=prepared.name):
                async with self._pool.connection() as conn:
                    if prepared.resolved is None:
                        await _encode(prepared, await self._resolver.resolve(conn, batch))
                    report = await self._commit(conn, prepared, in_transaction, dead_letter)
        except psycopg.Error as exc:
            if not is_data_error(exc):
                raise Retryable(
                    f"store unavailable or refusing the batch (SQLSTATE {exc.sqlstate}): {exc}"
                ) from exc
            return await self._isolate(batch, in_transaction, dead_letter, exc)
        self._count(report)
        self._stats.write_seconds.observe(time.perf_counter() - prepared.started)
        if batch:
            oldest = min(m.received_at for m in batch)
            self._stats.delay_seconds.observe((datetime.now(UTC) - oldest).total_seconds())
        return report

    async def commit_until_done(
        self,
        prepared: PreparedBatch,
        *,
        in_transaction: InTransaction | None = None,
        noun: str = "messages",
    ) -> None:
        """`commit`, again and again while the store is unavailable (backing off from 0.5 s
        to 10 s), without acknowledging anything meanwhile."""
        delay = _RETRY_FIRST
        while True:
            try:
                await self.commit(prepared, in_transaction=in_transaction)
            except Retryable as exc:
                log.warning(
                    "batch of %d %s not written (%s); retrying in %.1fs",
                    len(prepared.batch),
                    noun,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
            else:
                return

    async def _isolate(
        self,
        batch: Sequence[Received[Any]],
        in_transaction: InTransaction | None,
        dead_letter: bool,
        error: psycopg.Error,
    ) -> WriteReport:
        async def write(part: Sequence[Received[Any]], last: bool) -> WriteReport:
            run = in_transaction if last else None
            return await self.write(part, in_transaction=run, dead_letter=dead_letter)

        return await isolate(batch, error, write)

    async def _commit(
        self,
        conn: AsyncConnection[Any],
        prepared: PreparedBatch,
        in_transaction: InTransaction | None,
        dead_letter: bool,
    ) -> WriteReport:
        batch, resolved, report = prepared.batch, prepared.resolved, prepared.report
        assert resolved is not None  # prepared, or resolved again by commit
        rejected = resolved.rejected
        foreign = 0
        if self._skip_unknown:
            rejected = [r for r in rejected if r[1].reason != UNKNOWN_PLATFORM]
            foreign = len(resolved.rejected) - len(rejected)
        if prepared.days is not None:
            await self._ensure_partitions(conn, *prepared.days)
        seen = max((m.received_at for m in batch), default=datetime.now(UTC))
        moved = self.directory.moved(prepared.via)
        counters = Counters(self._shard)
        gateways, live_devices = prepared.gateways, self._due(prepared.live_devices, seen)
        async with conn.transaction():
            new_by_device = None
            if prepared.rows:
                new_by_device = await self._copy_points(conn, prepared.points)
                report.points_written = (
                    prepared.rows if new_by_device is None else sum(new_by_device.values())
                )
                report.duplicates_skipped = prepared.rows - report.points_written
            await record_usage(conn, resolved.meter.usage(new_by_device), shard=self._shard)
            # State last: the gateway locks it takes are held only until the commit.
            await lock_gateways(
                conn,
                sorted(gateways | {e.subject for e in resolved.gateway_sessions}),
                sorted(live_devices | moved.keys() | {e.subject for e in resolved.device_sessions}),
            )
            await DeviceDirectory.assign_gateways(conn, moved, counters)
            await record_activity(
                conn, counters, gateways=sorted(gateways), devices=sorted(live_devices), seen=seen
            )
            await apply_sessions(
                conn,
                counters,
                gateways=resolved.gateway_sessions,
                devices=resolved.device_sessions,
            )
            if rejected and dead_letter:
                # In arrival order, as operators read them (decoding refusals were found first).
                position = {id(message): n for n, message in enumerate(batch)}
                rejected.sort(key=lambda refusal: position[id(refusal[0])])
                await copy_dead_letters(conn, rejected)
            if in_transaction is not None:
                await in_transaction(conn, rejected)
            await counters.flush(conn)
        self.directory.remember_via(moved)
        self._renewed_at(live_devices, seen)
        report.dead_letters = len(rejected)
        self._stats.foreign_records += foreign
        for message, reason in rejected:
            self._stats.rejected[(reason.platform, reason.reason)] += 1
            log.warning(
                "rejected message on %s: %s (%s)",
                message.topic,
                reason.reason,
                reason.detail[:200],
                extra={
                    "platform": reason.platform,
                    "reason": reason.reason,
                    "topic": message.topic,
                },
            )
        return report

    async def _ensure_partitions(self, conn: AsyncConnection[Any], first: date, last: date) -> None:
        days = {first + timedelta(days=n) for n in range((last - first).days + 1)}
        if days <= self._partition_days:
            return
        async with conn.transaction():
            created = await (await conn.execute(ENSURE_PARTITIONS, (first, last))).fetchone()
        if created and created[0]:
            log.info("created %d telemetry partitions for %s..%s", created[0], first, last)
        self._partition_days |= days

    async def _copy_points(
        self, conn: AsyncConnection[Any], points: bytes
    ) -> dict[int, int] | None:
        """COPYs the encoded points; returns None when all were new, else how many points each
        device newly stored (the rest were already stored)."""
        try:
            async with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_TELEMETRY) as copy:
                await copy.write(points)
        except UniqueViolation:
            log.info("batch holds points stored already: writing through staging")
        else:
            return None
        async with conn.cursor() as cur:
            await cur.execute(CREATE_STAGING)
            async with cur.copy(COPY_STAGING) as copy:
                await copy.write(points)
            await cur.execute(MERGE_STAGING)
            return {device: int(count) for device, count in await cur.fetchall()}

    def _due(self, devices: set[int], seen: datetime) -> set[int]:
        """The devices whose activity renewal is due (all of them when renewals are not
        coalesced). A device renewed less than renew_seconds ago is online in the store: the
        sweeper ends no session before its stored expiry is renew_seconds old."""
        if self._renew <= 0 or not devices:
            return devices
        cutoff = seen.timestamp() - self._renew
        renewed = self._renewed
        return {d for d in devices if renewed.get(d, -math.inf) <= cutoff}

    def _renewed_at(self, devices: set[int], seen: datetime) -> None:
        if self._renew <= 0 or not devices:
            return
        if len(self._renewed) > self.directory.max_cached_ids:
            self._renewed.clear()  # bounded memory: those devices renew again once
        at = seen.timestamp()
        self._renewed.update(dict.fromkeys(devices, at))

    def _count(self, report: WriteReport) -> None:
        stats = self._stats
        stats.batches += 1
        stats.batch_points.observe(report.points_written + report.duplicates_skipped)
        stats.points_written += report.points_written
        stats.duplicates_skipped += report.duplicates_skipped
        stats.devices_registered += report.devices_registered


async def write_ahead(
    queue: "asyncio.Queue[Received[AckT] | EndOfStream]",
    writer: TelemetryWriter,
    commit: Callable[[PreparedBatch], Awaitable[None]],
    *,
    max_points: int,
    max_delay: float,
    keep: Callable[[list[Received[AckT]]], Sequence[Received[Any]]] | None = None,
    revise: Callable[[Sequence[Received[Any]]], Awaitable[Sequence[Received[Any]]]] | None = None,
) -> None:
    """Collects batches from `queue` and prepares each while the batch before it commits;
    `commit` gets each prepared batch in arrival order, until the end of the stream.

    Preparing (resolving ids, encoding the points) is CPU work in this process and committing
    is mostly PostgreSQL's; in sequence, each waited for the other and the two cores were half
    idle (`make bench`). One prepared batch waits while one commits and the next is prepared,
    so at most three batches are between the queue and the acknowledgement. `keep` filters a
    batch before it is prepared (Kafka drops records of partitions it no longer owns); what
    was collected stays in `PreparedBatch.collected` either way. `revise` may replace messages
    of a batch before it is prepared (MQTT gives redeliveries their first arrival time).
    """
    ready: asyncio.Queue[PreparedBatch | EndOfStream] = asyncio.Queue(1)

    async def prepare_ahead() -> None:
        ended = False
        while not ended:
            batch, ended = await collect(queue, max_points=max_points, max_delay=max_delay)
            if batch:
                kept: Sequence[Received[Any]] = keep(batch) if keep is not None else batch
                if revise is not None:
                    kept = await revise(kept)
                prepared = await writer.prepare(kept)
                prepared.collected = batch
                await ready.put(prepared)
        await ready.put(END)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(prepare_ahead())
        while not isinstance(prepared := await ready.get(), EndOfStream):
            await commit(prepared)


async def _encode(prepared: PreparedBatch, resolved: Resolved) -> None:
    """Takes the resolved batch into `prepared`: encodes the accepted points for COPY and
    meters them; notes the gateways and devices they came from, and meters the refused
    messages of platforms that exist.

    Yields to the event loop every _ENCODE_SLICE messages: the previous batch's commit is
    waiting on PostgreSQL meanwhile, and goes on sooner when the store answers."""
    prepared.resolved = resolved
    prepared.report.devices_registered = resolved.devices_registered
    meter = resolved.meter
    points = TelemetryCopy(resolved.metric_ids)
    add = points.add
    first: datetime | None = None
    last: datetime | None = None
    for n, accepted in enumerate(resolved.telemetry, 1):
        if n % _ENCODE_SLICE == 0:
            await asyncio.sleep(0)
        device, telemetry = accepted.device, accepted.telemetry
        add(device, telemetry.points)
        meter.points(accepted.key, device, len(telemetry.points))
        first = telemetry.first if first is None else min(first, telemetry.first)
        last = telemetry.last if last is None else max(last, telemetry.last)
        if accepted.gateway is not None:
            # A gateway that sends anything, even back-filled data, is alive now.
            prepared.gateways.add(accepted.gateway)
            prepared.via[device] = accepted.gateway
        if not telemetry.historical:
            prepared.live_devices.add(device)
    prepared.rows = points.rows
    if prepared.rows:
        prepared.points = points.data()
    if first is not None and last is not None:
        prepared.days = (_utc_day(first), _utc_day(last))
    for message, reason in resolved.rejected:
        if reason.platform in resolved.platforms:
            meter.refused(meter_key(reason.platform, message.received_at, message.source))


def _utc_day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()
