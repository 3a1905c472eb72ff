"""Input limits of the API: no stored value can break a read, no input answers 500 (issue 24).

JSON documents within limits that keep every read working; times over their whole range; CSV
cells safe in a spreadsheet; the body cap, the unknown-key limit per address, 405's Allow and
key expiry.
"""

import asyncio
import csv
import io
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from api.app import create_app
from api.routes.usage import _cell
from api.settings import ApiSettings
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry import migrate as migrations
from registry.access import Role, create_key
from registry.csv_cells import text_cell
from registry.json_limits import MAX_DEPTH, MAX_KEY_CHARS, MAX_KEYS, MAX_STRING_CHARS
from registry.settings import StoreSettings
from registry.store import connect
from tests.conftest import KeyMaker, served_api
from tests.test_writer import telemetry


def nested(levels: int) -> dict[str, Any]:
    """An object `levels` objects and arrays deep, alternating, with a value at the bottom."""
    document: Any = "bottom"
    for level in range(levels):
        document = {"k": document} if (levels - level) % 2 == 1 else [document]
    assert isinstance(document, dict)
    return document


def depth(document: Any) -> int:
    if isinstance(document, dict):
        return 1 + max((depth(v) for v in document.values()), default=0)
    if isinstance(document, list):
        return 1 + max((depth(v) for v in document), default=0)
    return 0


# --- JSON documents --------------------------------------------------------------------------


async def test_the_deepest_metadata_allowed_reads_back_and_one_level_more_is_refused(
    api: httpx.AsyncClient, platform: str
) -> None:
    deepest = nested(MAX_DEPTH)
    assert depth(deepest) == MAX_DEPTH
    devices = f"/platforms/{platform}/devices"
    created = await api.post(
        devices, json={"devices": [{"device_id": "deep", "metadata": deepest}]}
    )
    assert created.status_code == 200, created.text
    # Every read that carries the document: the device, the list, a containment search,
    # a change of it, and the audit log that records the change one level further down.
    assert (await api.get(f"{devices}/deep")).json()["metadata"] == deepest
    listed = await api.get(devices)
    assert listed.status_code == 200
    assert listed.json()["items"][0]["metadata"] == deepest
    searched = await api.get(devices, params={"metadata": '{"k": [{"k": []}]}'})
    assert [d["device_id"] for d in searched.json()["items"]] == ["deep"]
    patched = await api.patch(
        f"{devices}/deep", json={"metadata": {"other": nested(MAX_DEPTH - 1)}}
    )
    assert patched.status_code == 200, patched.text
    assert (await api.get("/audit")).status_code == 200
    assert (
        await api.patch(f"/platforms/{platform}", json={"metadata": deepest})
    ).status_code == 200
    assert (await api.get(f"/platforms/{platform}")).json()["metadata"] == deepest
    assert (await api.get("/platforms")).status_code == 200

    too_deep = {"k": deepest}
    for method, url, body in [
        ("POST", devices, {"devices": [{"device_id": "deeper", "metadata": too_deep}]}),
        ("PATCH", f"{devices}/deep", {"metadata": too_deep}),
        ("PATCH", f"/platforms/{platform}", {"metadata": too_deep}),
        ("POST", "/platforms", {"id": "plant-9", "name": "P", "metadata": too_deep}),
    ]:
        refused = await api.request(method, url, json=body)
        assert refused.status_code == 422, (method, url, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert "max_depth" in refused.text
    searched = await api.get(devices, params={"metadata": _compact(too_deep)})
    assert searched.status_code == 422
    assert "max_depth" in searched.json()["detail"]


def _compact(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"))


@pytest.mark.parametrize(
    ("metadata", "limit"),
    [
        ({f"k{n}": n for n in range(MAX_KEYS + 1)}, "max_keys"),
        ({"a": [{f"k{n}": n} for n in range(MAX_KEYS + 1)]}, "max_keys"),
        ({"k" * (MAX_KEY_CHARS + 1): 1}, "max_key_chars"),
        ({"note": "x" * (MAX_STRING_CHARS + 1)}, "max_string_chars"),
        ({"a": ["x" * MAX_STRING_CHARS] * 9}, "max_bytes"),
        ({"a": [1.5, float("nan")]}, "JSON cannot"),
        ({"a": {"b": float("inf")}}, "JSON cannot"),
    ],
)
async def test_metadata_beyond_each_limit_is_refused_naming_it(
    api: httpx.AsyncClient, platform: str, metadata: dict[str, Any], limit: str
) -> None:
    # Python's json writes NaN and Infinity as such (httpx's json= would refuse them).
    body = json.dumps({"devices": [{"device_id": "d-1", "metadata": metadata}]})
    refused = await api.post(
        f"/platforms/{platform}/devices",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert refused.status_code == 422
    assert limit in refused.text
    within = await api.post(
        f"/platforms/{platform}/devices",
        json={
            "devices": [
                {"device_id": "d-1", "metadata": {f"k{n}": "x" * 50 for n in range(MAX_KEYS)}}
            ]
        },
    )
    assert within.status_code == 200


async def test_merged_metadata_keeps_the_limits_and_a_refused_merge_changes_nothing(
    api: httpx.AsyncClient, platform: str
) -> None:
    devices = f"/platforms/{platform}/devices"
    half = MAX_KEYS // 2 + 1

    def keys(prefix: str) -> dict[str, int]:
        return {f"{prefix}{n}": n for n in range(half)}

    assert (
        await api.post(devices, json={"devices": [{"device_id": "d-1", "metadata": keys("a")}]})
    ).status_code == 200
    # Each document is within the limits; merged, they are not.
    patched = await api.patch(f"{devices}/d-1", json={"metadata": keys("b")})
    assert patched.status_code == 422, patched.text
    assert "max_keys" in patched.json()["detail"]
    again = await api.post(devices, json={"devices": [{"device_id": "d-1", "metadata": keys("c")}]})
    assert again.status_code == 422, again.text
    assert (await api.get(f"{devices}/d-1")).json()["metadata"] == keys("a")
    # Replacing keys merges to the same size: accepted.
    assert (await api.patch(f"{devices}/d-1", json={"metadata": keys("a")})).status_code == 200


async def _migrated_up_to(settings: StoreSettings, last: int) -> None:
    await migrations.migrate(settings, through=last)


@pytest.fixture
async def old_store(database_url: str, unique: str) -> AsyncIterator[StoreSettings]:
    """A schema migrated to the version before the limits (0022), dropped afterwards."""
    settings = StoreSettings(database_url=database_url, database_schema=f"t_{unique}")
    await _migrated_up_to(settings, 22)
    yield settings
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.database_schema))
        )


