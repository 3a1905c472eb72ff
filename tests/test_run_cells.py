"""`iiot run --cells N`: cells side by side on one machine, each with its own database, broker,
ingest, API and simulated platforms, all stopped by one Ctrl+C."""

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from psycopg import sql

from iiot.aggregator import Aggregator
from iiot.embedded import EmbeddedPostgres
from iiot.net import accepts_connections, free_port
from iiot.stack import RunSettings, cell_settings, demo_platforms
from national.cell.keys import load_signing_key, public_key_pem
from national.keys import cell_key, verify_viewer_key
from national.migrate import connection_options
from national.settings import NationalSettings
from tests.conftest import eventually
from tests.test_embedded import end_session

CELL_BLOCK = re.compile(
    r"^  (cell-\d+)\n"
    r"    API: +(http://\S+).*\n"
    r"    Dashboard: .*\n"
    r"    Admin key: +(iiot_\S+)\n"
    r"    Broker: +mqtt://127\.0\.0\.1:(\d+).*\n"
    r"    Database: +postgresql://\S+@127\.0\.0\.1:(\d+)/(\S+)\n"
    r"    Platforms: +(.*?) \(",
    re.MULTILINE,
)
NATIONAL_BLOCK = re.compile(
    r"^  national aggregator .*\n"
    r"    API: +(http://\S+).*\n"
    r"    Dashboard: +\S+/dashboard#key=(iiotn_\S+)\n"
    r"    Viewer key: +(iiotn_\S+)\n",
    re.MULTILINE,
)


def test_each_cell_gets_its_own_database_ports_topics_and_platforms() -> None:
    settings = RunSettings(
        api_port=9000, metrics_port=9100, kafka_bootstrap="k:9092", state_dir=Path("s")
    )
    cells = cell_settings(settings, 3, server_url="postgresql://postgres@db:5432/iiot")
    assert [c.cell for c in cells] == ["cell-1", "cell-2", "cell-3"]
    assert [str(c.database_url) for c in cells] == [
        f"postgresql://postgres@db:5432/iiot_cell_{n}" for n in (1, 2, 3)
    ]
    assert [c.api_port for c in cells] == [9000, 9001, 9002]
    assert [c.metrics_port for c in cells] == [9100, 9101, 9102]
    assert [c.state_dir for c in cells] == [Path("s/cells/cell-1"), Path("s/cells/cell-2"),
                                            Path("s/cells/cell-3")]  # fmt: skip
    assert cells[1].kafka_topics == ["iiot.cell-2.telemetry"]
    assert cells[1].kafka_group_id == "iiot-ingest-cell-2"
    assert demo_platforms("cell-2") == ["demo-2a", "demo-2b"]
    with pytest.raises(ValueError, match="IIOT_MQTT_URL"):
        cell_settings(settings.model_copy(update={"mqtt_url": "mqtt://b:1883"}), 2, server_url="")
    with pytest.raises(ValueError, match="between 1 and"):
        cell_settings(settings, 0, server_url="")


