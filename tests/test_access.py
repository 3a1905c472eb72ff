"""API keys, roles and tenant isolation, tried on every endpoint (docs/access.md)."""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from api.app import create_app
from api.settings import ApiSettings
from ingest.stats import IngestStats
from ingest.writer import TelemetryWriter
from registry.access import Role, import_key
from registry.errors import Conflict, Invalid
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import ApiAs, KeyMaker, api_in_process, scalar
from tests.test_enterprises import BYD
from tests.test_writer import telemetry

# One request per endpoint (method, path): path parameters name plant-1's objects; bodies are
# valid, so a refusal can only come from the access check.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/platforms"): {"id": "new-one", "name": "New"},
    ("PATCH", "/platforms/{platform}"): {"name": "Renamed"},
    ("POST", "/platforms/{platform}/devices"): {"devices": [{"device_id": "x-1"}]},
    ("POST", "/platforms/{platform}/devices/decommission"): {"device_ids": ["d-1"]},
    ("PATCH", "/platforms/{platform}/devices/{device}"): {"metadata": {"a": 1}},
    ("POST", "/keys"): {"role": "viewer", "platform": "plant-1", "name": "k"},
    ("PUT", "/quotas/{tier}"): {"hard_points_per_day": 1},
    ("POST", "/platforms/{platform}/enterprises"): {
        "enterprises": [{"code": BYD, "name": "x", "industry": "36", "above_size": True}]
    },
    ("POST", "/platforms/{platform}/enterprise-links"): {"devices": {"d-1": None}},
    ("PUT", "/platforms/{platform}/enterprise-rule"): {"metadata_key": "uscc"},
    ("PUT", "/classification/industry-mappings"): {"text": "cars", "industry": "36"},
    ("POST", "/broker/authenticate"): {"username": "plant-1/d-1", "password": "x"},
    ("POST", "/broker/authorize"): {
        "username": "plant-1/d-1",
        "topic": "iiot/v1/plant-1/d-1/telemetry",
        "action": "publish",
    },
}
DAY_AGO = (datetime.now(UTC) - timedelta(days=1)).isoformat()
QUERIES = {
    "/platforms/{platform}/devices/count/history": {"start": DAY_AGO},
    "/platforms/{platform}/devices/{device}/telemetry": {
        "metric": "v",
        "start": DAY_AGO,
    },
    "/platforms/{platform}/devices/{device}/telemetry.csv": {"start": DAY_AGO},
}
PUBLIC = {"/healthz", "/readyz"}
# What another platform's operator key gets where no path names a platform.
CROSS_PLATFORM = {
    ("POST", "/platforms"): 403,
    ("GET", "/platforms"): 200,  # its own platform only (asserted below)
    ("GET", "/counts/platforms"): 200,  # likewise
    ("GET", "/counts/by/{dimension}"): 403,
    ("GET", "/counts/national"): 403,
    ("GET", "/counts/reconciliations"): 403,
    ("GET", "/ingest/kafka/lag"): 403,
    ("GET", "/metrics"): 403,
    ("GET", "/keys"): 200,  # its platform's keys only
    ("POST", "/keys"): 404,  # a key for plant-1
    ("DELETE", "/keys/{key_id}"): 404,  # plant-1's key
    ("GET", "/audit"): 200,  # its platform's entries only
    ("GET", "/usage.csv"): 403,
    ("GET", "/quotas"): 200,  # the tiers' quotas are no platform's secret
    ("PUT", "/quotas/{tier}"): 403,
    ("POST", "/broker/authenticate"): 403,
    ("POST", "/broker/authorize"): 403,
    ("GET", "/penetration"): 403,
    ("GET", "/penetration/by/{grouping}"): 403,
    ("GET", "/penetration/totals"): 403,
    ("GET", "/penetration/indicators"): 200,  # its own platform's only
    ("GET", "/classification/industries"): 200,  # the standards' names, no platform's data
    ("GET", "/classification/regions"): 200,
    ("GET", "/classification/unmapped-industries"): 403,
    ("PUT", "/classification/industry-mappings"): 403,
}


def endpoints() -> list[tuple[str, str]]:
    """Every operation the app declares (its OpenAPI schema lists them all)."""
    app = create_app(ApiSettings(database_url="postgresql://unused"))  # never connected
    return sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    )


