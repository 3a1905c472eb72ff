"""The cell's outbox of signed snapshots (migration 0033): built, numbered and kept until the
aggregator takes them, across restarts and kills.

Numbering: a snapshot's sequence number is taken from `national_sequence` in the transaction
that reads its figures and stores it, so a number is never reused and never skipped (a failed
build rolls its number back with it). Builders take a session advisory lock before that
transaction starts, so snapshots are numbered in the order their figures were read. Delivery
rounds take another lock, so two processes never send the cell's snapshots at once.

Limits: delivered snapshots are deleted after `keep_delivered`. Undelivered ones are never
deleted; at `outbox_limit` of them no new snapshot is built (recorded as the failure
`outbox_full`, which /metrics shows) until the aggregator takes some.
"""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from psycopg import AsyncConnection, IsolationLevel

from national.cell.settings import Reporting
from national.cell.snapshots import read_figures

_LOCK = "SELECT pg_advisory_lock(hashtext(current_schema() || %s))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema() || %s))"
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(current_schema() || %s))"
BUILD_LOCK: Final = ".national_build"
DELIVERY_LOCK: Final = ".national_delivery"
# Held by the one periodic pusher of the cell for as long as it runs.
PUSHER_LOCK: Final = ".national_pusher"

UNDELIVERED_COUNT = "SELECT count(*) FROM national_outbox WHERE delivered_at IS NULL"
TAKE_SEQUENCE = "UPDATE national_sequence SET last = last + 1 RETURNING last"
STORE = """
INSERT INTO national_outbox (sequence, body, signature, taken_at) VALUES (%s, %s, %s, %s)
"""
UNDELIVERED = """
SELECT sequence, body, signature FROM national_outbox
WHERE delivered_at IS NULL ORDER BY sequence LIMIT %s
"""
# The aggregator holds every snapshot below `next`.
DELIVERED_BELOW = """
WITH marked AS (
    UPDATE national_outbox SET delivered_at = now()
    WHERE sequence < %(next)s AND delivered_at IS NULL RETURNING 1
), noted AS (
    UPDATE national_sequence SET delivered = greatest(delivered, %(next)s - 1)
)
SELECT count(*) FROM marked
"""
# The aggregator lacks the snapshots from `next` on: send them again (if they are still held).
RESEND_FROM = """
WITH unmarked AS (
    UPDATE national_outbox SET delivered_at = NULL
    WHERE sequence >= %(next)s AND delivered_at IS NOT NULL RETURNING 1
), noted AS (
    UPDATE national_sequence SET delivered = least(delivered, %(next)s - 1)
)
SELECT EXISTS (SELECT FROM national_outbox WHERE sequence = %(next)s)
"""
DELETE_DELIVERED = "DELETE FROM national_outbox WHERE delivered_at < now() - %s"
RECORD_FAILURE = """
INSERT INTO national_push_failures AS f (reason, failures, last_at, last_detail)
VALUES (%s, 1, now(), %s)
ON CONFLICT (reason) DO UPDATE
SET failures = f.failures + 1, last_at = excluded.last_at, last_detail = excluded.last_detail
"""
HALT = """
INSERT INTO national_push_halt (reason, sequence, detail) VALUES (%s, %s, %s)
ON CONFLICT (only_row) DO NOTHING
"""
HALTED = "SELECT reason, sequence, detail, halted_at FROM national_push_halt"
RESUME = "DELETE FROM national_push_halt RETURNING reason"
FIGURES = """
SELECT s.last, s.delivered, o.undelivered, o.oldest
FROM national_sequence s,
     (SELECT count(*) AS undelivered, min(taken_at) AS oldest
      FROM national_outbox WHERE delivered_at IS NULL) o
"""
FAILURES = "SELECT reason, failures, last_at FROM national_push_failures ORDER BY reason"


class OutboxFull(RuntimeError):
    """The outbox holds its limit of undelivered snapshots: none is built until the aggregator
    takes some (reach it, or raise IIOT_SNAPSHOT_OUTBOX_LIMIT)."""


@dataclass(frozen=True, slots=True)
class Pending:
    sequence: int
    body: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Halt:
    reason: str
    sequence: int
    detail: str
    halted_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxFigures:
    """For /metrics: how far building and delivery have come."""

    built: int  # the last sequence number taken
    delivered: int  # every snapshot up to this one is with the aggregator
    undelivered: int
    oldest_undelivered: datetime | None
    failures: dict[str, tuple[int, datetime]]
    halt: Halt | None


