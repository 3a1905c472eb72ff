"""Decoding and validating JSON telemetry payloads (docs/contract.md, "Payload").

A payload is one reading `{"ts": ..., "metrics": {...}}` or a list of them. A message is
accepted or rejected whole: a rejection names the first problem found.
"""

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ingest.errors import Rejected
from ingest.settings import Limits
from ingest.topics import TopicScheme
from registry.ids import is_device_id, is_metric_name, is_reserved_device_id, reserved_device_id

Point = tuple[datetime, str, float]
"""(device time, metric name, value)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Telemetry:
    """The valid readings of one device from one message."""

    platform: str
    device: str
    points: list[Point]
    # Back-filled data: stored, but not evidence that the device is connected now.
    historical: bool
    # Earliest and latest device time among the points (the writer makes partitions for them).
    first: datetime
    last: datetime
    # The gateway the readings came through, if any.
    gateway: str | None = None


@dataclass(slots=True)
class Status:
    """A session change a device or gateway announced (docs/contract.md, "Status")."""

    platform: str
    online: bool
    # The sender's session number; None: apply in arrival order.
    session: int | None
    device: str | None = None
    gateway: str | None = None
    # What announced it, recorded with the state change: a status topic or Sparkplug.
    cause: str = "status"


_MAX_STATUS_BYTES = 1024

Decoded = list[Telemetry | Status]
"""What one message amounts to: readings of one or more devices, or a status."""


def decode_status(platform: str, payload: bytes) -> tuple[bool, int | None]:
    """`online` / `offline` as text, or `{"state": "online"|"offline", "session": n}`."""
    if len(payload) > _MAX_STATUS_BYTES:
        raise Rejected("payload_too_large", f"a status of {len(payload)} bytes", platform=platform)
    text = payload.strip()
    if text in (b"online", b"offline"):
        return text == b"online", None
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Rejected(
            "invalid_status", 'expected "online", "offline" or a JSON status', platform=platform
        ) from None
    if not isinstance(document, dict) or not {"state"} <= document.keys() <= {"state", "session"}:
        raise Rejected(
            "invalid_status", 'a JSON status is {"state": ..., "session": n}', platform=platform
        )
    state, session = document["state"], document.get("session")
    if state not in ("online", "offline"):
        raise Rejected(
            "invalid_status", f"state {str(state)[:20]!r} is not online/offline", platform=platform
        )
    if session is not None and (
        isinstance(session, bool) or not isinstance(session, int) or not 0 <= session < 2**63
    ):
        raise Rejected("invalid_status", "session must be a whole number from 0", platform=platform)
    return state == "online", session


class TelemetryDecoder:
    """Decodes message payloads; a message is accepted or rejected whole."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._past, self._future = limits.window_past, limits.window_future

    def decode(
        self, platform: str, device: str, payload: bytes, received_at: datetime
    ) -> Telemetry:
        """Decodes a device's own message; raises Rejected with the reason."""
        document = self._load(platform, payload)
        budget = _Budget(self._limits.max_points_per_message, platform)
        return self._device(platform, device, document, received_at, budget, gateway=None)

    def decode_gateway(
        self, platform: str, gateway: str, payload: bytes, received_at: datetime
    ) -> list[Telemetry]:
        """Decodes a gateway's message `{"devices": {device: readings, ...}}`."""
        document = self._load(platform, payload)
        if not isinstance(document, dict) or document.keys() != {"devices"}:
            raise Rejected(
                "invalid_shape", 'a gateway message is {"devices": {...}}', platform=platform
            )
        devices = document["devices"]
        if not isinstance(devices, dict) or not devices:
            raise Rejected(
                "invalid_shape", "'devices' must be a non-empty object", platform=platform
            )
        budget = _Budget(self._limits.max_points_per_message, platform)
        decoded = []
        for device, readings in devices.items():
            if not is_device_id(device):
                raise Rejected(
                    "bad_device_id",
                    f"device id {device[:80]!r} breaks the id rules",
                    platform=platform,
                )
            if is_reserved_device_id(device):
                raise Rejected("reserved_device_id", reserved_device_id(device), platform=platform)
            decoded.append(
                self._device(platform, device, readings, received_at, budget, gateway=gateway)
            )
        return decoded

    def _load(self, platform: str, payload: bytes) -> Any:
        limit = self._limits.max_payload_bytes
        if len(payload) > limit:
            raise Rejected(
                "payload_too_large", f"{len(payload)} bytes, limit {limit}", platform=platform
            )
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise Rejected("invalid_json", str(exc), platform=platform) from None

    def _device(
        self,
        platform: str,
        device: str,
        document: Any,
        received_at: datetime,
        budget: "_Budget",
        *,
        gateway: str | None,
    ) -> Telemetry:
        readings = document if isinstance(document, list) else [document]
        if not readings:
            raise Rejected("invalid_shape", "empty list of readings", platform=platform)
        earliest = received_at - self._past
        latest = received_at + self._future
        points: list[Point] = []
        historical: bool | None = None
        first = last = received_at
        for index, reading in enumerate(readings):
            try:
                ts, readings_points, flagged = _reading(reading, received_at)
            except Rejected as exc:
                exc.platform = platform
                exc.detail = f"{device}, reading {index}: {exc.detail}"
                raise
            if not earliest <= ts <= latest:
                raise Rejected(
                    "timestamp_out_of_window",
                    f"{device}, reading {index}: {ts.isoformat()} is outside "
                    f"[{earliest.isoformat()}, {latest.isoformat()}]",
                    platform=platform,
                )
            if historical is None:
                historical, first, last = flagged, ts, ts
            else:
                first, last = min(first, ts), max(last, ts)
            if historical != flagged:
                raise Rejected(
                    "invalid_shape",
                    f"{device}: live and historical readings in one message",
                    platform=platform,
                )
            budget.take(len(readings_points))
            points += readings_points
        if not points:
            raise Rejected("invalid_shape", f"{device}: no metrics", platform=platform)
        return Telemetry(platform, device, points, bool(historical), first, last, gateway)


