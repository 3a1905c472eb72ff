"""The API as a client meets it: `iiot api` processes over real sockets. A change answered 2xx
is committed, a revocation holds from its answer on, and one made through another API process
reaches this one by notification (docs/access.md)."""

from pathlib import Path
from typing import Any

import httpx
import psycopg

from registry.access import Role
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from tests.conftest import KeyMaker, api_process, eventually, scalar

TRIES = 100


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_key_works_once_created_and_is_refused_once_revoked(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    await upsert_platform(db, "plant-1")
    admin = as_key(await make_key(Role.ADMIN, None))
    body = {"role": "operator", "platform": "plant-1", "name": "short-lived"}
    accepted = refused = 0
    async with (
        api_process(store, tmp_path / "api.log") as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        for _ in range(TRIES):
            created = await client.post("/keys", json=body, headers=admin)
            assert created.status_code == 201, created.text
            key, key_id = created.json()["key"], created.json()["id"]
            used = await client.patch(
                "/platforms/plant-1", json={"name": "Plant 1"}, headers=as_key(key)
            )
            accepted += used.status_code == 200
            assert (await client.delete(f"/keys/{key_id}", headers=admin)).status_code == 200
            again = await client.patch(
                "/platforms/plant-1", json={"name": "Changed"}, headers=as_key(key)
            )
            refused += again.status_code == 401
    assert (accepted, refused) == (TRIES, TRIES)
    assert await scalar(db, "SELECT name FROM platforms WHERE id = 'plant-1'") == "Plant 1"


async def test_a_rotated_mqtt_secret_is_refused_once_the_rotation_is_answered(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    await upsert_platform(db, "plant-1", auto_provision=False)
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('plant-1', 'd-1')")
    admin = as_key(await make_key(Role.ADMIN, None))
    broker = as_key(await make_key(Role.BROKER, None))
    answers = []
    async with (
        api_process(store, tmp_path / "api.log") as base,
        httpx.AsyncClient(base_url=base) as client,
    ):

        async def authenticate(secret: str) -> str:
            body = {"clientid": "c-1", "username": "plant-1/d-1", "password": secret}
            answer = await client.post("/broker/authenticate", json=body, headers=broker)
            result: str = answer.json()["result"]
            return result

        issued = await client.post("/platforms/plant-1/devices/d-1/credential", headers=admin)
        old = issued.json()["secret"]
        for _ in range(TRIES // 2):
            rotated = await client.post("/platforms/plant-1/devices/d-1/credential", headers=admin)
            assert rotated.status_code == 200, rotated.text
            new = rotated.json()["secret"]
            answers.append((await authenticate(old), await authenticate(new)))
            old = new
    assert answers == [("deny", "allow")] * (TRIES // 2)


FAIL_AT_COMMIT = """
CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 'doomed' THEN RAISE EXCEPTION 'doomed platforms fail at commit'; END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT ON platforms
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_doomed();
"""


async def test_a_commit_that_fails_answers_a_5xx_problem_and_changes_nothing(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    # A deferred constraint is checked at commit: the handler has returned by then.
    await db.execute(FAIL_AT_COMMIT)
    admin = as_key(await make_key(Role.ADMIN, None))
    async with (
        api_process(store, tmp_path / "api.log") as base,
        httpx.AsyncClient(base_url=base, headers=admin) as client,
    ):
        failed = await client.post("/platforms", json={"id": "doomed", "name": "Doomed"})
        assert failed.status_code == 500, failed.text
        assert failed.headers["content-type"] == "application/problem+json"
        assert "doomed platforms fail at commit" in failed.json()["detail"]
        assert (await client.get("/platforms/doomed")).status_code == 404
        fine = await client.post("/platforms", json={"id": "fine", "name": "Fine"})
        assert fine.status_code == 201, fine.text
    assert await scalar(db, "SELECT count(*) FROM platforms") == 1


async def test_a_revocation_through_one_api_process_reaches_another_by_notification(
    store: StoreSettings, make_key: KeyMaker, db: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    """The other process trusts what it verified for 300 s: only the notification can end it
    sooner (docs/access.md: within moments, the cache lifetime at worst)."""
    await upsert_platform(db, "plant-1", auto_provision=False)
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('plant-1', 'd-1')")
    admin = as_key(await make_key(Role.ADMIN, None))
    broker = as_key(await make_key(Role.BROKER, None))
    async with (
        api_process(store, tmp_path / "a.log") as a,
        api_process(store, tmp_path / "b.log", api_key_cache_seconds="300") as b,
        httpx.AsyncClient(base_url=a) as first,
        httpx.AsyncClient(base_url=b) as second,
    ):
        secret = await first.post("/platforms/plant-1/devices/d-1/credential", headers=admin)
        assert secret.status_code == 200
        authz = {"username": "plant-1/d-1", "topic": "iiot/v1/plant-1/d-1/telemetry"}
        authz |= {"action": "publish"}

        async def publish_allowed() -> bool:
            answer = await second.post("/broker/authorize", json=authz, headers=broker)
            return bool(answer.json()["result"] == "allow")

        for _ in range(5):
            key = await first.post("/keys", json={"role": "viewer", "name": "v"}, headers=admin)
            viewer = as_key(key.json()["key"])
            assert (await second.get("/platforms", headers=viewer)).status_code == 200  # cached
            assert await publish_allowed()  # cached too
            revoked = await first.delete(f"/keys/{key.json()['id']}", headers=admin)
            assert revoked.status_code == 200

            async def refused(headers: dict[str, str] = viewer) -> bool:
                return (await second.get("/platforms", headers=headers)).status_code == 401

            await eventually(refused, timeout=30)

        # A client's standing too: its secret revoked through the first process, the second
        # stops allowing what it had cached.
        gone = await first.delete("/platforms/plant-1/devices/d-1/credential", headers=admin)
        assert gone.status_code == 204

        async def denied() -> bool:
            return not await publish_allowed()

        await eventually(denied, timeout=30)