def url(path: str, key_id: int, platform: str = "plant-1") -> str:
    values = {
        "platform": platform,
        "device": "d-1",
        "gateway": "gw-1",
        "key_id": str(key_id),
        "dimension": "tier",
        "tier": "basic",
        "code": BYD,
        "grouping": "province",
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


async def call(
    client: httpx.AsyncClient, method: str, path: str, key_id: int, platform: str = "plant-1"
) -> httpx.Response:
    body = BODIES.get((method, path))
    return await client.request(
        method, url(path, key_id, platform), json=body, params=QUERIES.get(path)
    )


@pytest.fixture
async def two_platforms(db: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool) -> None:
    """plant-1 with a device that has data, and plant-2, each with nothing of the other's."""
    await upsert_platform(db, "plant-1", name="Plant One")
    await upsert_platform(db, "plant-2", name="Plant Two")
    writer = TelemetryWriter(pool, stats=IngestStats())
    now = datetime.now(UTC)
    await writer.write([telemetry("plant-1", "d-1", (now, "v", 42.5))])
    await writer.write([telemetry("plant-2", "e-1", (now, "v", 1.0))])
    # An enterprise plant-1 serves, named so that a leak of it shows.
    await db.execute(
        "INSERT INTO enterprises (platform_id, code, name, industry, above_size, region) "
        "VALUES ('plant-1', %s, 'Plant One Motors', '36', true, %s)",
        (BYD, BYD[2:8]),
    )
    await db.execute("UPDATE devices SET enterprise = %s WHERE device_id = 'd-1'", (BYD,))


async def plant_1_key_id(db: psycopg.AsyncConnection[Any]) -> int:
    return int(await scalar(db, "SELECT min(id) FROM api_keys WHERE platform_id = 'plant-1'"))


async def test_every_endpoint_but_health_needs_a_key(
    api_as: ApiAs, two_platforms: None, make_key: KeyMaker
) -> None:
    routes = endpoints()
    assert len(routes) > 25
    async with api_as("") as anonymous, api_as("iiot_000000000000_forged") as forged:
        for method, path in routes:
            for client in (anonymous, forged):
                response = await call(client, method, path, key_id=1)
                expected = 200 if path in PUBLIC else 401
                assert response.status_code == expected, (method, path, response.text)
                if expected == 401:
                    assert response.headers["content-type"] == "application/problem+json"


async def test_another_platforms_key_sees_and_touches_nothing_of_it(
    api_as: ApiAs, make_key: KeyMaker, two_platforms: None, db: psycopg.AsyncConnection[Any]
) -> None:
    await make_key(Role.VIEWER, "plant-1")
    foreign_key_id = await plant_1_key_id(db)
    before = await scalar(db, "SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM devices d")
    tried = set()
    for role in (Role.OPERATOR, Role.VIEWER):
        async with api_as(await make_key(role, "plant-2")) as other:
            for method, path in endpoints():
                if path in PUBLIC:
                    continue
                tried.add((method, path))
                response = await call(other, method, path, foreign_key_id)
                text = response.text
                if "{platform}" in path:
                    # The same answer as for a platform that does not exist: nothing leaks.
                    missing = await call(other, method, path, foreign_key_id, "no-such-plant")
                    assert response.status_code == missing.status_code == 404, (method, path)
                    assert text.replace("plant-1", "no-such-plant") == missing.text
                else:
                    expected = CROSS_PLATFORM[(method, path)]
                    if role is Role.VIEWER and method == "DELETE":
                        expected = 403  # a viewer may revoke no key at all
                    assert response.status_code == expected, (role, method, path, text)
                assert "Plant One" not in text, (method, path)
                assert "42.5" not in text, (method, path)
                if response.status_code == 200 and method == "GET":
                    assert "plant-1" not in text, (method, path, text)
    assert tried >= set(CROSS_PLATFORM)
    after = await scalar(db, "SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM devices d")
    assert after == before
    assert await scalar(db, "SELECT revoked_at IS NULL FROM api_keys WHERE id = %s", foreign_key_id)
    assert await scalar(db, "SELECT count(*) FROM credentials") == 0


async def test_a_viewer_reads_its_platform_and_changes_nothing(
    api_as: ApiAs, make_key: KeyMaker, two_platforms: None, db: psycopg.AsyncConnection[Any]
) -> None:
    async with api_as(await make_key(Role.VIEWER, "plant-1")) as viewer:
        for method, path in endpoints():
            if "{platform}" not in path:
                continue
            response = await call(viewer, method, path, key_id=1)
            if method in ("GET", "HEAD"):
                assert response.status_code in (200, 404), (method, path, response.text)
                if path.endswith("/latest"):
                    assert response.json()["values"][0]["value"] == 42.5
            else:
                assert response.status_code == 403, (method, path, response.text)
    changes = "SELECT count(*) FROM audit_log WHERE action <> 'api_key.create'"
    assert await scalar(db, changes) == 0


async def test_an_operator_changes_its_platform_but_not_its_classification(
    api_as: ApiAs, make_key: KeyMaker, two_platforms: None
) -> None:
    async with api_as(await make_key(Role.OPERATOR, "plant-1")) as operator:
        renamed = await operator.patch("/platforms/plant-1", json={"liveness_seconds": 60})
        assert renamed.status_code == 200
        assert renamed.json()["liveness_seconds"] == 60
        tier = await operator.patch("/platforms/plant-1", json={"tier": "ecosystem"})
        assert tier.status_code == 403
        assert (await operator.get("/platforms/plant-1")).json()["tier"] == "basic"
        listed = (await operator.get("/platforms")).json()["items"]
        assert [p["id"] for p in listed] == ["plant-1"]
        counts = (await operator.get("/counts/platforms")).json()["items"]
        assert [c["platform"] for c in counts] == ["plant-1"]


async def test_keys_are_shown_once_stored_hashed_revocable_and_audited(
    api: httpx.AsyncClient,
    api_as: ApiAs,
    two_platforms: None,
    db: psycopg.AsyncConnection[Any],
) -> None:
    created = await api.post(
        "/keys", json={"role": "operator", "platform": "plant-1", "name": "line 3"}
    )
    assert created.status_code == 201
    body = created.json()
    key = body["key"]
    assert key.startswith(f"iiot_{body['prefix']}_")
    # Only a digest is stored: the key appears nowhere in the table.
    stored = await scalar(
        db, "SELECT row_to_json(k)::text FROM api_keys k WHERE id = %s", body["id"]
    )
    assert key not in stored
    assert key.split("_", 2)[2] not in stored
    listed = (await api.get("/keys")).json()["items"]
    assert body["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)

    async with api_as(key) as operator:
        registered = await operator.post(
            "/platforms/plant-1/devices", json={"devices": [{"device_id": "new-1"}]}
        )
        assert registered.status_code == 200
        # An operator makes viewer keys for its platform, never admin keys.
        assert (
            await operator.post("/keys", json={"role": "admin", "name": "x"})
        ).status_code == 403
        viewer = await operator.post(
            "/keys", json={"role": "viewer", "platform": "plant-1", "name": "screen"}
        )
        assert viewer.status_code == 201

        revoked = await api.delete(f"/keys/{body['id']}")
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"] is not None
        refused = await operator.get("/platforms/plant-1")
        assert refused.status_code == 401

    audit = (await api.get("/audit", params={"platform": "plant-1"})).json()["items"]
    assert [(e["action"], e["subject"]) for e in audit] == [
        ("api_key.create", body["prefix"]),
        ("device.register", "new-1"),
        ("api_key.create", viewer.json()["prefix"]),
        ("api_key.revoke", body["prefix"]),
    ]
    assert audit[1]["key_id"] == body["id"]
    assert audit[1]["detail"] == {"ids": ["new-1"]}


async def test_a_revocation_through_another_api_process_applies_within_the_cache_time(
    store: StoreSettings, make_key: KeyMaker, two_platforms: None, api: httpx.AsyncClient
) -> None:
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        api_key_cache_seconds=0,
    )
    async with api_in_process(settings, await make_key(Role.VIEWER, "plant-1")) as client:
        assert (await client.get("/platforms/plant-1")).status_code == 200
        key_id = (await api.get("/keys")).json()["items"][-1]["id"]
        assert (await api.delete(f"/keys/{key_id}")).status_code == 200
        assert (await client.get("/platforms/plant-1")).status_code == 401


async def test_each_key_is_rate_limited_with_retry_after(
    store: StoreSettings, make_key: KeyMaker, two_platforms: None
) -> None:
    app = create_app(
        ApiSettings(
            database_url=store.database_url,
            database_schema=store.database_schema,
            api_rate_per_second=0.5,
            api_rate_burst=3,
        )
    )
    limited, other = await make_key(Role.VIEWER, "plant-1"), await make_key(Role.VIEWER, "plant-1")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)

        def client(key: str) -> httpx.AsyncClient:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.AsyncClient(transport=transport, base_url="http://iiot", headers=headers)

        async with client(limited) as first, client(other) as second:
            statuses = [(await first.get("/platforms/plant-1")).status_code for _ in range(5)]
            assert statuses == [200, 200, 200, 429, 429]
            refused = await first.get("/platforms/plant-1")
            assert refused.headers["content-type"] == "application/problem+json"
            assert 1 <= int(refused.headers["Retry-After"]) <= 2
            # Another key has its own bucket.
            assert (await second.get("/platforms/plant-1")).status_code == 200


async def test_a_pre_shared_key_is_imported_once_and_then_works(
    api_as: ApiAs, db: psycopg.AsyncConnection[Any], two_platforms: None
) -> None:
    key = "iiot_0123456789ab_" + "k" * 40
    assert await import_key(db, key, role=Role.BROKER, platform=None, name="emqx")
    assert not await import_key(db, key, role=Role.BROKER, platform=None, name="emqx")
    with pytest.raises(Conflict):
        await import_key(db, key[:-1] + "x", role=Role.BROKER, platform=None, name="other")
    with pytest.raises(Invalid):
        await import_key(db, "not-a-key", role=Role.BROKER, platform=None, name="bad")
    async with api_as(key) as broker:
        body = {"username": "plant-1/d-1", "password": "x"}
        assert (await broker.post("/broker/authenticate", json=body)).status_code == 200
