"""Binary parameters for the arrays that go with every batch.

psycopg dumps a list element by element in Python, and a batch of 10,000 connection events
sends several arrays that long.
`BigintArray`, `BoolArray`, `TimestamptzArray` and `TextArray` are lists that the dumpers below
write with a few slice copies, or from the few distinct values a batch holds, instead. They stay
lists: on a connection without these dumpers (`ADAPTERS`), psycopg dumps them as it dumps any
list.
"""

import struct
import sys
from array import array
from datetime import UTC, datetime
from typing import Final, cast

from psycopg import adapters
from psycopg.abc import AdaptContext
from psycopg.adapt import AdaptersMap, Buffer, Dumper, PyFormat, Transformer
from psycopg.pq import Format

_INT8, _INT8_ARRAY, _BOOL, _BOOL_ARRAY = 20, 1016, 16, 1000
_TIMESTAMPTZ, _TIMESTAMPTZ_ARRAY, _TEXT, _TEXT_ARRAY = 1184, 1185, 25, 1009
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_LENGTH: Final = struct.Struct("!i")
_NOTHING: Final = object()  # no element yet
# ndim, has-nulls flag, element type, then one dimension: its length and lower bound.
_HEADER: Final = struct.Struct("!iiIii")
_EMPTY: Final = struct.Struct("!iiI")
_INT8_ELEMENT: Final = struct.Struct("!iq")
_NULL: Final = b"\xff\xff\xff\xff"


class BigintArray(list[int | None]):
    """A list of ints (or None) sent as bigint[]."""


class BoolArray(list[bool]):
    """A list of bools sent as boolean[]."""


class TimestamptzArray(list[datetime]):
    """A list of timezone-aware datetimes sent as timestamptz[]."""


class TextArray(list[str]):
    """A list of strings, few of them distinct (causes, platforms, sources), sent as text[]."""


def _eight_byte_elements(raw: bytes, element_oid: int) -> bytearray:
    """A one-dimensional array without NULLs of `raw`'s 8-byte big-endian elements."""
    n = len(raw) // 8
    # Each element: its length (8) as a big-endian int4, then the value.
    out = bytearray(_HEADER.size + 12 * n)
    _HEADER.pack_into(out, 0, 1, 0, element_oid, n, 1)
    out[_HEADER.size + 3 :: 12] = b"\x08" * n
    for byte in range(8):
        out[_HEADER.size + 4 + byte :: 12] = raw[byte::8]
    return out


class _BigintArrayDumper(Dumper):
    format = Format.BINARY
    oid = _INT8_ARRAY

    def dump(self, obj: list[int | None]) -> Buffer:
        n = len(obj)
        if not n:
            return _EMPTY.pack(0, 0, _INT8)
        try:
            values = array("q", cast(list[int], obj))
        except TypeError:  # NULLs, element by element
            elements = b"".join(_NULL if v is None else _INT8_ELEMENT.pack(8, v) for v in obj)
            return _HEADER.pack(1, 1, _INT8, n, 1) + elements
        if sys.byteorder == "little":
            values.byteswap()
        return _eight_byte_elements(values.tobytes(), _INT8)


class _TimestamptzArrayDumper(Dumper):
    format = Format.BINARY
    oid = _TIMESTAMPTZ_ARRAY

    def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        # psycopg's element dumper (compiled in psycopg-binary): 8 bytes, big-endian
        # microseconds since 2000; this dumper only saves the list's per-element dispatch.
        tx = Transformer.from_context(context)
        self._element = tx.get_dumper(_PG_EPOCH, PyFormat.BINARY)

    def dump(self, obj: list[datetime]) -> Buffer:
        if not obj:
            return _EMPTY.pack(0, 0, _TIMESTAMPTZ)
        # Kafka's records share their fetch's time, a message's events its receipt time:
        # each run of one datetime is dumped once.
        element = self._element.dump
        raws: list[Buffer | None] = []
        append = raws.append
        last: object = _NOTHING
        raw: Buffer | None = None
        for at in obj:
            if at is not last:
                if not isinstance(at, datetime) or at.tzinfo is None:
                    raise TypeError(f"timestamptz[] needs timezone-aware datetimes, got {at!r}")
                last, raw = at, element(at)
            append(raw)
        return _eight_byte_elements(b"".join(cast(list[Buffer], raws)), _TIMESTAMPTZ)


class _TextArrayDumper(Dumper):
    format = Format.BINARY
    oid = _TEXT_ARRAY

    def __init__(self, cls: type, context: AdaptContext | None = None) -> None:
        super().__init__(cls, context)
        # psycopg's element dumper: the string in the connection's encoding.
        self._element = Transformer.from_context(context).get_dumper("", PyFormat.BINARY)

    def dump(self, obj: list[str]) -> Buffer:
        if not obj:
            return _EMPTY.pack(0, 0, _TEXT)
        # Each element: its length in bytes as a big-endian int4, then the bytes; each
        # distinct string is encoded once.
        element = self._element.dump
        encoded = {}
        for text in set(obj):
            if not isinstance(text, str):
                raise TypeError(f"text[] needs strings, got {text!r}")
            raw = bytes(cast(Buffer, element(text)))
            encoded[text] = _LENGTH.pack(len(raw)) + raw
        return _HEADER.pack(1, 0, _TEXT, len(obj), 1) + b"".join(map(encoded.__getitem__, obj))


class _BoolArrayDumper(Dumper):
    format = Format.BINARY
    oid = _BOOL_ARRAY

    def dump(self, obj: list[bool]) -> Buffer:
        n = len(obj)
        if not n:
            return _EMPTY.pack(0, 0, _BOOL)
        out = bytearray(_HEADER.size + 5 * n)
        _HEADER.pack_into(out, 0, 1, 0, _BOOL, n, 1)
        out[_HEADER.size + 3 :: 5] = b"\x01" * n
        out[_HEADER.size + 4 :: 5] = bytes(obj)  # a bool's value is one byte, 0 or 1
        return out


ADAPTERS: Final = AdaptersMap(adapters)
"""psycopg's adapters plus these; registry.store's connections use it."""
ADAPTERS.register_dumper(BigintArray, _BigintArrayDumper)
ADAPTERS.register_dumper(BoolArray, _BoolArrayDumper)
ADAPTERS.register_dumper(TimestamptzArray, _TimestamptzArrayDumper)
ADAPTERS.register_dumper(TextArray, _TextArrayDumper)