@contextlib.asynccontextmanager
async def session_lock(conn: AsyncConnection[Any], name: str) -> AsyncIterator[None]:
    """Holds the advisory lock `name` of this schema (waiting for it) on an autocommit
    connection, outside any transaction, so a transaction started inside sees what the previous
    holder committed."""
    await conn.execute(_LOCK, (name,))
    try:
        yield
    finally:
        if not conn.closed:
            await conn.execute(_UNLOCK, (name,))


async def try_lock(conn: AsyncConnection[Any], name: str) -> bool:
    return bool(await _scalar(conn, TRY_LOCK, name))


async def store_snapshot(conn: AsyncConnection[Any], reporting: Reporting) -> int:
    """Reads the cell's figures, numbers, signs and stores them as the next snapshot; returns
    its sequence number. `conn` is in autocommit mode (the transaction is made here)."""
    async with session_lock(conn, BUILD_LOCK):
        undelivered = await _scalar(conn, UNDELIVERED_COUNT)
        if undelivered >= reporting.outbox_limit:
            detail = (
                f"{undelivered} snapshots wait for the aggregator (IIOT_SNAPSHOT_OUTBOX_LIMIT "
                f"{reporting.outbox_limit}): none is built until it takes some"
            )
            await record_failure(conn, "outbox_full", detail)
            raise OutboxFull(detail)
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        try:
            async with conn.transaction():
                figures = await read_figures(
                    conn, hash_key=reporting.hash_key, release_period=reporting.release_period
                )
                sequence = int(await _scalar(conn, TAKE_SEQUENCE))
                snapshot = figures.snapshot(reporting.cell, sequence, reporting.interval_seconds)
                body = snapshot.model_dump_json().encode()
                signature = reporting.signing_key.sign(body)
                await conn.execute(STORE, (sequence, body, signature, figures.taken_at))
        finally:
            await conn.set_isolation_level(None)
    return sequence


async def undelivered(conn: AsyncConnection[Any], limit: int = 100) -> list[Pending]:
    cur = await conn.execute(UNDELIVERED, (limit,))
    return [Pending(s, bytes(b), bytes(sig)) for s, b, sig in await cur.fetchall()]


async def delivered_below(conn: AsyncConnection[Any], next_sequence: int) -> int:
    """Marks every snapshot below `next_sequence` delivered; returns how many were not yet."""
    return int(await _scalar(conn, DELIVERED_BELOW, {"next": next_sequence}))


async def resend_from(conn: AsyncConnection[Any], next_sequence: int) -> bool:
    """Marks the snapshots from `next_sequence` on undelivered; False if that one is no longer
    held (deleted after delivery), so the aggregator's history cannot be filled from here."""
    return bool(await _scalar(conn, RESEND_FROM, {"next": next_sequence}))


async def delete_delivered(conn: AsyncConnection[Any], older_than: timedelta) -> int:
    cur = await conn.execute(DELETE_DELIVERED, (older_than,))
    return cur.rowcount


async def record_failure(conn: AsyncConnection[Any], reason: str, detail: str) -> None:
    await conn.execute(RECORD_FAILURE, (reason, detail[:2000]))


async def halt(conn: AsyncConnection[Any], reason: str, sequence: int, detail: str) -> None:
    await conn.execute(HALT, (reason, sequence, detail[:2000]))


async def halted(conn: AsyncConnection[Any]) -> Halt | None:
    cur = await conn.execute(HALTED)
    row = await cur.fetchone()
    return None if row is None else Halt(*row)


async def resume(conn: AsyncConnection[Any]) -> str | None:
    """Lifts a halt (after an operator found its cause); returns the halt's reason, if any."""
    reason = await _scalar(conn, RESUME)
    return None if reason is None else str(reason)


async def outbox_figures(conn: AsyncConnection[Any]) -> OutboxFigures:
    cur = await conn.execute(FIGURES)
    row = await cur.fetchone()
    assert row is not None  # national_sequence holds its one row from the migration on
    built, delivered, waiting, oldest = row
    cur = await conn.execute(FAILURES)
    failures = {reason: (count, at) for reason, count, at in await cur.fetchall()}
    return OutboxFigures(built, delivered, waiting, oldest, failures, await halted(conn))


async def _scalar(conn: AsyncConnection[Any], query: str, *args: Any) -> Any:
    params = args[0] if len(args) == 1 and isinstance(args[0], dict) else (args or None)
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]
