"""Registry changes announced to running processes (PostgreSQL LISTEN/NOTIFY).

An operator's change (a device decommissioned, a platform's liveness window or provisioning
policy changed) is NOTIFYed on `iiot_registry` in the transaction that makes it; ingest
processes listen and drop their caches, so the change holds everywhere within moments. A
revoked API key is NOTIFYed on `iiot_api_keys` (its id), for API processes' key caches.
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
KEYS_CHANNEL: Final = "iiot_api_keys"
NOTIFY = "SELECT pg_notify(%s, %s)"


async def announce(conn: AsyncConnection[Any], platform: str) -> None:
    """Tells listening processes, when the current transaction commits, that `platform` changed."""
    await conn.execute(NOTIFY, (CHANNEL, platform))


async def announce_key_revoked(conn: AsyncConnection[Any], key_id: int) -> None:
    """Tells listening API processes, when the current transaction commits, that a key ended."""
    await conn.execute(NOTIFY, (KEYS_CHANNEL, str(key_id)))


class RegistryWatcher:
    """Calls `on_change(platform)` for every registry change and, if given,
    `on_key_revoked(key id)` for every revoked API key, until `stop()`; reconnects, and calls
    both with "*" (anything may have changed) whenever it starts listening."""

    def __init__(
        self,
        settings: StoreSettings,
        on_change: Callable[[str], None],
        on_key_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._handlers = {CHANNEL: on_change}
        if on_key_revoked is not None:
            self._handlers[KEYS_CHANNEL] = on_key_revoked
        self._stopping = asyncio.Event()
        self.listening = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with await connect(self._settings, autocommit=True) as conn:
                    for channel in self._handlers:
                        await conn.execute(f"LISTEN {channel}")
                    # Whatever changed while we were not listening: start from a clean slate.
                    for handler in self._handlers.values():
                        handler("*")
                    self.listening.set()
                    while not self._stopping.is_set():
                        async for note in conn.notifies(timeout=0.5):
                            self._handlers[note.channel](note.payload)
            except psycopg.OperationalError as exc:
                self.listening.clear()
                log.warning("registry listener lost the database (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await self._stopping.wait()
