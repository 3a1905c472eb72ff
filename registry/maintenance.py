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
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from registry.lifecycle import LifecycleSettings, Maintenance, Step, check_telemetry_retention
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


@dataclass(frozen=True, slots=True)
class MaintenanceRun:
    started_at: datetime
    finished_at: datetime
    steps: list[Step]

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
            run = MaintenanceRun(started, datetime.now(UTC), steps)
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


async def last_runs(conn: AsyncConnection[Any]) -> LastRuns:
    cur = await conn.execute(LAST_RUNS)
    row = await cur.fetchone()
    return LastRuns(*row) if row is not None else LastRuns(None, None, None)


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
