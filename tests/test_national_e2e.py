"""Issue #28 end to end: three cells, each its own store and its own `iiot maintain` process
pushing signed snapshots every second, and the aggregator (`iiot national serve`), all over real
sockets. A small fleet spread over platforms of all three cells is the simulated truth the
national figures must equal; one cell is cut off and killed, one platform moves between cells.

The move is simulated at the store level (the platform export/import of issue #27 is not on
this branch): the source sets `moved_to` (what an export with --move-to leaves, migration
0032), then the destination creates the platform with the same devices in one transaction.
"""

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from national.cell import outbox
from national.cell.keys import load_signing_key
from national.format import CELL_HEADER, SIGNATURE_HEADER, SIGNATURE_PREFIX
from registry import uscc
from registry.activity import refresh_activity
from registry.connection import Counters, lock_gateways, record_activity
from registry.enterprises import declare, link, upsert_enterprises
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.registration import register_devices
from registry.settings import StoreSettings
from registry.store import connect
from tests.conftest import eventually
from tests.national import Aggregator, aggregator_process

pytestmark = pytest.mark.slow

INTERVAL = 1.0
HASH_KEY = "7a" * 32
# Issue #29: enterprises as keyed hashes. SHARED is served in cell-1 and cell-2 (one enterprise),
# with a connected device in cell-1; AUTO has one in cell-2; CHEM none.
SHARED = uscc.compose("320500", "60000001")
AUTO = uscc.compose("440300", "19231745")
CHEM = uscc.compose("320100", "60000005")
ENTERPRISES = {
    "cell-1": {"steel": [(SHARED, "31", "s1")]},
    "cell-2": {"auto": [(SHARED, "31", None), (AUTO, "36", "a3")]},
    "cell-3": {"chem": [(CHEM, "26", None)]},
}

# The simulated truth: cell -> platform -> device -> (national identity, online).
Fleet = dict[str, dict[str, dict[str, tuple[str | None, bool]]]]


def initial_fleet() -> Fleet:
    return {
        "cell-1": {
            "steel": {
                "s1": ("G-shared", True),  # also on cell-2's auto
                "s2": ("G-a", True),
                "s3": (None, True),
                "s4": (None, False),
                "s5": ("G-b", False),
            },
            "mover": {"m1": ("G-m", True), "m2": (None, True), "m3": (None, False)},
        },
        "cell-2": {
            "auto": {"a1": ("G-shared", True), "a2": (None, True), "a3": ("G-d", True)},
            "parts": {"p1": (None, False), "p2": ("G-p", True)},
        },
        "cell-3": {"chem": {"c1": ("G-e", True), "c2": (None, True), "c3": (None, False)}},
    }


def truth(fleet: Fleet) -> dict[str, int]:
    devices = [d for platforms in fleet.values() for p in platforms.values() for d in p.values()]
    online = [identity for identity, up in devices if up]
    return {
        "platforms": sum(len(platforms) for platforms in fleet.values()),
        "registered": len(devices),
        "connected": len(online),
        "distinct": len({i for i in online if i is not None}) + online.count(None),
    }


async def create_platform(
    store: StoreSettings, platform: str, devices: dict[str, tuple[str | None, bool]]
) -> None:
    """The platform with its devices, the online ones live, in one transaction (as an import
    would: a snapshot sees all of it or none)."""
    async with await connect(store) as conn, conn.transaction():
        await upsert_platform(conn, platform, region="320500", industry="steel")
        await register_devices(
            conn,
            platform,
            [(d, {} if g is None else {"global_id": g}) for d, (g, _) in devices.items()],
            shard=0,
        )
        await bring_online(conn, platform, [d for d, (_, up) in devices.items() if up])


async def bring_online(conn: psycopg.AsyncConnection[Any], platform: str, ids: list[str]) -> None:
    """Live data from these devices now: what ingest records for it (registry/connection.py)."""
    cur = await conn.execute(
        "SELECT id FROM devices WHERE platform_id = %s AND device_id = ANY(%s)", (platform, ids)
    )
    rows = [row[0] for row in await cur.fetchall()]
    counters = Counters(0)
    await lock_gateways(conn, [], rows)
    await record_activity(conn, counters, gateways=[], devices=rows, seen=datetime.now(UTC))
    await counters.flush(conn)


