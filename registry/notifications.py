"""Registry changes announced to running processes (PostgreSQL LISTEN/NOTIFY).

An operator's change (a device decommissioned, a platform's liveness window or provisioning
policy changed) is NOTIFYed on `iiot_registry` in the transaction that makes it; ingest
processes listen and drop their caches, so the change holds everywhere within moments.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection

from registry.settings import StoreSettings
from registry.store import connect

log = logging.getLogger(__name__)

CHANNEL: Final = "iiot_registry"


async def announce(conn: AsyncConnection[Any], platform: str) -> None:
    """Tells listening processes, when the current transaction commits, that `platform` changed."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, platform))


class RegistryWatcher:
    """Calls `on_change(platform)` for every registry change until `stop()`; reconnects."""

    def __init__(self, settings: StoreSettings, on_change: Callable[[str], None]) -> None:
        self._settings = settings
        self._on_change = on_change
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with await connect(self._settings, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever changed while we were not listening: start from a clean slate.
                    self._on_change("*")
                    self.listening.set()
                    while not self._stopping.is_set():
                        async for note in conn.notifies(timeout=0.5):
                            self._on_change(note.payload)
            except psycopg.OperationalError as exc:
                self.listening.clear()
                log.warning("registry listener lost the database (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await self._stopping.wait()
