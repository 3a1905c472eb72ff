"""Fixtures on real services: each test gets its own schema and its own MQTT topic root."""

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette

from api.app import create_app
from api.settings import ApiSettings
from iiot.kafka_mock import MockKafkaCluster
from iiot.net import free_port
from iiot.server import ApiServer
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from registry.access import Role, create_key
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from tests import services

# A test that asks for none of these (directly or through another fixture) and starts no server
# of its own (those are marked `slow`) needs no services: `make test-fast` runs just those.
SERVICE_FIXTURES = frozenset({"database_url", "mqtt_url", "kafka"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if not needs and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def database_url(services_dir: Path) -> Iterator[str]:
    with services.postgres(services_dir) as url:
        yield url


@pytest.fixture(scope="session")
def mqtt_url(services_dir: Path) -> Iterator[str]:
    with services.mqtt_broker(services_dir) as url:
        yield url


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """A Kafka-protocol broker on loopback: librdkafka's mock cluster (no Kafka here)."""
    with MockKafkaCluster() as cluster:
        yield cluster.bootstrap


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def store(database_url: str, unique: str) -> AsyncIterator[StoreSettings]:
    """A freshly migrated schema of our own, dropped afterwards."""
    settings = StoreSettings(database_url=database_url, database_schema=f"t_{unique}")
    await migrate(settings)
    yield settings
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(settings.database_schema))
        )


@pytest.fixture
async def db(store: StoreSettings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the test's schema, for arranging and asserting."""
    conn = await connect(store, autocommit=True)
    async with conn:
        yield conn


@pytest.fixture
async def pool(store: StoreSettings) -> AsyncIterator[AsyncConnectionPool]:
    async with create_pool(store, name="test") as pool:
        yield pool


KeyMaker = Callable[[Role, str | None], Awaitable[str]]


@pytest.fixture
async def make_key(store: StoreSettings) -> KeyMaker:
    """Creates an API key in the test's schema: `await make_key(Role.VIEWER, "plant-1")`."""

    async def make(role: Role, platform: str | None) -> str:
        async with await connect(store, autocommit=True) as conn:
            _, key = await create_key(
                conn, role=role, platform=platform, name=f"test {role}", created_by=None
            )
        return key

    return make


ApiAs = Callable[[str], httpx.AsyncClient]


@pytest.fixture
async def api_as(store: StoreSettings) -> AsyncIterator[ApiAs]:
    """The API, in process, on the test's schema: `api_as(key)` is a client presenting `key`."""
    app = create_app(
        ApiSettings(
            database_url=store.database_url,
            database_schema=store.database_schema,
            api_rate_per_second=1e6,  # tests fire requests faster than any operator
            api_rate_burst=1_000_000,
            api_unknown_key_burst=1_000_000,  # and try more unknown keys than any client
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))

        def client(key: str) -> httpx.AsyncClient:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.AsyncClient(transport=transport, base_url="http://iiot", headers=headers)

        yield client


@asynccontextmanager
async def api_in_process(settings: ApiSettings, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An API of these settings, in process (its lifespan running): a client presenting `key`."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://iiot",
            headers={"X-API-Key": key},
        ) as client,
    ):
        yield client


@pytest.fixture
async def api(api_as: ApiAs, make_key: KeyMaker) -> AsyncIterator[httpx.AsyncClient]:
    """The API, in process, on the test's schema, called with an admin key."""
    async with api_as(await make_key(Role.ADMIN, None)) as client:
        yield client


@pytest.fixture
def ingest_settings(store: StoreSettings, mqtt_url: str, unique: str) -> IngestSettings:
    return ingest_settings_of(store, mqtt_url, unique, client_id=f"iiot-test-{unique}")


def ingest_settings_of(
    store: StoreSettings, mqtt_url: str, unique: str, *, client_id: str
) -> IngestSettings:
    """Ingest's settings for a test's store (its cell), under the test's own topic root."""
    return IngestSettings(
        database_url=store.database_url,
        database_schema=store.database_schema,
        cell=store.cell,
        mqtt_url=mqtt_url,
        mqtt_client_id=client_id,
        mqtt_topic_root=f"test/{unique}/iiot/v1",
        # The broker forgets a test's session soon after it; Sparkplug only where a test maps a
        # group of its own (its topics are not under the test's root).
        mqtt_session_expiry_seconds=600,
        sparkplug_groups="",
        batch_max_delay_seconds=0.05,
        shutdown_grace_seconds=5,
    )


