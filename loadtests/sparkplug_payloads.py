"""Sparkplug B payloads for the load test, encoded here and not by iiot's own encoder.

The load test checks iiot; had it used iiot's encoder, a mistake in the shared code would pass
on both sides. So this writes the protobuf wire format itself, from the field numbers of Eclipse
Tahu's published `sparkplug_b.proto` (Sparkplug B 3.0), for the few fields a fleet sends.
tests/test_loadtest_payloads.py checks its bytes against an independent implementation's
(pysparkplug's reference payloads in tests/fixtures).
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass

NAMESPACE = "spBv1.0"

# Sparkplug B datatypes (sparkplug_b.proto, DataType).
INT64 = 4
DOUBLE = 10
BOOLEAN = 11

_VARINT, _FIXED64, _LENGTH = 0, 1, 2
# Payload fields
_TIMESTAMP, _METRICS, _SEQ = 1, 2, 3
# Metric fields
_NAME, _ALIAS, _M_TIMESTAMP, _DATATYPE = 1, 2, 3, 4
_HISTORICAL, _NULL = 5, 7
_LONG_VALUE, _DOUBLE_VALUE, _BOOLEAN_VALUE = 11, 13, 14


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric. `datatype` None leaves it out, as DATA messages may (the BIRTH gave it)."""

    name: str | None = None
    value: float | int | bool | None = None
    datatype: int | None = DOUBLE
    alias: int | None = None
    timestamp_ms: int | None = None
    historical: bool = False


def node_topic(group: str, kind: str, edge_node: str, device: str | None = None) -> str:
    suffix = f"/{device}" if device is not None else ""
    return f"{NAMESPACE}/{group}/{kind}/{edge_node}{suffix}"


def encode(
    metrics: Sequence[Metric], *, seq: int | None = None, timestamp_ms: int | None = None
) -> bytes:
    """A Payload message: timestamp, metrics, seq, each present only when given."""
    out = bytearray()
    if timestamp_ms is not None:
        _varint_field(out, _TIMESTAMP, timestamp_ms)
    for metric in metrics:
        body = _metric(metric)
        _key(out, _METRICS, _LENGTH)
        _varint(out, len(body))
        out += body
    if seq is not None:
        _varint_field(out, _SEQ, seq)
    return bytes(out)


def _metric(metric: Metric) -> bytes:
    out = bytearray()
    if metric.name is not None:
        name = metric.name.encode()
        _key(out, _NAME, _LENGTH)
        _varint(out, len(name))
        out += name
    if metric.alias is not None:
        _varint_field(out, _ALIAS, metric.alias)
    if metric.timestamp_ms is not None:
        _varint_field(out, _M_TIMESTAMP, metric.timestamp_ms)
    if metric.datatype is not None:
        _varint_field(out, _DATATYPE, metric.datatype)
    if metric.historical:
        _varint_field(out, _HISTORICAL, 1)
    value = metric.value
    if value is None:
        _varint_field(out, _NULL, 1)
    elif metric.datatype == BOOLEAN or isinstance(value, bool):
        _varint_field(out, _BOOLEAN_VALUE, int(bool(value)))
    elif metric.datatype == INT64:
        _varint_field(out, _LONG_VALUE, int(value) & (1 << 64) - 1)
    else:
        _key(out, _DOUBLE_VALUE, _FIXED64)
        out += struct.pack("<d", float(value))
    return bytes(out)


def _key(out: bytearray, field: int, wire_type: int) -> None:
    _varint(out, field << 3 | wire_type)


def _varint_field(out: bytearray, field: int, value: int) -> None:
    _key(out, field, _VARINT)
    _varint(out, value)


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
