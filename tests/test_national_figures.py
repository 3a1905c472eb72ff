"""National figures from the aggregator over HTTP: totals and breakdowns equal the cells'
figures, `distinct` counts a device on two cells once within the stated bounds, a silent cell
is stale and shown apart, the history fills in when a cell delivers late, CSV, and keys."""

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest

from tests import national
from tests.conftest import eventually
from tests.national import Aggregator, SimCell, national_cli, platform

aggregator = national.aggregator  # the fixture
pytestmark = pytest.mark.slow


async def test_totals_and_breakdowns_are_the_exact_sums_of_the_cells_figures(
    aggregator: Aggregator,
) -> None:
    east, west, north = SimCell("east", 60), SimCell("west", 60), SimCell("north", 60)
    await aggregator.register(east, west, north)
    fleet = {
        east: [
            platform("e1", connected=10, registered=12, tier="leading", region="320505"),
            platform("e2", connected=3, tier="basic", region="110101", industry=None),
        ],
        west: [platform("w1", connected=7, registered=9, type_="industry", region="320200")],
        north: [platform("n1", connected=1, tier="ecosystem", region="210100", industry="26")],
    }
    async with aggregator.client() as http:
        for cell, platforms in fleet.items():
            assert (await cell.push(http, cell.body(platforms))).status_code == 202
        answer = (await http.get("/national/totals")).json()
        assert answer["totals"] == {
            "platforms": 4,
            "registered": 25,
            "connected": 21,
            "ever_connected": 25,
            "active_24h": 21,
            "active_30d": 25,
        }
        coverage = answer["coverage"]
        assert coverage["cells_covered"] == 3
        assert coverage["stale_cells"] == []
        assert 0 <= coverage["oldest_snapshot_age_seconds"] < 30
        assert coverage["definitions_versions"] == ["2026-12.1"]

        async def by(dimension: str) -> dict[str, tuple[int, int]]:
            rows = (await http.get(f"/national/by/{dimension}")).json()["rows"]
            return {r["key"]: (r["platforms"], r["connected"]) for r in rows}

        assert await by("tier") == {
            "basic": (2, 10),
            "ecosystem": (1, 1),
            "leading": (1, 10),
        }
        assert await by("type") == {"industry": (1, 7), "professional": (3, 14)}
        assert await by("province") == {"110000": (1, 3), "210000": (1, 1), "320000": (2, 17)}
        assert await by("prefecture") == {
            "110100": (1, 3),
            "210100": (1, 1),
            "320200": (1, 7),
            "320500": (1, 10),
        }
        assert await by("industry") == {"26": (1, 1), "36": (2, 17), "unmapped": (1, 3)}
        assert await by("cell") == {"east": (2, 13), "north": (1, 1), "west": (1, 7)}
        provinces = (await http.get("/national/by/province")).json()["rows"]
        assert {r["key"]: r["name"] for r in provinces}["320000"] == "江苏省"

        cells = (await http.get("/national/cells")).json()["cells"]
        assert {(c["cell"], c["status"], c["connected"]) for c in cells} == {
            ("east", "fresh", 13),
            ("west", "fresh", 7),
            ("north", "fresh", 1),
        }
        exported = await http.get("/national/platforms", params={"format": "csv"})
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert {(r["platform"], r["cell"], r["connected"]) for r in rows} == {
            ("e1", "east", "10"),
            ("e2", "east", "3"),
            ("w1", "west", "7"),
            ("n1", "north", "1"),
        }
        tiers = await http.get("/national/by/tier", params={"format": "csv"})
        tier_rows = list(csv.DictReader(io.StringIO(tiers.text)))
        assert {(r["key"], r["connected"], r["cells_covered"]) for r in tier_rows} == {
            ("basic", "10", "3"),
            ("ecosystem", "1", "3"),
            ("leading", "10", "3"),
        }


async def test_a_device_on_two_cells_counts_once_in_distinct_within_the_stated_bounds(
    aggregator: Aggregator,
) -> None:
    east, west = SimCell("east", 60), SimCell("west", 60)
    await aggregator.register(east, west)
    # 3,000 devices with a national identity, 1,000 of them connected in both cells; 50 devices
    # without one (distinct per platform, counted exactly).
    async with aggregator.client() as http:
        await east.push(
            http,
            east.body(
                [platform("e1", connected=2040)],
                identities=[f"g-{n}" for n in range(2000)],
                without_identity=40,
            ),
        )
        await west.push(
            http,
            west.body(
                [platform("w1", connected=2010)],
                identities=[f"g-{n}" for n in range(1000, 3000)],
                without_identity=10,
            ),
        )
        answer = (await http.get("/national/totals")).json()
    distinct = answer["distinct"]
    assert answer["totals"]["connected"] == 4050  # summed: exact, and counts shared devices twice
    assert distinct["lower_bound"] <= 3050 <= distinct["upper_bound"]
    assert distinct["without_identity_exact"] == 50
    assert distinct["sketch"] | {"relative_error_95": None} == {
        "name": "datasketches HLL",
        "lg_k": 12,
        "target": "HLL_8",
        "cells_merged": 2,
        "relative_error_95": None,
    }
    assert (
        abs(distinct["connected_devices"] - 3050) <= 3050 * distinct["sketch"]["relative_error_95"]
    )
    assert distinct["confidence"] > 0.95


