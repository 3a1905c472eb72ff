"""Writes a batch of received messages to the store in one transaction.

Per batch: resolve platforms, devices (registering new ones) and metric names; make sure the
telemetry partitions exist; then, in one transaction, COPY the points, mark live devices as seen
and record the dead letters. Only after that commit may the consumer acknowledge the batch.

Duplicates (a redelivered message, or the same point twice in a batch) make the fast path's COPY
fail on the primary key; the batch is then written again through a staging table with
`ON CONFLICT DO NOTHING`, so a point (device, metric, time) is stored once (docs/adr/0002).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import Telemetry
from ingest.errors import Rejected, Retryable
from ingest.metric_names import MetricNames
from ingest.stats import IngestStats
from registry.devices import DeviceDirectory, DeviceKey

log = logging.getLogger(__name__)

COPY_TELEMETRY = "COPY telemetry (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
TELEMETRY_TYPES = ("timestamptz", "int8", "int4", "float8")
CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS telemetry_staging
    (time timestamptz, device_id int8, metric_id int4, value float8) ON COMMIT DELETE ROWS
"""
COPY_STAGING = (
    "COPY telemetry_staging (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
)
MERGE_STAGING = """
INSERT INTO telemetry (time, device_id, metric_id, value)
SELECT DISTINCT ON (device_id, metric_id, time) time, device_id, metric_id, value
FROM telemetry_staging
ORDER BY device_id, metric_id, time
ON CONFLICT DO NOTHING
"""
ENSURE_PARTITIONS = "SELECT iiot_ensure_telemetry_partitions(%s, %s)"
COPY_DEAD_LETTERS = """
COPY dead_letters (received_at, source, topic, platform_id, reason, detail, payload)
FROM STDIN (FORMAT BINARY)
"""
DEAD_LETTER_TYPES = ("timestamptz", "text", "text", "text", "text", "text", "bytea")

Row = tuple[datetime, int, int, float]


@dataclass(slots=True)
class WriteReport:
    points_written: int = 0
    duplicates_skipped: int = 0
    dead_letters: int = 0
    devices_registered: int = 0


