"""Eclipse Sparkplug B 3.0: topics, payloads, and the sessions of edge nodes (docs/contract.md,
"Sparkplug B").

`EdgeNodeSessions` follows each edge node the way a primary host application must: the BIRTH
certificates give metric names for aliases and open sessions (`bdSeq` ties an NDEATH to the
session it ends), `seq` (0-255, one counter per edge node) reveals lost messages, and anything
it cannot make sense of asks for a Rebirth. It is called in arrival order by one process per
Sparkplug group.

Data is stored on arrival even when it arrives out of order (points carry their own time):
`seq` serves only to detect gaps. A gap not filled within the reorder wait costs one Rebirth
request.

Sessions are numbered by the host, in arrival order, never by an edge node's clock (edge clocks
drift and get corrected): each number handed out for an edge node (its own sessions and its
devices') is its arrival time in ms by the host's clock, and above every number handed out
before for that edge node.
"""

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import orjson
from google.protobuf.message import DecodeError

from ingest.decoding import known_metric_name
from ingest.errors import Rejected
from ingest.sparkplug_b_pb2 import Payload as PayloadMessage
from registry.ids import is_device_id

NAMESPACE: Final = "spBv1.0"
NODE_KINDS: Final = ("NBIRTH", "NDEATH", "NDATA", "NCMD")
DEVICE_KINDS: Final = ("DBIRTH", "DDEATH", "DDATA", "DCMD")
Kind = Literal["NBIRTH", "NDEATH", "NDATA", "NCMD", "DBIRTH", "DDEATH", "DDATA", "DCMD"]

# Datatypes (Metric.datatype).
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12
# Names of the datatypes (the specification's DataType enum), for the statistics of what was
# not stored.
# fmt: off
_TYPE_NAMES: Final = (
    "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float",
    "Double", "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes", "File",
    "Template", "PropertySet", "PropertySetList", "Int8Array", "Int16Array", "Int32Array",
    "Int64Array", "UInt8Array", "UInt16Array", "UInt32Array", "UInt64Array", "FloatArray",
    "DoubleArray", "BooleanArray", "StringArray", "DateTimeArray",
)
# fmt: on
# A value's protobuf field names its type when the message leaves the datatype out.
_FIELD_TYPES: Final = {
    "string_value": "String",
    "bytes_value": "Bytes",
    "dataset_value": "DataSet",
    "template_value": "Template",
    "extension_value": "Extension",
}
TRANSIENT: Final = "transient"

BD_SEQ: Final = "bdSeq"
REBIRTH: Final = "Node Control/Rebirth"
# Metrics about the session or for commands, not measurements: never stored as telemetry.
_CONTROL_PREFIXES: Final = ("Node Control/", "Device Control/")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_SIGNED_BITS: Final = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}

Point = tuple[datetime, str, float]


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    group: str
    kind: Kind
    edge_node: str
    device: str | None = None


def parse_topic(topic: str) -> SparkplugTopic:
    """`spBv1.0/{group}/{kind}/{edge node}[/{device}]`; ids follow the device id rule."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        raise Rejected("bad_topic", f"expected {NAMESPACE}/{{group}}/{{kind}}/{{edge node}}[/...]")
    _, group, kind, edge_node = parts[:4]
    device = parts[4] if len(parts) == 5 else None
    node_level = kind in NODE_KINDS and device is None
    if not node_level and not (kind in DEVICE_KINDS and device is not None):
        raise Rejected("bad_topic", f"{kind[:20]!r} with {len(parts)} topic levels")
    for what, value in (("group", group), ("edge_node", edge_node), ("device", device)):
        if value is not None and not is_device_id(value):
            raise Rejected(f"bad_{what}_id", f"{what} id {value[:80]!r} breaks the id rules")
    return SparkplugTopic(group, kind, edge_node, device)  # type: ignore[arg-type]


def node_topic(group: str, kind: str, edge_node: str, device: str | None = None) -> str:
    suffix = f"/{device}" if device is not None else ""
    return f"{NAMESPACE}/{group}/{kind}/{edge_node}{suffix}"


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{host_id}"


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """The primary host's STATE (3.0: JSON, published retained with QoS 1)."""
    return orjson.dumps({"online": online, "timestamp": timestamp_ms})


