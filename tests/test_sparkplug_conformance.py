"""Sparkplug B 3.0 host behaviour an independent edge node relies on (issue 22), with payloads
encoded by pysparkplug (tests/sparkplug_reference.py), over the real Mosquitto and PostgreSQL."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import httpx
import orjson
import psycopg
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg_pool import AsyncConnectionPool

from iiot.net import free_port
from iiot.services import ingest_services, run_until
from ingest.errors import Rejected
from ingest.metrics import IngestCollector
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import EdgeNodeSessions, decode_payload, parse_topic
from ingest.sparkplug_host import sparkplug_filters
from ingest.topics import TopicScheme
from registry.counts import platform_counts
from registry.notifications import announce
from registry.registration import decommission_devices
from tests.conftest import answers_ok, eventually, publisher, running, scalar
from tests.sparkplug_reference import reference

DAY_MS = 86_400_000


@pytest.fixture
def settings(ingest_settings: IngestSettings, platform: str, unique: str) -> IngestSettings:
    return ingest_settings.model_copy(
        update={
            "sparkplug_groups": f"sp-{unique}={platform}",
            "sparkplug_host_id": f"iiot-{unique}",
        }
    )


@pytest.fixture
def group(unique: str) -> str:
    return f"sp-{unique}"


def host(settings: IngestSettings, pool: AsyncConnectionPool) -> MqttIngest:
    return MqttIngest(settings, pool, sparkplug_host=True)


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


class ReferenceNode:
    """Edge node `e1` of a group, publishing pysparkplug's payloads with its own seq."""

    def __init__(self, client: aiomqtt.Client, group: str) -> None:
        self.client, self.group = client, group
        self.seq = 0
        self.clock_offset_ms = 0  # how far the edge clock is off
        # Each message a millisecond of its own: a point is (device, metric, time).
        self.clock = 0

    async def send(self, kind: str, name: str, device: str | None = None) -> None:
        seq: int | None = None
        if kind == "NBIRTH":
            self.seq, seq = 1, 0
        elif kind != "NDEATH":
            seq, self.seq = self.seq, (self.seq + 1) % 256
        self.clock = max(self.clock + 1, now_ms())
        raw = reference(name, at_ms=self.clock + self.clock_offset_ms, seq=seq)
        topic = f"spBv1.0/{self.group}/{kind}/e1" + (f"/{device}" if device else "")
        await self.client.publish(topic, raw, qos=1)

    async def born(self, *devices: str) -> None:
        """NBIRTH (bdSeq 0), then a DBIRTH per device."""
        await self.send("NBIRTH", "nbirth_bdseq_0")
        for device in devices:
            await self.send("DBIRTH", "dbirth", device=device)


async def connected(db: psycopg.AsyncConnection[Any], platform: str) -> int:
    counts = await platform_counts(db, platform)
    assert counts is not None
    return counts.connected


