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
from registry.access import Role
from registry.platforms import Tier, upsert_platform
from registry.settings import StoreSettings
from tests.browser import Browser, Page, chromium
from tests.conftest import KeyMaker, served_api
from tests.test_writer import telemetry

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(
    chromium() is None,
    reason="needs Debian's chromium (make test installs it when run as root: `make browser`)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    binary = chromium()
    assert binary is not None
    opened = Browser(binary, tmp_path / "profile")
    yield opened
    opened.close()


@pytest.fixture
def base(store: StoreSettings) -> Iterator[str]:
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        api_rate_per_second=1e6,
        api_rate_burst=1_000_000,
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