def state_online(payload: bytes) -> bool:
    """Whether a STATE payload says online; anything else (offline, unreadable) does not."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and document.get("online") is True


@dataclass(slots=True)
class Metric:
    name: str | None
    alias: int | None
    # Milliseconds since the epoch (kept as a number: most share their message's few values).
    timestamp_ms: int | None
    # The value as a number; None for null metrics and types that are not numbers.
    value: float | None
    historical: bool
    # Not to be historized (the specification's is_transient): never stored.
    transient: bool = False
    # As sent; 0 when left out (DATA messages should leave it to the BIRTH).
    datatype: int = 0
    # An integer sent without its datatype, as unsigned: its sign depends on the BIRTH's type.
    unsigned: int | None = None
    # The value's protobuf field; None for a null metric.
    field: str | None = None


@dataclass(slots=True)
class Payload:
    timestamp: datetime | None
    seq: int | None
    metrics: list[Metric]


def decode_payload(raw: bytes, *, max_bytes: int, max_metrics: int) -> Payload:
    if len(raw) > max_bytes:
        raise Rejected("payload_too_large", f"{len(raw)} bytes, limit {max_bytes}")
    message = PayloadMessage()
    try:
        message.ParseFromString(raw)
    except DecodeError as exc:
        raise Rejected("invalid_protobuf", f"not a Sparkplug B payload: {exc}") from None
    if len(message.metrics) > max_metrics:
        raise Rejected("too_many_points", f"{len(message.metrics)} metrics, limit {max_metrics}")
    if not message.HasField("timestamp") and not message.metrics and not message.HasField("seq"):
        # Any bytes parse as "unknown fields": a payload with nothing we know is not ours.
        raise Rejected("invalid_protobuf", "no timestamp, seq or metrics")
    metrics = [
        Metric(
            m.name or None,  # an empty name is no name
            m.alias if m.HasField("alias") else None,
            m.timestamp if m.HasField("timestamp") else None,
            None if m.is_null else _number(m),
            m.is_historical,
            m.is_transient,
            m.datatype,
            _unsigned(m) if not m.datatype and not m.is_null else None,
            None if m.is_null else m.WhichOneof("value"),
        )
        for m in message.metrics
    ]
    return Payload(
        _EPOCH + timedelta(milliseconds=message.timestamp)
        if message.HasField("timestamp")
        else None,
        message.seq if message.HasField("seq") else None,
        metrics,
    )


def _number(m: PayloadMessage.Metric) -> float | None:
    kind = m.WhichOneof("value")
    if kind in ("double_value", "float_value"):
        value = m.double_value if kind == "double_value" else m.float_value
        if not math.isfinite(value):
            raise Rejected("invalid_value", f"metric {(m.name or m.alias)!r}: {value}")
        return value
    if kind in ("int_value", "long_value"):
        raw = m.int_value if kind == "int_value" else m.long_value
        return float(_signed(raw, m.datatype))
    if kind == "boolean_value":
        return 1.0 if m.boolean_value else 0.0
    return None  # strings, bytes, datasets, templates: not telemetry


def _unsigned(m: PayloadMessage.Metric) -> int | None:
    kind = m.WhichOneof("value")
    if kind == "int_value":
        return m.int_value
    return m.long_value if kind == "long_value" else None


def _signed(raw: int, datatype: int) -> int:
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None:  # signed types travel as unsigned two's complement
        raw &= (1 << bits) - 1
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    return raw


def type_name(datatype: int, field: str | None) -> str:
    """The Sparkplug name of a value's type: its datatype, else its protobuf field."""
    if 0 < datatype < len(_TYPE_NAMES):
        return _TYPE_NAMES[datatype]
    return _FIELD_TYPES.get(field or "", "Unknown")


