"""Headless Chromium driven over the DevTools protocol, for the dashboard's tests.

Debian's `chromium` is installed by `make test` (the `browser` target) where it can be; it is
started with the flags the project's machines need and one private profile per test.
"""

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from iiot.net import free_port

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


NEEDS_CHROMIUM = pytest.mark.skipif(
    chromium() is None,
    reason="needs Debian's chromium (make test installs it when run as root: `make browser`)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator["Browser"]:
    """Chromium with a profile of the test's own (import it into a test module)."""
    binary = chromium()
    assert binary is not None
    opened = Browser(binary, tmp_path / "profile")
    yield opened
    opened.close()


class Page:
    def __init__(self, ws_url: str) -> None:
        self._ws = websocket.create_connection(ws_url, timeout=30)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self._ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        """Polls `expression` until it is truthy; fails with its last value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as error:  # the page is still loading: not there yet
                value = str(error)[:200]
            else:
                if value:
                    return value
            time.sleep(0.1)
        raise AssertionError(f"not true within {timeout} s: {expression} (last: {value!r})")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        self._ws.close()


class Browser:
    def __init__(self, binary: str, profile: Path) -> None:
        self.port = free_port()
        self._process = subprocess.Popen(
            [binary, *FLAGS, f"--remote-debugging-port={self.port}", f"--user-data-dir={profile}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self._get("/json/version")
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError("chromium did not start") from None
                time.sleep(0.1)

    def open(self, url: str) -> Page:
        # A new tab, then navigated: a URL given to /json/new would lose its #fragment.
        target = self._get("/json/new?about:blank", method="PUT")
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.navigate", url=url)
        return page

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)

    def _get(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
