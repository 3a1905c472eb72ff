"""Id resolution: a batch's platforms, gateways, devices and metric names as the store's row
ids, registering new devices and gateways on platforms that provision automatically.

What cannot be resolved is refused here with its reason (an unknown platform, an unknown device
or gateway on a platform that does not provision, a platform over its hard quota), so that the
writer stores only what has ids and dead-letters the rest.
"""

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from psycopg import AsyncConnection

from ingest.batching import Received
from ingest.decoding import Decoded, Telemetry
from ingest.errors import Rejected
from ingest.metering import BatchMeter, MeterKey, QuotaGuard, meter_key
from ingest.metric_names import MetricNames
from registry.connection import Counters, SessionEvent
from registry.devices import DeviceDirectory, Key
from registry.moves import REASON as MOVED
from registry.platforms import Platform

_NAME = operator.itemgetter(1)  # of a point (time, name, value)


@dataclass(slots=True)
class Accepted:
    """A reading to store, under its row ids."""

    device: int
    gateway: int | None
    telemetry: Telemetry
    key: MeterKey


@dataclass(slots=True)
class Resolved:
    """A batch split into what can be written and what is refused."""

    telemetry: list[Accepted]
    gateway_sessions: list[SessionEvent]
    device_sessions: list[SessionEvent]
    rejected: list[tuple[Received[Any], Rejected]]
    metric_ids: dict[str, int]
    platforms: set[str]
    # Accepted messages are metered where they are accepted; refusals once the batch is split.
    meter: BatchMeter = field(default_factory=BatchMeter)
    devices_registered: int = 0


class Resolver:
    """Resolves batches against the registry, caching what it learns: the device directory
    (which writers may share) and the metric names and quotas of its own."""

    def __init__(self, directory: DeviceDirectory, *, counter_shard: int = 0) -> None:
        self.directory = directory
        self._shard = counter_shard
        self._metrics = MetricNames()
        self._quotas = QuotaGuard()

    async def resolve(self, conn: AsyncConnection[Any], batch: Sequence[Received[Any]]) -> Resolved:
        """Splits the batch into what can be written and what is refused, registering what is
        new on platforms that provision automatically.

        Runs in its own transaction: registrations commit even if the batch later fails, so the
        cached ids always name rows that exist.
        """
        resolved = Resolved([], [], [], [], {}, set())
        decoded: list[tuple[Received[Any], Decoded]] = []
        for message in batch:
            if isinstance(message.outcome, Rejected):
                resolved.rejected.append((message, message.outcome))
            else:
                decoded.append((message, message.outcome))
        directory = self.directory
        # The platforms named, refused messages' too: refusals are metered where they exist.
        named = {d[0].platform for _, d in decoded}
        named |= {r.platform for _, r in resolved.rejected if r.platform is not None}
        if not decoded:
            if named:
                async with conn.transaction():
                    resolved.platforms = set(_here(await directory.platforms(conn, named)))
            return resolved
        async with conn.transaction():
            found = await directory.platforms(conn, named)
            # A platform moved to another cell is refused whole: nothing registered, metered
            # or stored here (its usage and counts go on in the new cell).
            moved = {p: platform.moved_to for p, platform in found.items() if platform.moved_to}
            platforms = _here(found)
            resolved.platforms = set(platforms)
            today = max(m.received_at for m, _ in decoded).astimezone(UTC).date()
            over_quota = await self._quotas.over_hard_quota(conn, platforms.values(), today)
            known = [item for _, items in decoded for item in items if item.platform in platforms]
            provision = {p for p, platform in platforms.items() if platform.auto_provision}
            device_keys = {(i.platform, i.device) for i in known if i.device is not None}
            gateway_keys = {(i.platform, i.gateway) for i in known if i.gateway is not None}
            device_ids, new_devices, registered = await directory.devices.resolve(
                conn, device_keys, provision=provision
            )
            gateway_ids, new_gateways, _ = await directory.gateways.resolve(
                conn, gateway_keys, provision=provision
            )
            names: set[str] = set()
            for item in known:
                if isinstance(item, Telemetry):
                    names.update(map(_NAME, item.points))
            resolved.metric_ids = await self._metrics.resolve(conn, names)
            counters = Counters(self._shard)
            for platform, _ in registered:
                counters.add(platform, registered=1)
            await counters.flush(conn)
        directory.devices.remember(new_devices)
        directory.gateways.remember(new_gateways)
        self._metrics.remember(resolved.metric_ids)
        resolved.devices_registered = len(registered)

        for message, items in decoded:
            reason = _refusal(items, platforms.keys(), device_ids, gateway_ids, moved)
            platform = items[0].platform
            if reason is None and platform in over_quota and _has_points(items):
                reason = Rejected("quota_exceeded", over_quota[platform], platform=platform)
            if reason is not None:
                resolved.rejected.append((message, reason))
                continue
            key = meter_key(platform, message.received_at, message.source)
            resolved.meter.accepted(key, len(message.payload))
            _sort_items(
                resolved, message, items, key, device_ids=device_ids, gateway_ids=gateway_ids
            )
        return resolved


def _sort_items(
    resolved: Resolved,
    message: Received[Any],
    items: Decoded,
    key: MeterKey,
    *,
    device_ids: Mapping[Key, int],
    gateway_ids: Mapping[Key, int],
) -> None:
    """Files an accepted message's readings and session changes under their row ids."""
    for item in items:
        device = device_ids[(item.platform, item.device)] if item.device else None
        gateway = gateway_ids[(item.platform, item.gateway)] if item.gateway else None
        if isinstance(item, Telemetry):
            assert device is not None  # readings always name their device
            resolved.telemetry.append(Accepted(device, gateway, item, key))
            continue
        subject, events = (
            (device, resolved.device_sessions)
            if device is not None
            else (gateway, resolved.gateway_sessions)
        )
        assert subject is not None  # a status names its device or gateway
        events.append(
            SessionEvent(subject, item.online, item.session, message.received_at, item.cause)
        )


def _here(platforms: dict[str, Platform]) -> dict[str, Platform]:
    """The platforms this cell serves: those that have not moved to another cell."""
    return {p: platform for p, platform in platforms.items() if platform.moved_to is None}


def _has_points(items: Decoded) -> bool:
    return any(isinstance(item, Telemetry) and item.points for item in items)


def _refusal(
    items: Decoded,
    platforms: Any,
    devices: Mapping[Key, int],
    gateways: Mapping[Key, int],
    moved: Mapping[str, str] | None = None,
) -> Rejected | None:
    """Why a decoded message cannot be stored whole, if it cannot. `moved`: platforms that
    moved to another cell, and the cell."""
    platform = items[0].platform
    if moved and platform in moved:
        return Rejected(
            MOVED,
            f"platform {platform!r} moved to cell {moved[platform]!r}: its devices must "
            "connect to that cell",
            platform=platform,
        )
    if platform not in platforms:
        return Rejected(
            "unknown_platform", f"no platform {platform!r} is registered", platform=platform
        )
    for item in items:
        if item.gateway is not None and (platform, item.gateway) not in gateways:
            return Rejected(
                "unknown_gateway",
                f"gateway {item.gateway!r} is not registered and platform {platform!r} "
                "does not provision automatically",
                platform=platform,
            )
        if item.device is not None and (platform, item.device) not in devices:
            return Rejected(
                "unknown_device",
                f"device {item.device!r} is not registered and platform {platform!r} "
                "does not provision automatically",
                platform=platform,
            )
    return None
