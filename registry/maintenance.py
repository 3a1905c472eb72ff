"""Maintenance runs: `iiot maintain --once`, a CronJob, or a service inside `iiot run` and the
ingest processes. Any number of them may be scheduled; an advisory lock lets one run at a time
and the others skip their turn. Every run is recorded in `maintenance_runs` with what each step
did, which `/metrics` and the alert on stale maintenance read.
"""

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from registry.lifecycle import (
    DEFAULT_PARTITION,
    TIMESCALE,
    LifecycleSettings,
    Maintenance,
    Step,
    check_telemetry_retention,
    scalar,
    timescale_jobs,
)
from registry.store import connect

log = logging.getLogger(__name__)

TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(current_schema() || '.iiot_maintain'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema() || '.iiot_maintain'))"
RECORD = """
INSERT INTO maintenance_runs (started_at, finished_at, succeeded, steps, error)
VALUES (%s, %s, %s, %s, %s)
"""
# The newest run, and the newest that succeeded.
LAST_RUNS = """
SELECT newest.finished_at, newest.succeeded,
       (SELECT max(finished_at) FROM maintenance_runs WHERE succeeded)
FROM (VALUES (1)) one
LEFT JOIN LATERAL (SELECT finished_at, succeeded FROM maintenance_runs ORDER BY id DESC LIMIT 1)
    newest ON true
"""

# Each growing table and the column its age is read from.
GROWING_TABLES = {
    "telemetry": "time",
    "connection_events": "time",
    "count_history": "time",
    "usage_ledger": "recorded_at",
    "usage_ledger_daily": None,
    "dead_letters": "received_at",
    "reconciliations": "time",
    "maintenance_runs": "finished_at",
}
# A table with all its partitions or chunks (TimescaleDB's compressed copies aside).
TABLE_BYTES = """
WITH RECURSIVE tree (oid) AS (
    SELECT %s::regclass::oid
    UNION ALL
    SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT sum(pg_total_relation_size(oid))::bigint FROM tree
"""
PARTITIONED = "SELECT relkind = 'p' FROM pg_class WHERE oid = %s::regclass"
OLDEST_CHUNK = """
SELECT min(range_start) FROM timescaledb_information.chunks
WHERE hypertable_schema = current_schema() AND hypertable_name = %s
"""
OLDEST_ROW = "SELECT min({column}) FROM {table}"
DAILY_PARTITIONS = "SELECT name, day FROM iiot_daily_partitions(%s)"
HOLDS_ROWS = "SELECT EXISTS (SELECT 1 FROM {table})"


@dataclass(frozen=True, slots=True)
class TableFigures:
    table: str
    bytes: int
    oldest: datetime | None


@dataclass(frozen=True, slots=True)
class MaintenanceRun:
    started_at: datetime
    finished_at: datetime
    steps: list[Step]
    # TimescaleDB's own jobs on this schema's hypertables, as lines (none on plain PostgreSQL).
    timescale_jobs: list[str]

    @property
    def succeeded(self) -> bool:
        return all(step.error is None for step in self.steps)

    def summary(self) -> str:
        done = [str(step) for step in self.steps if step.count or step.error]
        outcome = "succeeded" if self.succeeded else "FAILED"
        seconds = (self.finished_at - self.started_at).total_seconds()
        lines = [f"maintenance {outcome} in {seconds:.1f} s", *(f"  {line}" for line in done)]
        if not done:
            lines.append("  nothing to do")
        if self.timescale_jobs:
            lines += ["TimescaleDB jobs:", *(f"  {job}" for job in self.timescale_jobs)]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class LastRuns:
    finished_at: datetime | None
    succeeded: bool | None
    last_success: datetime | None


