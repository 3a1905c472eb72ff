"""The operator dashboard in headless Chromium: it loads, its counts match the API, its chart
follows new devices, a device drills down, and an operator's key shows one platform only.
Screenshots go to test-artifacts/."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from api.settings import ApiSettings
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry import uscc
from registry.access import Role
from registry.official_totals import import_totals
from registry.penetration import refresh_penetration
from registry.platforms import Tier, upsert_platform
from registry.settings import StoreSettings
from tests import browser as browser_module
from tests.browser import Browser, Page
from tests.conftest import KeyMaker, served_api
from tests.test_writer import telemetry

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

pytestmark = browser_module.NEEDS_CHROMIUM
browser = browser_module.browser  # the fixture


@pytest.fixture
def base(store: StoreSettings) -> Iterator[str]:
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        api_rate_per_second=1e6,
        api_rate_burst=1_000_000,
        cell="east-1",
    )
    with served_api(settings) as url:
        yield url


async def connect_devices(pool: AsyncConnectionPool, platform: str, names: list[str]) -> None:
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    for n, name in enumerate(names):
        point = (now - timedelta(seconds=n), "temperature", 20.0 + n)
        await writer.write([telemetry(platform, name, point)])


def text(page: Page, testid: str) -> str:
    value: str = page.evaluate(f"document.querySelector('[data-testid={testid}]').textContent")
    return value


def rows(page: Page) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {
        row["platform"]: {"connected": int(row["connected"]), "registered": int(row["registered"])}
        for row in page.evaluate(
            "[...document.querySelectorAll('[data-testid=platforms] tbody tr')].map(r => ({"
            "platform: r.dataset.testid.replace('platform-row-', ''),"
            "connected: r.dataset.connected, registered: r.dataset.registered}))"
        )
    }
    return found


def refreshed_after(page: Page, count: int) -> None:
    try:
        page.wait_for(f"Number(document.body.dataset.refreshed || 0) > {count}")
    except AssertionError as failure:
        status = page.evaluate("document.querySelector('#status').textContent")
        raise AssertionError(f"{failure}; the page says: {status}") from None


async def test_the_dashboard_shows_what_the_api_counts_and_follows_new_devices(
    browser: Browser,
    base: str,
    make_key: KeyMaker,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
) -> None:
    await upsert_platform(db, "plant-1", name="Plant One", tier=Tier.GROWTH, region="110000")
    await upsert_platform(db, "plant-2", name="Plant Two")
    await connect_devices(pool, "plant-1", ["press-1", "press-2", "press-3"])
    await connect_devices(pool, "plant-2", ["pump-1", "pump-2"])
    admin = await make_key(Role.ADMIN, None)

    page = browser.open(f"{base}/dashboard#key={admin}&interval=0.5")
    refreshed_after(page, 0)
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": admin}) as api:
        counted = (await api.get("/counts/platforms")).json()["items"]
        national = (await api.get("/counts/national")).json()
    assert rows(page) == {
        c["platform"]: {"connected": c["connected"], "registered": c["registered"]} for c in counted
    }
    assert rows(page)["plant-1"] == {"connected": 3, "registered": 3}
    assert text(page, "national-connected") == f"{national['connected']:,}" == "5"
    # The header names the cell whose store the figures come from, as the API does.
    assert text(page, "cell") == "cell east-1"
    assert national["cell"] == "east-1"
    assert page.evaluate("document.querySelector('[data-testid=group-tier]') !== null")
    # The key is out of the address bar once read.
    assert "key=" not in page.evaluate("location.href")

    # The chart follows the selected (first) platform; two more devices connect.
    page.wait_for("document.querySelector('#chart').dataset.last === '3'")
    await connect_devices(pool, "plant-1", ["press-4", "press-5"])
    page.wait_for("document.querySelector('#chart').dataset.last === '5'")
    page.wait_for("Number(document.querySelector('#chart').dataset.points) >= 2")
    assert rows(page)["plant-1"]["connected"] == 5
    page.wait_for("document.querySelector('[data-testid=rate-points]').textContent !== '-'")
    page.screenshot(ARTIFACTS / "dashboard-admin.png")

    # Drill down into a device: its latest values and its state history.
    page.evaluate("document.querySelector('[data-testid=device-row-press-4]').click()")
    page.wait_for("!document.querySelector('[data-testid=device]').hidden")
    page.wait_for("document.querySelectorAll('[data-testid=latest] tbody tr').length === 1")
    latest = page.evaluate("document.querySelector('[data-testid=latest] tbody tr').innerText")
    assert "temperature" in latest
    assert "20" in latest
    page.wait_for("document.querySelectorAll('[data-testid=events] tbody tr').length >= 1")
    assert "online" in page.evaluate(
        "document.querySelector('[data-testid=events] tbody').innerText"
    )
    page.screenshot(ARTIFACTS / "dashboard-device.png")
    page.close()


async def test_an_operator_sees_only_its_own_platform(
    browser: Browser,
    base: str,
    make_key: KeyMaker,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
) -> None:
    await upsert_platform(db, "plant-1", name="Plant One")
    await upsert_platform(db, "plant-2", name="Plant Two")
    await connect_devices(pool, "plant-1", ["press-1", "press-2"])
    await connect_devices(pool, "plant-2", ["pump-1"])
    operator = await make_key(Role.OPERATOR, "plant-2")

    page = browser.open(f"{base}/dashboard#key={operator}&interval=0.5")
    refreshed_after(page, 1)
    assert rows(page) == {"plant-2": {"connected": 1, "registered": 1}}
    assert page.evaluate("document.querySelector('[data-testid=national]').hidden") is True
    assert page.evaluate("document.querySelector('[data-testid=groups]').hidden") is True
    html = page.evaluate("document.documentElement.outerHTML")
    assert "plant-1" not in html
    assert "press-" not in html
    page.screenshot(ARTIFACTS / "dashboard-operator.png")
    page.close()

    # A wrong key gets the login form, not data.
    page = browser.open(f"{base}/dashboard#key=iiot_000000000000_{'x' * 40}")
    page.wait_for("!document.querySelector('[data-testid=login]').hidden")
    assert page.evaluate("document.querySelector('#main').hidden") is True
    page.close()


async def test_the_penetration_view_matches_the_api_and_drills_down_to_prefectures(
    browser: Browser,
    base: str,
    make_key: KeyMaker,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
) -> None:
    await upsert_platform(
        db, "plant-1", name="Plant One", tier=Tier.LEADING, region="320000", industry="Automotive"
    )
    await upsert_platform(db, "plant-2", name="Plant Two", industry="gizmos")
    admin = await make_key(Role.ADMIN, None)
    codes = {
        "suzhou": uscc.compose("320500", "70000001"),
        "nanjing": uscc.compose("320100", "70000002"),
        "shenzhen": uscc.compose("440300", "70000003"),
    }
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": admin}) as api:
        for platform, names in (
            ("plant-1", ["suzhou", "nanjing", "shenzhen"]),
            ("plant-2", ["suzhou"]),
        ):
            declared = [
                {"code": codes[n], "name": n, "industry": "34", "above_size": True} for n in names
            ]
            response = await api.post(
                f"/platforms/{platform}/enterprises", json={"enterprises": declared}
            )
            assert response.status_code == 200
        await connect_devices(pool, "plant-1", ["press-1"])
        links = {"devices": {"press-1": codes["suzhou"]}}
        await api.post("/platforms/plant-1/enterprise-links", json=links)
        async with db.transaction():
            await import_totals(
                db,
                "year,region,industry,enterprises\n2025,000000,,100\n2025,320000,,40\n"
                "2025,440000,,30\n2025,320500,,10\n2025,000000,C,90\n",
                source="test totals",
                file_name="t.csv",
            )
        assert await refresh_penetration(db)
        provinces = (await api.get("/penetration/by/province")).json()["rows"]

    page = browser.open(f"{base}/dashboard#key={admin}&interval=0.5")
    refreshed_after(page, 0)
    assert text(page, "penetration-served") == "3.0%"
    assert text(page, "penetration-served-of").endswith("3 / 100 enterprises above designated size")
    assert text(page, "penetration-connected") == "1.0%"
    assert text(page, "penetration-target") == "55.0%"
    shown = page.evaluate(
        "[...document.querySelectorAll('[data-testid=penetration-rows] tbody tr')]"
        ".map(r => [r.dataset.testid, r.cells[1].textContent, r.dataset.served, r.dataset.total])"
    )
    assert shown == [
        [f"penetration-row-{r['key']}", r["name"], str(r["served"]), str(r["total"])]
        for r in provinces
    ]
    assert [s[1] for s in shown] == ["江苏省", "广东省"]
    assert page.evaluate("document.querySelector('#penetration-chart').dataset.bars") == "2"
    page.screenshot(ARTIFACTS / "dashboard-penetration.png")

    # Drill down into Jiangsu: its prefectures, Suzhou with its official total.
    page.evaluate("document.querySelector('[data-testid=penetration-row-320000]').click()")
    page.wait_for("document.querySelector('[data-testid=penetration-row-320500]') !== null")
    suzhou = page.evaluate(
        "document.querySelector('[data-testid=penetration-row-320500]').innerText"
    )
    assert "苏州市" in suzhou
    assert "10.0%" in suzhou  # 1 of 10
    assert "南京市" in page.evaluate(
        "document.querySelector('[data-testid=penetration-rows] tbody').innerText"
    )
    page.screenshot(ARTIFACTS / "dashboard-penetration-prefectures.png")
    page.evaluate("document.querySelector('[data-testid=penetration-by-industry]').click()")
    page.wait_for("document.querySelector('[data-testid=penetration-row-C]') !== null")
    assert "制造业" in text(page, "penetration-rows")

    # Platform indicators, sorted by enterprises (descending) with a click on the header.
    page.wait_for("document.querySelector('[data-testid=indicators-row-plant-2]') !== null")
    page.evaluate(
        "document.querySelector('[data-testid=indicators] th[data-sort=enterprises]').click()"
    )
    page.wait_for(
        "document.querySelector('[data-testid=indicators] tbody tr').dataset.testid"
        " === 'indicators-row-plant-1'"
    )
    first = page.evaluate("document.querySelector('[data-testid=indicators] tbody tr').innerText")
    assert "leading" in first
    assert "320000 江苏省" in first  # names beside codes
    assert "36 汽车制造业" in first  # the platform's text "Automotive", mapped
    second = page.evaluate(
        "document.querySelector('[data-testid=indicators-row-plant-2]').innerText"
    )
    assert "gizmos (not mapped)" in second
    page.close()
