"""The lifecycle of every growing table: retention, the usage ledger's roll-up and the count
history's downsampling (docs/operations.md). `maintain` applies each step once; each step is
idempotent, so a second run right after the first does nothing.

Time-partitioned tables (telemetry, connection_events, count_history, usage_ledger) lose whole
UTC days: a day partition (or TimescaleDB chunk) is dropped once all of it is past retention.
Rows their default partition caught, and the small unpartitioned tables (dead_letters,
reconciliations, maintenance_runs), are deleted in batches, each its own transaction.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from pydantic import Field

from registry.settings import StoreSettings

log = logging.getLogger(__name__)


class LifecycleSettings(StoreSettings):
    """How long each growing table keeps its rows, and how often maintenance runs."""

    retention_telemetry_days: int = Field(
        default=30,
        ge=1,
        description="Days of telemetry kept (whole UTC days); never shorter than the ingest "
        "time window (IIOT_TIME_WINDOW_PAST_SECONDS).",
    )
    retention_connection_events_days: int = Field(default=90, ge=1)
    retention_dead_letters_days: int = Field(
        default=30, ge=1, description="Dead letters can be replayed until then."
    )
    retention_reconciliations_days: int = Field(default=90, ge=1)
    count_history_minute_days: int = Field(
        default=7, ge=1, description="Count samples older than this are downsampled to hours."
    )
    retention_count_history_days: int = Field(default=730, ge=1)
    usage_ledger_settle_days: int = Field(
        default=7,
        ge=1,
        description="The ledger's per-batch rows are rolled up into daily rows this many days "
        "after they were recorded.",
    )
    maintain_interval_seconds: float = Field(
        default=3600,
        ge=0,
        description="`iiot run` and ingest processes run maintenance this often (one runner at "
        "a time across processes); 0 leaves it to `iiot maintain` (a CronJob).",
    )
    maintain_partitions_ahead_days: int = Field(default=7, ge=1, le=60)
    maintain_lock_timeout_seconds: float = Field(
        default=5,
        gt=0,
        description="Dropping or creating a partition waits at most this long for the table's "
        "lock (a long query holds it); the step then fails and the next run retries it.",
    )


# Tables partitioned by day whose partitions maintenance makes ahead (telemetry's writer makes
# its own on demand; making them ahead too costs nothing).
DAILY_TABLES = ("telemetry", "connection_events", "count_history", "usage_ledger")
ENSURE_PARTITIONS = "SELECT iiot_ensure_daily_partitions(%s, %s, %s)"
DROP_PARTITIONS = "SELECT iiot_drop_daily_partitions(%s, %s)"
DAILY_PARTITIONS = "SELECT name, day FROM iiot_daily_partitions(%s) WHERE day < %s"
DEFAULT_PARTITION = "SELECT to_regclass(%s)::text"
# Deletes one batch of rows older than a cutoff, whatever else the table holds.
DELETE_BATCH = """
DELETE FROM {table} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table} WHERE {column} < %(cutoff)s LIMIT %(limit)s))
"""

# Adds a day partition's (or the default partition's old) per-batch rows to the daily rows.
ROLL_UP = """
INSERT INTO usage_ledger_daily AS d
    (platform_id, day, source, messages, bytes, points, duplicate_points, refused_messages,
     batches)
SELECT platform_id, day, source, sum(messages), sum(bytes), sum(points), sum(duplicate_points),
       sum(refused_messages), count(*)
FROM {rows}
GROUP BY platform_id, day, source
ORDER BY platform_id, day, source
ON CONFLICT (platform_id, day, source) DO UPDATE SET
    messages = d.messages + excluded.messages,
    bytes = d.bytes + excluded.bytes,
    points = d.points + excluded.points,
    duplicate_points = d.duplicate_points + excluded.duplicate_points,
    refused_messages = d.refused_messages + excluded.refused_messages,
    batches = d.batches + excluded.batches
