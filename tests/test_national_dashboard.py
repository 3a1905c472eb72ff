"""The national page in headless Chromium, against `iiot national serve`: its figures match
the API, a stale cell's last figures appear apart, and a wrong key gets the form, not data.
Screenshots go to test-artifacts/."""

from pathlib import Path

import pytest

from tests import browser as browser_module
from tests import national
from tests.browser import Browser, Page
from tests.national import Aggregator, SimCell, platform

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

aggregator = national.aggregator  # the fixture
pytestmark = [pytest.mark.slow, browser_module.NEEDS_CHROMIUM]
browser = browser_module.browser  # the fixture


def text(page: Page, testid: str) -> str:
    value: str = page.evaluate(f"document.querySelector('[data-testid={testid}]').textContent")
    return value


async def test_the_national_page_shows_the_totals_coverage_and_stale_cells_apart(
    browser: Browser, aggregator: Aggregator
) -> None:
    east, west = SimCell("east", 60), SimCell("west", 1)
    await aggregator.register(east, west)
    async with aggregator.client() as http:
        await east.push(http, east.body([platform("e1", connected=1200, tier="leading")]))
        await west.push(http, west.body([platform("w1", connected=34)]))
        page = browser.open(f"{aggregator.url}/dashboard#key={aggregator.key}&interval=0.5")
        # West says nothing more: stale after three of its 1 s intervals, shown apart.
        page.wait_for("!document.querySelector('[data-testid=stale]').hidden", timeout=15)
        page.wait_for("document.querySelector('[data-testid=stale-west]') !== null")
        totals = (await http.get("/national/totals")).json()
    assert totals["totals"]["connected"] == 1200
    page.wait_for("document.querySelector('[data-testid=connected]').textContent === '1,200'")
    assert "1 of 2 cells counted" in text(page, "coverage")
    assert "stale: west" in text(page, "coverage")
    assert "34" in text(page, "stale-west")
    assert "datasketches HLL" in text(page, "distinct-method")
    page.wait_for("document.querySelector('[data-testid=tier-leading]') !== null")
    assert "stale" in text(page, "cell-west")
    assert "key=" not in page.evaluate("location.href")
    page.screenshot(ARTIFACTS / "national-dashboard.png")
    page.close()

    page = browser.open(f"{aggregator.url}/dashboard#key=iiotn_00000000_wrong")
    page.wait_for("!document.querySelector('[data-testid=login]').hidden")
    assert page.evaluate("document.querySelector('#main').hidden") is True
    page.close()