async def declare_enterprises(
    store: StoreSettings, served: dict[str, list[tuple[str, str, str | None]]]
) -> None:
    async with await connect(store) as conn, conn.transaction():
        for platform, items in served.items():
            for code, industry, device in items:
                found = declare(code, name="企业", industry=industry, above_size=True)
                await upsert_enterprises(conn, platform, [found])
                if device is not None:
                    await link(conn, platform, "devices", {device: code})


class Gate:
    """A TCP relay between a cell and the aggregator that can be cut (the cell's network)."""

    def __init__(self, target: str) -> None:
        self._host, port = target.removeprefix("http://").split(":")
        self._port = int(port)
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> "Gate":
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self.cut()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.open = False
        for writer in self._writers:
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._tasks.discard(task)
            self._writers -= {writer, up_writer}


@dataclass
class Cell:
    name: str
    store: StoreSettings
    key: Path
    log: Path
    url: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        env = os.environ | {
            "IIOT_DATABASE_URL": str(self.store.database_url),
            "IIOT_DATABASE_SCHEMA": self.store.database_schema,
            "IIOT_CELL": self.name,
            "IIOT_NATIONAL_URL": self.url,
            "IIOT_CELL_SIGNING_KEY": str(self.key),
            "IIOT_ENTERPRISE_HASH_KEY": HASH_KEY,
            "IIOT_SNAPSHOT_INTERVAL_SECONDS": str(INTERVAL),
            "IIOT_NATIONAL_TIMEOUT_SECONDS": "2",
            "IIOT_MAINTAIN_INTERVAL_SECONDS": "3600",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "iiot.cli", "maintain"], env=env, stdout=out, stderr=out
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run(*command: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "iiot.cli", *command],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | (env or {}),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
async def aggregator(database_url: str, unique: str, tmp_path: Path) -> AsyncIterator[Aggregator]:
    async with aggregator_process(database_url, f"n_{unique}", tmp_path / "national.log") as agg:
        yield agg


@pytest.fixture
async def cells(
    store: StoreSettings, database_url: str, aggregator: Aggregator, tmp_path: Path
) -> AsyncIterator[dict[str, Cell]]:
    """Three cells' stores holding the initial fleet, their keys made with `iiot cell keygen`
    and registered with `iiot national add-cell`; their processes are not started yet."""
    stores = [store] + [
        store.model_copy(update={"database_schema": f"{store.database_schema}_{n}"}) for n in (2, 3)
    ]
    national = {
        "IIOT_NATIONAL_DATABASE_URL": database_url,
        "IIOT_NATIONAL_DATABASE_SCHEMA": aggregator.settings.database_schema,
    }
    made: dict[str, Cell] = {}
    try:
        for n, (name, platforms) in enumerate(initial_fleet().items()):
            cell = Cell(name, stores[n], tmp_path / f"{name}.key", tmp_path / f"{name}.log")
            if n:
                await migrate(cell.store)
            made[name] = cell
            public = tmp_path / f"{name}.pub"
            public.write_text(run("cell", "keygen", "--out", str(cell.key)))
            run("national", "add-cell", name, "--public-key", str(public), env=national)
            for platform, devices in platforms.items():
                await create_platform(cell.store, platform, devices)
            await declare_enterprises(cell.store, ENTERPRISES[name])
            async with await connect(cell.store, autocommit=True) as conn:
                assert await refresh_activity(conn)
        yield made
    finally:
        for cell in made.values():
            cell.stop()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            for extra in stores[1:]:
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(extra.database_schema)
                    )
                )


async def national(http: httpx.AsyncClient) -> dict[str, Any]:
    answer: dict[str, Any] = (await http.get("/national/totals")).json()
    return answer


def figures(answer: dict[str, Any]) -> dict[str, int]:
    totals = answer["totals"]
    return {
        "platforms": totals["platforms"],
        "registered": totals["registered"],
        "connected": totals["connected"],
        "distinct": answer["distinct"]["connected_devices"],
    }


