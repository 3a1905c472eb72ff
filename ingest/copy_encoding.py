"""Telemetry rows as PostgreSQL's binary COPY data ("COPY ... FORMAT BINARY" file layout).

Packed here rather than by psycopg's row writer: one struct call per point instead of a row
tuple and four dumpers. The layout is the columns of `COPY_TELEMETRY`, in its order.
"""

import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from ingest.decoding import Point

COPY_TELEMETRY = "COPY telemetry (time, device_id, metric_id, value) FROM STDIN (FORMAT BINARY)"
TELEMETRY_TYPES = ("timestamptz", "int8", "int4", "float8")
"""The columns' types, for psycopg's own row writer (the benchmarks' baseline)."""

Row = tuple[datetime, int, int, float]
"""(time, device id, metric id, value): a row of `telemetry`."""

_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + bytes(8)  # signature, flags, header extension
_TRAILER = b"\xff\xff"
# Field count, then (length, value) for time (µs since 2000), device_id, metric_id, value.
_PACK_ROW = struct.Struct("!hiqiqiiid").pack
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class TelemetryCopy:
    """Binary COPY data for `COPY_TELEMETRY`, built a reading at a time."""

    __slots__ = ("_metric_ids", "_parts")

    def __init__(self, metric_ids: Mapping[str, int]) -> None:
        self._parts = [_SIGNATURE]
        self._metric_ids = metric_ids

    def add(self, device: int, points: Sequence[Point]) -> None:
        """Adds a row per point of one device's reading (its metric names are in metric_ids)."""
        parts, metric_ids, pack = self._parts, self._metric_ids, _PACK_ROW
        # The points of one reading share their time: convert it once.
        stamp: datetime | None = None
        micros = 0
        for ts, name, value in points:
            if ts is not stamp:
                stamp, micros = ts, (ts - _PG_EPOCH) // _MICROSECOND
            parts.append(pack(4, 8, micros, 8, device, 4, metric_ids[name], 8, value))

    @property
    def rows(self) -> int:
        return len(self._parts) - 1

    def data(self) -> bytes:
        """The COPY data: header, rows, trailer."""
        return b"".join((*self._parts, _TRAILER))


def encode_rows(rows: Sequence[Row]) -> bytes:
    """Rows as binary COPY data (the benchmarks' baseline encodes its rows with this)."""
    parts = [_SIGNATURE]
    parts += [
        _PACK_ROW(4, 8, (ts - _PG_EPOCH) // _MICROSECOND, 8, device, 4, metric, 8, value)
        for ts, device, metric, value in rows
    ]
    parts.append(_TRAILER)
    return b"".join(parts)
