"""A Sparkplug B edge node with devices through birth, data, death and rebirth, over the real
Mosquitto and PostgreSQL: the rows, the connection state, the dead letters and the host's own
messages (STATE, Rebirth requests)."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import BOOLEAN, INT64, MetricIn, encode_payload
from registry.counts import platform_counts
from tests.conftest import eventually, publisher, running, scalar

NOW_MS = int(datetime.now(UTC).timestamp() * 1000)


@pytest.fixture
def settings(ingest_settings: IngestSettings, platform: str, unique: str) -> IngestSettings:
    return ingest_settings.model_copy(
        update={
            "sparkplug_groups": f"sp-{unique}={platform}",
            "sparkplug_host_id": f"iiot-{unique}",
            "sparkplug_reorder_wait_seconds": 0.3,
        }
    )


class EdgeNode:
    """Publishes one edge node's messages with a running seq, like a Sparkplug client."""

    def __init__(self, client: aiomqtt.Client, group: str, edge: str = "e1") -> None:
        self.client, self.group, self.edge = client, group, edge
        self.seq = 0
        # Each message a millisecond of its own: a point is (device, metric, time), and two
        # messages within one millisecond would be the same points.
        self.clock = 0

    async def send(
        self,
        kind: str,
        metrics: list[MetricIn],
        *,
        device: str | None = None,
        seq: int | None = None,
        ts: int | None = None,
    ) -> None:
        if kind == "NBIRTH":
            self.seq = 0
        use = self.seq if seq is None else seq
        if kind != "NDEATH":
            self.seq = (use + 1) % 256
        topic = f"spBv1.0/{self.group}/{kind}/{self.edge}" + (f"/{device}" if device else "")
        self.clock = max(self.clock + 1, now_ms())
        payload = encode_payload(
            metrics, seq=None if kind == "NDEATH" else use, timestamp_ms=ts or self.clock
        )
        await self.client.publish(topic, payload, qos=1)

    async def birth(self, bd_seq: int, *devices: str) -> None:
        await self.send(
            "NBIRTH",
            [
                MetricIn("bdSeq", bd_seq, INT64),
                MetricIn("Node Control/Rebirth", False, BOOLEAN),
                MetricIn("Temperature", 20.0, alias=1),
            ],
        )
        for device in devices:
            await self.send("DBIRTH", [MetricIn("Speed", 100.0, alias=2)], device=device)

    async def death(self, bd_seq: int) -> None:
        await self.send("NDEATH", [MetricIn("bdSeq", bd_seq, INT64)])


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