async def test_documents_stored_deeper_before_the_limits_read_after_migration_0023(
    old_store: StoreSettings,
) -> None:
    # What the API accepted before the limits: a device's metadata 300 levels deep made its
    # GET and its platform's list answer 500, for every key.
    deep = nested(300)
    async with await connect(old_store, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO platforms (id, name, metadata) VALUES ('p', 'P', %s)", (Jsonb(deep),)
        )
        await conn.execute(
            "INSERT INTO devices (platform_id, device_id, metadata) VALUES ('p', 'd', %s)",
            (Jsonb({"keep": 1, "deep": deep}),),
        )
        await conn.execute(
            "INSERT INTO audit_log (action, subject, detail) VALUES ('device.update', 'd', %s)",
            (Jsonb({"metadata": deep}),),
        )
    await migrations.migrate(old_store)
    settings = ApiSettings(
        database_url=old_store.database_url, database_schema=old_store.database_schema
    )
    app = create_app(settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        async with await connect(old_store, autocommit=True) as conn:
            _, key = await create_key(
                conn, role=Role.ADMIN, platform=None, name="t", created_by=None
            )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://iiot",
            headers={"Authorization": f"Bearer {key}"},
        )
        async with client:
            device = await client.get("/platforms/p/devices/d")
            assert device.status_code == 200, device.text
            metadata = device.json()["metadata"]
            assert metadata["keep"] == 1
            assert depth(metadata) == MAX_DEPTH
            # Nothing lost: the part beyond the limit is kept as its JSON text.
            cut: Any = metadata["deep"]
            original: Any = deep
            while not isinstance(cut, str):
                cut = cut["k"] if isinstance(cut, dict) else cut[0]
                original = original["k"] if isinstance(original, dict) else original[0]
            assert json.loads(cut) == original
            for url in ("/platforms/p/devices", "/platforms/p", "/platforms", "/audit"):
                answer = await client.get(url)
                assert answer.status_code == 200, (url, answer.text[:300])


# --- times -----------------------------------------------------------------------------------


