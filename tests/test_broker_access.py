"""Device credentials and the broker's access hooks, as EMQX calls them (docs/access.md)."""

from typing import Any

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.settings import ApiSettings
from iiot.net import free_port
from registry.access import Role
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import ApiAs, KeyMaker, api_in_process, scalar, served


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
    # plant-1 auto-provisions: devices without a secret of their own stand (connect) by its
    # provisioning secret.
    await api.post("/platforms/plant-1/provisioning-credential")
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


async def test_a_revoked_secret_stays_revoked_until_a_new_one_is_issued(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=True)
    provisioning = (await api.post("/platforms/plant-1/provisioning-credential")).json()["secret"]
    await api.post("/platforms/plant-1/devices", json={"devices": [{"device_id": "d-1"}]})
    device = (await api.post("/platforms/plant-1/devices/d-1/credential")).json()["secret"]
    gateway = (await api.post("/platforms/plant-1/gateways/gw-1/credential")).json()["secret"]
    clients = [
        ("plant-1/d-1", device, "iiot/v1/plant-1/d-1/telemetry"),
        ("plant-1/gateways/gw-1", gateway, "iiot/v1/plant-1/gateways/gw-1/telemetry"),
    ]
    for username, secret, topic in clients:
        assert await connect(broker, username, secret) == "allow"
        assert await may(broker, username, topic, "publish") == "allow"

    assert (await api.delete("/platforms/plant-1/devices/d-1/credential")).status_code == 204
    assert (await api.delete("/platforms/plant-1/gateways/gw-1/credential")).status_code == 204
    for username, secret, topic in clients:
        # Neither its own secret nor the provisioning one, and nothing it asks is allowed.
        assert await connect(broker, username, secret) == "deny"
        assert await connect(broker, username, provisioning) == "deny", username
        assert await may(broker, username, topic, "publish") == "deny", username
    assert (await api.delete("/platforms/plant-1/devices/d-1/credential")).status_code == 404
    # Another device without a secret of its own still connects by the provisioning secret.
    assert await connect(broker, "plant-1/d-9", provisioning) == "allow"

    # A new secret, issued afresh (not a rotation), admits it again; nothing else does.
    issued = (await api.post("/platforms/plant-1/devices/d-1/credential")).json()
    assert issued["rotated_at"] is None
    assert await connect(broker, "plant-1/d-1", issued["secret"]) == "allow"
    assert await connect(broker, "plant-1/d-1", provisioning) == "deny"
    assert await may(broker, "plant-1/d-1", clients[0][2], "publish") == "allow"
    audit = (await api.get("/audit", params={"platform": "plant-1"})).json()["items"]
    assert [e["action"] for e in audit if e["subject"] == "device:d-1"] == [
        "credential.issue",
        "credential.revoke",
        "credential.issue",
    ]


async def test_the_authorize_hook_allows_only_clients_that_still_stand(
    api: httpx.AsyncClient, broker: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=True)
    await api.post("/platforms/plant-1/provisioning-credential")
    await api.post("/platforms/plant-1/devices", json={"devices": [{"device_id": "d-1"}]})
    await api.post("/platforms/plant-1/devices/d-1/credential")
    await api.post("/platforms/plant-1/gateways/gw-1/credential")

    def topic(username: str) -> str:
        return f"iiot/v1/{username}/telemetry"

    async def allowed(*usernames: str) -> list[str]:
        return [u for u in usernames if await may(broker, u, topic(u), "publish") == "allow"]

    # A platform that does not exist has no clients, whatever the user name says.
    assert await may(broker, "ghost/d-1", topic("ghost/d-1"), "publish") == "deny"
    assert await may(broker, "ghost/gateways/g", topic("ghost/gateways/g"), "publish") == "deny"
    # Registered with a secret, not yet registered (auto-provisioning admits them): all stand.
    everyone = ("plant-1/d-1", "plant-1/gateways/gw-1", "plant-1/new-1", "plant-1/gateways/gw-9")
    assert await allowed(*everyone) == list(everyone)

    # Decommissioned: denied from the answer on (the allow above was cached).
    assert (await api.delete("/platforms/plant-1/devices/d-1")).status_code == 204
    assert await allowed("plant-1/d-1") == []
    # Auto-provisioning off: clients without a secret of their own no longer stand.
    assert (await api.patch("/platforms/plant-1", json={"auto_provision": False})).is_success
    assert await allowed(*everyone) == ["plant-1/gateways/gw-1"]
    # ... and back on: they do again.
    assert (await api.patch("/platforms/plant-1", json={"auto_provision": True})).is_success
    assert await allowed(*everyone) == list(everyone[1:])