class TelemetryWriter:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        stats: IngestStats,
        directory: DeviceDirectory | None = None,
    ) -> None:
        self._pool = pool
        self._stats = stats
        self._directory = directory or DeviceDirectory()
        self._metrics = MetricNames()
        self._partition_days: set[date] = set()

    async def write(self, batch: Sequence[Received[Any]]) -> WriteReport:
        """Commits the batch; raises Retryable (nothing committed) if the store is unavailable."""
        try:
            async with self._pool.connection() as conn:
                return await self._write(conn, batch)
        except psycopg.OperationalError as exc:
            raise Retryable(f"store unavailable: {exc}") from exc

    async def ensure_partitions(self, first: date, last: date) -> None:
        async with self._pool.connection() as conn:
            await self._ensure_partitions(conn, first, last)

    async def _write(
        self, conn: AsyncConnection[Any], batch: Sequence[Received[Any]]
    ) -> WriteReport:
        report = WriteReport()
        accepted, rejected, metric_ids = await self._resolve(conn, batch, report)
        rows: list[Row] = []
        live: set[int] = set()
        if accepted:
            first = min(t.first for _, t in accepted)
            last = max(t.last for _, t in accepted)
            await self._ensure_partitions(conn, _utc_day(first), _utc_day(last))
            for device_id, telemetry in accepted:
                rows.extend(
                    (ts, device_id, metric_ids[name], value) for ts, name, value in telemetry.points
                )
                if not telemetry.historical:
                    live.add(device_id)
        seen = max((m.received_at for m in batch), default=datetime.now(UTC))
        async with conn.transaction():
            if rows:
                report.points_written = await self._copy_points(conn, rows)
                report.duplicates_skipped = len(rows) - report.points_written
            await DeviceDirectory.mark_seen(conn, sorted(live), seen)
            if rejected:
                await _copy_dead_letters(conn, rejected)
        report.dead_letters = len(rejected)
        self._count(report, rejected)
        return report

    async def _resolve(
        self, conn: AsyncConnection[Any], batch: Sequence[Received[Any]], report: WriteReport
    ) -> tuple[list[tuple[int, Telemetry]], list[tuple[Received[Any], Rejected]], dict[str, int]]:
        """Splits the batch into writable telemetry and rejections.

        Runs in its own transaction: registrations commit even if the batch later fails, so the
        cached ids always name rows that exist.
        """
        rejected: list[tuple[Received[Any], Rejected]] = []
        telemetry: list[tuple[Received[Any], Telemetry]] = []
        for message in batch:
            if isinstance(message.outcome, Rejected):
                rejected.append((message, message.outcome))
            else:
                telemetry.append((message, message.outcome))
        accepted: list[tuple[int, Telemetry]] = []
        if not telemetry:
            return accepted, rejected, {}
        async with conn.transaction():
            platforms = await self._directory.platforms(conn, {t.platform for _, t in telemetry})
            provisioned: set[DeviceKey] = set()
            for message, t in telemetry:
                platform = platforms.get(t.platform)
                if platform is None:
                    rejected.append(
                        (
                            message,
                            Rejected(
                                "unknown_platform",
                                f"no platform {t.platform!r} is registered",
                                platform=t.platform,
                            ),
                        )
                    )
                elif platform.auto_provision:
                    provisioned.add((t.platform, t.device))
            keys = {(t.platform, t.device) for _, t in telemetry if t.platform in platforms}
            device_ids, registered = await self._directory.resolve(conn, keys, register=provisioned)
            report.devices_registered = registered
            names = {name for _, t in telemetry for _, name, _ in t.points}
            metric_ids = await self._metrics.resolve(conn, names)
        self._directory.remember(device_ids)
        self._metrics.remember(metric_ids)
        for message, t in telemetry:
            if t.platform not in platforms:
                continue
            device_id = device_ids.get((t.platform, t.device))
            if device_id is None:
                rejected.append(
                    (
                        message,
                        Rejected(
                            "unknown_device",
                            f"device {t.device!r} is not registered and platform {t.platform!r} "
                            "does not provision devices automatically",
                            platform=t.platform,
                        ),
                    )
                )
            else:
                accepted.append((device_id, t))
        return accepted, rejected, metric_ids

    async def _ensure_partitions(self, conn: AsyncConnection[Any], first: date, last: date) -> None:
        days = {first + timedelta(days=n) for n in range((last - first).days + 1)}
        if days <= self._partition_days:
            return
        async with conn.transaction():
            created = await (await conn.execute(ENSURE_PARTITIONS, (first, last))).fetchone()
        if created and created[0]:
            log.info("created %d telemetry partitions for %s..%s", created[0], first, last)
        self._partition_days |= days

    async def _copy_points(self, conn: AsyncConnection[Any], rows: list[Row]) -> int:
        """COPYs the rows; returns how many were new (the rest were already stored)."""
        try:
            async with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_TELEMETRY) as copy:
                copy.set_types(TELEMETRY_TYPES)
                for row in rows:
                    await copy.write_row(row)
            return len(rows)
        except UniqueViolation:
            log.info("batch of %d points holds duplicates: writing through staging", len(rows))
        async with conn.cursor() as cur:
            await cur.execute(CREATE_STAGING)
            async with cur.copy(COPY_STAGING) as copy:
                copy.set_types(TELEMETRY_TYPES)
                for row in rows:
                    await copy.write_row(row)
            await cur.execute(MERGE_STAGING)
            return cur.rowcount

    def _count(self, report: WriteReport, rejected: list[tuple[Received[Any], Rejected]]) -> None:
        stats = self._stats
        stats.batches += 1
        stats.points_written += report.points_written
        stats.duplicates_skipped += report.duplicates_skipped
        stats.devices_registered += report.devices_registered
        for message, reason in rejected:
            stats.rejected[(reason.platform, reason.reason)] += 1
            log.warning(
                "rejected message on %s: %s (%s)", message.topic, reason.reason, reason.detail[:200]
            )


async def _copy_dead_letters(
    conn: AsyncConnection[Any], rejected: list[tuple[Received[Any], Rejected]]
) -> None:
    async with conn.cursor() as cur, cur.copy(COPY_DEAD_LETTERS) as copy:
        copy.set_types(DEAD_LETTER_TYPES)
        for message, reason in rejected:
            await copy.write_row(
                (
                    message.received_at,
                    message.source,
                    message.topic,
                    reason.platform,
                    reason.reason,
                    reason.detail,
                    message.payload,
                )
            )


def _utc_day(ts: datetime) -> date:
    return ts.astimezone(UTC).date()
