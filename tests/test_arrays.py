"""The array dumpers of registry.arrays, read back by PostgreSQL itself."""

from typing import Any

import psycopg
import pytest
from psycopg.adapt import PyFormat, Transformer

from registry.arrays import BigintArray, BoolArray

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
    cur = await db.execute(
        "SELECT %(a)b, pg_typeof(%(a)b)::text, cardinality(%(a)b)",
        {"a": BigintArray(values)},
    )
    assert await cur.fetchone() == (values, "bigint[]", len(values))


@pytest.mark.parametrize("values", [[], [True], [False], [True, False, False, True] * 1000])
async def test_bool_arrays_arrive_as_sent(
    db: psycopg.AsyncConnection[Any], values: list[bool]
) -> None:
    cur = await db.execute(
        "SELECT %(a)b, pg_typeof(%(a)b)::text, cardinality(%(a)b)", {"a": BoolArray(values)}
    )
    assert await cur.fetchone() == (values, "boolean[]", len(values))


async def test_the_store_s_connections_use_these_dumpers(
    db: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    """registry.store connects with them; elsewhere they are dumped as plain lists."""
    ids = BigintArray([1, 2, 3])
    used = Transformer(db).get_dumper(ids, PyFormat.BINARY)
    assert type(used).__module__ == "registry.arrays"
    async with await psycopg.AsyncConnection.connect(database_url) as plain:
        assert type(Transformer(plain).get_dumper(ids, PyFormat.BINARY)).__module__ != (
            "registry.arrays"
        )
        cur = await plain.execute("SELECT %b::bigint[], %b::bool[]", (ids, BoolArray([True])))
        assert await cur.fetchone() == ([1, 2, 3], [True])
