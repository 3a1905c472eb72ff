"""The MQTT consumer: receive, decode, batch, write, then acknowledge (docs/contract.md).

Delivery: QoS 1 messages are acknowledged to the broker only after the batch holding them has
committed, in arrival order. aiomqtt acknowledges on receipt and has no manual-ack API, so the
paho client underneath is switched to manual acknowledgement before it connects (paho's own
`manual_ack_set` and `ack`). The session is persistent (stable client id, no clean start,
session expiry > 0): what arrives while ingest is down is delivered when it returns, and what
was received but not acknowledged when a connection or the process died is delivered again.
Redelivered points are stored once by the writer; a redelivered message without `ts` gets the
time it was first stored at (ingest/redelivery.py).

Reading and acknowledging go through ingest/paho_speedups.py, which relies on paho's private
internals; where the installed release lacks them (ingest/mqtt_internals.py, checked when `run()`
starts) or `IIOT_MQTT_PAHO_SPEEDUPS` is off, through paho's public `on_message` and `ack`.

Back-pressure: the broker sends at most Receive Maximum (MQTT 5) or its in-flight limit (3.1.1)
unacknowledged messages, so a slow store slows the broker down instead of growing memory.

The Sparkplug B primary host is a second `MqttIngest` (`sparkplug_host=True`) on a connection of
its own, as Sparkplug 3.0 specifies: a clean session (Clean Start, session expiry 0), its STATE
as Will. The broker keeps nothing for it while it is away; the edge nodes, which watch its
STATE, hold their data meanwhile (store and forward) and publish new BIRTHs when it returns.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import aiomqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.batching import END, EndOfStream, Received
from ingest.decoding import MessageDecoder
from ingest.errors import Unstorable
from ingest.mqtt_internals import paho_of, use_fast_path, wakeups_of
from ingest.paho_speedups import (
    Publish,
    acknowledge,
    acknowledge_each,
    read_in_bulk,
    read_publicly,
    share_property_tables,
)
from ingest.progress import Progress
from ingest.redelivery import RedeliveryRecord
from ingest.scope import FiltersOf, SubscriptionScope
from ingest.settings import IngestSettings
from ingest.sparkplug import NAMESPACE, state_online, state_payload, state_topic
from ingest.sparkplug_host import SparkplugHost, sparkplug_filters
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import PreparedBatch, Refusals, TelemetryWriter, write_ahead
from registry.devices import DeviceDirectory
from registry.settings import hashed_shard

log = logging.getLogger(__name__)

MqttAck = tuple[int, int]
"""(packet id, QoS) of a received message; QoS 0 needs no acknowledgement."""

_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0
_MICROSECOND = timedelta(microseconds=1)
_YIELD_EVERY = 50  # messages the receiver decodes before it lets other tasks run
# The "acknowledgement" of what the host decided itself (a silent edge node's session ending):
# no packet of the session, so nothing to acknowledge and no position in the stream.
_NOT_RECEIVED: MqttAck = (0, -1)
SESSION = "mqtt"
"""The one stream of `MqttIngest.progress`: the session's messages, acknowledged in order."""


