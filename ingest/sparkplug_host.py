"""iiot as a Sparkplug B primary host application (docs/contract.md, "Sparkplug B").

Turns Sparkplug messages into what the writer stores (readings per device, session changes of
edge nodes and devices), keeps BIRTH certificates in the store with the batch that held them
so a restart still knows every open session, and says which edge nodes need a Rebirth.
Its group-to-platform map comes from the settings (`IIOT_SPARKPLUG_GROUPS`).
"""

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import Decoded, Status, Telemetry
from ingest.errors import Rejected
from ingest.settings import IngestSettings
from ingest.sparkplug import (
    NAMESPACE,
    EdgeNodeSessions,
    Outcome,
    Point,
    decode_payload,
    node_topic,
    parse_topic,
    rebirth_request,
)
from registry.ids import is_device_id, is_platform_id, is_reserved_device_id, reserved_device_id

log = logging.getLogger(__name__)

LOAD_BIRTHS = """
SELECT group_id, edge_node, device, payload, received_at, session FROM sparkplug_births
WHERE %(groups)s::text[] IS NULL OR group_id = ANY(%(groups)s)
ORDER BY device <> '', received_at
"""
BORN = """
INSERT INTO sparkplug_births (group_id, edge_node, device, payload, received_at, session)
VALUES (%(group)s, %(edge)s, %(device)s, %(payload)s, %(at)s, %(session)s)
ON CONFLICT (group_id, edge_node, device) DO UPDATE
SET payload = excluded.payload, received_at = excluded.received_at, session = excluded.session
"""
NODE_DIED = "DELETE FROM sparkplug_births WHERE group_id = %(group)s AND edge_node = %(edge)s"
DEVICE_DIED = """
DELETE FROM sparkplug_births
WHERE group_id = %(group)s AND edge_node = %(edge)s AND device = %(device)s
"""
# A new edge node session ends its devices' sessions: their BIRTHs go with the old one.
_KIND_STATEMENTS = {
    "NBIRTH": (NODE_DIED, BORN),
    "DBIRTH": (BORN,),
    "NDEATH": (NODE_DIED,),
    "DDEATH": (DEVICE_DIED,),
}