"""
DROP_TABLE = "DROP TABLE {table}"
DELETE_OLD_LEDGER_ROWS = """
WITH gone AS (DELETE FROM usage_ledger_default WHERE recorded_at < %(cutoff)s RETURNING *)
""" + ROLL_UP.format(rows="gone")

# One UTC day of count samples to hourly rows: every hour of a platform not already a single
# row on the hour is replaced by one that keeps its last counts, its connected device-seconds
# and its lowest and highest count. Deleting a key and inserting it again in one statement is
# allowed (the insert sees the delete).
HOUR = "date_bin('1 hour', time, timestamptz '2000-01-01')"
DOWNSAMPLE_DAY = f"""
WITH gone AS (
    DELETE FROM count_history
    WHERE time >= %(start)s AND time < %(end)s
      AND (platform_id, {HOUR}) IN (
          SELECT platform_id, {HOUR} FROM count_history
          WHERE time >= %(start)s AND time < %(end)s AND time <> {HOUR})
    RETURNING *
)
INSERT INTO count_history (time, platform_id, registered, connected, ever_connected, seconds,
                           connected_seconds, connected_min, connected_max)
SELECT {HOUR}, platform_id,
       (array_agg(registered ORDER BY time DESC))[1],
       (array_agg(connected ORDER BY time DESC))[1],
       (array_agg(ever_connected ORDER BY time DESC))[1],
       sum(seconds), sum(coalesce(connected_seconds, connected * seconds)),
       min(coalesce(connected_min, connected)), max(coalesce(connected_max, connected))
FROM gone
GROUP BY {HOUR}, platform_id
"""
DOWNSAMPLED_THROUGH = "SELECT through FROM maintenance_progress WHERE step = 'count_history'"
OLDEST_SAMPLE = "SELECT min(time) FROM count_history WHERE time < %s"
SET_DOWNSAMPLED_THROUGH = """
INSERT INTO maintenance_progress (step, through) VALUES ('count_history', %s)
ON CONFLICT (step) DO UPDATE SET through = excluded.through
"""

TIMESCALE = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
HYPERTABLE = "SELECT relkind <> 'p' FROM pg_class WHERE oid = %s::regclass"
POLICY = """
SELECT (config->>%(setting)s)::interval FROM timescaledb_information.jobs
WHERE proc_name = %(proc)s AND hypertable_schema = current_schema()
  AND hypertable_name = %(table)s
"""
REMOVE_RETENTION = "SELECT remove_retention_policy(%s::regclass, if_exists => true)"
ADD_RETENTION = "SELECT add_retention_policy(%s::regclass, drop_after => %s::interval)"
REMOVE_COMPRESSION = "SELECT remove_compression_policy(%s::regclass, if_exists => true)"
ADD_COMPRESSION = "SELECT add_compression_policy(%s::regclass, compress_after => %s::interval)"
POLICIES = """
SELECT j.hypertable_name, j.proc_name, j.config::text, s.last_run_status,
       s.last_successful_finish
