"""Delivers the cell's snapshots to the national aggregator, oldest first, and builds one every
interval (docs/operations.md, "National snapshots").

The intake protocol (docs/national.md): `POST {aggregator}/snapshots` with the exact stored
bytes and their signature. What each answer means here:

- 202 accepted, 200 duplicate: the aggregator holds everything below `next_sequence`; those are
  marked delivered (a duplicate is a retry whose first answer was lost).
- 409 out-of-order: the aggregator lacks the snapshots from `next_sequence` on; they are sent
  again from there (if they were deleted after delivery, delivery halts: `gap`).
- 409 replayed, 422: the aggregator holds other bytes under one of our numbers, or cannot read
  ours. Sending again cannot change that: delivery halts (building goes on) until an operator
  has found the cause and resumes (`iiot national push --resume`).
- 401, 403, 5xx, no answer: recorded per reason and tried again with backoff (at least once an
  interval); the snapshots wait in the outbox.
"""

import asyncio
import base64
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
from psycopg import AsyncConnection

from national.cell import outbox
from national.cell.settings import CellSettings, Reporting
from national.format import CELL_HEADER, SIGNATURE_HEADER, SIGNATURE_PREFIX
from registry.store import connect

log = logging.getLogger(__name__)

# Halting answers: sending the same bytes again cannot change them.
_HALTING = {"replayed", "invalid", "gap"}


@dataclass(frozen=True, slots=True)
class Round:
    """One delivery round: how many snapshots the aggregator newly took, and why it stopped
    short (None: the outbox is empty)."""

    delivered: int
    failure: str | None = None
    halted: bool = False


