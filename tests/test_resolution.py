"""Id resolution on its own, on the real PostgreSQL: what a batch's names resolve to, what is
registered, and what is refused with which reason, before anything is written."""

from datetime import UTC, datetime
from typing import Any

import psycopg

from ingest.batching import Received
from ingest.decoding import Status, Telemetry
from ingest.errors import Rejected
from ingest.resolution import Resolver
from registry.devices import DeviceDirectory
from registry.platforms import upsert_platform
from tests.conftest import scalar

NOW = datetime.now(UTC).replace(microsecond=0)


def reading(platform: str, device: str, *names: str, gateway: str | None = None) -> Telemetry:
    return Telemetry(platform, device, [(NOW, n, 1.0) for n in names], False, NOW, NOW, gateway)


def received(*outcome: Telemetry | Status) -> Received[None]:
    return Received("mqtt", f"iiot/v1/{outcome[0].platform}/x", b"{}", NOW, [*outcome], None)


async def ids(db: psycopg.AsyncConnection[Any], table: str, column: str) -> dict[str, int]:
    cur = await db.execute(f"SELECT {column}, id FROM {table}")
    return dict(await cur.fetchall())


async def test_a_batch_resolves_to_row_ids_registering_what_is_new(
    db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await upsert_platform(db, "closed", auto_provision=False)
    await db.execute("INSERT INTO devices (platform_id, device_id) VALUES ('closed', 'known')")
    bad = Received("mqtt", "t", b"{", NOW, Rejected("invalid_json", "eof"), None)
    batch = [
        received(reading("nowhere", "a", "temp")),
        received(reading(platform, "a", "temp", "rpm")),
        bad,
        received(reading("closed", "new", "temp")),
        received(reading("closed", "known", "temp", gateway="edge")),
        received(reading(platform, "b", "temp", gateway="edge"), reading(platform, "c", "temp")),
        received(Status(platform, False, 3, device="a")),
    ]
    resolver = Resolver(DeviceDirectory())
    resolved = await resolver.resolve(db, batch)

    # Refusals: those decoding found first, then in arrival order; their messages untouched.
    assert [(m, r.reason) for m, r in resolved.rejected] == [
        (bad, "invalid_json"),
        (batch[0], "unknown_platform"),
        (batch[3], "unknown_device"),
        (batch[4], "unknown_gateway"),
    ]
    devices = await ids(db, "devices", "device_id")
    gateways = await ids(db, "gateways", "gateway_id")
    assert resolved.devices_registered == 3  # a, b, c; nothing on the closed platform
    assert set(devices) == {"known", "a", "b", "c"}
    assert set(gateways) == {"edge"}
    assert [(a.device, a.gateway) for a in resolved.telemetry] == [
        (devices["a"], None),
        (devices["b"], gateways["edge"]),
        (devices["c"], None),
    ]
    assert resolved.metric_ids == await ids(db, "metrics", "name")
    assert set(resolved.metric_ids) == {"temp", "rpm"}
    assert [(e.subject, e.online, e.epoch) for e in resolved.device_sessions] == [
        (devices["a"], False, 3)
    ]
    assert resolved.platforms == {platform, "closed"}
    assert await scalar(db, "SELECT count(*) FROM telemetry") == 0

    # Another resolver sharing the directory finds the same ids and registers nothing.
    again = await Resolver(resolver.directory).resolve(db, batch[1:2])
    assert again.devices_registered == 0
    assert [a.device for a in again.telemetry] == [devices["a"]]
