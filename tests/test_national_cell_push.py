"""The cell's pusher against an aggregator's intake over a real socket (tests/
national_intake_stub.py, a process of its own that verifies signatures): snapshots wait while
the aggregator is down or the cell is killed, and are delivered in order, none lost or twice;
answers that retrying cannot change halt delivery until an operator resumes it."""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from iiot.net import free_port
from national.cell import outbox
from national.cell.keys import generate_signing_key
from national.cell.pusher import Pusher, push_now
from national.cell.settings import CellSettings
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import answers_ok, eventually

CELL = "cell-1"
INTERVAL = 0.3


@pytest.fixture
def public_key(tmp_path: Path) -> Path:
    """The cell's key pair: the private key in tmp_path/cell.key, the public key returned."""
    public = tmp_path / "cell.pub"
    public.write_text(generate_signing_key(tmp_path / "cell.key"))
    return public


@pytest.fixture
async def cell(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], public_key: Path, tmp_path: Path
) -> CellSettings:
    """The cell's settings, pointing at a port where nothing listens yet."""
    await upsert_platform(db, "plant-1")
    return CellSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        cell=CELL,
        national_url=f"http://127.0.0.1:{free_port()}",
        cell_signing_key=tmp_path / "cell.key",
        snapshot_interval_seconds=INTERVAL,
        national_timeout_seconds=2,
    )


@asynccontextmanager
async def intake(
    cell: CellSettings, public_key: Path, log: Path, *taken: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The stand-in intake as a process on the cell's aggregator port; yields a client to it."""
    url = str(cell.national_url).rstrip("/")
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "tests.national_intake_stub", port, CELL, str(public_key)]
    if taken:
        command += ["--taken", *taken]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out)  # noqa: ASYNC220
    try:
        async with httpx.AsyncClient(base_url=url) as client:

            async def up() -> bool:
                assert process.poll() is None, f"the intake stub ended; see {log}"
                return await answers_ok(client, "/received")

            await eventually(up, timeout=20, interval=0.05)
            yield client
    finally:
        process.terminate()
        process.wait(10)


async def received(client: httpx.AsyncClient) -> dict[str, Any]:
    document: dict[str, Any] = (await client.get("/received")).json()
    return document


@asynccontextmanager
async def pushing(settings: CellSettings) -> AsyncIterator[Pusher]:
    pusher = Pusher(settings)
    task = asyncio.create_task(pusher.run())
    try:
        yield pusher
    finally:
        pusher.stop()
        async with asyncio.timeout(15):
            await task


async def figures(db: psycopg.AsyncConnection[Any]) -> outbox.OutboxFigures:
    return await outbox.outbox_figures(db)


async def stored_bodies(db: psycopg.AsyncConnection[Any]) -> dict[int, Any]:
    cur = await db.execute("SELECT sequence, body FROM national_outbox ORDER BY sequence")
    return {s: json.loads(bytes(b)) for s, b in await cur.fetchall()}