class Delivery:
    """Sends the outbox to one aggregator over one HTTP client."""

    def __init__(self, reporting: Reporting, url: str, client: httpx.AsyncClient) -> None:
        self._reporting = reporting
        self._url = f"{url}/snapshots"
        self._client = client

    async def deliver(self, conn: AsyncConnection[Any]) -> Round:
        """Sends every undelivered snapshot in order until one is not taken. `conn`: autocommit."""
        async with outbox.session_lock(conn, outbox.DELIVERY_LOCK):
            held = await outbox.halted(conn)
            if held is not None:
                return Round(0, held.reason, halted=True)
            done = 0
            while pending := await outbox.undelivered(conn):
                for snapshot in pending:
                    taken, failure, resend = await self._send(conn, snapshot)
                    done += taken
                    if failure is not None:
                        return Round(done, failure, halted=failure in _HALTING)
                    if resend:
                        break  # read the outbox again from where the aggregator wants it
            await outbox.delete_delivered(conn, self._reporting.keep_delivered)
            return Round(done)

    async def _send(
        self, conn: AsyncConnection[Any], snapshot: outbox.Pending
    ) -> tuple[int, str | None, bool]:
        """(newly delivered, failure reason or None, whether to re-read the outbox)."""
        signature = base64.b64encode(snapshot.signature).decode("ascii")
        headers = {
            CELL_HEADER: self._reporting.cell,
            SIGNATURE_HEADER: SIGNATURE_PREFIX + signature,
            "Content-Type": "application/json",
        }
        try:
            response = await self._client.post(self._url, content=snapshot.body, headers=headers)
        except httpx.HTTPError as exc:
            return 0, await self._failed(conn, "unreachable", f"{type(exc).__name__}: {exc}"), False
        body = _json(response)
        kind = str(body.get("type", "")).rsplit("/", 1)[-1]
        next_sequence = body.get("next_sequence")
        status = response.status_code
        if status in (200, 202) and isinstance(next_sequence, int):
            return await outbox.delivered_below(conn, next_sequence), None, False
        if status == 409 and kind == "out-of-order" and isinstance(next_sequence, int):
            return await self._from(conn, next_sequence, snapshot.sequence)
        detail = f"{status} {response.text[:500]}"
        if status == 409 and kind == "replayed":
            detail = (
                f"the aggregator holds other bytes under snapshot {snapshot.sequence}: another "
                "process sends as this cell, or this cell's store was restored from a backup; "
                f"answer: {detail}"
            )
            return 0, await self._halt(conn, "replayed", snapshot.sequence, detail), False
        if status == 422:
            return 0, await self._halt(conn, "invalid", snapshot.sequence, detail), False
        reasons = {401: "bad_signature", 403: "unknown_cell", 409: "conflict"}
        reason = reasons.get(status, "server_error" if status >= 500 else f"http_{status}")
        return 0, await self._failed(conn, reason, detail), False

    async def _from(
        self, conn: AsyncConnection[Any], next_sequence: int, sent: int
    ) -> tuple[int, str | None, bool]:
        """The aggregator answered out-of-order: it holds everything below `next_sequence`."""
        if next_sequence == sent:  # it asks for the very snapshot it refused: try again later
            detail = f"out-of-order for snapshot {sent}, yet next_sequence is {sent}"
            return 0, await self._failed(conn, "out_of_order", detail), False
        taken = await outbox.delivered_below(conn, next_sequence)
        if next_sequence <= sent and not await outbox.resend_from(conn, next_sequence):
            detail = (
                f"the aggregator wants snapshot {next_sequence} on, which was deleted after "
                "delivery: its history cannot be filled from this cell"
            )
            return taken, await self._halt(conn, "gap", sent, detail), False
        log.warning(
            "the aggregator wants the snapshots from %d on (sent %d); sending from there",
            next_sequence,
            sent,
        )
        return taken, None, True

    async def _failed(self, conn: AsyncConnection[Any], reason: str, detail: str) -> str:
        await outbox.record_failure(conn, reason, detail)
        log.warning("national snapshot not delivered (%s): %s; trying again", reason, detail)
        return reason

    async def _halt(
        self, conn: AsyncConnection[Any], reason: str, sequence: int, detail: str
    ) -> str:
        await outbox.record_failure(conn, reason, detail)
        await outbox.halt(conn, reason, sequence, detail)
        log.error(
            "national delivery HALTED at snapshot %d (%s): %s. Snapshots are still built and "
            "kept; find the cause (docs/operations.md), then `iiot national push --resume`",
            sequence,
            reason,
            detail,
        )
        return reason


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Pusher:
    """Builds a snapshot every interval and delivers the outbox; one per cell runs at a time
    (an advisory lock held for its life: others wait their turn, one interval at a time)."""

    def __init__(self, settings: CellSettings) -> None:
        url, key = settings.require_national()
        self._settings = settings
        self._url = url
        self._reporting = Reporting.load(settings, key)  # fails now on a key it cannot use
        self._stopping = asyncio.Event()
        self._conn: AsyncConnection[Any] | None = None
        self.built = 0
        self.rounds = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        interval = self._reporting.interval_seconds
        timeout = httpx.Timeout(self._settings.national_timeout_seconds)
        failures = 0
        next_build = time.monotonic()
        next_delivery = math.inf
        async with httpx.AsyncClient(timeout=timeout) as client:
            delivery = Delivery(self._reporting, self._url, client)
            try:
                while not await self._stopped_within(min(next_build, next_delivery)):
                    now = time.monotonic()
                    try:
                        conn = await self._leading()
                        if conn is None:  # another pusher of this cell runs: ask again later
                            next_build, next_delivery = now + interval, math.inf
                            continue
                        if now >= next_build:
                            next_build = max(next_build + interval, now)
                            await self._build(conn)
                        result = await delivery.deliver(conn)
                        self.rounds += 1
                    except psycopg.OperationalError as exc:
                        log.warning("national snapshots: the store failed (%s); next turn", exc)
                        await self._release()
                        result = Round(0, "store")
                    if result.halted:
                        log.error(
                            "national delivery is halted (%s): snapshots are built and kept, "
                            "none is sent; see docs/operations.md, then "
                            "`iiot national push --resume`",
                            result.failure,
                        )
                    if result.failure is None or result.halted:
                        failures, next_delivery = 0, math.inf
                    else:
                        failures += 1
                        next_delivery = now + min(interval, 0.5 * 2**failures)
            finally:
                await self._release()

    async def _build(self, conn: AsyncConnection[Any]) -> None:
        try:
            sequence = await outbox.store_snapshot(conn, self._reporting)
        except outbox.OutboxFull as exc:
            log.error("national snapshot not built: %s", exc)  # noqa: TRY400 - it says why
            return
        except psycopg.OperationalError:
            raise
        except Exception as exc:  # a figure the format refuses: recorded, the next turn tries again
            log.exception("national snapshot not built")
            await outbox.record_failure(conn, "build_failed", f"{type(exc).__name__}: {exc}")
            return
        self.built += 1
        log.debug("national snapshot %d built", sequence)

    async def _leading(self) -> AsyncConnection[Any] | None:
        """This pusher's connection, holding the cell's pusher lock; None while another has it."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = await connect(self._settings, autocommit=True)
        if not await outbox.try_lock(conn, outbox.PUSHER_LOCK):
            await conn.close()
            return None
        self._conn = conn
        return conn

    async def _release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()  # the session's locks go with it
            self._conn = None

    async def _stopped_within(self, deadline: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._stopping.wait()
        return self._stopping.is_set()


async def push_now(settings: CellSettings, *, resume: bool = False) -> tuple[int | None, Round]:
    """Builds one snapshot and delivers the outbox (`iiot national push`): the new snapshot's
    sequence number (None: the outbox is full) and the round. `resume`: lift a halt first."""
    url, key = settings.require_national()
    reporting = Reporting.load(settings, key)
    timeout = httpx.Timeout(settings.national_timeout_seconds)
    async with (
        await connect(settings, autocommit=True) as conn,
        httpx.AsyncClient(timeout=timeout) as client,
    ):
        if resume and (reason := await outbox.resume(conn)) is not None:
            log.warning("national delivery resumed (it was halted: %s)", reason)
        try:
            sequence: int | None = await outbox.store_snapshot(conn, reporting)
        except outbox.OutboxFull:
            sequence = None
        return sequence, await Delivery(reporting, url, client).deliver(conn)
