"""Binary COPY encoding, byte for byte against PostgreSQL's own: the server writes the same
rows with `COPY ... TO STDOUT (FORMAT BINARY)`, and what the writer sends must be identical."""

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from ingest.copy_encoding import TelemetryCopy, encode_rows

NOW = datetime.now(UTC)
# Before and after PostgreSQL's epoch (2000), microseconds, int8 device ids, negative values.
ROWS = [
    (datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), 1, 1, -1.5),
    (NOW, 2**40, 2**31 - 1, 1e300),
    (NOW, 2**40, 7, 0.0),
    (NOW + timedelta(microseconds=1), 3, 7, 20.25),
]


async def postgresql_copy(db: psycopg.AsyncConnection[Any], rows: list[Any]) -> bytes:
    await db.execute(
        "CREATE TEMP TABLE rows (n int, time timestamptz, device_id int8, metric_id int4,"
        " value float8)"
    )
    async with db.cursor() as cur:
        await cur.executemany(
            "INSERT INTO rows VALUES (%s, %s, %s, %s, %s)", [(n, *r) for n, r in enumerate(rows)]
        )
        out = bytearray()
        copy_out = "COPY (SELECT time, device_id, metric_id, value FROM rows ORDER BY n) TO STDOUT"
        async with cur.copy(copy_out + " (FORMAT BINARY)") as copy:
            async for data in copy:
                out += data
    return bytes(out)


async def test_rows_are_encoded_as_postgresql_encodes_them(
    db: psycopg.AsyncConnection[Any],
) -> None:
    assert encode_rows(ROWS) == await postgresql_copy(db, ROWS)


async def test_readings_are_encoded_as_their_rows(db: psycopg.AsyncConnection[Any]) -> None:
    # Readings share a time across their points; a device's next reading has a time of its own.
    ids = {"a": 1, "b": 7}
    copy = TelemetryCopy(ids)
    copy.add(2**40, [(NOW, "a", 1.0), (NOW, "b", 2.0)])
    copy.add(3, [(NOW + timedelta(seconds=1), "b", 3.0), (NOW - timedelta(days=1), "a", 4.0)])
    expected = [
        (NOW, 2**40, 1, 1.0),
        (NOW, 2**40, 7, 2.0),
        (NOW + timedelta(seconds=1), 3, 7, 3.0),
        (NOW - timedelta(days=1), 3, 1, 4.0),
    ]
    assert copy.rows == 4
    assert copy.data() == await postgresql_copy(db, expected)


def test_no_rows_is_a_header_and_a_trailer() -> None:
    copy = TelemetryCopy({})
    assert copy.rows == 0
    assert copy.data() == encode_rows([]) == b"PGCOPY\n\xff\r\n\0" + bytes(8) + b"\xff\xff"