class SparkplugHost:
    def __init__(self, settings: IngestSettings, groups: dict[str, str]) -> None:
        """`groups`: group id -> platform id; empty: every group, as the platform of its id."""
        self._settings = settings
        self._groups = groups
        self.sessions = EdgeNodeSessions(
            window_past=settings.window_past,
            window_future=settings.window_future,
            reorder_wait=settings.sparkplug_reorder_wait_seconds,
            confirm_wait=settings.sparkplug_confirm_seconds,
        )
        self._restored = False

    def filters(self) -> list[str]:
        """Subscriptions for the BIRTH, DEATH and DATA messages of our groups (not commands)."""
        return sparkplug_filters(self._groups)

    def platform(self, group: str) -> str:
        if self._groups:
            platform = self._groups.get(group)
            if platform is None:
                raise Rejected("unknown_group", f"Sparkplug group {group!r} is not mapped")
            return platform
        if not is_platform_id(group):
            raise Rejected(
                "bad_platform_id",
                f"Sparkplug group {group[:80]!r} is not a platform id (map it in "
                "IIOT_SPARKPLUG_GROUPS)",
            )
        return group

    def decode(self, topic: str, raw: bytes, received_at: datetime) -> Decoded | Rejected:
        platform: str | None = None
        try:
            address = parse_topic(topic)
            platform = self.platform(address.group)
            # Before the session sees it (a rebirth would not change it: no request).
            _check_device_id(device_id(address.edge_node, address.device))
        except Rejected as rejected:
            rejected.platform = platform
            return rejected
        edge = address.edge_node
        try:
            payload = decode_payload(
                raw,
                max_bytes=self._settings.max_payload_bytes,
                max_metrics=self._settings.max_points_per_message,
            )
        except Rejected as rejected:
            if address.kind in ("NBIRTH", "DBIRTH"):
                self.sessions.birth_refused(address)
            rejected.platform = platform
            return rejected
        try:
            outcome = self.sessions.handle(address, payload, received_at)
        except Rejected as rejected:
            rejected.platform = platform
            return rejected
        decoded = _decoded(platform, edge, outcome, received_at)
        if not decoded:  # an NDEATH or DDEATH always changes a session; nothing else is empty
            return Rejected("invalid_shape", "nothing in the message", platform=platform)
        return decoded

    def connected(self) -> None:
        """The host's MQTT session began: the edge nodes it knows must show they are alive."""
        self.sessions.host_connected()

    def silent_ended(self, at: datetime) -> list[tuple[str, Decoded]]:
        """(NDEATH topic, the session changes) of each edge node whose session ends now because
        it stayed silent since the host connected (`EdgeNodeSessions.expire_unconfirmed`)."""
        return [
            (
                node_topic(group, "NDEATH", edge),
                _decoded(self.platform(group), edge, outcome, at, cause="sparkplug silent"),
            )
            for (group, edge), outcome in self.sessions.expire_unconfirmed()
        ]

    def rebirths(self) -> list[tuple[str, bytes]]:
        """(NCMD topic, Rebirth request) for each edge node that needs one now."""
        self.sessions.expire_gaps()
        return [
            (node_topic(group, "NCMD", edge), rebirth_request())
            for group, edge in self.sessions.take_rebirths()
        ]

    async def restore(self, pool: AsyncConnectionPool) -> None:
        """Once per process: the open sessions' BIRTH certificates, from the store."""
        if self._restored:
            return
        groups = sorted(self._groups) or None
        async with pool.connection() as conn:
            cursor = await conn.execute(LOAD_BIRTHS, {"groups": groups})
            rows = await cursor.fetchall()
        for group, edge, device, payload, received_at, session in rows:
            kind = "DBIRTH" if device else "NBIRTH"
            topic = node_topic(group, kind, edge, device or None)
            try:
                address = parse_topic(topic)
                self.sessions.restore_birth(address, bytes(payload), received_at, session)
            except Rejected as exc:
                log.warning("stored BIRTH %s not restored: %s", topic, exc)
        if rows:
            log.info("restored %d Sparkplug BIRTH certificates", len(rows))
        self._restored = True

    @staticmethod
    async def keep_births(conn: AsyncConnection[Any], batch: Sequence[Received[Any]]) -> None:
        """Stores BIRTHs and forgets DEATHs of the batch, in its transaction, in order.

        The statements go in one pipeline (one round trip, not one per birth: a thousand
        births after a broker restart took 1.4 s one by one, `make bench`)."""
        statements: list[tuple[str, dict[str, Any]]] = []
        for message in batch:
            origin = message.origin
            topic = origin.sparkplug_topic if origin and origin.sparkplug_topic else message.topic
            if isinstance(message.outcome, Rejected) or not topic.startswith(NAMESPACE):
                continue
            parts = topic.split("/")
            params = {
                "group": parts[1],
                "edge": parts[3],
                "device": parts[4] if len(parts) == 5 else "",
                "payload": message.payload,
                "at": message.received_at,
                # The session number the BIRTH was given (its opening), kept for a restart.
                "session": next(
                    (s.session for s in message.outcome if isinstance(s, Status) and s.online),
                    None,
                ),
            }
            statements += [(statement, params) for statement in _KIND_STATEMENTS.get(parts[2], ())]
        if statements:
            async with conn.pipeline():
                for statement, params in statements:
                    await conn.execute(statement, params)


def sparkplug_filters(groups: dict[str, str]) -> list[str]:
    """The host's subscriptions for `groups` (group -> platform; empty: every group)."""
    return [
        f"{NAMESPACE}/{group}/{kind}/+{'/+' if kind[0] == 'D' else ''}"
        for group in sorted(groups) or ["+"]
        for kind in ("NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA")
    ]


def device_id(edge_node: str, device: str | None) -> str:
    """The registry id of a Sparkplug device: its id is unique only under its edge node, so it
    is qualified by it (`edge:device`); the edge node's own metrics are the device `edge`."""
    return edge_node if device is None else f"{edge_node}:{device}"


def _check_device_id(device: str) -> None:
    if not is_device_id(device):
        raise Rejected("bad_device_id", f"{device[:140]!r} is over 128 characters")
    if is_reserved_device_id(device):
        raise Rejected("reserved_device_id", reserved_device_id(device))


def _decoded(
    platform: str, edge: str, outcome: Outcome, received_at: datetime, cause: str = "sparkplug"
) -> Decoded:
    """What the writer stores of a Sparkplug outcome: session changes, then readings."""
    decoded: Decoded = [
        Status(
            platform,
            change.online,
            change.session,
            device=device_id(edge, change.device) if change.device else None,
            gateway=edge if change.device is None else None,
            cause=cause,
        )
        for change in outcome.changes
    ]
    for readings in outcome.readings:
        device = device_id(edge, readings.device)
        for points, historical in ((readings.live, False), (readings.historical, True)):
            if points:
                decoded.append(_telemetry(platform, device, edge, points, historical))
        if not readings.live and not readings.historical and not outcome.changes:
            # Only strings, nulls or control metrics: nothing to store, but the device spoke.
            decoded.append(Telemetry(platform, device, [], False, received_at, received_at, edge))
    return decoded


def _telemetry(
    platform: str, device: str, edge: str, points: list[Point], historical: bool
) -> Telemetry:
    times = [ts for ts, _, _ in points]
    return Telemetry(platform, device, points, historical, min(times), max(times), gateway=edge)