@dataclass(slots=True)
class MetricIn:
    """A metric to encode (tests, the simulator, commands)."""

    name: str | None = None
    value: float | bool | int | None = None
    datatype: int = DOUBLE
    alias: int | None = None
    timestamp_ms: int | None = None
    historical: bool = False
    transient: bool = False


def encode_payload(
    metrics: Sequence[MetricIn], *, seq: int | None = None, timestamp_ms: int | None = None
) -> bytes:
    message = PayloadMessage()
    if timestamp_ms is not None:
        message.timestamp = timestamp_ms
    if seq is not None:
        message.seq = seq
    for metric in metrics:
        m = message.metrics.add()
        if metric.name is not None:
            m.name = metric.name
        if metric.alias is not None:
            m.alias = metric.alias
        if metric.timestamp_ms is not None:
            m.timestamp = metric.timestamp_ms
        if metric.historical:
            m.is_historical = True
        if metric.transient:
            m.is_transient = True
        m.datatype = metric.datatype
        _set_value(m, metric)
    return message.SerializeToString()


def _set_value(m: PayloadMessage.Metric, metric: MetricIn) -> None:
    value = metric.value
    if value is None:
        m.is_null = True
    elif metric.datatype == BOOLEAN:
        m.boolean_value = bool(value)
    elif metric.datatype == FLOAT:
        m.float_value = float(value)
    elif metric.datatype == DOUBLE:
        m.double_value = float(value)
    elif metric.datatype == STRING:
        m.string_value = str(value)
    elif metric.datatype in (INT64, UINT64):
        m.long_value = int(value) & (1 << 64) - 1
    else:
        m.int_value = int(value) & (1 << 32) - 1


def rebirth_request() -> bytes:
    """The NCMD payload that asks an edge node to publish its BIRTH certificates again."""
    return encode_payload([MetricIn(REBIRTH, True, BOOLEAN)], timestamp_ms=_now_ms())


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- Sessions ---------------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceReadings:
    """Points of one device, or of the edge node itself (device None), from one message."""

    device: str | None
    live: list[Point] = field(default_factory=list)
    historical: list[Point] = field(default_factory=list)


@dataclass(slots=True)
class SessionChange:
    """A session opened or closed: of the edge node (device None) or of one device."""

    online: bool
    # Orders sessions: the host's number for the session (see the module docstring).
    session: int
    device: str | None = None


@dataclass(slots=True)
class Outcome:
    readings: list[DeviceReadings]
    changes: list[SessionChange]


@dataclass(slots=True)
class _Birth:
    """What a BIRTH certificate defines: metric names by alias, datatypes by metric name."""

    aliases: dict[int, str] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Device:
    session: int
    birth: _Birth


@dataclass(slots=True)
class _Node:
    bd_seq: int | None
    session: int
    birth: _Birth
    # The NBIRTH's own timestamp: the same again with the same bdSeq is the same BIRTH.
    birth_ms: int | None = None
    # False after a refused NBIRTH: no session until a good one (the devices are kept, so that
    # that BIRTH ends their sessions).
    born: bool = True
    devices: dict[str, _Device] = field(default_factory=dict)
    # The seq expected next (None: unknown, after a restore); missing seqs -> when first missed.
    next_seq: int | None = None
    gaps: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class SessionStats:
    gaps: int = 0
    rebirth_requests: int = 0
    out_of_order: int = 0
    # BIRTH values whose own time was outside the window, stored at the BIRTH's time.
    birth_values_restamped: int = 0
    # Metric values not stored, by type name (`type_name`), or "transient" (is_transient).
    not_stored: Counter[str] = field(default_factory=Counter)