async def test_a_silent_cell_is_stale_after_three_intervals_and_shown_apart(
    aggregator: Aggregator,
) -> None:
    east, west = SimCell("east", 1.0), SimCell("west", 60)
    await aggregator.register(east, west)
    async with aggregator.client() as http:
        await east.push(http, east.body([platform("e1", connected=10)]))
        await west.push(http, west.body([platform("w1", connected=5)]))
        fresh = (await http.get("/national/totals")).json()
        assert fresh["totals"]["connected"] == 15

        async def stale() -> dict[str, object] | None:
            answer = (await http.get("/national/totals")).json()
            return answer if answer["coverage"]["stale_cells"] else None

        started = datetime.now(UTC)
        answer = await eventually(stale, timeout=10, interval=0.2)
        assert datetime.now(UTC) - started >= timedelta(seconds=2)  # 3 intervals from taken_at
        assert answer["totals"]["connected"] == 5
        assert answer["coverage"]["cells"] == ["west"]
        assert [c["cell"] for c in answer["coverage"]["stale_cells"]] == ["east"]
        (apart,) = answer["stale"]
        assert apart["cell"] == "east"
        assert apart["connected"] == 10
        assert apart["age_seconds"] > 3
        assert 'iiot_national_cell_stale{cell="east"} 1.0' in (await http.get("/metrics")).text
        rows = (await http.get("/national/by/cell")).json()
        assert [r["key"] for r in rows["rows"]] == ["west"]
        assert [r["key"] for r in rows["stale_rows"]] == ["east"]
        # Back: counted again at once.
        await east.push(http, east.body([platform("e1", connected=11)]))
        assert (await http.get("/national/totals")).json()["totals"]["connected"] == 16

        # A cell taken out of service leaves the coverage, but not while it holds platforms.
        refused = national_cli(aggregator, "retire-cell", "west")
        assert refused.returncode == 1
        assert "holds 1 platform(s): w1" in refused.stderr
        await west.push(http, west.body([]))  # its platform gone (moved or removed)
        retired = national_cli(aggregator, "retire-cell", "west")
        assert retired.returncode == 0, retired.stderr
        coverage = (await http.get("/national/totals")).json()["coverage"]
        # (East, on a 1 s interval, may itself be stale by now on a busy machine.)
        assert coverage["cells_registered"] == 1
        listed = coverage["cells"] + [c["cell"] for c in coverage["stale_cells"]]
        assert listed == ["east"]
        late = await west.push(http, west.body([platform("w1", connected=5)]))
        assert late.status_code == 403, late.text
        assert (await http.get("/national/cells/west/snapshots")).json()["snapshots"]


async def test_the_history_fills_in_when_a_cell_delivers_the_snapshots_it_kept(
    aggregator: Aggregator,
) -> None:
    cell = SimCell("east", 60)
    await aggregator.register(cell)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    async with aggregator.client() as http:
        # Ten minutes the cell could not deliver, then delivered in order: one snapshot a minute.
        for back in range(10, 0, -1):
            taken = minute - timedelta(minutes=back) + timedelta(seconds=30)
            body = cell.body([platform("e1", connected=100 - back)], taken_at=taken)
            assert (await cell.push(http, body)).status_code == 202

        async def filled() -> list[dict[str, object]] | None:
            answer = await http.get(
                "/national/history", params={"since": (minute - timedelta(minutes=10)).isoformat()}
            )
            samples = answer.json()["samples"]
            past = [s for s in samples if s["at"] < minute.isoformat().replace("+00:00", "Z")]
            return samples if len(past) >= 10 else None

        samples = await eventually(filled, timeout=15, interval=0.5)
        by_minute = {datetime.fromisoformat(s["at"]): s for s in samples}
        for back in range(10, 0, -1):
            sample = by_minute[minute - timedelta(minutes=back)]
            assert sample["connected"] == 100 - back, sample
            assert sample["cells"] == 1
            assert sample["resolution"] == "minute"
        exported = await http.get(
            "/national/history",
            params={"since": (minute - timedelta(minutes=10)).isoformat(), "format": "csv"},
        )
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [int(r["connected"]) for r in rows[:10]] == list(range(90, 100))


async def test_figures_need_a_live_national_viewer_key(aggregator: Aggregator) -> None:
    async with aggregator.client("") as anonymous, aggregator.client("iiotn_00_x") as wrong:
        for client in (anonymous, wrong):
            answer = await client.get("/national/totals")
            assert answer.status_code == 401
            assert answer.headers["content-type"] == "application/problem+json"
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/openapi.json")).status_code == 200
        assert (await anonymous.get("/dashboard")).status_code == 200
    async with aggregator.client() as http:
        assert (await http.get("/national/totals")).status_code == 200
    # A key made and revoked as an operator would (the test's aggregator caches no key).
    made = national_cli(aggregator, "keys", "create", "--name", "statistics office")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    listed = national_cli(aggregator, "keys", "list")
    (row,) = [line for line in listed.stdout.splitlines() if "statistics office" in line]
    assert key not in listed.stdout
    async with aggregator.client(key) as office:
        assert (await office.get("/national/cells")).status_code == 200
        revoked = national_cli(aggregator, "keys", "revoke", row.split("\t")[0])
        assert revoked.returncode == 0, revoked.stderr
        answer = await office.get("/national/cells")
        assert answer.status_code == 401, answer.text
