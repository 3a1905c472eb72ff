"""The platform penetration rate (docs/enterprises.md): each enterprise once across platforms,
the two definitions, the rule for disagreeing platforms, the official totals and their import
(also through the `iiot` command), the groupings, and who may read them."""

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from iiot.demo_enterprises import seed_demo, simulated_enterprises
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry import uscc
from registry.access import Role
from registry.errors import Invalid
from registry.official_totals import import_totals
from registry.penetration import refresh_penetration
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import ApiAs, KeyMaker
from tests.test_writer import telemetry

SHENZHEN_AUTO = uscc.compose("440300", "19231745")  # also the platforms' shared enterprise
SUZHOU_MACHINES = uscc.compose("320500", "60000001")
WUXI_ELECTRIC = uscc.compose("320200", "60000002")
SUZHOU_SOFTWARE = uscc.compose("320500", "60000003")
NANJING_PHARMA = uscc.compose("320104", "60000004")  # a district of Nanjing (320100)
NANJING_CHEMICALS = uscc.compose("320100", "60000005")

TOTALS = """year,region,region_name,industry,enterprises
2025,000000,全国,,100
2025,440000,广东省,,10
2025,320000,江苏省,,20
2025,320500,苏州市,,8
2025,320100,南京市,,5
2025,000000,全国,C,90
2025,000000,全国,36,4
2025,320000,江苏省,C,18
"""


def enterprise(code: str, industry: str, *, above_size: bool = True) -> dict[str, Any]:
    return {
        "code": code,
        "name": f"企业 {code[-6:]}",
        "industry": industry,
        "above_size": above_size,
    }


async def declare(client: httpx.AsyncClient, platform: str, *items: dict[str, Any]) -> None:
    response = await client.post(f"/platforms/{platform}/enterprises", json={"enterprises": items})
    assert response.status_code == 200, response.text


async def device_of(client: httpx.AsyncClient, platform: str, device: str, code: str) -> None:
    await client.post(f"/platforms/{platform}/devices", json={"devices": [{"device_id": device}]})
    links = {"devices": {device: code}}
    response = await client.post(f"/platforms/{platform}/enterprise-links", json=links)
    assert response.json()["devices"] == 1


@pytest.fixture
async def province_of_figures(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool
) -> None:
    """Three platforms serving six enterprises in Guangdong and Jiangsu (see the asserts)."""
    for platform in ("plant-1", "plant-2", "plant-3"):
        await upsert_platform(db, platform)
    # Served by two platforms, with a device connected on each: one enterprise.
    await declare(api, "plant-1", enterprise(SHENZHEN_AUTO, "36"))
    await declare(api, "plant-2", enterprise(SHENZHEN_AUTO, "36"))
    await device_of(api, "plant-1", "car-line", SHENZHEN_AUTO)
    await device_of(api, "plant-2", "paint-shop", SHENZHEN_AUTO)
    # A device last active 31 days ago, and one 10 days ago.
    await declare(api, "plant-2", enterprise(SUZHOU_MACHINES, "34"))
    await device_of(api, "plant-2", "lathe", SUZHOU_MACHINES)
    await declare(api, "plant-1", enterprise(WUXI_ELECTRIC, "38"))
    await device_of(api, "plant-1", "motor-test", WUXI_ELECTRIC)
    await db.execute("""
        UPDATE devices SET last_seen = now() - CASE device_id WHEN 'lathe' THEN interval '31 days'
                                                               ELSE interval '10 days' END
        WHERE device_id IN ('lathe', 'motor-test')""")
    # Not above designated size, with a live device: in no numerator.
    await declare(api, "plant-3", enterprise(SUZHOU_SOFTWARE, "65", above_size=False))
    await device_of(api, "plant-3", "server", SUZHOU_SOFTWARE)
    # Platforms disagree: two say division 27, one 26 (27 counts); one says above designated
    # size and one not, the first declaration (above) counts.
    await declare(api, "plant-1", enterprise(NANJING_PHARMA, "26"))
    await declare(api, "plant-2", enterprise(NANJING_PHARMA, "27"))
    await declare(api, "plant-3", enterprise(NANJING_PHARMA, "27"))
    await declare(api, "plant-1", enterprise(NANJING_CHEMICALS, "26"))
    await declare(api, "plant-2", enterprise(NANJING_CHEMICALS, "26", above_size=False))
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for platform, device in (
        ("plant-1", "car-line"),
        ("plant-2", "paint-shop"),
        ("plant-3", "server"),
    ):
        await writer.write([telemetry(platform, device, (now, "v", 1.0))])
    async with db.transaction():
        await import_totals(db, TOTALS, source="test yearbook 2026, table 1", file_name="t.csv")
    assert await refresh_penetration(db)


