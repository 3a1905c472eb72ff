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
from registry.ids import is_metric_name

Point = tuple[datetime, str, float]
"""(device time, metric name, value)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Telemetry:
    """A decoded, valid telemetry message."""

    platform: str
    device: str
    points: list[Point]
    # Back-filled data: stored, but not evidence that the device is connected now.
    historical: bool
    # Earliest and latest device time among the points (the writer makes partitions for them).
    first: datetime
    last: datetime


class TelemetryDecoder:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    def decode(
        self, platform: str, device: str, payload: bytes, received_at: datetime
    ) -> Telemetry:
        """Decodes one message; raises Rejected with the reason when anything is wrong."""
        limits = self._limits
        if len(payload) > limits.max_payload_bytes:
            raise Rejected(
                "payload_too_large",
                f"{len(payload)} bytes, limit {limits.max_payload_bytes}",
                platform=platform,
            )
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise Rejected("invalid_json", str(exc), platform=platform) from None
        readings = document if isinstance(document, list) else [document]
        if not readings:
            raise Rejected("invalid_shape", "empty list of readings", platform=platform)
        earliest = received_at - limits.window_past
        latest = received_at + limits.window_future
        points: list[Point] = []
        historical: bool | None = None
        first = last = received_at
        for index, reading in enumerate(readings):
            try:
                ts, metrics, flagged = _reading(reading, received_at)
            except Rejected as exc:
                exc.platform = platform
                exc.detail = f"reading {index}: {exc.detail}"
                raise
            if not earliest <= ts <= latest:
                raise Rejected(
                    "timestamp_out_of_window",
                    f"reading {index}: {ts.isoformat()} is outside "
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
                    "live and historical readings in one message",
                    platform=platform,
                )
            if len(points) + len(metrics) > limits.max_points_per_message:
                raise Rejected(
                    "too_many_points",
                    f"more than {limits.max_points_per_message} points in one message",
                    platform=platform,
                )
            points.extend((ts, name, value) for name, value in metrics)
        if not points:
            raise Rejected("invalid_shape", "no metrics in the message", platform=platform)
        return Telemetry(platform, device, points, bool(historical), first, last)


def _reading(reading: Any, received_at: datetime) -> tuple[datetime, list[tuple[str, float]], bool]:
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
    values = []
    for name, raw in metrics.items():
        if not is_metric_name(name):
            raise Rejected(
                "invalid_metric_name", f"metric name {name[:80]!r} breaks the name rules"
            )
        values.append((name, _value(name, raw)))
    return ts, values, historical


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