async def equals(http: httpx.AsyncClient, fleet: Fleet) -> dict[str, Any] | None:
    answer = await national(http)
    fresh = not answer["coverage"]["stale_cells"] and len(answer["coverage"]["cells"]) == 3
    return answer if fresh and figures(answer) == truth(fleet) else None


async def test_three_cells_and_the_aggregator(
    cells: dict[str, Cell], aggregator: Aggregator
) -> None:
    fleet = initial_fleet()
    one, two, three = cells["cell-1"], cells["cell-2"], cells["cell-3"]
    async with Gate(aggregator.url) as gate, aggregator.client() as http:
        one.url, three.url, two.url = aggregator.url, aggregator.url, gate.url
        for cell in cells.values():
            cell.start()
        answer = await eventually(lambda: equals(http, fleet), timeout=60, interval=0.1)

        # A device connected on platforms of two cells counts once in `distinct`, within the
        # stated bounds; the sums count registrations, so it counts twice there.
        distinct = answer["distinct"]
        assert distinct["lower_bound"] <= truth(fleet)["distinct"] <= distinct["upper_bound"]
        assert answer["totals"]["connected"] == truth(fleet)["distinct"] + 1
        assert distinct["sketch"]["lg_k"] == 14
        assert distinct["sketch"]["cells_merged"] == 3

        await enterprises_count_once_and_travel_only_as_keyed_hashes(http)

        # A change in a cell is in the national totals within two intervals.
        async with await connect(three.store) as conn, conn.transaction():
            await bring_online(conn, "chem", ["c3"])
        fleet["cell-3"]["chem"]["c3"] = (None, True)
        changed = time.monotonic()
        await eventually(lambda: equals(http, fleet), timeout=10, interval=0.05)
        assert time.monotonic() - changed <= 2 * INTERVAL

        # Cell-2 loses the aggregator, keeps building, and is killed.
        gate.cut()
        cut = datetime.now(UTC)
        await eventually(lambda: _undelivered(two, at_least=2), timeout=20)
        assert two.process is not None
        two.process.send_signal(signal.SIGKILL)
        two.process.wait(10)
        async with await connect(two.store) as conn, conn.transaction():
            await bring_online(conn, "parts", ["p1"])  # the cell's traffic goes on meanwhile
        fleet["cell-2"]["parts"]["p1"] = (None, True)

        async def stale() -> dict[str, Any] | None:
            answer = await national(http)
            return answer if answer["coverage"]["stale_cells"] else None

        answer = await eventually(stale, timeout=30, interval=0.1)
        seen_stale = datetime.now(UTC)
        [apart] = answer["coverage"]["stale_cells"]
        assert apart["cell"] == "cell-2"
        last_taken = datetime.fromisoformat(apart["taken_at"])
        assert seen_stale - last_taken >= timedelta(seconds=3 * INTERVAL)
        assert last_taken <= cut
        # Stale: its last figures are shown apart, not counted.
        counted = answer["totals"]["platforms"]
        assert counted == truth(fleet)["platforms"] - len(fleet["cell-2"])

        # Back: exact again, and the snapshots it kept while cut off fill its history.
        gate.open = True
        two.start()
        await eventually(lambda: equals(http, fleet), timeout=60, interval=0.1)
        listed = (await http.get("/national/cells/cell-2/snapshots")).json()["snapshots"]
        sequences = [s["sequence"] for s in listed]
        assert sequences == list(range(1, len(sequences) + 1))
        kept = [s for s in listed if cut <= datetime.fromisoformat(s["taken_at"]) < seen_stale]
        assert len(kept) >= 2

        await refuses_replayed_and_tampered_snapshots(http, one)
        assert await equals(http, fleet)

        await a_platform_moves_and_counts_once_throughout(http, fleet, one, three)


async def enterprises_count_once_and_travel_only_as_keyed_hashes(http: httpx.AsyncClient) -> None:
    async def computed() -> dict[str, Any] | None:
        answer = (await http.get("/national/penetration", params={"by": "national"})).json()
        run = answer["computed"]
        return answer if run and run["cells"] == ["cell-1", "cell-2", "cell-3"] else None

    answer = await eventually(computed, timeout=20, interval=0.2)
    assert [(r["key"], r["served"], r["active"]) for r in answer["rows"]] == [("000000", 3, 2)]
    body = (await http.get("/national/cells/cell-2/snapshots/1")).content
    assert json.loads(body)["enterprises"]["items"]
    for code in (SHARED, AUTO, CHEM):
        assert code.encode() not in body


