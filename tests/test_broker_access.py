"""Device credentials and the broker's access hooks, as EMQX calls them (docs/access.md)."""

from typing import Any

import httpx
import psycopg
import pytest

from registry.access import Role
from registry.platforms import upsert_platform
from tests.conftest import ApiAs, KeyMaker, scalar


@pytest.fixture
async def broker(api_as: ApiAs, make_key: KeyMaker) -> httpx.AsyncClient:
    return api_as(await make_key(Role.BROKER, None))


async def connect(broker: httpx.AsyncClient, username: str, password: str) -> str:
    response = await broker.post(
        "/broker/authenticate",
        json={"clientid": "c-1", "username": username, "password": password},
    )
    assert response.status_code == 200, response.text
    assert response.json()["is_superuser"] is False
    result: str = response.json()["result"]
    return result


async def may(broker: httpx.AsyncClient, username: str, topic: str, action: str) -> str:
    response = await broker.post(
        "/broker/authorize",
        json={"clientid": "c-1", "username": username, "topic": topic, "action": action},
    )
    assert response.status_code == 200, response.text
    result: str = response.json()["result"]
    return result


async def test_devices_connect_with_their_own_secret_and_a_rotation_ends_the_old_one(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=False)
    await api.post("/platforms/plant-1/devices", json={"devices": [{"device_id": "d-1"}]})
    issued = await api.post("/platforms/plant-1/devices/d-1/credential")
    assert issued.status_code == 200
    first = issued.json()
    assert (first["username"], first["rotated_at"]) == ("plant-1/d-1", None)
    stored = await scalar(db, "SELECT row_to_json(c)::text FROM credentials c")
    assert first["secret"] not in stored

    assert await connect(broker, "plant-1/d-1", first["secret"]) == "allow"
    assert await connect(broker, "plant-1/d-1", first["secret"] + "x") == "deny"
    assert await connect(broker, "plant-1/d-2", first["secret"]) == "deny"  # not its secret
    assert await connect(broker, "plant-2/d-1", first["secret"]) == "deny"  # no such platform

    rotated = (await api.post("/platforms/plant-1/devices/d-1/credential")).json()
    assert rotated["rotated_at"] is not None
    assert await connect(broker, "plant-1/d-1", first["secret"]) == "deny"
    assert await connect(broker, "plant-1/d-1", rotated["secret"]) == "allow"

    # Decommissioned: refused whatever it presents; revoked: refused.
    assert (await api.delete("/platforms/plant-1/devices/d-1")).status_code == 204
    assert await connect(broker, "plant-1/d-1", rotated["secret"]) == "deny"
    assert (await api.delete("/platforms/plant-1/devices/d-1/credential")).status_code == 204
    assert (await api.post("/platforms/plant-1/devices/nope/credential")).status_code == 404

    audit = (await api.get("/audit", params={"platform": "plant-1"})).json()["items"]
    assert [e["action"] for e in audit if e["action"].startswith("credential")] == [
        "credential.issue",
        "credential.rotate",
        "credential.revoke",
    ]


async def test_unknown_devices_are_admitted_only_by_the_provisioning_policy(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=True)
    assert await connect(broker, "plant-1/new-7", "anything") == "deny"  # no provisioning secret
    provisioning = (await api.post("/platforms/plant-1/provisioning-credential")).json()["secret"]
    assert await connect(broker, "plant-1/new-7", provisioning) == "allow"
    assert await connect(broker, "plant-1/gateways/gw-9", provisioning) == "allow"
    assert await connect(broker, "plant-1/new-7", provisioning[:-1]) == "deny"

    # A device with its own credential must use it, not the provisioning one.
    await api.post("/platforms/plant-1/devices", json={"devices": [{"device_id": "own-1"}]})
    own = (await api.post("/platforms/plant-1/devices/own-1/credential")).json()["secret"]
    assert await connect(broker, "plant-1/own-1", provisioning) == "deny"
    assert await connect(broker, "plant-1/own-1", own) == "allow"

    # Auto-provisioning off: the provisioning secret admits nobody.
    await api.patch("/platforms/plant-1", json={"auto_provision": False})
    assert await connect(broker, "plant-1/new-7", provisioning) == "deny"
    assert await connect(broker, "plant-1/own-1", own) == "allow"

    for username in (
        "",
        "plant-1",
        "plant-1/+",
        "plant-1/#",
        "../x/d",
        "plant-1/gateways",
        "a/b/c",
    ):
        assert await connect(broker, username, provisioning) == "deny", username