class MqttIngest:
    """Consumes device telemetry from an MQTT broker until `stop()`; reconnects on its own."""

    def __init__(
        self,
        settings: IngestSettings,
        pool: AsyncConnectionPool,
        *,
        stats: IngestStats | None = None,
        sparkplug_host: bool = False,
    ) -> None:
        """`sparkplug_host`: consume the Sparkplug B groups of `IIOT_SPARKPLUG_GROUPS` as their
        primary host (its own client id, `{IIOT_MQTT_CLIENT_ID}-sparkplug`), instead of the JSON
        topics."""
        self._settings = settings
        self.speedups = False
        """Whether this run reads and acknowledges through ingest/paho_speedups.py (set by
        `run()`: the setting, and paho's and aiomqtt's internals being there)."""
        self.stats = stats or IngestStats()
        groups = settings.sparkplug_platforms()
        self.sparkplug = SparkplugHost(settings, groups or {}) if sparkplug_host else None
        self._client_id = settings.mqtt_client_id
        shard = settings.shard
        if self.sparkplug is not None:
            if groups is None:
                raise ValueError("IIOT_SPARKPLUG_GROUPS is empty: Sparkplug is off")
            self._client_id += "-sparkplug"
            if settings.counter_shard is None and settings.shards_from_range() is None:
                # A shard of its own when none is configured; a configured one it shares with
                # the JSON consumer (colliding shards cost lock waits, never wrong counts).
                shard = hashed_shard(self._client_id)
        self._writer = TelemetryWriter(
            pool,
            stats=self.stats,
            counter_shard=shard,
            directory=DeviceDirectory(max_cached_ids=settings.device_cache_max),
            renew_seconds=settings.activity_renew_seconds,
        )
        self._topics = TopicScheme(settings.mqtt_topic_root)
        self._decode = MessageDecoder(self._topics, settings)
        self._pool = pool
        self.scope = self._scope(settings, groups)
        """What the session subscribes to; None: the Sparkplug groups configured by name."""
        # Kept while the broker may keep a session (and a day more): it redelivers only then.
        keep = timedelta(seconds=settings.mqtt_session_expiry_seconds, days=1)
        self._redeliveries = RedeliveryRecord(pool, self._client_id, keep=keep, decode=self._decode)
        self._state_timestamp = 0
        self._stopping = asyncio.Event()
        self._queue: asyncio.Queue[Any] | None = None
        self._state_offline = asyncio.Event()
        self.subscribed = asyncio.Event()
        """Set while a session is subscribed (tests and readiness wait on it)."""
        self.progress = Progress()
        """What was received and not yet acknowledged; why consuming stopped, if it did."""

    def _scope(
        self, settings: IngestSettings, groups: dict[str, str] | None
    ) -> SubscriptionScope | None:
        filters_of: FiltersOf
        if self.sparkplug is None:
            filters_of = partial(
                self._topics.platform_filters, shared_group=settings.mqtt_shared_group
            )
        elif not groups:  # every group, as the platform of its id: the cell's platforms'
            filters_of = _sparkplug_platform_filters
        else:
            return None
        return SubscriptionScope(
            self._pool,
            filters_of,
            per_platform=settings.mqtt_scope == "platforms",
            refresh_seconds=settings.mqtt_scope_refresh_seconds,
            moved_hold_seconds=settings.mqtt_moved_hold_seconds,
        )

    def registry_changed(self, platform: str) -> None:
        """An operator changed the registry: forget what was cached about it, and follow the
        platforms served (a platform created or moved)."""
        self._writer.directory.forget()
        if self.scope is not None:
            self.scope.registry_changed()

    def queue_depth(self) -> int:
        """Messages received and not yet written (metrics)."""
        return self._queue.qsize() if self._queue is not None else 0

    def partition_lag(self) -> dict[tuple[str, int], int]:
        """MQTT has no partitions: the broker's queue is its own (metrics)."""
        return {}

    def subscribed_platforms(self) -> int | None:
        """Platforms subscribed to one by one (metrics); None when not subscribing so."""
        scope = self.scope
        return len(scope.platforms) if scope is not None and scope.per_platform else None

    def stop(self) -> None:
        """Asks `run()` to stop receiving, write and acknowledge what it holds, and return."""
        self._stopping.set()

    async def run(self) -> None:
        delay = _RETRY_FIRST
        self.speedups = use_fast_path(self._settings.mqtt_paho_speedups)
        if self.speedups:
            share_property_tables()
        if self.sparkplug is not None:
            await self.sparkplug.restore(self._pool)
        while not self._stopping.is_set():
            try:
                await self._session()
                delay = _RETRY_FIRST
            except* aiomqtt.MqttError as group:
                log.warning(
                    "MQTT connection lost (%s); reconnecting in %.1fs", group.exceptions[0], delay
                )
            except* Unstorable as group:
                self.progress.failure = str(Unstorable.first(group))
            self.subscribed.clear()
            self.progress.forget(SESSION)  # what was not acknowledged, the broker keeps
            if self.progress.failure is not None:
                # Nothing after the message can be acknowledged before it: stay down, unready
                # (/readyz says why), until an operator has looked (docs/contract.md).
                log.critical("MQTT ingest stopped: %s", self.progress.failure)
                await self._stopping.wait()
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            delay = min(delay * 2, _RETRY_MAX)

    async def _session(self) -> None:
        """One connection: receive and write concurrently until stopped or disconnected.

        If the connection drops, whatever was received but not committed is abandoned: it was
        not acknowledged, so the broker delivers it again in the next session.
        """
        client, arrived = self._client()
        self._redeliveries.connected()
        async with client:
            queue: asyncio.Queue[Received[MqttAck] | EndOfStream] = asyncio.Queue(
                self._settings.queue_max_messages
            )
            self._queue = queue
            if self.scope is not None:
                await self.scope.start(client)
            if self.sparkplug is None:
                groups = self._settings.sparkplug_platforms()
                if groups is not None:
                    # The persistent session of a version whose host shared this connection
                    # still holds the Sparkplug subscriptions: the host has its own now.
                    await client.unsubscribe(sparkplug_filters(groups))
            else:
                # Not shared: an edge node's births, deaths and seq must reach one process.
                if self.scope is None:
                    for topic_filter in self.sparkplug.filters():
                        await client.subscribe(topic_filter, qos=1)
                host_id = self._settings.sparkplug_host_id
                if host_id:
                    # Its own STATE, to answer an `online: false` (QoS 0: nothing to acknowledge
                    # in order with the data; losing it means losing the connection, and a new
                    # one announces itself anyway).
                    await client.subscribe(state_topic(host_id), qos=0)
                await self._announce_state(client, online=True)
                self.sparkplug.connected()
            self.progress.start(SESSION, 0)
            self.subscribed.set()
            log.info(
                "subscribed to %s as %s",
                "Sparkplug B" if self.sparkplug else self._settings.mqtt_topic_root,
                self._client_id,
            )
            async with asyncio.TaskGroup() as tasks:
                receiving = tasks.create_task(self._receive(client, arrived, queue))
                writing = tasks.create_task(self._write(client, queue))
                stopping = tasks.create_task(self._stopping.wait())
                commanding = tasks.create_task(self._act_as_host(client, queue))
                following = tasks.create_task(self._follow_platforms(client))
                await asyncio.wait((stopping, writing), return_when=asyncio.FIRST_COMPLETED)
                receiving.cancel()
                commanding.cancel()
                following.cancel()
                await queue.put(END)
                try:
                    async with asyncio.timeout(self._settings.shutdown_grace_seconds):
                        await writing
                        await self._confirm_acks(client)
                        await self._announce_state(client, online=False)
                except TimeoutError:
                    log.error(  # noqa: TRY400 - expected; a traceback would not help
                        "drain did not finish within the grace period; the broker will redeliver"
                    )
                    writing.cancel()

    async def _follow_platforms(self, client: aiomqtt.Client) -> None:
        if self.scope is not None:
            await self.scope.follow(client)

    async def _confirm_acks(self, client: aiomqtt.Client) -> None:
        """Returns once the broker has read every acknowledgement sent so far.

        Closing the connection right after the last PUBACKs loses some of them: the socket
        still holds unread messages from the broker, so the close is a reset, and the broker
        drops what it had not yet read; it then redelivers messages that were stored. A
        broker answers packets in order, so the SUBACK of a throwaway subscription (to a topic
        nobody publishes) comes after the PUBACKs before it.
        """
        barrier = f"{self._topics.root}/_ack_barrier/{uuid.uuid4().hex}"
        await client.subscribe(barrier, qos=0)
        await client.unsubscribe(barrier)

    async def _announce_state(self, client: aiomqtt.Client, *, online: bool) -> None:
        """Sparkplug 3.0 primary host STATE: retained, QoS 1; the Will says offline."""
        host_id = self._settings.sparkplug_host_id
        if self.sparkplug is not None and host_id:
            payload = state_payload(online, self._state_timestamp)
            await client.publish(state_topic(host_id), payload, qos=1, retain=True)

    async def _act_as_host(
        self, client: aiomqtt.Client, queue: "asyncio.Queue[Received[MqttAck] | EndOfStream]"
    ) -> None:
        """The Sparkplug host's own doings, a few times a second:
        - its STATE said offline (a stale Will, another client): Sparkplug 3.0 has the host
          publish `online: true` again, with the timestamp of its current Will;
        - edge nodes silent since this connection began: their sessions end, through the writer
          as their NDEATH would have ended them (no packet of the session: nothing to ack);
        - the Rebirth requests the sessions ask for (gaps, unknown aliases, data before a
          birth), QoS 0, as the specification has commands."""
        if self.sparkplug is None:
            return
        while True:
            if self._state_offline.is_set():
                self._state_offline.clear()
                log.warning("STATE of this host said offline; publishing online again")
                await self._announce_state(client, online=True)
            now = datetime.now(UTC)
            for topic, decoded in self.sparkplug.silent_ended(now):
                log.warning("%s: silent since the host connected; its session ends", topic)
                await queue.put(Received("mqtt", topic, b"", now, decoded, _NOT_RECEIVED))
            for topic, payload in self.sparkplug.rebirths():
                log.info("requesting a Rebirth on %s", topic)
                await client.publish(topic, payload, qos=0)
            await asyncio.sleep(0.25)

    def _client(self) -> "tuple[aiomqtt.Client, deque[Publish]]":
        s = self._settings
        host, port, username, password = s.mqtt_endpoint()
        # Persistent session either way: MQTT 5 via clean start off and a session expiry,
        # MQTT 3.1.1 via clean session off. The Sparkplug host: a clean one (Sparkplug 3.0).
        clean = self.sparkplug is not None
        session: dict[str, Any]
        if s.mqtt_protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if clean else s.mqtt_session_expiry_seconds
            properties.ReceiveMaximum = s.mqtt_receive_maximum
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": clean,
                "properties": properties,
            }
        else:
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": clean}
        will = None
        # The STATE timestamp ties the Will to the birth of this connection (Sparkplug 3.0).
        self._state_timestamp = int(time.time() * 1000)
        if self.sparkplug is not None and s.sparkplug_host_id:
            will = aiomqtt.Will(
                state_topic(s.sparkplug_host_id),
                state_payload(False, self._state_timestamp),
                qos=1,
                retain=True,
            )
        client = aiomqtt.Client(
            host,
            port,
            username=username,
            password=password,
            identifier=self._client_id,
            keepalive=s.mqtt_keepalive_seconds,
            will=will,
            tls_context=s.mqtt_tls_context(),
            **session,
        )
        # Must happen before connecting: the backlog delivered at connect would otherwise be
        # acknowledged automatically (docs/adr/0002).
        paho = paho_of(client)
        paho.manual_ack_set(True)
        # Received messages collect in `arrived` as (topic, payload, packet id, QoS, DUP), without
        # paho's or aiomqtt's message objects on the fast path. There aiomqtt's queue gets one
        # wake-up per burst, so that its iterator still wakes `_receive` and ends when the
        # connection is lost; on paho's public path, aiomqtt's own message per message does.
        arrived: deque[Publish] = deque()
        wake = wakeups_of(client).put_nowait if self.speedups else None
        # The host's own STATE (QoS 0) is no message of the stream: noted here, answered by
        # `_act_as_host`.
        own_state = state_topic(s.sparkplug_host_id) if will is not None else None
        self._state_offline.clear()

        def on_publish(topic: str, payload: bytes, mid: int, qos: int, dup: bool) -> None:
            if topic == own_state:
                if not state_online(payload):
                    self._state_offline.set()
                return
            if not arrived and wake is not None:
                wake(None)
            arrived.append((topic, payload, mid, qos, dup))

        if self.speedups:
            read_in_bulk(paho, on_publish=on_publish)
        else:
            read_publicly(paho, on_publish)
        return client, arrived

    async def _receive(
        self,
        client: aiomqtt.Client,
        arrived: "deque[Publish]",
        queue: "asyncio.Queue[Received[MqttAck] | EndOfStream]",
    ) -> None:
        decode = self._decode
        sparkplug = self.sparkplug.decode if self.sparkplug is not None else None
        # aiomqtt's iterator yields the wake-ups `_client` puts in its private queue (or, on
        # paho's public path, its own messages, unread); it raises MqttError when the
        # connection is lost.
        wakeups = cast("AsyncIterator[object]", client.messages)
        progress = self.progress
        taken = 0
        last = datetime.now(UTC)
        async for _ in wakeups:
            # What arrived is noted per burst and every _YIELD_EVERY messages, not per message.
            progress.received(SESSION, taken + len(arrived), progress.now())
            while arrived:
                # No two messages share an arrival time: two identical readings without `ts`
                # would otherwise be one point.
                received_at = datetime.now(UTC)
                if received_at <= last:
                    received_at = last + _MICROSECOND
                last = received_at
                topic, payload, mid, qos, dup = arrived.popleft()
                if sparkplug is not None and topic.startswith(NAMESPACE):
                    outcome = sparkplug(topic, payload, received_at)
                else:
                    outcome = decode(topic, payload, received_at)
                ack = (mid, qos)
                received = Received("mqtt", topic, payload, received_at, outcome, ack, None, dup)
                if queue.full():
                    await queue.put(received)  # the writer is behind: wait (back-pressure)
                else:
                    queue.put_nowait(received)
                self.stats.messages += 1
                taken += 1
                if taken % _YIELD_EVERY == 0:
                    # Let the writer go on as soon as the store answers a statement: decoding
                    # a backlog in one go would leave PostgreSQL idle meanwhile.
                    await asyncio.sleep(0)
                    progress.received(SESSION, taken + len(arrived), progress.now())

    async def _write(
        self, client: aiomqtt.Client, queue: "asyncio.Queue[Received[MqttAck] | EndOfStream]"
    ) -> None:
        paho = paho_of(client)
        send_acks = acknowledge if self.speedups else acknowledge_each
        keep_births = SparkplugHost.keep_births if self.sparkplug is not None else None
        acknowledged = 0
        redeliveries = self._redeliveries

        async def commit(prepared: PreparedBatch) -> None:
            nonlocal acknowledged

            async def in_transaction(conn: AsyncConnection[Any], _: Refusals) -> None:
                if keep_births is not None:
                    await keep_births(conn, prepared.batch)
                await redeliveries.record(conn, prepared.batch)

            await self._writer.commit_until_done(prepared, in_transaction=in_transaction)
            acks = [message.ack for message in prepared.collected]
            if send_acks(paho, acks) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Connection gone: the broker redelivers in the next session; the writer
                # stores the redelivered points once.
                raise aiomqtt.MqttError("acknowledgement failed: not connected")
            acknowledged += sum(1 for ack in acks if ack != _NOT_RECEIVED)
            self.progress.acknowledged(SESSION, acknowledged)

        s = self._settings
        await write_ahead(
            queue,
            self._writer,
            commit,
            max_points=s.batch_max_points,
            max_delay=s.batch_max_delay_seconds,
            revise=redeliveries.recorded_times,
        )


def _sparkplug_platform_filters(platform: str) -> list[str]:
    """The Sparkplug host's subscriptions for the group of a platform's id ("+": every group)."""
    return sparkplug_filters({} if platform == "+" else {platform: platform})
