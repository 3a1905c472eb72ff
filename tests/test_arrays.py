"""The array dumpers of registry.arrays, read back by PostgreSQL itself."""

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.adapt import PyFormat, Transformer

from registry.arrays import BigintArray, BoolArray, TextArray, TimestamptzArray


async def sent_and_read(
    db: psycopg.AsyncConnection[Any], array: list[Any]
) -> tuple[Any, ...] | None:
    """The array as PostgreSQL reads it back, its type and its length."""
    cur = await db.execute("SELECT %(a)b, pg_typeof(%(a)b)::text, cardinality(%(a)b)", {"a": array})
    return await cur.fetchone()


BIGINTS = [
    [],
    [0],
    [1, -1, 255, 256, -(2**63), 2**63 - 1],
    list(range(-5000, 5000, 3)),
    [None],
    [7, None, -7, None],
]


@pytest.mark.parametrize("values", BIGINTS)
async def test_bigint_arrays_arrive_as_sent(
    db: psycopg.AsyncConnection[Any], values: list[int | None]
) -> None:
    assert await sent_and_read(db, BigintArray(values)) == (values, "bigint[]", len(values))


@pytest.mark.parametrize("values", [[], [True], [False], [True, False, False, True] * 1000])
async def test_bool_arrays_arrive_as_sent(
    db: psycopg.AsyncConnection[Any], values: list[bool]
) -> None:
    assert await sent_and_read(db, BoolArray(values)) == (values, "boolean[]", len(values))


NOW = datetime(2026, 12, 3, 13, 45, 7, 123456, tzinfo=UTC)
TIMES = [
    [],
    [NOW],
    [NOW, NOW, NOW + timedelta(microseconds=1), NOW],
    # Before 2000 (negative), another zone, the extremes Python has, a leap day.
    [
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 6, 1, 8, tzinfo=timezone(timedelta(hours=8))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 2, 29, 12, tzinfo=UTC),
    ],
    [NOW + timedelta(seconds=n) for n in range(3000)],
]


@pytest.mark.parametrize("values", TIMES)
async def test_timestamptz_arrays_arrive_as_sent(
    db: psycopg.AsyncConnection[Any], values: list[datetime]
) -> None:
    await db.execute("SET TimeZone = 'UTC'")  # year 1 and 9999 read back in any zone
    assert await sent_and_read(db, TimestamptzArray(values)) == (
        values,
        "timestamp with time zone[]",
        len(values),
    )


@pytest.mark.parametrize("values", [[NOW, datetime(2026, 12, 3)], [None, NOW], [NOW, None]])
async def test_naive_datetimes_and_nulls_are_refused_not_guessed(
    db: psycopg.AsyncConnection[Any], values: list[Any]
) -> None:
    with pytest.raises(TypeError, match="timezone-aware"):
        await db.execute("SELECT %b", (TimestamptzArray(values),))


@pytest.mark.parametrize("values", [[None], ["a", None]])
async def test_text_arrays_refuse_nulls(
    db: psycopg.AsyncConnection[Any], values: list[Any]
) -> None:
    with pytest.raises(TypeError, match="needs strings"):
        await db.execute("SELECT %b", (TextArray(values),))


TEXTS = [
    [],
    [""],
    ["status", "status", "sparkplug NDEATH", "status"],
    ["p000", "数据", "ünïcode", "tab\tand\nnewline", 'quote " and \\ backslash', "{brace,}"],
    [f"d{n:07d}" for n in range(5000)],
]


@pytest.mark.parametrize("values", TEXTS)
async def test_text_arrays_arrive_as_sent(
    db: psycopg.AsyncConnection[Any], values: list[str]
) -> None:
    assert await sent_and_read(db, TextArray(values)) == (values, "text[]", len(values))


async def test_the_store_s_connections_use_these_dumpers(
    db: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    """registry.store connects with them; elsewhere they are dumped as plain lists."""
    ids = BigintArray([1, 2, 3])
    arrays = [ids, BoolArray([True]), TimestamptzArray([NOW]), TextArray(["a"])]
    for values in arrays:
        used = Transformer(db).get_dumper(values, PyFormat.BINARY)
        assert type(used).__module__ == "registry.arrays"
    async with await psycopg.AsyncConnection.connect(database_url) as plain:
        assert type(Transformer(plain).get_dumper(ids, PyFormat.BINARY)).__module__ != (
            "registry.arrays"
        )
        cur = await plain.execute(
            "SELECT %b::bigint[], %b::bool[], %b::timestamptz[], %b::text[]", arrays
        )
        assert await cur.fetchone() == ([1, 2, 3], [True], [NOW], ["a"])