class EdgeNodeSessions:
    """What a primary host knows of each edge node's session; see the module docstring."""

    def __init__(
        self,
        *,
        window_past: timedelta,
        window_future: timedelta,
        reorder_wait: float = 2.0,
        rebirth_interval: float = 10.0,
        max_bad_births: int = 3,
        confirm_wait: float = 30.0,
        max_nodes: int = 100_000,
        max_devices_per_node: int = 10_000,
        max_aliases: int = 100_000,
    ) -> None:
        self._window_past = window_past
        self._window_future = window_future
        self._reorder_wait = reorder_wait
        self._rebirth_interval = rebirth_interval
        self._max_bad_births = max_bad_births
        self._confirm_wait = confirm_wait
        self._max_nodes = max_nodes
        self._max_devices = max_devices_per_node
        self._max_aliases = max_aliases
        self._nodes: dict[tuple[str, str], _Node] = {}
        # The last session number per edge node, so that a new one always sorts after it.
        self._last_session: dict[tuple[str, str], int] = {}
        self._rebirth_asked: dict[tuple[str, str], float] = {}
        self._rebirths: set[tuple[str, str]] = set()
        # Refused BIRTHs per edge node since its last new connection (bdSeq): past the limit,
        # no more Rebirth requests, so a node that always sends a bad BIRTH is not asked forever.
        self._bad_births: dict[tuple[str, str], int] = {}
        # Edge nodes known when the host's session began and not heard from since; when that
        # wait began, and whether they were asked for a Rebirth at its end.
        self._unconfirmed: set[tuple[str, str]] = set()
        self._unconfirmed_since = 0.0
        self._unconfirmed_asked = False
        self.stats = SessionStats()

    # What to do next -------------------------------------------------------------------------

    def take_rebirths(self) -> list[tuple[str, str]]:
        """Edge nodes (group, edge node) that should now get a Rebirth request, once each."""
        wanted, self._rebirths = sorted(self._rebirths), set()
        return wanted

    def expire_gaps(self, now: float | None = None) -> None:
        """Gaps not filled within the reorder wait become Rebirth requests."""
        now = time.monotonic() if now is None else now
        for key, node in self._nodes.items():
            if node.gaps and min(node.gaps.values()) + self._reorder_wait <= now:
                self.stats.gaps += len(node.gaps)
                node.gaps.clear()
                self._ask_rebirth(key, now)

    def host_connected(self, now: float | None = None) -> None:
        """The host has a new MQTT session. It is a clean one, so what edge nodes sent meanwhile,
        an NDEATH among it, went to nobody: each edge node it knows must show it is alive."""
        self._unconfirmed = set(self._nodes)
        self._unconfirmed_since = time.monotonic() if now is None else now
        self._unconfirmed_asked = False

    def expire_unconfirmed(self, now: float | None = None) -> list[tuple[tuple[str, str], Outcome]]:
        """Edge nodes silent since the host connected: after the confirm wait, a Rebirth
        request; silent as long again, their session ends, as their NDEATH would have ended it."""
        now = time.monotonic() if now is None else now
        if not self._unconfirmed or self._unconfirmed_since + self._confirm_wait > now:
            return []
        self._unconfirmed_since = now
        if not self._unconfirmed_asked:
            self._unconfirmed_asked = True
            for key in sorted(self._unconfirmed):
                self._ask_rebirth(key, now)
            return []
        ended = [(key, _ended(self._nodes.pop(key))) for key in sorted(self._unconfirmed)]
        self._unconfirmed.clear()
        return ended

    def _ask_rebirth(self, key: tuple[str, str], now: float | None = None) -> None:
        if self._bad_births.get(key, 0) > self._max_bad_births:
            return  # it answers with bad BIRTHs: asking again would not help
        now = time.monotonic() if now is None else now
        asked = self._rebirth_asked.get(key)
        if asked is not None and now - asked < self._rebirth_interval:
            return  # one outstanding request at a time
        self._rebirth_asked[key] = now
        self._rebirths.add(key)
        self.stats.rebirth_requests += 1

    def birth_refused(self, topic: SparkplugTopic, now: float | None = None) -> None:
        """A BIRTH was refused (malformed): it opens no session, and asks for a Rebirth (up to
        `max_bad_births` times per connection of the edge node)."""
        key = (topic.group, topic.edge_node)
        node = self._nodes.get(key)
        if node is not None:
            if topic.kind == "NBIRTH":
                # The old session's aliases no longer hold; its devices stay until a good one.
                node.born, node.birth, node.next_seq = False, _Birth(), None
                node.gaps.clear()
            elif topic.device is not None:
                node.devices.pop(topic.device, None)
        self._bad_births[key] = self._bad_births.get(key, 0) + 1
        self._ask_rebirth(key, now)

    # Messages --------------------------------------------------------------------------------

    def handle(
        self,
        topic: SparkplugTopic,
        payload: Payload,
        received_at: datetime,
        *,
        now: float | None = None,
    ) -> Outcome:
        """What one message means; raises Rejected (and may ask for a Rebirth)."""
        key = (topic.group, topic.edge_node)
        kind = topic.kind
        if kind == "NDEATH":
            return self._node_death(key, payload)
        if kind == "NBIRTH":
            try:
                return self._node_birth(key, payload, received_at)
            except Rejected:
                self.birth_refused(topic, now)
                raise
        node = self._alive(key, kind, now)  # no session: not the BIRTH's fault
        if kind == "DBIRTH":
            try:
                return self._device_birth(key, node, topic, payload, received_at, now=now)
            except Rejected:
                self.birth_refused(topic, now)
                raise
        self._track_seq(key, node, payload.seq, now)
        if kind == "NDATA":
            readings = self._readings(None, node.birth, payload, received_at, key)
            return Outcome([readings], [])
        assert topic.device is not None  # parse_topic: device kinds have a device
        device = topic.device
        known = node.devices.get(device)
        if known is None:
            self._ask_rebirth(key, now)
            raise Rejected("no_birth", f"{kind} for device {device!r} before its DBIRTH")
        if kind == "DDEATH":
            del node.devices[device]
            return Outcome([], [SessionChange(False, known.session, device)])
        if kind == "DDATA":
            readings = self._readings(device, known.birth, payload, received_at, key)
            return Outcome([readings], [])
        raise Rejected("bad_topic", f"{kind} is a command, not for a host to consume")

    def restore_birth(
        self, topic: SparkplugTopic, raw: bytes, received_at: datetime, session: int | None
    ) -> None:
        """Rebuilds a session from a stored BIRTH (after a restart): aliases, datatypes, bdSeq
        and the session number it was given (None: stored before numbers were kept).

        The seq position is unknown until the next message, which becomes the baseline.
        """
        payload = decode_payload(raw, max_bytes=len(raw), max_metrics=len(raw) + 1)
        key = (topic.group, topic.edge_node)
        number = _millis(received_at) if session is None else session
        self._last_session[key] = max(number, self._last_session.get(key, number))
        birth = self._birth(payload)
        if topic.kind == "NBIRTH":
            self._nodes[key] = _Node(_bd_seq(payload), number, birth, _ms(payload.timestamp))
        elif topic.kind == "DBIRTH" and topic.device is not None and key in self._nodes:
            self._nodes[key].devices[topic.device] = _Device(number, birth)

    def _alive(self, key: tuple[str, str], kind: str, now: float | None) -> _Node:
        node = self._nodes.get(key)
        if node is None or not node.born:
            self._ask_rebirth(key, now)
            raise Rejected("no_birth", f"{kind} from edge node {key[1]!r} before NBIRTH")
        self._unconfirmed.discard(key)  # it speaks: alive
        return node

    def _number(self, key: tuple[str, str], received_at: datetime) -> int:
        """The next session number of this edge node or one of its devices: arrival order."""
        number = max(_millis(received_at), self._last_session.get(key, -1) + 1)
        self._last_session[key] = number
        return number

    def _node_birth(self, key: tuple[str, str], payload: Payload, received_at: datetime) -> Outcome:
        if key not in self._nodes and len(self._nodes) >= self._max_nodes:
            raise Rejected("too_many_devices", f"more than {self._max_nodes} edge nodes")
        bd_seq = _bd_seq(payload)
        birth = self._birth(payload)
        current = self._nodes.get(key)
        birth_ms = _ms(payload.timestamp)
        # The same BIRTH again (a redelivery): the same session, its devices still in it.
        duplicate = (
            current is not None
            and current.born
            and birth_ms is not None
            and (current.birth_ms, current.bd_seq) == (birth_ms, bd_seq)
        )
        readings = self._readings(None, birth, payload, received_at, key, is_birth=True)
        # Valid: from here on, nothing refuses it.
        changes: list[SessionChange] = []
        if duplicate and current is not None:
            node = _Node(bd_seq, current.session, birth, birth_ms, devices=current.devices)
        else:
            node = _Node(bd_seq, self._number(key, received_at), birth, birth_ms)
            if current is not None:
                # A new session ends the devices' sessions: each returns with its own DBIRTH.
                changes += [
                    SessionChange(False, d.session, name) for name, d in current.devices.items()
                ]
            if current is None or current.bd_seq != bd_seq:
                self._bad_births.pop(key, None)  # a new connection: ask again if need be
        node.next_seq = None if payload.seq is None else (payload.seq + 1) % 256
        self._nodes[key] = node
        self._rebirth_asked.pop(key, None)
        self._unconfirmed.discard(key)
        return Outcome([readings], [SessionChange(True, node.session), *changes])

    def _device_birth(
        self,
        key: tuple[str, str],
        node: _Node,
        topic: SparkplugTopic,
        payload: Payload,
        received_at: datetime,
        *,
        now: float | None,
    ) -> Outcome:
        device = topic.device
        assert device is not None  # parse_topic: device kinds have a device
        if device not in node.devices and len(node.devices) >= self._max_devices:
            raise Rejected("too_many_devices", f"more than {self._max_devices} devices")
        self._track_seq(key, node, payload.seq, now)  # arrived, even if refused: no gap
        birth = self._birth(payload)
        readings = self._readings(device, birth, payload, received_at, key, is_birth=True)
        session = self._number(key, received_at)
        node.devices[device] = _Device(session, birth)
        return Outcome([readings], [SessionChange(True, session, device)])

    def _node_death(self, key: tuple[str, str], payload: Payload) -> Outcome:
        node = self._nodes.get(key)
        bd_seq = _bd_seq(payload)
        if node is None:
            raise Rejected("stale_death", f"NDEATH (bdSeq {bd_seq}) for an edge node not alive")
        if bd_seq is not None and node.bd_seq is not None and bd_seq != node.bd_seq:
            raise Rejected(
                "stale_death",
                f"NDEATH with bdSeq {bd_seq} does not end the current session (bdSeq "
                f"{node.bd_seq})",
            )
        del self._nodes[key]
        self._bad_births.pop(key, None)
        self._unconfirmed.discard(key)
        return _ended(node)

    def _track_seq(
        self, key: tuple[str, str], node: _Node, seq: int | None, now: float | None
    ) -> None:
        if seq is None or not 0 <= seq <= 255:
            self._ask_rebirth(key, now)
            raise Rejected("invalid_seq", f"seq {seq} is not 0-255")
        expected = node.next_seq
        if expected is None or seq == expected:
            node.next_seq = (seq + 1) % 256
            node.gaps.pop(seq, None)
            return
        ahead = (seq - expected) % 256
        if ahead < 128:
            # Messages expected..seq-1 are missing for now: maybe late, maybe lost.
            at = time.monotonic() if now is None else now
            for missing in range(expected, expected + ahead):
                node.gaps.setdefault(missing % 256, at)
            node.next_seq = (seq + 1) % 256
        else:
            self.stats.out_of_order += 1
            node.gaps.pop(seq, None)  # a late one fills its gap; a duplicate changes nothing

    def _birth(self, payload: Payload) -> _Birth:
        birth = _Birth()
        for m in payload.metrics:
            if m.name:
                if m.alias is not None:
                    birth.aliases[m.alias] = m.name
                if m.datatype:
                    birth.types[m.name] = m.datatype
        if len(birth.aliases) > self._max_aliases:
            raise Rejected("too_many_points", f"more than {self._max_aliases} aliases")
        return birth

    def _readings(
        self,
        device: str | None,
        birth: _Birth,
        payload: Payload,
        received_at: datetime,
        key: tuple[str, str],
        *,
        is_birth: bool = False,
    ) -> DeviceReadings:
        readings = DeviceReadings(device)
        default_ms = _millis(payload.timestamp or received_at)
        now_ms = _millis(received_at)
        earliest = now_ms - self._window_past // _MS
        latest = now_ms + self._window_future // _MS
        # A BIRTH's values are current values; a metric's own time there is its last change
        # (a tag unchanged for days). Outside the window, it is stored at the BIRTH's time.
        birth_ms = default_ms if earliest <= default_ms <= latest else now_ms
        times: dict[int, datetime] = {}
        skipped: list[str] = []
        for m in payload.metrics:
            name = m.name
            if name is None:
                if m.alias is None:
                    raise Rejected("invalid_shape", "a metric with neither name nor alias")
                name = birth.aliases.get(m.alias)
                if name is None:
                    self._ask_rebirth(key)
                    raise Rejected("unknown_alias", f"alias {m.alias} is not in the BIRTH")
            if m.field is None or name == BD_SEQ or name.startswith(_CONTROL_PREFIXES):
                continue  # null, or a session or command metric
            if not known_metric_name(name):
                raise Rejected("invalid_metric_name", f"metric name {name[:80]!r}")
            value = m.value
            if m.unsigned is not None:  # no datatype sent: the BIRTH's gives the sign
                value = float(_signed(m.unsigned, birth.types.get(name, 0)))
            if m.transient or value is None:
                datatype = m.datatype or birth.types.get(name, 0)
                skipped.append(TRANSIENT if m.transient else type_name(datatype, m.field))
                continue
            ms = m.timestamp_ms or default_ms
            ts = times.get(ms)
            if ts is None:
                if not earliest <= ms <= latest:
                    if not is_birth:
                        raise Rejected(
                            "timestamp_out_of_window",
                            f"{device or key[1]}: {_EPOCH + timedelta(milliseconds=ms)} is "
                            f"outside the window around {received_at.isoformat()}",
                        )
                    self.stats.birth_values_restamped += 1
                    ms = birth_ms
                ts = times.get(ms) or _EPOCH + timedelta(milliseconds=ms)
                times[m.timestamp_ms or default_ms] = ts
            (readings.historical if m.historical else readings.live).append((ts, name, value))
        self.stats.not_stored.update(skipped)  # only for a message accepted whole
        return readings


def _ended(node: _Node) -> Outcome:
    """An edge node's session ends: the gateway's death makes its devices unreachable in one
    step, and their sessions end with it (a device returns only with its own DBIRTH)."""
    devices = [SessionChange(False, d.session, name) for name, d in node.devices.items()]
    return Outcome([], [SessionChange(False, node.session), *devices])


def _bd_seq(payload: Payload) -> int | None:
    for m in payload.metrics:
        if m.name == BD_SEQ and m.value is not None:
            return int(m.value)
    return None


def _millis(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _ms(ts: datetime | None) -> int | None:
    return None if ts is None else _millis(ts)