@pytest.mark.slow
def test_run_cells_serves_each_cell_apart_and_one_ctrl_c_stops_them_all(tmp_path: Path) -> None:
    """Also the national aggregator beside them: its totals are the sum of the cells' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_STATE_DIR": str(tmp_path / "state"),
        "IIOT_API_PORT": str(free_port()),
        "IIOT_SIMULATE_DEVICES": "3",
        "IIOT_SIMULATE_INTERVAL_SECONDS": "0.5",
        "IIOT_CELLS_SNAPSHOT_INTERVAL_SECONDS": "1",
        "IIOT_NATIONAL_PORT": str(free_port()),
    }
    log = tmp_path / "run.log"
    with log.open("w") as out:
        # In a session of its own, as a shell runs a foreground job: Ctrl+C signals the group.
        process = subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "run", "--cells", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        cells: list[tuple[str, ...]] = []

        async def serving() -> bool:
            assert process.poll() is None, log.read_text()
            cells[:] = CELL_BLOCK.findall(log.read_text())
            if len(cells) < 2:
                return False
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    for name, api, key, *_ in cells:
                        if (await http.get(f"{api}/readyz")).status_code != 200:
                            return False
                        response = await http.get(
                            f"{api}/counts/platforms", headers={"Authorization": f"Bearer {key}"}
                        )
                        connected = {
                            i["platform"]: i["connected"] for i in response.json()["items"]
                        }
                        # Only this cell's simulated platforms, each with its 3 devices.
                        assert set(connected) == set(demo_platforms(name)), connected
                        if set(connected.values()) != {3}:
                            return False
            except httpx.TransportError:
                return False
            return True

        asyncio.run(eventually(serving, timeout=60, interval=0.3))
        assert [c[0] for c in cells] == ["cell-1", "cell-2"]
        assert [c[6] for c in cells] == ["demo-1a, demo-1b", "demo-2a, demo-2b"]
        assert len({c[5] for c in cells}) == 2, "each cell has its own database"
        assert len({c[3] for c in cells}) == 2, "each cell has its own broker"
        # A cell's admin key is its own: the other cell does not know it.
        other = httpx.get(
            f"{cells[1][1]}/counts/platforms", headers={"Authorization": f"Bearer {cells[0][2]}"}
        )
        assert other.status_code == 401

        # The aggregator beside them: both cells report, and its totals are the sum of theirs.
        found = NATIONAL_BLOCK.search(log.read_text())
        assert found is not None, log.read_text()
        national, dashboard_key, viewer_key = found.groups()
        assert dashboard_key == viewer_key
        own = {f: 0 for f in ("platforms", "registered", "connected")}
        for _, api, key, *_ in cells:
            items = httpx.get(
                f"{api}/counts/platforms", headers={"Authorization": f"Bearer {key}"}
            ).json()["items"]
            own["platforms"] += len(items)
            own["registered"] += sum(i["registered"] for i in items)
            own["connected"] += sum(i["connected"] for i in items)
        assert own == {"platforms": 4, "registered": 12, "connected": 12}
        answer: dict[str, Any] = {}

        async def reported() -> bool:
            async with httpx.AsyncClient(timeout=5) as http:
                response = await http.get(
                    f"{national}/national/totals",
                    headers={"Authorization": f"Bearer {viewer_key}"},
                )
            assert response.status_code == 200, response.text
            answer.update(response.json())
            totals = {f: answer["totals"][f] for f in own}
            return answer["coverage"]["cells"] == ["cell-1", "cell-2"] and totals == own

        asyncio.run(eventually(reported, timeout=30, interval=0.5))
        assert answer["stale"] == [], "no cell is stale"

        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()
    finally:
        left = end_session(process, tmp_path)
        # pg_ctl started the server apart: a killed run leaves it for the next to reuse.
        EmbeddedPostgres(tmp_path / "state" / "cells" / "postgres").kill()
    output = log.read_text()
    assert "[error" not in output, output
    assert left == [], "processes left running"
    national_port = int(national.rsplit(":", 1)[1])
    assert not accepts_connections("127.0.0.1", national_port), "the aggregator still answers"
    for _, api, _, broker, database, *_ in cells:
        port = int(api.rsplit(":", 1)[1])
        assert not accepts_connections("127.0.0.1", port), f"API {api} still answers"
        assert not accepts_connections("127.0.0.1", int(broker)), "a broker still listens"
        assert not accepts_connections("127.0.0.1", int(database)), "PostgreSQL still listens"
    assert not (tmp_path / "state" / "cells" / "postgres" / "postmaster.pid").exists()


async def test_the_aggregator_beside_cells_knows_each_cell_s_own_key_across_runs(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    schema = f"n_{unique}"
    settings = NationalSettings(database_url=database_url, database_schema=schema)
    cells = [("cell-1", tmp_path / "cell-1"), ("cell-2", tmp_path / "cell-2")]
    try:
        first = Aggregator(settings, state_dir=tmp_path, interval=3)
        reporting = await first.prepare(cells)
        keys = [c.cell_signing_key.read_bytes() for c in reporting.values() if c.cell_signing_key]
        again = Aggregator(settings, state_dir=tmp_path, interval=3)
        assert await again.prepare(cells) == reporting
        assert [
            c.cell_signing_key.read_bytes() for c in reporting.values() if c.cell_signing_key
        ] == keys, "a cell keeps its key across runs"
        one, two = reporting["cell-1"], reporting["cell-2"]
        assert str(one.national_url).rstrip("/") == again.url
        assert one.snapshot_interval_seconds == 3
        assert one.cell_signing_key != two.cell_signing_key
        assert one.enterprise_hash_key == two.enterprise_hash_key  # the cells share it
        async with await psycopg.AsyncConnection.connect(
            database_url, options=connection_options(schema)
        ) as conn:
            for name, cell in reporting.items():
                assert cell.cell_signing_key is not None
                signing = load_signing_key(cell.cell_signing_key)
                registered = await cell_key(conn, name)
                assert registered is not None
                assert (
                    public_key_pem(signing)
                    == registered.public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    ).decode()
                )
            # A new viewer key each run, the previous one revoked.
            assert await verify_viewer_key(conn, again.viewer_key) is not None
            assert await verify_viewer_key(conn, first.viewer_key) is None
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
