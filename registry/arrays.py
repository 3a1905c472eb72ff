"""Binary parameters for the id and flag arrays that go with every batch.

psycopg dumps a list element by element in Python (about 0.23 µs an element, measured); a batch
of 10,000 connection events sends several arrays that long. `BigintArray` and `BoolArray` are
lists that the dumpers below write with a few slice copies instead. They stay lists: on a
connection without these dumpers (`ADAPTERS`), psycopg dumps them as it dumps any list.
"""

import struct
import sys
from array import array
from typing import Final, cast

from psycopg import adapters
from psycopg.adapt import AdaptersMap, Buffer, Dumper
from psycopg.pq import Format

_INT8, _INT8_ARRAY, _BOOL, _BOOL_ARRAY = 20, 1016, 16, 1000
# ndim, has-nulls flag, element type, then one dimension: its length and lower bound.
_HEADER: Final = struct.Struct("!iiIii")
_EMPTY: Final = struct.Struct("!iiI")
_INT8_ELEMENT: Final = struct.Struct("!iq")
_NULL: Final = b"\xff\xff\xff\xff"


class BigintArray(list[int | None]):
    """A list of ints (or None) sent as bigint[]."""


class BoolArray(list[bool]):
    """A list of bools sent as boolean[]."""


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
        raw = values.tobytes()
        # Each element: its length (8) as a big-endian int4, then the value.
        out = bytearray(_HEADER.size + 12 * n)
        _HEADER.pack_into(out, 0, 1, 0, _INT8, n, 1)
        out[_HEADER.size + 3 :: 12] = b"\x08" * n
        for byte in range(8):
            out[_HEADER.size + 4 + byte :: 12] = raw[byte::8]
        return out


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