async def test_time_parameters_take_their_whole_range_or_answer_422(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    writer = TelemetryWriter(pool, stats=IngestStats())
    await writer.write([telemetry(platform, "press", (now, "temp", 1.0))])
    device = f"/platforms/{platform}/devices/press"
    first, last = "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"
    raw = await api.get(
        f"{device}/telemetry", params={"metric": "temp", "start": first, "end": last}
    )
    assert raw.status_code == 200, raw.text
    assert [p["value"] for p in raw.json()["points"]] == [1.0]
    defaulted = await api.get(f"{device}/telemetry", params={"metric": "temp", "start": first})
    assert defaulted.status_code == 200, defaulted.text
    paged = await api.get(
        f"{device}/telemetry",
        params={"metric": "temp", "start": first, "end": last, "after": first},
    )
    assert paged.status_code == 200, paged.text
    early = {"start": first, "end": "0001-02-01T00:00:00Z"}
    bucketed = await api.get(
        f"{device}/telemetry", params={**early, "metric": "temp", "bucket_seconds": 86400}
    )
    assert bucketed.status_code == 200, bucketed.text
    assert (await api.get(f"{device}/telemetry.csv", params=early)).status_code == 200
    late = {"start": "9999-12-01T00:00:00Z", "end": last}
    assert (await api.get(f"{device}/telemetry.csv", params=late)).status_code == 200
    history = await api.get(f"/platforms/{platform}/devices/count/history", params=early)
    assert history.status_code == 200, history.text
    wide = await api.get(
        f"/platforms/{platform}/devices/count/history", params={"start": first, "end": last}
    )
    assert wide.status_code == 422  # too many buckets, said so

    # Times with no UTC form within years 1 to 9999: 422, for every time parameter.
    before = "0001-01-01T00:00:00+01:00"
    after = "9999-12-31T23:59:59-01:00"
    for url, params in [
        (f"{device}/telemetry", {"metric": "temp", "start": before}),
        (f"{device}/telemetry", {"metric": "temp", "start": first, "end": after}),
        (f"{device}/telemetry", {"metric": "temp", "start": first, "after": before}),
        (f"{device}/telemetry.csv", {"start": before}),
        (f"{device}/telemetry.csv", {"start": "9999-12-31T00:00:00Z", "end": after}),
        (f"/platforms/{platform}/devices/count/history", {"start": before}),
    ]:
        answer = await api.get(url, params=params)
        assert answer.status_code == 422, (url, params, answer.text)
    answer = await api.post("/keys", json={"role": "admin", "name": "k", "expires_at": after})
    assert answer.status_code == 422


# --- CSV -------------------------------------------------------------------------------------


def test_text_cells_that_a_spreadsheet_would_run_are_neutralised() -> None:
    for formula in ("=1+2", "+SUM(1,2)", "-2+3", "@SUM(A1)", "\t=1", "\r=1"):
        assert text_cell(formula) == "'" + formula
    for text in ("temp", "a=b", "x-1", " =1", ""):
        assert text_cell(text) == text
    # The usage export's cells: text neutralised, numbers (negative ones too) untouched.
    assert _cell("=cmd") == "'=cmd"
    assert _cell(-5) == -5
    assert _cell(-0.5) == -0.5
    assert _cell(None) == ""


async def test_metric_names_in_the_telemetry_export_are_not_formulas(
    api: httpx.AsyncClient, pool: AsyncConnectionPool, platform: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    names = ['=HYPERLINK("http://evil","x")', "+SUM(1,2)", "-1+1", "@SUM(A1)", "temp"]
    writer = TelemetryWriter(pool, stats=IngestStats())
    await writer.write([telemetry(platform, "press", *[(now, n, -2.5) for n in names])])
    export = await api.get(
        f"/platforms/{platform}/devices/press/telemetry.csv",
        params={"start": (now - timedelta(minutes=1)).isoformat()},
    )
    assert export.status_code == 200
    rows = list(csv.reader(io.StringIO(export.text)))[1:]
    cells = {metric: value for _, metric, value in rows}
    assert cells == {
        '\'=HYPERLINK("http://evil","x")': "-2.5",
        "'+SUM(1,2)": "-2.5",
        "'-1+1": "-2.5",
        "'@SUM(A1)": "-2.5",
        "temp": "-2.5",
    }


# --- HTTP limits over a real socket ----------------------------------------------------------


@pytest.fixture
def small_api(store: StoreSettings) -> Any:
    """The API under uvicorn with a 4 KiB body cap and 3 unknown keys per address."""
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        api_max_body_bytes=4096,
        api_unknown_key_burst=3,
        api_unknown_key_rate_per_second=0.01,
    )
    with served_api(settings) as base:
        yield base


def _raw_request(base: str, head: bytes, body: bytes = b"") -> bytes:
    """Sends `head` (and `body`) over a socket; returns what the server answers, read until it
    closes or has sent its headers and a short body."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=15) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


async def test_a_body_over_the_cap_is_refused_with_413_before_it_is_read(
    small_api: str, make_key: KeyMaker, platform: str
) -> None:
    key = await make_key(Role.ADMIN, None)
    # A declared 30 MB body, none of it sent: the answer comes at once (the old API waited
    # for the body it would read and parse).
    head = (
        b"POST /platforms/plant-1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 30000000\r\n\r\n"
    )
    answer = await asyncio.to_thread(_raw_request, small_api, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"application/problem+json" in answer

    # Chunked (no Content-Length): refused once the chunks pass the cap.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1000

    async with httpx.AsyncClient(
        base_url=small_api, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        streamed = await client.post(
            "/platforms/plant-1/devices",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert streamed.status_code == 413
        assert streamed.headers["content-type"] == "application/problem+json"
        within = await client.post(
            "/platforms/plant-1/devices", json={"devices": [{"device_id": "d-1"}]}
        )
        assert within.status_code == 200


async def test_unknown_keys_are_rate_limited_per_client_address(
    small_api: str, make_key: KeyMaker
) -> None:
    key = await make_key(Role.ADMIN, None)
    async with httpx.AsyncClient(base_url=small_api) as client:
        # A valid key, looked up and cached before the guessing starts, goes on working.
        good = {"Authorization": f"Bearer {key}"}
        assert (await client.get("/platforms", headers=good)).status_code == 200
        answers = []
        for n in range(5):
            guess = {"Authorization": f"Bearer iiot_{n:012x}_{'x' * 43}"}
            answers.append(await client.get("/platforms", headers=guess))
        assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]
        assert int(answers[3].headers["retry-after"]) >= 1
        assert answers[3].headers["content-type"] == "application/problem+json"
        # No key at all costs no lookup: still a plain 401.
        assert (await client.get("/platforms")).status_code == 401
        assert (await client.get("/platforms", headers=good)).status_code == 200


async def test_405_names_the_allowed_methods(api: httpx.AsyncClient) -> None:
    answer = await api.put("/healthz")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"
    assert answer.headers["content-type"] == "application/problem+json"
    answer = await api.delete("/quotas")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET"


# --- key expiry ------------------------------------------------------------------------------


async def test_a_key_can_expire_is_listed_with_its_expiry_and_refused_after(
    api: httpx.AsyncClient, api_as: Any, db: psycopg.AsyncConnection[Any]
) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    refused = await api.post("/keys", json={"role": "admin", "name": "k", "expires_at": past})
    assert refused.status_code == 422
    soon = datetime.now(UTC) + timedelta(seconds=3)
    created = await api.post(
        "/keys", json={"role": "admin", "name": "k", "expires_at": soon.isoformat()}
    )
    assert created.status_code == 201, created.text
    assert datetime.fromisoformat(created.json()["expires_at"]) == soon
    listed = (await api.get("/keys")).json()["items"]
    assert {k["name"]: k["expires_at"] for k in listed}["k"] is not None
    never = await api.post("/keys", json={"role": "admin", "name": "never"})
    assert never.json()["expires_at"] is None

    async with api_as(created.json()["key"]) as expiring:
        # Verified and cached (5 s) while valid; the cache keeps it no longer than its expiry.
        assert (await expiring.get("/platforms")).status_code == 200
        await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.2)
        late = await expiring.get("/platforms")
        assert late.status_code == 401
        assert "expired" in late.json()["detail"]

    # An expiry set in the store (another API process, an operator's SQL) applies too.
    other = await api.post("/keys", json={"role": "admin", "name": "other"})
    await db.execute("UPDATE api_keys SET expires_at = now() WHERE id = %s", (other.json()["id"],))
    async with api_as(other.json()["key"]) as expired:
        assert (await expired.get("/platforms")).status_code == 401