class FakeEmqx:
    """Just enough of EMQX's REST API (v5) to list clients by user name and kick them, recording
    what it was asked. `connected`: user name -> client ids."""

    def __init__(self, connected: dict[str, list[str]]) -> None:
        self.connected = connected
        self.kicked: list[str] = []
        self.credentials: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/api/v5/clients", self._list, methods=["GET"]),
                Route("/api/v5/clients/{clientid:path}", self._kick, methods=["DELETE"]),
            ]
        )

    async def _list(self, request: StarletteRequest) -> Response:
        self.credentials.add(request.headers["authorization"])
        ids = self.connected.get(request.query_params["username"], [])
        return JSONResponse({"data": [{"clientid": c} for c in ids], "meta": {"count": len(ids)}})

    async def _kick(self, request: StarletteRequest) -> Response:
        self.credentials.add(request.headers["authorization"])
        clientid = request.path_params["clientid"]
        if not any(clientid in ids for ids in self.connected.values()):
            return JSONResponse({"code": "CLIENTID_NOT_FOUND"}, status_code=404)
        self.kicked.append(clientid)
        for ids in self.connected.values():
            if clientid in ids:
                ids.remove(clientid)
        return Response(status_code=204)


async def test_clients_whose_access_ended_are_kicked_through_emqxs_api(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=True)
    devices = [{"device_id": d} for d in ("d-1", "d-2", "d-3")]
    # Connected by the provisioning secret, before their own secrets are issued.
    emqx = FakeEmqx({"plant-1/d-1": ["d-1 provisioned"], "plant-1/d-3": ["d-3"]})
    with served(emqx.app) as emqx_url:
        settings = ApiSettings(
            database_url=store.database_url,
            database_schema=store.database_schema,
            emqx_api_url=f"{emqx_url}/api/v5",
            emqx_api_key="iiot",
            emqx_api_secret="s3cret",
        )
        async with api_in_process(settings, await make_key(Role.ADMIN, None)) as api:
            await api.post("/platforms/plant-1/devices", json={"devices": devices})
            # Each answer comes after the kick: nothing to wait for.
            assert (await api.post("/platforms/plant-1/devices/d-1/credential")).is_success
            assert emqx.kicked == ["d-1 provisioned"]  # its own secret now, nothing else
            await api.post("/platforms/plant-1/gateways/gw-1/credential")
            emqx.connected |= {
                "plant-1/d-1": ["d-1 (a)", "d-1/b"],  # two sessions; ids that need quoting
                "plant-1/d-2": ["d-2"],
                "plant-1/gateways/gw-1": ["gw-1"],
            }
            emqx.kicked.clear()

            assert (await api.delete("/platforms/plant-1/devices/d-1/credential")).is_success
            assert emqx.kicked == ["d-1 (a)", "d-1/b"]
            assert (await api.delete("/platforms/plant-1/devices/d-2")).is_success
            assert emqx.kicked[2:] == ["d-2"]
            assert (await api.post("/platforms/plant-1/gateways/gw-1/credential")).is_success
            assert emqx.kicked[3:] == ["gw-1"]  # rotated: the old secret's session ends
            # The provisioning secret rotated, a change refused: no one is kicked.
            assert (await api.post("/platforms/plant-1/provisioning-credential")).is_success
            missing = await api.delete("/platforms/plant-1/devices/nope/credential")
            assert missing.status_code == 404
            assert emqx.kicked[4:] == []
            assert emqx.connected["plant-1/d-3"] == ["d-3"]
            assert emqx.credentials == {"Basic aWlvdDpzM2NyZXQ="}  # iiot:s3cret


async def test_a_broker_api_that_is_down_does_not_undo_the_change(
    store: StoreSettings,
    make_key: KeyMaker,
    broker: httpx.AsyncClient,
    db: psycopg.AsyncConnection[Any],
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=False)
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('plant-1', 'd-1')")
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        emqx_api_url=f"http://127.0.0.1:{free_port()}/api/v5",  # nothing listens
        emqx_api_key="iiot",
        emqx_api_secret="s3cret",
        emqx_api_timeout_seconds=2,
    )
    async with api_in_process(settings, await make_key(Role.ADMIN, None)) as api:
        issued = (await api.post("/platforms/plant-1/devices/d-1/credential")).json()
        assert await connect(broker, "plant-1/d-1", issued["secret"]) == "allow"
        assert (await api.delete("/platforms/plant-1/devices/d-1/credential")).status_code == 204
    assert await connect(broker, "plant-1/d-1", issued["secret"]) == "deny"


async def test_the_brokers_key_has_a_limit_of_its_own_sized_for_reconnect_storms(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any]
) -> None:
    await upsert_platform(db, "plant-1")
    # A person's limit that a storm would meet at once; the broker's left at its default.
    settings = ApiSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        api_rate_per_second=1,
        api_rate_burst=5,
    )
    storm = 500  # connects of a fleet coming back at once
    body = {"clientid": "c", "username": "plant-1/d-1", "password": "x"}
    async with api_in_process(settings, await make_key(Role.BROKER, None)) as broker:
        answers = [(await broker.post("/broker/authenticate", json=body)) for _ in range(storm)]
        assert {a.status_code for a in answers} == {200}
    async with api_in_process(settings, await make_key(Role.OPERATOR, "plant-1")) as operator:
        statuses = [(await operator.get("/platforms/plant-1")).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