@asynccontextmanager
async def watching(mqtt_url: str, *filters: str) -> AsyncIterator["asyncio.Queue[Any]"]:
    """Collects what the backend publishes on `filters`."""
    seen: asyncio.Queue[Any] = asyncio.Queue()
    async with publisher(mqtt_url) as client:
        for f in filters:
            await client.subscribe(f, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                seen.put_nowait(message)

        task = asyncio.create_task(collect())
        try:
            yield seen
        finally:
            task.cancel()


async def next_message(seen: "asyncio.Queue[Any]", timeout: float = 5) -> Any:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        return await seen.get()


async def connected(db: psycopg.AsyncConnection[Any], platform: str) -> int:
    counts = await platform_counts(db, platform)
    assert counts is not None
    return counts.connected


async def device_states(db: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    cur = await db.execute("SELECT device_id, state FROM devices ORDER BY device_id")
    return dict(await cur.fetchall())


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "paho-public"])
async def test_an_edge_node_with_devices_through_birth_data_death_and_rebirth(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    unique: str,
    speedups: bool,
) -> None:
    settings = settings.model_copy(update={"mqtt_paho_speedups": speedups})
    group = f"sp-{unique}"
    host = settings.sparkplug_host_id
    async with (
        watching(mqtt_url, f"spBv1.0/STATE/{host}", f"spBv1.0/{group}/NCMD/#") as seen,
        running(MqttIngest(settings, pool, sparkplug_host=True)) as ingest,
        publisher(mqtt_url) as client,
    ):
        state = await next_message(seen)
        assert state.topic.value == f"spBv1.0/STATE/{host}"
        assert orjson.loads(state.payload)["online"] is True
        assert ingest.speedups is speedups

        node = EdgeNode(client, group)
        await node.birth(0, "press-1", "press-2")
        await node.send("NDATA", [MetricIn(None, 21.0, alias=1)])
        await node.send("DDATA", [MetricIn(None, 101.0, alias=2)], device="press-1")
        await eventually(lambda: scalar(db, "SELECT count(*) = 5 FROM telemetry"))
        rows = await (
            await db.execute(
                "SELECT d.device_id, g.gateway_id, m.name, t.value FROM telemetry t"
                " JOIN devices d ON d.id = t.device_id JOIN metrics m ON m.id = t.metric_id"
                " LEFT JOIN gateways g ON g.id = d.via_gateway ORDER BY 1, 3, 4"
            )
        ).fetchall()
        assert rows == [
            ("e1", "e1", "Temperature", 20.0),
            ("e1", "e1", "Temperature", 21.0),
            ("e1:press-1", "e1", "Speed", 100.0),
            ("e1:press-1", "e1", "Speed", 101.0),
            ("e1:press-2", "e1", "Speed", 100.0),
        ]
        # The edge node's own metrics are a device of the same name behind it; a Sparkplug
        # device's id is unique only under its edge node, so its registry id is qualified.
        await eventually(lambda: _equals(connected(db, platform), 3))

        # A device leaves; then the edge node dies and takes its devices with it, in one step.
        await node.send("DDEATH", [], device="press-2")
        await eventually(lambda: _equals(connected(db, platform), 2))
        await node.death(0)
        await eventually(lambda: _equals(connected(db, platform), 0))
        events = await scalar(
            db,
            "SELECT count(*) FROM connection_events"
            " WHERE subject = 'gateway' AND state = 'offline'",
        )
        assert events == 1

        # Rebirth with a new bdSeq; the old session's Will arrives late and changes nothing.
        await node.birth(1, "press-1")
        await eventually(lambda: _equals(connected(db, platform), 2))
        await node.death(0)
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM dead_letters"))
        assert await scalar(db, "SELECT reason FROM dead_letters") == "stale_death"
        await asyncio.sleep(0.3)
        assert await connected(db, platform) == 2

        # Back-filled points are stored but are not liveness; an unknown alias is refused and
        # asks for a Rebirth.
        old = now_ms() - 3_600_000
        await node.send(
            "DDATA",
            [MetricIn(None, 55.0, alias=2, timestamp_ms=old, historical=True)],
            device="press-1",
        )
        await node.send("NDATA", [MetricIn(None, 1.0, alias=42)])
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM dead_letters"))
        ncmd = await next_message(seen)
        assert ncmd.topic.value == f"spBv1.0/{group}/NCMD/e1"
        assert await scalar(db, "SELECT count(*) FROM telemetry WHERE value = 55") == 1

        # A lost message (seq jumps) is a gap; not filled, it costs one Rebirth request.
        await node.birth(2)
        node.seq += 3
        await node.send("NDATA", [MetricIn(None, 22.0, alias=1)])
        ncmd = await next_message(seen)
        assert ncmd.topic.value == f"spBv1.0/{group}/NCMD/e1"
        assert ingest.sparkplug is not None
        assert ingest.sparkplug.sessions.stats.gaps == 3

    reasons = await (await db.execute("SELECT reason FROM dead_letters ORDER BY id")).fetchall()
    assert reasons == [("stale_death",), ("unknown_alias",)]


async def test_a_restarted_host_remembers_the_open_sessions(
    settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    unique: str,
) -> None:
    group = f"sp-{unique}"
    async with publisher(mqtt_url) as client:
        node = EdgeNode(client, group)
        async with running(MqttIngest(settings, pool, sparkplug_host=True)):
            await node.birth(7, "press-1")
            await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM sparkplug_births"))
        async with running(MqttIngest(settings, pool, sparkplug_host=True)):
            # Data by alias only, then the stale Will of an older session: the restored BIRTHs
            # know both.
            await node.send("DDATA", [MetricIn(None, 5.0, alias=2)], device="press-1")
            await node.death(6)
            await eventually(
                lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry WHERE value = 5")
            )
            await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM dead_letters"))
            assert await scalar(db, "SELECT reason FROM dead_letters") == "stale_death"
            await node.death(7)
            await eventually(lambda: scalar(db, "SELECT count(*) = 0 FROM sparkplug_births"))
            await eventually(lambda: _equals(connected(db, platform), 0))


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