class _Budget:
    """Points left for one message."""

    def __init__(self, limit: int, platform: str) -> None:
        self._left = self._limit = limit
        self._platform = platform

    def take(self, points: int) -> None:
        self._left -= points
        if self._left < 0:
            raise Rejected(
                "too_many_points",
                f"more than {self._limit} points in one message",
                platform=self._platform,
            )


def _reading(reading: Any, received_at: datetime) -> tuple[datetime, list[Point], bool]:
    if not isinstance(reading, dict):
        raise Rejected(
            "invalid_shape", f"a reading must be an object, not {type(reading).__name__}"
        )
    unknown = reading.keys() - {"ts", "metrics", "historical"}
    if unknown:
        raise Rejected("invalid_shape", f"unknown fields {sorted(unknown)[:5]}")
    ts = _timestamp(reading["ts"]) if "ts" in reading else received_at
    historical = reading.get("historical", False)
    if not isinstance(historical, bool):
        raise Rejected("invalid_shape", "'historical' must be true or false")
    metrics = reading.get("metrics")
    if not isinstance(metrics, dict):
        raise Rejected("invalid_shape", "'metrics' must be an object of name: number")
    # Per reading, not per point, in the common case: every name known good, and every value
    # a finite number (fsum refuses what is not a number, overflows on integers beyond a
    # float, and is not finite if any value is NaN or infinite).
    if not _GOOD_NAMES.issuperset(metrics):
        for name in metrics:
            if not known_metric_name(name):
                raise Rejected(
                    "invalid_metric_name", f"metric name {name[:80]!r} breaks the name rules"
                )
    try:
        finite = math.isfinite(math.fsum(metrics.values()))
    except (TypeError, OverflowError):
        finite = False
    if finite:
        # JSON numbers as orjson gives them: floats and ints (true/false are ints); COPY
        # stores them as float8.
        return ts, [(ts, name, value) for name, value in metrics.items()], historical
    return ts, [(ts, name, _value(name, raw)) for name, raw in metrics.items()], historical


# Metric names repeat across messages: remember the valid ones instead of matching each time.
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 100_000


def known_metric_name(name: str) -> bool:
    """Whether `name` follows the metric name rule (registry/ids.py), remembering good ones."""
    if name in _GOOD_NAMES:
        return True
    if not is_metric_name(name):
        return False
    if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(name)
    return True


def _value(name: str, raw: Any) -> float:
    # bool is an int subclass: true/false are stored as 1.0/0.0 (docs/contract.md).
    if isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:
            value = math.inf
        if math.isfinite(value):
            return value
        raise Rejected("invalid_value", f"metric {name[:80]!r}: {raw!r} is not a finite number")
    raise Rejected("invalid_value", f"metric {name[:80]!r}: {type(raw).__name__} is not a number")


def _timestamp(raw: Any) -> datetime:
    if isinstance(raw, bool):
        raise Rejected("invalid_timestamp", "'ts' must be RFC 3339 text or epoch milliseconds")
    if isinstance(raw, int | float):
        if not math.isfinite(raw) or abs(raw) > 1e15:
            raise Rejected("invalid_timestamp", f"{raw!r} is not a plausible epoch in milliseconds")
        return _EPOCH + timedelta(milliseconds=raw)
    if isinstance(raw, str):
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError:
            raise Rejected("invalid_timestamp", f"{raw[:64]!r} is not RFC 3339") from None
        if ts.tzinfo is None:
            raise Rejected(
                "invalid_timestamp", f"{raw[:64]!r} has no UTC offset (RFC 3339 needs one)"
            )
        return ts.astimezone(UTC)
    raise Rejected("invalid_timestamp", "'ts' must be RFC 3339 text or epoch milliseconds")


class MessageDecoder:
    """What one MQTT message (topic and payload) amounts to, or the reason it is refused."""

    def __init__(self, topics: TopicScheme, limits: Limits) -> None:
        self._topics = topics
        self._limits = limits
        self._payloads = TelemetryDecoder(limits)

    def __call__(self, topic: str, payload: bytes, received_at: datetime) -> Decoded | Rejected:
        try:
            address = self._topics.parse(topic)
            platform, device, gateway = address.platform, address.device, address.gateway
            if address.kind == "status":
                online, session = decode_status(platform, payload)
                return [Status(platform, online, session, device=device, gateway=gateway)]
            if gateway is not None:
                decoded: Decoded = []
                decoded.extend(
                    self._payloads.decode_gateway(platform, gateway, payload, received_at)
                )
                return decoded
            assert device is not None  # the parser sets exactly one
            return [self._payloads.decode(platform, device, payload, received_at)]
        except Rejected as rejected:
            return rejected