async def test_snapshots_wait_while_the_aggregator_is_down_and_arrive_in_order_after(
    cell: CellSettings, public_key: Path, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    pusher = Pusher(cell)
    task = asyncio.create_task(pusher.run())
    try:

        async def waiting() -> bool:
            f = await figures(db)
            return f.undelivered >= 4 and f.failures.get("unreachable", (0,))[0] >= 2

        await eventually(waiting, timeout=30)
        assert (await figures(db)).delivered == 0
        async with intake(cell, public_key, tmp_path / "intake.log") as aggregator:

            async def caught_up() -> bool:
                f = await figures(db)
                return f.delivered >= 6 and f.undelivered == 0

            await eventually(caught_up, timeout=30)
            pusher.stop()
            await task
            got = await received(aggregator)
    finally:
        pusher.stop()
        await asyncio.wait_for(task, 15)
    built = (await figures(db)).built
    sequences = [s["sequence"] for s in got["snapshots"]]
    assert sequences == list(range(1, built + 1))  # every one, once, in order
    assert got["refused"] == []
    assert {s["sequence"]: s for s in got["snapshots"]} == await stored_bodies(db)


async def test_a_replayed_answer_halts_delivery_until_an_operator_resumes_it(
    cell: CellSettings, public_key: Path, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The aggregator holds other bytes under our number 1 (say, the cell's store was restored
    from a backup): sending again cannot help, so the pusher stops sending, and keeps building."""
    other = "1:" + hashlib.sha256(b"other bytes").hexdigest()
    async with intake(cell, public_key, tmp_path / "intake.log", other) as aggregator:
        async with pushing(cell):

            async def halted_and_building() -> bool:
                f = await figures(db)
                return f.halt is not None and f.built >= 4

            await eventually(halted_and_building, timeout=30)
        got = await received(aggregator)
        assert got["refused"] == ["replayed"]  # sent once, not hammered
        f = await figures(db)
        assert f.halt is not None
        assert (f.halt.reason, f.halt.sequence, f.delivered) == ("replayed", 1, 0)
        assert "restored from a backup" in f.halt.detail
        # Resuming without fixing the cause halts again, at the same snapshot.
        sequence, result = await push_now(cell, resume=True)
        assert (result.failure, result.halted, result.delivered) == ("replayed", True, 0)
        assert sequence == f.built + 1
        assert (await received(aggregator))["refused"] == ["replayed", "replayed"]


async def test_an_aggregator_that_lost_its_history_gets_it_again_from_the_outbox(
    cell: CellSettings, public_key: Path, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """Snapshots 1-3 delivered (and kept a day); a fresh aggregator answers 4 with out-of-order
    from 1: the cell sends 1-4 again, in order."""
    log = tmp_path / "intake.log"
    async with intake(cell, public_key, log):
        for _ in range(3):
            await push_now(cell)
    assert (await figures(db)).delivered == 3
    async with intake(cell, public_key, log) as fresh:
        sequence, result = await push_now(cell)
        got = await received(fresh)
    assert (sequence, result.failure, result.delivered) == (4, None, 4)
    assert [s["sequence"] for s in got["snapshots"]] == [1, 2, 3, 4]
    assert got["refused"] == ["out-of-order"]


async def test_a_signature_the_aggregator_does_not_accept_is_retried_not_halted(
    cell: CellSettings, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The aggregator holds another public key for the cell (an operator's mistake there)."""
    wrong = tmp_path / "other.pub"
    wrong.write_text(generate_signing_key(tmp_path / "other.key"))
    async with intake(cell, wrong, tmp_path / "intake.log") as aggregator:
        _, result = await push_now(cell)
        _, again = await push_now(cell)
        got = await received(aggregator)
    assert (result.failure, result.halted, again.failure) == (
        "bad_signature",
        False,
        "bad_signature",
    )
    assert got["refused"] == ["bad-signature", "bad-signature"]
    f = await figures(db)
    assert (f.halt, f.undelivered, f.failures["bad_signature"][0]) == (None, 2, 2)


async def test_one_pusher_per_cell_at_a_time(
    cell: CellSettings, db: psycopg.AsyncConnection[Any]
) -> None:
    async with pushing(cell) as first, pushing(cell) as second:
        await eventually(lambda: _at_least(db, 5), timeout=30)
        assert 0 in (first.built, second.built)
        leader, standby = (first, second) if first.built else (second, first)
        leader.stop()
        # The other takes over once the first let its lock go.

        async def taken_over() -> bool:
            return standby.built >= 2

        await eventually(taken_over, timeout=30)


async def _at_least(db: psycopg.AsyncConnection[Any], built: int) -> bool:
    return (await figures(db)).built >= built


@contextmanager
def maintain(cell: CellSettings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`iiot maintain` with the cell's national settings, as a process of its own."""
    env = os.environ | {
        "IIOT_DATABASE_URL": str(cell.database_url),
        "IIOT_DATABASE_SCHEMA": cell.database_schema,
        "IIOT_CELL": CELL,
        "IIOT_NATIONAL_URL": str(cell.national_url),
        "IIOT_CELL_SIGNING_KEY": str(cell.cell_signing_key),
        "IIOT_SNAPSHOT_INTERVAL_SECONDS": str(INTERVAL),
        "IIOT_NATIONAL_TIMEOUT_SECONDS": "2",
        "IIOT_MAINTAIN_INTERVAL_SECONDS": "3600",
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "maintain"], env=env, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(15)


async def test_snapshots_survive_a_killed_cell_and_are_delivered_after_its_restart(
    cell: CellSettings, public_key: Path, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    log = tmp_path / "maintain.log"
    with maintain(cell, log) as process:
        await eventually(lambda: _at_least(db, 5), timeout=60)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    kept = await stored_bodies(db)
    assert list(kept) == list(range(1, len(kept) + 1))  # no gap, even mid-build
    assert (await figures(db)).delivered == 0
    async with intake(cell, public_key, tmp_path / "intake.log") as aggregator:
        with maintain(cell, log):

            async def delivered_beyond_the_kill() -> bool:
                f = await figures(db)
                return f.delivered > len(kept) + 2

            await eventually(delivered_beyond_the_kill, timeout=60)
        got = await received(aggregator)
    sequences = [s["sequence"] for s in got["snapshots"]]
    assert sequences == list(range(1, len(sequences) + 1))
    assert {s["sequence"]: s for s in got["snapshots"] if s["sequence"] in kept} == kept
    assert got["refused"] == []


def test_a_cell_without_its_key_refuses_to_start_saying_what_to_do(tmp_path: Path) -> None:
    env = os.environ | {
        "IIOT_DATABASE_URL": "postgresql://127.0.0.1:1/none",
        "IIOT_NATIONAL_URL": "http://127.0.0.1:9",
        "IIOT_CELL_SIGNING_KEY": str(tmp_path / "missing.key"),
        "IIOT_MAINTAIN_INTERVAL_SECONDS": "3600",
    }
    done = subprocess.run(
        [sys.executable, "-m", "iiot.cli", "maintain"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    said = " ".join(done.stderr.replace("│", " ").split())  # typer's box, wrapped anywhere
    assert "iiot cell keygen --out FILE" in said