async def states(db: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    cur = await db.execute(
        "SELECT device_id, state FROM devices UNION ALL"
        " SELECT 'gateway ' || gateway_id, state FROM gateways ORDER BY 1"
    )
    return dict(await cur.fetchall())


async def reasons(db: psycopg.AsyncConnection[Any]) -> list[str]:
    cur = await db.execute("SELECT reason FROM dead_letters ORDER BY id")
    return [r for (r,) in await cur.fetchall()]


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# Fault 1: a BIRTH with a tag unchanged for days is accepted; a malformed one opens nothing.


async def test_a_birth_with_an_old_tag_is_accepted_and_a_malformed_one_opens_no_session(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    async with (
        publisher(mqtt_url) as watcher,
        running(host(settings, pool)),
        publisher(mqtt_url) as client,
    ):
        await watcher.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
        node = ReferenceNode(client, group)
        await node.send("NBIRTH", "nbirth_bdseq_0")
        # Speed's own time is eight days old (its last change): the BIRTH stands, and the value
        # is stored at the BIRTH's time.
        before = datetime.now(UTC)
        await node.send("DBIRTH", "dbirth_stale_tag", device="press")
        await node.send("DDATA", "ddata", device="press")
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM sparkplug_births"))
        await eventually(lambda: scalar(db, "SELECT count(*) = 5 FROM telemetry"))
        speed = await (
            await db.execute(
                "SELECT t.time, t.value FROM telemetry t JOIN metrics m ON m.id = t.metric_id"
                " WHERE m.name = 'Speed' ORDER BY t.value"
            )
        ).fetchall()
        assert [v for _, v in speed] == [100.0, 101.0]
        assert speed[0][0] >= before - timedelta(seconds=1)
        assert (await states(db))["e1:press"] == "online"

        # A BIRTH with a real fault is refused, opens no session, and asks for a Rebirth.
        await node.send("DBIRTH", "dbirth_malformed", device="bad")
        await node.send("DDATA", "ddata", device="bad")
        await eventually(lambda: _is(reasons(db), ["invalid_metric_name", "no_birth"]))
        async with asyncio.timeout(5):
            ncmd = await anext(aiter(watcher.messages))
        assert ncmd.topic.value == f"spBv1.0/{group}/NCMD/e1"
        assert "e1:bad" not in await states(db)
    assert await scalar(db, "SELECT count(*) FROM sparkplug_births WHERE device = 'bad'") == 0


def test_a_node_that_always_sends_a_bad_birth_is_not_asked_forever() -> None:
    sessions = EdgeNodeSessions(
        window_past=timedelta(days=7),
        window_future=timedelta(minutes=10),
        rebirth_interval=10.0,
        max_bad_births=3,
    )
    received = datetime.now(UTC)
    at = now_ms()

    def handle(kind: str, name: str, device: str | None, seq: int, now: float) -> None:
        topic = parse_topic(f"spBv1.0/g/{kind}/e1" + (f"/{device}" if device else ""))
        payload = decode_payload(
            reference(name, at_ms=at, seq=seq), max_bytes=65536, max_metrics=100
        )
        sessions.handle(topic, payload, received, now=now)

    asked = []
    for attempt in range(10):  # each Rebirth answered with the same bad DBIRTH
        now = attempt * 11.0  # past the interval every time
        handle("NBIRTH", "nbirth_bdseq_0", None, 0, now)
        with pytest.raises(Rejected):
            handle("DBIRTH", "dbirth_malformed", "bad", 1, now)
        asked.append(sessions.take_rebirths())
    assert asked == [[("g", "e1")]] * 3 + [[]] * 7
    # A new connection (another bdSeq) may be asked again.
    handle("NBIRTH", "nbirth_bdseq_1", None, 0, 200.0)
    with pytest.raises(Rejected):
        handle("DBIRTH", "dbirth_malformed", "bad", 1, 200.0)
    assert sessions.take_rebirths() == [("g", "e1")]


# Fault 2: sessions are ordered by arrival, not by the edge clock.


async def test_a_node_whose_clock_was_corrected_comes_back_after_a_host_restart(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    async with publisher(mqtt_url) as client:
        node = ReferenceNode(client, group)
        node.clock_offset_ms = 300_000  # five minutes fast
        async with running(host(settings, pool)):
            await node.born("press")
            await eventually(lambda: _is(connected(db, platform), 2))
            await node.send("NDEATH", "ndeath_bdseq_0")
            await eventually(lambda: _is(connected(db, platform), 0))
        node.clock_offset_ms = 0  # corrected while iiot restarted
        async with running(host(settings, pool)):
            await node.send("NBIRTH", "nbirth_bdseq_1")
            await node.send("DBIRTH", "dbirth", device="press")
            await node.send("DDATA", "ddata", device="press")
            await eventually(
                lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 101")
            )
            await eventually(lambda: _is(connected(db, platform), 2))
    assert await states(db) == {"e1": "online", "e1:press": "online", "gateway e1": "online"}
    assert await reasons(db) == []


# Fault 3: the host answers an `online: false` on its own STATE topic.


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "paho-public"])
async def test_the_host_publishes_online_again_when_its_state_says_offline(
    settings: IngestSettings, pool: AsyncConnectionPool, mqtt_url: str, speedups: bool
) -> None:
    settings = settings.model_copy(update={"mqtt_paho_speedups": speedups})
    state = f"spBv1.0/STATE/{settings.sparkplug_host_id}"
    async with publisher(mqtt_url) as watcher, publisher(mqtt_url) as other:
        await watcher.subscribe(state, qos=1)
        messages = aiter(watcher.messages)
        async with running(host(settings, pool)) as ingest:
            assert ingest.speedups is speedups
            async with asyncio.timeout(5):
                first = orjson.loads((await anext(messages)).payload)
            assert first["online"] is True
            # Another client (or a stale Will) says this host is offline.
            offline = reference("state_offline", at_ms=now_ms() - 60_000)
            await other.publish(state, offline, qos=1, retain=True)
            async with asyncio.timeout(5):
                assert orjson.loads((await anext(messages)).payload)["online"] is False
                again = orjson.loads((await anext(messages)).payload)
            # Online again, with the timestamp of its current Will (its first STATE's).
            assert again == {"online": True, "timestamp": first["timestamp"]}
            # Its STATE is no message of the stream: nothing waits for an acknowledgement.
            assert ingest.progress.oldest_waiting() == {}


# Fault 4: after an NDEATH, a device returns only with its own DBIRTH.


async def test_devices_return_only_with_their_own_dbirth(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    async with running(host(settings, pool)), publisher(mqtt_url) as client:
        node = ReferenceNode(client, group)
        await node.born("press-1", "press-2")
        await eventually(lambda: _is(connected(db, platform), 3))
        await node.send("NDEATH", "ndeath_bdseq_0")
        await eventually(lambda: _is(connected(db, platform), 0))
        # The node returns; only press-1 is born again.
        await node.send("NBIRTH", "nbirth_bdseq_1")
        await node.send("DBIRTH", "dbirth", device="press-1")
        await eventually(lambda: _is(connected(db, platform), 2))
        await node.send("DDEATH", "ddeath", device="press-2")  # never born in this session
        await eventually(lambda: _is(reasons(db), ["no_birth"]))
        assert await connected(db, platform) == 2
    found = await states(db)
    assert (found["e1:press-1"], found["e1:press-2"]) == ("online", "offline")


# Fault 5: is_transient metrics are not stored; what is not stored is counted by type.


async def test_transient_metrics_are_not_stored_and_skipped_values_are_counted_by_type(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    async with running(host(settings, pool)) as ingest, publisher(mqtt_url) as client:
        node = ReferenceNode(client, group)
        await node.born("press")
        await node.send("DDATA", "ddata", device="press")
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 101"))
    rows = await (
        await db.execute(
            "SELECT m.name, t.value FROM telemetry t JOIN metrics m ON m.id = t.metric_id"
            " JOIN devices d ON d.id = t.device_id WHERE d.device_id = 'e1:press' ORDER BY 1, 2"
        )
    ).fetchall()
    # Offset is an Int8: its DDATA value comes without a datatype, read by the BIRTH's.
    assert rows == [("Offset", -7.0), ("Offset", -5.0), ("Speed", 100.0), ("Speed", 101.0)]
    assert ingest.sparkplug is not None
    assert dict(ingest.sparkplug.sessions.stats.not_stored) == {
        "transient": 2,
        "String": 2,
        "Bytes": 2,
        "DataSet": 2,
        "Template": 2,
    }
    exported = {
        (sample.labels["type"], sample.value)
        for family in IngestCollector([("sparkplug", ingest)]).collect()
        if family.name == "iiot_sparkplug_values_not_stored"
        for sample in family.samples
    }
    assert ("transient", 2) in exported
    assert ("DataSet", 2) in exported


# Fault 6: the host has a clean session of its own.


async def test_the_host_has_a_clean_session_of_its_own(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    async with publisher(mqtt_url) as client:
        node = ReferenceNode(client, group)
        async with running(host(settings, pool)):
            await node.born("press")
            await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM sparkplug_births"))
        # Published while the host is away: a clean session keeps nothing for it (the edge
        # node's store and forward is what covers a host outage).
        await node.send("DDATA", "ddata", device="press")
        json = MqttIngest(settings, pool)
        async with running(host(settings, pool)), running(json):
            # The JSON consumer's persistent session and the host's run side by side.
            await client.publish(
                TopicScheme(settings.mqtt_topic_root).telemetry(platform, "m1"),
                orjson.dumps({"ts": now_ms(), "metrics": {"v": 7.0}}),
                qos=1,
            )
            await node.send("NDATA", "ndata")
            await eventually(
                lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 21")
            )
            await eventually(
                lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 7")
            )
    assert await scalar(db, "SELECT count(*) FROM telemetry WHERE value = 101") == 0


async def test_the_json_consumer_drops_the_sparkplug_subscriptions_of_its_old_session(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    """Before the host had a connection of its own, the JSON consumer's persistent session
    subscribed to the Sparkplug topics; after an upgrade it must not receive them any more."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    hostname, port = mqtt_url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(
        hostname,
        int(port),
        identifier=settings.mqtt_client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    ) as old:
        for topic_filter in sparkplug_filters({group: platform}):
            await old.subscribe(topic_filter, qos=1)
    async with (
        running(MqttIngest(settings, pool)),
        running(host(settings, pool)),
        publisher(mqtt_url) as client,
    ):
        node = ReferenceNode(client, group)
        await node.send("NBIRTH", "nbirth_bdseq_0")
        await node.send("NDATA", "ndata")
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM telemetry"))
    assert await reasons(db) == []


async def test_an_edge_node_that_died_while_the_host_was_away_is_ended_after_a_rebirth_request(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    """A clean session keeps nothing for the host while it is away, an NDEATH included: an edge
    node it knew must show it is alive after the host returns, or its session ends."""
    settings = settings.model_copy(update={"sparkplug_confirm_seconds": 0.5})
    async with publisher(mqtt_url) as client, publisher(mqtt_url) as watcher:
        node = ReferenceNode(client, group)
        async with running(host(settings, pool)):
            await node.born("press")
            await eventually(lambda: _is(connected(db, platform), 2))
        await node.send("NDEATH", "ndeath_bdseq_0")  # while the host is away: to nobody
        await watcher.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
        async with running(host(settings, pool)) as ingest:
            async with asyncio.timeout(5):
                ncmd = await anext(aiter(watcher.messages))  # are you there?
            assert ncmd.topic.value == f"spBv1.0/{group}/NCMD/e1"
            await eventually(lambda: _is(connected(db, platform), 0))
            await eventually(lambda: scalar(db, "SELECT count(*) = 0 FROM sparkplug_births"))
            # The ending was the host's own doing, no packet of its session: the stream's
            # positions are untouched (its own STATE came back to it too).
            await node.send("NBIRTH", "nbirth_bdseq_1")
            await eventually(lambda: _is(connected(db, platform), 1))
            assert ingest.progress.oldest_waiting() == {}
            assert ingest.progress.stalled() == {}
    assert await states(db) == {"e1": "online", "e1:press": "offline", "gateway e1": "online"}
    cur = await db.execute(
        "SELECT subject, state FROM connection_events WHERE cause = 'sparkplug silent' ORDER BY 1"
    )
    assert await cur.fetchall() == [("device", "offline"), ("gateway", "offline")]
    assert await reasons(db) == []


async def test_an_edge_node_that_speaks_after_the_host_returns_stays_online(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    settings = settings.model_copy(update={"sparkplug_confirm_seconds": 0.5})
    async with publisher(mqtt_url) as client:
        node = ReferenceNode(client, group)
        async with running(host(settings, pool)):
            await node.born("press")
            await eventually(lambda: _is(connected(db, platform), 2))
        async with running(host(settings, pool)) as ingest:
            await node.send("NDATA", "ndata")
            await eventually(
                lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 21")
            )
            await asyncio.sleep(1.5)  # past both waits: nothing may end it now
            assert ingest.sparkplug is not None
            assert ingest.sparkplug.sessions.stats.rebirth_requests == 0
    assert await connected(db, platform) == 2


async def test_an_ingest_process_runs_the_host_beside_the_json_consumer(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    group: str,
) -> None:
    """`iiot ingest mqtt`'s services: both connections ready, both in /metrics, and a registry
    change reaches the host's writer too (a decommissioned device's data is refused)."""
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port})
    stop = asyncio.Event()
    process = asyncio.create_task(run_until(stop, ingest_services(settings, pool)))
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            publisher(mqtt_url) as client,
        ):
            await eventually(lambda: answers_ok(http, "/readyz"))
            node = ReferenceNode(client, group)
            await node.born("press")
            await eventually(lambda: scalar(db, "SELECT count(*) = 3 FROM telemetry"))
            async with db.transaction():
                await decommission_devices(db, platform, ["e1:press"], shard=0)
                await announce(db, platform)

            async def refused() -> bool:
                await node.send("DDATA", "ddata", device="press")
                return await scalar(db, "SELECT count(*) > 0 FROM dead_letters")

            await eventually(refused, timeout=5, interval=0.2)
            metrics = (await http.get("/metrics")).text
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await process
    assert await scalar(db, "SELECT count(*) FROM telemetry WHERE value = 101") == 0
    assert 'iiot_messages_received_total{cell="default",source="sparkplug"}' in metrics
    assert 'iiot_messages_received_total{cell="default",source="mqtt"}' in metrics