async def maintain_once(
    settings: LifecycleSettings, *, ingest_window: timedelta, now: datetime | None = None
) -> MaintenanceRun | None:
    """Applies every lifecycle step once and records the run; None when another process is
    running maintenance (it holds the lock)."""
    async with await connect(settings, autocommit=True) as conn:
        locked = await (await conn.execute(TRY_LOCK)).fetchone()
        if not locked or not locked[0]:
            return None
        try:
            started = datetime.now(UTC)
            steps = await Maintenance(conn, settings, ingest_window=ingest_window, now=now).run()
            run = MaintenanceRun(started, datetime.now(UTC), steps, await _jobs(conn))
            failed = [str(step) for step in steps if step.error is not None]
            await conn.execute(
                RECORD,
                (
                    run.started_at,
                    run.finished_at,
                    run.succeeded,
                    Jsonb([asdict(step) for step in steps]),
                    "; ".join(failed) or None,
                ),
            )
        finally:
            await conn.execute(UNLOCK)
    return run


async def _jobs(conn: AsyncConnection[Any]) -> list[str]:
    try:
        return [
            f"{table}: {proc} {config}, last run {status} (last success {success})"
            for table, proc, config, status, success in await timescale_jobs(conn)
        ]
    except psycopg.Error as exc:  # a report only: the run itself is what counts
        return [f"not readable: {exc}"]


async def last_runs(conn: AsyncConnection[Any]) -> LastRuns:
    cur = await conn.execute(LAST_RUNS)
    row = await cur.fetchone()
    return LastRuns(*row) if row is not None else LastRuns(None, None, None)


async def table_figures(conn: AsyncConnection[Any]) -> list[TableFigures]:
    """Each growing table's size on disk and the time of its oldest row: for a table partitioned
    by day the start of its oldest day that holds a row (or the default partition's oldest row),
    so that no figure scans a large table."""
    timescale = await scalar(conn, TIMESCALE)
    figures = []
    for table, column in GROWING_TABLES.items():
        size = int(await scalar(conn, TABLE_BYTES, table) or 0)
        oldest: datetime | None = None
        if column is not None:
            oldest = await _oldest(conn, table, column, timescale=bool(timescale))
        figures.append(TableFigures(table, size, oldest))
    return figures


async def _oldest(
    conn: AsyncConnection[Any], table: str, column: str, *, timescale: bool
) -> datetime | None:
    def oldest_row(name: str) -> sql.Composed:
        return sql.SQL(OLDEST_ROW).format(column=sql.Identifier(column), table=sql.Identifier(name))

    found: list[datetime | None] = []
    partitioned = await scalar(conn, PARTITIONED, table)
    if not partitioned and timescale and table in ("telemetry", "connection_events"):
        found.append(await scalar(conn, OLDEST_CHUNK, table))  # a hypertable
    elif not partitioned:
        found.append(await scalar(conn, oldest_row(table)))
    else:
        if await scalar(conn, DEFAULT_PARTITION, f"{table}_default") is not None:
            found.append(await scalar(conn, oldest_row(f"{table}_default")))
        cur = await conn.execute(DAILY_PARTITIONS, (table,))
        for name, day in await cur.fetchall():
            if await scalar(conn, sql.SQL(HOLDS_ROWS).format(table=sql.Identifier(name))):
                found.append(datetime(day.year, day.month, day.day, tzinfo=UTC))
                break
    return min((at for at in found if at is not None), default=None)


class Maintainer:
    """Runs maintenance every `interval` seconds, the first time a minute after it starts (a
    process that restarts in a loop does not also maintain in a loop)."""

    def __init__(
        self,
        settings: LifecycleSettings,
        *,
        ingest_window: timedelta,
        first_delay: float = 60.0,
    ) -> None:
        check_telemetry_retention(settings, ingest_window)
        self._settings = settings
        self._window = ingest_window
        self._first_delay = first_delay
        self._stopping = asyncio.Event()
        self.runs = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        wait = min(self._first_delay, self._settings.maintain_interval_seconds)
        while not await self._stopped_within(wait):
            try:
                run = await maintain_once(self._settings, ingest_window=self._window)
            except psycopg.OperationalError as exc:
                log.warning("maintenance failed (%s); next turn", exc)
            else:
                if run is not None:
                    self.runs += 1
                    (log.info if run.succeeded else log.error)("%s", run.summary())
            wait = self._settings.maintain_interval_seconds

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()