def figures(body: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {
        r["key"]: (r["name"], r["served"], r["connected_30d"], r["total"]) for r in body["rows"]
    }


async def test_national_rate_counts_each_enterprise_once_by_both_definitions(
    api: httpx.AsyncClient, province_of_figures: None
) -> None:
    body = (await api.get("/penetration")).json()
    assert figures(body) == {"000000": ("全国", 5, 2, 100)}
    row = body["rows"][0]
    assert row["served_rate"] == pytest.approx(0.05)
    assert row["connected_30d_rate"] == pytest.approx(0.02)
    assert body["target_2028"] == 0.55
    assert body["enterprises"] == 6
    assert body["disputed"] == 2
    assert body["definitions_version"] == "2026-12.1"
    assert set(body["definitions"]) == {"served", "connected_30d", "denominator", "attribution"}
    assert body["totals"]["year"] == 2025
    assert body["totals"]["source"] == "test yearbook 2026, table 1"


async def test_rates_per_province_prefecture_and_industry(
    api: httpx.AsyncClient, province_of_figures: None
) -> None:
    provinces = (await api.get("/penetration/by/province")).json()
    assert figures(provinces) == {
        "320000": ("江苏省", 4, 1, 20),
        "440000": ("广东省", 1, 1, 10),
    }
    prefectures = await api.get("/penetration/by/prefecture", params={"region": "320000"})
    assert figures(prefectures.json()) == {
        "320100": ("南京市", 2, 0, 5),
        "320200": ("无锡市", 1, 1, None),  # no official total imported: no rate
        "320500": ("苏州市", 1, 0, 8),
    }
    assert prefectures.json()["rows"][1]["served_rate"] is None
    divisions = (await api.get("/penetration/by/industry")).json()
    assert figures(divisions) == {
        "26": ("化学原料和化学制品制造业", 1, 0, None),
        "27": ("医药制造业", 1, 0, None),
        "34": ("通用设备制造业", 1, 0, None),
        "36": ("汽车制造业", 1, 1, 4),
        "38": ("电气机械和器材制造业", 1, 1, None),
    }
    sections = await api.get("/penetration/by/industry", params={"level": "section"})
    assert figures(sections.json()) == {"C": ("制造业", 5, 2, 90)}
    in_jiangsu = await api.get(
        "/penetration/by/industry", params={"level": "section", "region": "320000"}
    )
    assert figures(in_jiangsu.json()) == {"C": ("制造业", 4, 1, 18)}
    manufacturing = await api.get("/penetration/by/province", params={"industry": "C"})
    assert figures(manufacturing.json()) == {
        "320000": ("江苏省", 4, 1, 18),
        "440000": ("广东省", 1, 1, None),
    }
    only_jiangsu = await api.get("/penetration/by/province", params={"region": "320000"})
    assert figures(only_jiangsu.json()) == {"320000": ("江苏省", 4, 1, 20)}
    no_province = await api.get("/penetration/by/prefecture")
    assert no_province.status_code == 422


async def test_platform_indicators_are_per_platform_and_sortable(
    api: httpx.AsyncClient, province_of_figures: None
) -> None:
    body = (await api.get("/penetration/indicators", params={"sort": "enterprises"})).json()
    rows = {i["platform"]: i for i in body["items"]}
    assert [i["platform"] for i in body["items"]] == ["plant-3", "plant-1", "plant-2"]
    assert rows["plant-1"]["enterprises"] == 4
    assert rows["plant-1"]["enterprises_above_size"] == 4
    assert rows["plant-1"]["enterprises_connected_30d"] == 2  # car-line, motor-test
    assert rows["plant-1"]["industries"] == 3  # 26, 36, 38
    assert rows["plant-1"]["provinces"] == 2
    assert rows["plant-1"]["prefectures"] == 3
    assert rows["plant-1"]["linked_devices"] == 2
    assert rows["plant-1"]["devices_per_enterprise"] == 0.5
    assert rows["plant-1"]["tier"] == "basic"
    assert rows["plant-1"]["devices_connected"] == 1
    assert rows["plant-3"]["enterprises_above_size"] == 1  # NANJING_PHARMA, not the software firm
    descending = await api.get(
        "/penetration/indicators", params={"sort": "enterprises", "descending": "true"}
    )
    assert [i["platform"] for i in descending.json()["items"]] == ["plant-2", "plant-1", "plant-3"]


async def test_platform_keys_get_no_national_figures_and_their_own_indicators(
    api_as: ApiAs, make_key: KeyMaker, province_of_figures: None
) -> None:
    async with api_as(await make_key(Role.OPERATOR, "plant-1")) as operator:
        for path in ("/penetration", "/penetration/by/province", "/penetration/totals"):
            assert (await operator.get(path)).status_code == 403
        mine = (await operator.get("/penetration/indicators")).json()["items"]
        assert [i["platform"] for i in mine] == ["plant-1"]
    async with api_as(await make_key(Role.VIEWER, None)) as national:
        assert (await national.get("/penetration")).status_code == 200


async def test_totals_are_versioned_per_year(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    async with db.transaction():
        await import_totals(
            db,
            "year,region,industry,enterprises\n2025,000000,,100\n",
            source="first",
            file_name="a.csv",
        )
        await import_totals(
            db,
            "year,region,industry,enterprises\n2025,000000,,120\n",
            source="corrected",
            file_name="b.csv",
        )
        await import_totals(
            db,
            "year,region,industry,enterprises\n2024,000000,,90\n",
            source="last year",
            file_name="c.csv",
        )
    latest = (await api.get("/penetration")).json()
    assert (latest["totals"]["source"], latest["rows"][0]["total"]) == ("corrected", 120)
    older = (await api.get("/penetration", params={"year": 2024})).json()
    assert (older["totals"]["source"], older["rows"][0]["total"]) == ("last year", 90)
    missing = await api.get("/penetration", params={"year": 2020})
    assert missing.status_code == 422
    versions = (await api.get("/penetration/totals")).json()
    assert [(v["source"], v["years"]) for v in versions] == [
        ("last year", [2024]),
        ("corrected", [2025]),
        ("first", [2025]),
    ]


async def test_a_totals_file_with_bad_rows_is_refused_whole(
    db: psycopg.AsyncConnection[Any],
) -> None:
    text = """year,region,industry,enterprises
2025,320000,,20
2025,320102,,1
2025,320000,F,3
2025,990000,,3
2025,320000,C,-1
2025,320000,,21
"""
    with pytest.raises(Invalid) as refused:
        async with db.transaction():
            await import_totals(db, text, source="x", file_name="bad.csv")
    message = str(refused.value)
    assert "line 3: region 320102 is a county" in message
    assert "line 4: industry 'F' is not an industrial section" in message
    assert "line 5: region '990000' is not a GB/T 2260 code" in message
    assert "line 6: enterprises cannot be negative" in message
    assert "line 7: repeats line 2" in message
    cur = await db.execute("SELECT count(*) FROM enterprise_total_imports")
    assert await cur.fetchone() == (0,)


async def test_the_iiot_command_imports_totals(
    store: StoreSettings, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    good = tmp_path / "totals-2025.csv"
    good.write_text(TOTALS, encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text("year,region,enterprises\n2025,000000,1\n", encoding="utf-8")
    env = {
        **os.environ,
        "IIOT_DATABASE_URL": str(store.database_url),
        "IIOT_DATABASE_SCHEMA": store.database_schema,
    }
    iiot = str(Path(sys.executable).parent / "iiot")

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            iiot,
            "enterprises",
            "import-totals",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, output.decode()

    code, output = await run(str(bad), "--source", "x")
    assert code == 1
    assert "refused: the totals file lacks the columns industry" in output
    code, output = await run(str(good), "--source", "NBS yearbook 2026, table 13-2")
    assert code == 0, output
    assert "import 1: 8 totals for 2025" in output
    versions = (await api.get("/penetration/totals")).json()
    assert versions[0]["source"] == "NBS yearbook 2026, table 13-2"
    assert versions[0]["file_name"] == "totals-2025.csv"


def test_simulated_enterprises_have_valid_codes_across_regions_and_industries() -> None:
    found = simulated_enterprises(40)
    assert len({e.code for e in found}) == 40
    for e in found:
        assert uscc.parse(e.code).code == e.code
        assert e.region == e.code[2:8]
    assert len({e.region[:2] for e in found}) >= 10
    assert len({e.industry for e in found}) >= 10
    assert sum(e.above_size for e in found) == 30
    assert simulated_enterprises(3) == found[:3]  # deterministic
    assert not {e.code for e in simulated_enterprises(3, prefix="LT")} & {e.code for e in found}


async def test_the_demo_seed_gives_iiot_run_figures(
    api: httpx.AsyncClient, db: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool
) -> None:
    await upsert_platform(db, "demo")
    devices = [f"sim-{n:06d}" for n in range(8)]
    async with db.transaction():
        await seed_demo(db, "demo", devices, year=2025)
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for device in devices[:2]:  # two devices report: two enterprises (sim-0 and sim-1's)
        await writer.write([telemetry("demo", device, (now, "v", 1.0))])
    assert await refresh_penetration(db)
    body = (await api.get("/penetration")).json()
    declared = simulated_enterprises(4)
    above = sum(e.above_size for e in declared)
    connected = sum(e.above_size for e in declared[:2])
    assert figures(body) == {"000000": ("全国", above, connected, 4 * above)}
    assert body["totals"]["source"].startswith("iiot run: simulated totals")
    owner = (await api.get("/platforms/demo/devices/sim-000005/enterprise")).json()
    assert owner == {"device_id": "sim-000005", "enterprise": declared[1].code, "linked_by": "rule"}