@pytest.fixture
def kafka_settings(ingest_settings: IngestSettings, kafka: str, unique: str) -> IngestSettings:
    """Ingest's settings for a Kafka topic and consumer group of the test's own."""
    return ingest_settings.model_copy(
        update={
            "kafka_bootstrap": kafka,
            "kafka_topics": [f"telemetry-{unique}"],
            "kafka_group_id": f"iiot-{unique}",
            "kafka_client_id": f"iiot-test-{unique}",
        }
    )


@pytest.fixture
async def platform(db: psycopg.AsyncConnection[Any]) -> str:
    await upsert_platform(db, "plant-1", name="Plant 1")
    return "plant-1"


@asynccontextmanager
async def running(ingest: MqttIngest) -> AsyncIterator[MqttIngest]:
    """Runs ingest until the block ends, then stops it gracefully (drain, ack, disconnect)."""
    task = asyncio.create_task(ingest.run())
    try:
        async with asyncio.timeout(10):
            await ingest.subscribed.wait()
        yield ingest
    finally:
        ingest.stop()
        async with asyncio.timeout(30):
            await task


@asynccontextmanager
async def publisher(mqtt_url: str, protocol: str = "5") -> AsyncIterator[aiomqtt.Client]:
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    version = aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(host, int(port), protocol=version) as client:
        yield client


@contextmanager
def served_api(settings: ApiSettings) -> Iterator[str]:
    """The API under uvicorn in a thread of its own (for clients outside this process: a
    browser, schemathesis); yields its base URL."""
    with served(create_app(settings)) as url:
        yield url


@contextmanager
def served(app: Starlette) -> Iterator[str]:
    """An ASGI app under uvicorn in a thread of its own; yields its base URL."""
    port = free_port()
    server = ApiServer(app, host="127.0.0.1", port=port)
    thread = threading.Thread(target=asyncio.run, args=(server.run(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the API server stopped"
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        thread.join(10)


@asynccontextmanager
async def api_process(store: StoreSettings, log: Path, **settings: str) -> AsyncIterator[str]:
    """`iiot api` as a process of its own on the test's schema (what a client meets over a real
    socket: the response is sent when uvicorn sends it); yields its base URL. `settings`:
    `IIOT_*` variables, e.g. `api_key_cache_seconds="300"`; its log goes to `log`."""
    port = free_port()
    env = os.environ | {
        "IIOT_DATABASE_URL": str(store.database_url),
        "IIOT_DATABASE_SCHEMA": store.database_schema,
        "IIOT_API_PORT": str(port),
        "IIOT_API_RATE_PER_SECOND": "1000000",
        "IIOT_API_RATE_BURST": "1000000",
        # Revoked keys presented again and again from one address are the point of some tests.
        "IIOT_API_UNKNOWN_KEY_RATE_PER_SECOND": "1000000",
        "IIOT_API_UNKNOWN_KEY_BURST": "1000000",
    }
    env |= {f"IIOT_{name.upper()}": value for name, value in settings.items()}
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "iiot.cli", "api"], env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:

            async def ready() -> bool:
                assert process.poll() is None, f"the API process ended; see {log}"
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=30, interval=0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def payload(document: Any) -> bytes:
    return orjson.dumps(document)


async def eventually(
    check: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10,  # noqa: ASYNC109 - a deadline for polling, not for one call
    interval: float = 0.02,
) -> Any:
    """Polls `check` until it returns something truthy; fails loudly with the last value."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last:
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        pytest.fail(f"condition not met within {timeout}s; last value: {last!r}")


async def answers_ok(http: httpx.AsyncClient, path: str) -> bool:
    """Whether `path` answers 200 yet (False while nothing listens): for `eventually`."""
    try:
        return (await http.get(path)).status_code == 200
    except httpx.TransportError:
        return False


async def scalar(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> Any:
    cur = await conn.execute(query, params or None)
    row = await cur.fetchone()
    return None if row is None else row[0]
