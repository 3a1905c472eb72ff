"""National penetration from the cells' keyed enterprise hashes: an enterprise in several cells
counts once, disagreements on its industry follow the stated rule and are counted, a cell under
another hash key is excluded, and the rates use totals imported with `iiot national
import-totals` (registered here with `iiot national add-cell`, as an operator would)."""

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests import national
from tests.conftest import eventually
from tests.national import Aggregator, SimCell, national_cli, platform

aggregator = national.aggregator  # the fixture
pytestmark = pytest.mark.slow

TOTALS = """year,region,industry,enterprises
2025,000000,,100
2025,000000,36,4
2025,000000,37,5
2025,320000,,10
"""


def code(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def enterprise(name: str, industry: str, *, active: bool, above: bool = True) -> dict[str, Any]:
    return {
        "code_hmac": code(name),
        "region": "320505",
        "industry_code": industry,
        "above_designated_size": above,
        "active_30d": active,
        "served": True,
    }


def listed(*items: dict[str, Any], key_id: str = "k1") -> dict[str, Any]:
    return {"key_id": key_id, "definitions_version": "2026-12.1", "items": list(items)}


async def test_enterprises_count_once_nationally_and_disagreements_follow_the_rule(
    aggregator: Aggregator, tmp_path: Path
) -> None:
    cells = [SimCell(name, 60) for name in ("east", "west", "north", "odd")]
    for cell in cells:
        pem = tmp_path / f"{cell.name}.pem"
        pem.write_text(cell.public_pem)
        done = national_cli(aggregator, "add-cell", cell.name, "--public-key", str(pem))
        assert done.returncode == 0, done.stderr
    totals = tmp_path / "totals.csv"
    totals.write_text(TOTALS)
    done = national_cli(aggregator, "import-totals", str(totals), "--source", "NBS 2025 table 1")
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("year,region,industry,enterprises\n2025,320000,ZZ,3\n")
    refused = national_cli(aggregator, "import-totals", str(bad), "--source", "x")
    assert refused.returncode == 1
    assert "line 2" in refused.stderr

    east, west, north, odd = cells
    lists = {
        # "a": three cells, industries 36/37/37: counted in 37 (most cells).
        # "b": two cells, 36/37: a tie, counted in 36 (the smallest code).
        east: listed(
            enterprise("a", "36", active=False),
            enterprise("b", "36", active=False),
            enterprise("c", "36", active=True),
        ),
        west: listed(enterprise("a", "37", active=True), enterprise("b", "37", active=False)),
        north: listed(
            enterprise("a", "37", active=False), enterprise("d", "37", active=True, above=False)
        ),
        # Hashed under another key: cannot be matched with the others, so left out, named.
        odd: listed(enterprise("e", "36", active=True), key_id="k2"),
    }
    async with aggregator.client() as http:
        for cell, items in lists.items():
            body = cell.body([platform(f"{cell.name}-1")], enterprises=items)
            assert (await cell.push(http, body)).status_code == 202

        async def computed(by: str) -> dict[str, Any] | None:
            answer = (await http.get("/national/penetration", params={"by": by})).json()
            run = answer["computed"]
            return answer if run and run["cells"] == ["east", "north", "west"] else None

        province = await eventually(lambda: computed("province"), timeout=15, interval=0.3)
        assert province["computed"]["excluded_cells"] == ["odd"]
        assert province["coverage"]["cells_covered"] == 4
        assert province["computed"]["key_id"] == "k1"
        assert province["totals"]["source"] == "NBS 2025 table 1"
        (jiangsu,) = province["rows"]
        # a, b, c above designated size (d is not): 3 served, 2 active (a in west, c).
        assert jiangsu | {"name": None} == {
            "key": "320000",
            "name": None,
            "active": 2,
            "served": 3,
            "official_total": 10,
            "active_rate": 0.2,
            "served_rate": 0.3,
        }
        by_industry = (await computed("industry")) or {}
        rows = {
            r["key"]: (r["served"], r["active"], r["official_total"]) for r in by_industry["rows"]
        }
        assert rows == {"36": (2, 1, 4), "37": (1, 1, 5)}
        disagreements = by_industry["disagreements"]
        assert disagreements["count"] == 2
        counted = {d["code_hmac"]: d["counted_industry"] for d in disagreements["listed"]}
        assert counted == {code("a"): "37", code("b"): "36"}
        national = (await computed("national")) or {}
        assert [(r["key"], r["served"], r["official_total"]) for r in national["rows"]] == [
            ("000000", 3, 100)
        ]
        exported = await http.get(
            "/national/penetration", params={"by": "industry", "format": "csv"}
        )
        assert exported.text.splitlines()[0].startswith("key,name,active,served")
