"""What an MQTT session of a cell subscribes to (`IIOT_MQTT_SCOPE`, docs/operations.md "Cells").

"platforms": the topics of each platform the cell serves (registry/platforms.py,
`subscribed_platform_ids`: created here and not moved away), so that cells can share a broker
without receiving, and dead-lettering as `unknown_platform`, each other's traffic. The set is
read when a session starts and again whenever the registry announces a platform change (the
trigger of migration 0035), and every `IIOT_MQTT_SCOPE_REFRESH_SECONDS` as a backstop; a
platform created is subscribed without a restart. A platform moved away stays subscribed for
`IIOT_MQTT_MOVED_HOLD_SECONDS`: what its devices still publish here is refused by resolution
as `platform_moved`, naming the new cell, and recorded as a dead letter, not discarded by a
broker that no longer has a subscriber for it. After the hold it is unsubscribed.

"all": every platform under the topic root, with a few wildcard subscriptions: for a broker (or
a topic root) of the cell's own.

A persistent session keeps its subscriptions across restarts, so each session first removes
what the other scope, or a platform moved away meanwhile, left there.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import aiomqtt
import psycopg
from psycopg_pool import AsyncConnectionPool

from registry.platforms import released_platform_ids, subscribed_platform_ids

log = logging.getLogger(__name__)

# Filters per SUBSCRIBE or UNSUBSCRIBE packet: a cell of thousands of platforms subscribes in
# a few dozen round trips, each packet well under any broker's size limit.
_PER_PACKET = 200

FiltersOf = Callable[[str], list[str]]
"""A platform's subscriptions; called with "+" for every platform's."""


class SubscriptionScope:
    """Keeps an MQTT session subscribed to the topics of the platforms its cell serves."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        filters_of: FiltersOf,
        *,
        per_platform: bool,
        refresh_seconds: float,
        moved_hold_seconds: float,
    ) -> None:
        """`per_platform`: subscribe per served platform; else to every platform's topics."""
        self._pool = pool
        self._filters_of = filters_of
        self.per_platform = per_platform
        self._refresh = refresh_seconds
        self._hold = moved_hold_seconds
        self._changed = asyncio.Event()
        self.platforms: frozenset[str] = frozenset()
        """The platforms subscribed to now (per-platform scope)."""

    def registry_changed(self) -> None:
        """A platform may have been created or moved: read the served set again soon."""
        self._changed.set()

    async def start(self, client: aiomqtt.Client) -> None:
        """Subscribes a new session, removing what an earlier one may have left.

        Raises aiomqtt.MqttError when the store does not answer (per-platform scope): the
        session cannot know what to subscribe to, so ingest reconnects, backing off, as for a
        lost connection."""
        everything = self._filters_of("+")
        if not self.per_platform:
            await subscribe(client, everything)
            try:
                async with self._pool.connection() as conn:
                    served = await subscribed_platform_ids(conn, self._hold)
            except psycopg.Error as exc:
                log.warning(
                    "served platforms not read (%s): per-platform subscriptions of an "
                    "earlier session, if any, stay until the next",
                    exc,
                )
                return
            await unsubscribe(client, self._filters(served))
            return
        try:
            async with self._pool.connection() as conn:
                served = await subscribed_platform_ids(conn, self._hold)
                moved = await released_platform_ids(conn, self._hold)
        except psycopg.Error as exc:
            raise aiomqtt.MqttError(f"served platforms not read from the store: {exc}") from exc
        await unsubscribe(client, [*everything, *self._filters(moved)])
        await subscribe(client, self._filters(served))
        self.platforms = frozenset(served)
        log.info("subscribed to the topics of %d platforms", len(served))

    async def follow(self, client: aiomqtt.Client) -> None:
        """Until cancelled: subscribes platforms as they are created here, unsubscribes those
        moved away once their hold is over (or deleted)."""
        if not self.per_platform:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh):
                    await self._changed.wait()
            self._changed.clear()
            try:
                async with self._pool.connection() as conn:
                    served = frozenset(await subscribed_platform_ids(conn, self._hold))
            except psycopg.Error as exc:
                log.warning("served platforms not read (%s); keeping the subscriptions", exc)
                continue
            added, gone = served - self.platforms, self.platforms - served
            if gone:
                await unsubscribe(client, self._filters(sorted(gone)))
                log.info("unsubscribed platforms no longer served: %s", _few(gone))
            if added:
                await subscribe(client, self._filters(sorted(added)))
                log.info("subscribed new platforms: %s", _few(added))
            self.platforms = served

    def _filters(self, platforms: Iterable[str]) -> list[str]:
        return [f for platform in platforms for f in self._filters_of(platform)]


async def subscribe(client: aiomqtt.Client, filters: list[str]) -> None:
    """QoS 1 subscriptions, a packet per `_PER_PACKET`; a filter the broker refuses (its ACL,
    a subscription limit) is logged, as nothing will arrive on it."""
    for start in range(0, len(filters), _PER_PACKET):
        chunk = filters[start : start + _PER_PACKET]
        granted = await client.subscribe([(f, 1) for f in chunk])
        refused = [f for f, code in zip(chunk, granted, strict=False) if _failed(code)]
        if refused:
            log.error("the broker refused %d subscriptions: %s", len(refused), _few(refused))


async def unsubscribe(client: aiomqtt.Client, filters: list[str]) -> None:
    """Removes subscriptions (those that did not exist are no error)."""
    for start in range(0, len(filters), _PER_PACKET):
        await client.unsubscribe(filters[start : start + _PER_PACKET])


def _failed(code: Any) -> bool:
    """A SUBACK's code: MQTT 5 ReasonCode objects, MQTT 3.1.1 granted QoS (0x80: failure)."""
    return bool(getattr(code, "is_failure", False)) or (isinstance(code, int) and code >= 0x80)


def _few(names: Iterable[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")
