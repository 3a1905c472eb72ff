"""The sweeper: ends activity sessions whose liveness window has passed.

Offline detection is late by at most one interval (default 1 s) plus the grace that ingest's
coalesced renewals need (`activity_renew_seconds`, default 5 s), and the state change is stamped
with the stored expiry time (the last renewal's, early by less than that grace). Several
sweepers (one per ingest process) share the work: each takes rows the others have not locked.
"""

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool

from registry.connection import Counters, sweep

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        counter_shard: int,
        interval: float = 1.0,
        batch_limit: int = 10_000,
        grace: timedelta = timedelta(0),
    ) -> None:
        self._pool = pool
        self._shard = counter_shard
        self._interval = interval
        self._limit = batch_limit
        # Ingest renews a device's stored expiry at most this often (activity_renew_seconds):
        # a session ends only once its stored expiry is this far in the past.
        self._grace = grace
        self._stopping = asyncio.Event()
        self.expired = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                while await self.sweep_once() == self._limit:
                    pass  # more expired than one pass takes: keep going
            except psycopg.OperationalError as exc:
                log.warning("sweep failed (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()

    async def sweep_once(self, now: datetime | None = None) -> int:
        """One pass at `now` (the current time unless given); returns the rows it turned offline."""
        counters = Counters(self._shard)
        async with self._pool.connection() as conn, conn.transaction():
            changed = await sweep(
                conn, counters, now or datetime.now(UTC), self._limit, device_grace=self._grace
            )
            await counters.flush(conn)
        self.expired += changed
        return changed