async def _undelivered(cell: Cell, *, at_least: int) -> bool:
    async with await connect(cell.store, autocommit=True) as conn:
        return (await outbox.outbox_figures(conn)).undelivered >= at_least


async def refuses_replayed_and_tampered_snapshots(http: httpx.AsyncClient, cell: Cell) -> None:
    """Cell-1's first snapshot, as delivered, then changed: without a new signature (tampered)
    and with one (replayed: another body under a number already taken)."""
    async with await connect(cell.store, autocommit=True) as conn:
        cur = await conn.execute("SELECT body, signature FROM national_outbox WHERE sequence = 1")
        row = await cur.fetchone()
    assert row is not None
    body, signature = bytes(row[0]), bytes(row[1])
    document = json.loads(body)
    document["platforms"][0]["connected"] += 1000
    changed = json.dumps(document).encode()
    key = load_signing_key(cell.key)

    async def send(data: bytes, signed: bytes) -> httpx.Response:
        headers = {
            CELL_HEADER: cell.name,
            SIGNATURE_HEADER: SIGNATURE_PREFIX + _b64(signed),
            "Content-Type": "application/json",
        }
        return await http.post("/snapshots", content=data, headers=headers)

    tampered = await send(changed, signature)
    assert tampered.status_code == 401
    assert tampered.json()["type"].endswith("/bad-signature")
    replayed = await send(changed, key.sign(changed))
    assert replayed.status_code == 409
    assert replayed.json()["type"].endswith("/replayed")
    again = await send(body, signature)  # the same bytes again: a retry, changing nothing
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    refusals = (await http.get("/national/refusals", params={"cell": cell.name})).json()
    reasons = [r["reason"] for r in refusals["refusals"]]
    assert "bad-signature" in reasons
    assert "replayed" in reasons


async def a_platform_moves_and_counts_once_throughout(
    http: httpx.AsyncClient, fleet: Fleet, source: Cell, destination: Cell
) -> None:
    """`mover` leaves cell-1 for cell-3 while the national totals are read every 50 ms."""
    expected = truth(fleet)
    samples: list[tuple[int, int, int]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            totals = (await national(http))["totals"]
            samples.append((totals["platforms"], totals["registered"], totals["connected"]))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        async with await connect(source.store, autocommit=True) as conn:
            await conn.execute(
                "UPDATE platforms SET moved_to = %s, moved_at = now() WHERE id = 'mover'",
                (destination.name,),
            )

        async def moving() -> bool:
            return (await national(http))["moving_platforms"] == ["mover"]

        await eventually(moving, timeout=10, interval=0.05)
        await asyncio.sleep(2 * INTERVAL)  # counted from the source's last figures meanwhile
        await create_platform(destination.store, "mover", fleet["cell-1"]["mover"])
        fleet["cell-3"]["mover"] = fleet["cell-1"].pop("mover")

        async def claimed() -> list[dict[str, Any]] | None:
            moves = (await http.get("/national/moves")).json()["moves"]
            done = [m for m in moves if m["platform"] == "mover" and m["claimed_at"]]
            return done or None

        [move] = await eventually(claimed, timeout=10, interval=0.05)
        assert (move["from_cell"], move["to_cell"]) == ("cell-1", "cell-3")
        await asyncio.sleep(2 * INTERVAL)  # the source keeps releasing it: still once
    finally:
        stop.set()
        await watcher
    counted = {(p, r, c) for p, r, c in samples}
    assert counted == {(expected["platforms"], expected["registered"], expected["connected"])}
    assert len(samples) > 50
    platforms = (await http.get("/national/platforms")).json()["platforms"]
    assert [p["cell"] for p in platforms if p["platform"] == "mover"] == ["cell-3"]
    assert await equals(http, fleet)  # distinct too: the mover's devices now in cell-3's sketch


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