async def test_a_device_publishes_to_its_own_topics_a_gateway_to_its_devices(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1")
    await upsert_platform(db, "plant-2")
    await api.post("/platforms/plant-1/gateways/gw-1/credential")
    # d-2 sits behind gw-1 (registered by a gateway message), d-3 does not.
    await db.execute(
        "INSERT INTO devices (platform_id, device_id, via_gateway) "
        "SELECT 'plant-1', 'd-2', id FROM gateways WHERE gateway_id = 'gw-1'"
    )
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('plant-1', 'd-3')")

    device, gateway = "plant-1/d-1", "plant-1/gateways/gw-1"
    cases = [
        (device, "iiot/v1/plant-1/d-1/telemetry", "publish", "allow"),
        (device, "iiot/v1/plant-1/d-1/status", "publish", "allow"),
        (device, "iiot/v1/plant-1/d-2/telemetry", "publish", "deny"),
        (device, "iiot/v1/plant-2/d-1/telemetry", "publish", "deny"),
        (device, "iiot/v1/plant-1/d-1/other", "publish", "deny"),
        (device, "iiot/v1/plant-1/+/telemetry", "publish", "deny"),
        (device, "iiot/v1/plant-1/d-1/telemetry", "subscribe", "deny"),
        (device, "iiot/v1/#", "subscribe", "deny"),
        (device, "iiot/v1/plant-1/gateways/d-1/telemetry", "publish", "deny"),
        (gateway, "iiot/v1/plant-1/gateways/gw-1/telemetry", "publish", "allow"),
        (gateway, "iiot/v1/plant-1/gateways/gw-1/status", "publish", "allow"),
        (gateway, "iiot/v1/plant-1/gateways/gw-2/telemetry", "publish", "deny"),
        (gateway, "iiot/v1/plant-1/d-2/telemetry", "publish", "allow"),
        (gateway, "iiot/v1/plant-1/d-3/telemetry", "publish", "deny"),
        (gateway, "iiot/v1/plant-2/gateways/gw-1/telemetry", "publish", "deny"),
        (gateway, "spBv1.0/plant-1/NBIRTH/gw-1", "publish", "allow"),
        (gateway, "spBv1.0/plant-1/DDATA/gw-1/anything", "publish", "allow"),
        (gateway, "spBv1.0/plant-1/NDATA/gw-2", "publish", "deny"),
        (gateway, "spBv1.0/plant-2/NDATA/gw-1", "publish", "deny"),
        (gateway, "spBv1.0/plant-1/NCMD/gw-1", "publish", "deny"),
        (gateway, "spBv1.0/plant-1/NCMD/gw-1", "subscribe", "allow"),
        (gateway, "spBv1.0/plant-1/DCMD/gw-1/+", "subscribe", "allow"),
        (gateway, "spBv1.0/plant-1/NCMD/+", "subscribe", "deny"),
        (gateway, "spBv1.0/STATE/+", "subscribe", "allow"),
        (gateway, "spBv1.0/STATE/iiot", "publish", "deny"),
        (gateway, "spBv1.0/#", "subscribe", "deny"),
        (device, "spBv1.0/plant-1/NBIRTH/d-1", "publish", "deny"),
        ("nobody", "iiot/v1/plant-1/d-1/telemetry", "publish", "deny"),
    ]
    got = [(u, t, a, await may(broker, u, t, a)) for u, t, a, _ in cases]
    assert got == cases


async def test_iiot_ingest_connects_as_the_service_user_with_a_broker_key(
    broker: httpx.AsyncClient, make_key: KeyMaker, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1")
    broker_key = await make_key(Role.BROKER, None)
    viewer_key = await make_key(Role.VIEWER, "plant-1")

    async def answer(username: str, password: str) -> tuple[str, bool]:
        body = {"clientid": "iiot-ingest-0", "username": username, "password": password}
        got = (await broker.post("/broker/authenticate", json=body)).json()
        return got["result"], got["is_superuser"]

    assert await answer("iiot-service", broker_key) == ("allow", True)
    assert await answer("iiot-service", viewer_key) == ("deny", False)
    assert await answer("iiot-service", "iiot_0123456789ab_" + "x" * 40) == ("deny", False)


async def test_the_hooks_answer_only_the_brokers_key(
    api_as: ApiAs, make_key: KeyMaker, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1")
    body = {"username": "plant-1/d-1", "password": "x"}
    async with api_as(await make_key(Role.OPERATOR, "plant-1")) as operator:
        assert (await operator.post("/broker/authenticate", json=body)).status_code == 403
    async with api_as(await make_key(Role.BROKER, None)) as broker:
        assert (await broker.post("/broker/authenticate", json=body)).status_code == 200
        # ... and a broker key opens nothing else.
        assert (await broker.get("/platforms")).status_code == 403
        assert (await broker.get("/platforms/plant-1/devices")).status_code == 403
    async with api_as("") as anonymous:
        assert (await anonymous.post("/broker/authenticate", json=body)).status_code == 401