FROM timescaledb_information.jobs j
LEFT JOIN timescaledb_information.job_stats s USING (job_id)
WHERE j.hypertable_schema = current_schema()
ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of maintenance did to one table: `count` partitions or rows `action`."""

    table: str
    action: str
    count: int
    error: str | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.table}: {self.action} FAILED: {self.error}"
        return f"{self.table}: {self.count} {self.action}"


class Maintenance:
    """One maintenance pass over the store at `now`, on an autocommit connection: each step
    commits on its own, so a step that fails (a lock not granted in time) costs only itself."""

    def __init__(
        self,
        conn: AsyncConnection[Any],
        settings: LifecycleSettings,
        *,
        ingest_window: timedelta,
        now: datetime | None = None,
        batch_rows: int = 10_000,
    ) -> None:
        check_telemetry_retention(settings, ingest_window)
        self._conn = conn
        self._settings = settings
        self._window = ingest_window
        self._now = now or datetime.now(UTC)
        self._today = self._now.astimezone(UTC).date()
        self._batch = batch_rows
        self.steps: list[Step] = []

    async def run(self) -> list[Step]:
        s = self._settings
        await self._conn.execute(
            sql.SQL("SET lock_timeout = {}").format(
                sql.Literal(f"{int(s.maintain_lock_timeout_seconds * 1000)}ms")
            )
        )
        ahead = self._today + timedelta(s.maintain_partitions_ahead_days)
        for table in DAILY_TABLES:
            await self._step(
                table, "partitions created", ENSURE_PARTITIONS, table, self._today, ahead
            )
        if await scalar(self._conn, TIMESCALE):
            await self._timescale_policies()
        await self._retention("telemetry", "time", s.retention_telemetry_days)
        await self._retention("connection_events", "time", s.retention_connection_events_days)
        await self._roll_up_ledger(self._cutoff(s.usage_ledger_settle_days))
        await self._retention("count_history", "time", s.retention_count_history_days)
        await self._downsample_count_history(
            self._cutoff(s.retention_count_history_days),
            self._cutoff(s.count_history_minute_days),
        )
        await self._delete("dead_letters", "received_at", s.retention_dead_letters_days)
        await self._delete("reconciliations", "time", s.retention_reconciliations_days)
        await self._delete("maintenance_runs", "finished_at", 90)
        return self.steps

    async def _step(self, table: str, action: str, query: str, *params: Any) -> None:
        """A step that is one statement returning its count."""
        try:
            count = int(await scalar(self._conn, query, *params) or 0)
        except psycopg.Error as exc:
            self._failed(table, action, exc)
        else:
            self.steps.append(Step(table, action, count))

    def _failed(self, table: str, action: str, exc: psycopg.Error) -> None:
        log.warning("maintenance of %s (%s) failed: %s", table, action, exc)
        self.steps.append(Step(table, action, 0, error=f"{type(exc).__name__}: {exc}"))

    def _cutoff(self, keep_days: int) -> date:
        """The first day kept: rows of earlier UTC days are past retention."""
        return self._today - timedelta(keep_days)

    async def _retention(self, table: str, column: str, keep_days: int) -> None:
        cutoff = self._cutoff(keep_days)
        await self._step(table, "partitions dropped", DROP_PARTITIONS, table, cutoff)
        default = await scalar(self._conn, DEFAULT_PARTITION, f"{table}_default")
        if default is not None:
            await self._delete(f"{table}_default", column, keep_days)

    async def _delete(self, table: str, column: str, keep_days: int) -> None:
        """Deletes rows of days past retention in batches, each batch its own transaction."""
        cutoff = _midnight(self._cutoff(keep_days))
        query = sql.SQL(DELETE_BATCH).format(
            table=sql.Identifier(table), column=sql.Identifier(column)
        )
        deleted = 0
        try:
            while True:
                cur = await self._conn.execute(query, {"cutoff": cutoff, "limit": self._batch})
                deleted += cur.rowcount
                if cur.rowcount < self._batch:
                    break
        except psycopg.Error as exc:
            self._failed(table, "rows deleted", exc)
        else:
            self.steps.append(Step(table, "rows deleted", deleted))

    async def _roll_up_ledger(self, settled: date) -> None:
        """Folds each day partition recorded before `settled` into usage_ledger_daily and drops
        it, in one transaction: the ledger's totals per day are the same before and after."""
        action = "partitions rolled up"
        rolled = 0
        try:
            cur = await self._conn.execute(DAILY_PARTITIONS, ("usage_ledger", settled))
            for name, _ in await cur.fetchall():
                part = sql.Identifier(name)
                async with self._conn.transaction():
                    await self._conn.execute(sql.SQL(ROLL_UP).format(rows=part))
                    await self._conn.execute(sql.SQL(DROP_TABLE).format(table=part))
                rolled += 1
            # Deleting from the default partition itself passes the ledger's append-only
            # trigger, which guards statements on usage_ledger.
            cur = await self._conn.execute(DELETE_OLD_LEDGER_ROWS, {"cutoff": _midnight(settled)})
        except psycopg.Error as exc:
            self._failed("usage_ledger", action, exc)
            return
        self.steps.append(Step("usage_ledger", action, rolled))
        self.steps.append(Step("usage_ledger_default", "daily rows added to", cur.rowcount))

    async def _downsample_count_history(self, kept: date, before: date) -> None:
        """Minute samples of each UTC day from `kept` (the oldest day retention keeps) to
        `before` to hours, one day per transaction; remembers how far it got, so a run reads only
        days it has not done."""
        action = "hours downsampled"
        hours = 0
        try:
            day = await scalar(self._conn, DOWNSAMPLED_THROUGH)
            if day is None:
                oldest = await scalar(self._conn, OLDEST_SAMPLE, _midnight(before))
                day = before if oldest is None else oldest.astimezone(UTC).date()
            day = max(day, kept)
            while day < before:
                async with self._conn.transaction():
                    cur = await self._conn.execute(
                        DOWNSAMPLE_DAY,
                        {"start": _midnight(day), "end": _midnight(day + timedelta(1))},
                    )
                    hours += cur.rowcount
                    day += timedelta(1)
                    await self._conn.execute(SET_DOWNSAMPLED_THROUGH, (day,))
        except psycopg.Error as exc:
            self._failed("count_history", action, exc)
        else:
            self.steps.append(Step("count_history", action, hours))

    async def _timescale_policies(self) -> None:
        """Where TimescaleDB runs, its own jobs apply retention and compression to hypertables:
        their settings are kept equal to ours here (and maintenance drops chunks too, at once).
        Compression waits a day past the ingest window, so accepted points never land in a
        compressed chunk."""
        s = self._settings
        wanted = [
            ("telemetry", "policy_retention", "drop_after", s.retention_telemetry_days),
            ("connection_events", "policy_retention", "drop_after",
             s.retention_connection_events_days),
            ("telemetry", "policy_compression", "compress_after",
             max(7, -(-int(self._window.total_seconds()) // 86400) + 1)),
        ]  # fmt: skip
        for table, proc, setting, days in wanted:
            action = f"{proc} set to {days} days"
            try:
                if not await scalar(self._conn, HYPERTABLE, table):
                    continue
                args = {"setting": setting, "proc": proc, "table": table}
                if await self._policy(args) == timedelta(days):
                    continue
                remove, add = (
                    (REMOVE_RETENTION, ADD_RETENTION)
                    if proc == "policy_retention"
                    else (REMOVE_COMPRESSION, ADD_COMPRESSION)
                )
                async with self._conn.transaction():
                    await self._conn.execute(remove, (table,))
                    await self._conn.execute(add, (table, timedelta(days)))
            except psycopg.Error as exc:
                self._failed(table, action, exc)
            else:
                self.steps.append(Step(table, action, 1))

    async def _policy(self, args: dict[str, Any]) -> timedelta | None:
        cur = await self._conn.execute(POLICY, args)
        row = await cur.fetchone()
        return None if row is None else row[0]


def check_telemetry_retention(settings: LifecycleSettings, ingest_window: timedelta) -> None:
    if timedelta(days=settings.retention_telemetry_days) < ingest_window:
        raise ValueError(
            f"IIOT_RETENTION_TELEMETRY_DAYS ({settings.retention_telemetry_days}) is shorter "
            f"than the ingest time window ({ingest_window}, IIOT_TIME_WINDOW_PAST_SECONDS): "
            "accepted points would be dropped; raise the retention or shorten the window"
        )


async def timescale_jobs(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    """TimescaleDB's retention and compression jobs on this schema's hypertables (none on plain
    PostgreSQL): table, job, configuration, last run's status and last success."""
    if await (await conn.execute(TIMESCALE)).fetchone() != (True,):
        return []
    cur = await conn.execute(POLICIES)
    return list(await cur.fetchall())


async def scalar(conn: AsyncConnection[Any], query: str | sql.Composed, *params: Any) -> Any:
    """The first column of the first row (None without a row)."""
    cur = await conn.execute(query, params or None)
    row = await cur.fetchone()
    return None if row is None else row[0]


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
