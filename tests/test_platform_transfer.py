"""Moving a platform between cells: export from cell A, import into cell B (two schemas of one
PostgreSQL), with the platform filled through real MQTT ingest and the registry's functions.
Everything a cell answers about the platform must read the same before and after the move."""

import asyncio
import gzip
import io
import os
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from api.settings import ApiSettings
from ingest.kafka import KafkaIngest
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import MetricIn
from registry import counts, enterprises, history, penetration, usage
from registry.access import CredentialKind, Role, create_key, issue_credential, verify_key
from registry.activity import refresh_activity
from registry.errors import Conflict, Invalid
from registry.lifecycle import LifecycleSettings
from registry.maintenance import maintain_once
from registry.migrate import migrate
from registry.moves import mark_moved, unmove
from registry.platform_export import export_platform, export_to
from registry.platform_import import import_from
from registry.platforms import Tier, upsert_platform
from registry.registration import decommission_devices, register_devices
from registry.settings import StoreSettings
from registry.store import connect, create_pool
from registry.transfer_format import SECTIONS
from tests.conftest import api_in_process, eventually, payload, publisher, running, scalar
from tests.test_kafka_ingest import consuming, produce
from tests.test_sparkplug_ingest import EdgeNode

PLATFORM = "plant-x"
CODE = "914403001922038216"


@asynccontextmanager
async def cell_store(database_url: str, schema: str, cell: str) -> AsyncIterator[StoreSettings]:
    settings = StoreSettings(database_url=database_url, database_schema=schema, cell=cell)
    await migrate(settings)
    try:
        yield settings
    finally:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def rows(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> list[Any]:
    cur = await conn.execute(query, params or None)
    return await cur.fetchall()


async def observe(settings: StoreSettings) -> dict[str, Any]:
    """Everything the cell answers about the platform, as values (no internal ids)."""
    async with await connect(settings, autocommit=True) as conn:
        one = await counts.platform_counts(conn, PLATFORM)
        seen: dict[str, Any] = {"counts": one and {**asdict(one), "as_of": None}}
        seen["listed"] = await counts.all_platform_counts(conn, after=None, limit=10)
        national, distinct, _ = await counts.national_counts(conn)
        # Each device once, over the whole cell: recomputed by the sampler (both cells' next
        # pass), compared below.
        seen["national"] = national
        seen["distinct"] = distinct and (*asdict(distinct).values(),)[:4]
        for dimension in counts.DIMENSIONS:
            seen[f"by_{dimension}"] = await counts.grouped_counts(conn, dimension)
        seen["gauges"] = await counts.platform_gauges(conn)
        seen["indicators"] = await penetration.platform_indicators(conn, PLATFORM)
        start = datetime.now(UTC) - timedelta(days=2)
        end = datetime.now(UTC) + timedelta(days=1)
        seen["history"] = await history.history(conn, PLATFORM, start, end, timedelta(minutes=1))
        seen["usage"] = await usage.usage_days(
            conn, platform=PLATFORM, start=start.date(), end=end.date()
        )
        seen["ledger"] = await rows(
            conn,
            """SELECT recorded_at, day, source, messages, bytes, points, duplicate_points,
                      refused_messages FROM usage_ledger WHERE platform_id = %s ORDER BY id""",
            PLATFORM,
        )
        seen["ledger_days"] = await rows(
            conn, "SELECT * FROM usage_ledger_days WHERE platform_id = %s ORDER BY day", PLATFORM
        )
        seen["devices"] = await rows(
            conn,
            """SELECT d.device_id, d.metadata, d.created_at, d.first_seen, d.last_seen,
                      g.gateway_id, d.state, d.session_managed, d.session_epoch,
                      d.session_order, d.state_changed_at, d.expires_at, d.decommissioned_at,
                      d.enterprise
               FROM devices d LEFT JOIN gateways g ON g.id = d.via_gateway
               WHERE d.platform_id = %s ORDER BY d.device_id""",
            PLATFORM,
        )
        seen["gateways"] = await rows(
            conn,
            """SELECT gateway_id, metadata, created_at, first_seen, last_seen, state,
                      state_changed_at, enterprise
               FROM gateways WHERE platform_id = %s ORDER BY gateway_id""",
            PLATFORM,
        )
        seen["events"] = {
            device: await history.device_events(conn, PLATFORM, device, 1000)
            for (device, *_) in seen["devices"]
        }
        seen["credentials"] = await rows(
            conn,
            "SELECT * FROM credentials WHERE platform_id = %s ORDER BY kind, subject",
            PLATFORM,
        )
        seen["keys"] = await rows(
            conn,
            """SELECT prefix, digest, role, name, created_at, revoked_at, expires_at
               FROM api_keys WHERE platform_id = %s ORDER BY prefix""",
            PLATFORM,
        )
        seen["audit"] = await rows(
            conn,
            """SELECT time, action, subject, detail FROM audit_log
               WHERE platform_id = %s AND action NOT LIKE 'platform.%%' ORDER BY id""",
            PLATFORM,
        )
        seen["enterprises"] = await enterprises.list_enterprises(conn, PLATFORM)
        seen["linked"] = await enterprises.linked_devices(
            conn, PLATFORM, CODE, after=None, limit=1000
        )
        seen["rule"] = await enterprises.get_rule(conn, PLATFORM)
        seen["industry"] = await rows(
            conn, "SELECT * FROM platform_industries WHERE platform_id = %s", PLATFORM
        )
        seen["telemetry"] = await rows(
            conn,
            """SELECT d.device_id, m.name, t.time, t.value FROM telemetry t
               JOIN devices d ON d.id = t.device_id JOIN metrics m ON m.id = t.metric_id
               WHERE d.platform_id = %s ORDER BY 1, 2, 3""",
            PLATFORM,
        )
        seen["dead_letters"] = await rows(
            conn,
            """SELECT received_at, topic, reason, payload FROM dead_letters
               WHERE platform_id = %s ORDER BY id""",
            PLATFORM,
        )
    return seen


def ingest(settings: StoreSettings, mqtt_url: str, client: str, root: str) -> IngestSettings:
    return IngestSettings(
        database_url=settings.database_url,
        database_schema=settings.database_schema,
        mqtt_url=mqtt_url,
        mqtt_client_id=client,
        mqtt_topic_root=root,
        mqtt_session_expiry_seconds=600,
        sparkplug_groups="",
        batch_max_delay_seconds=0.05,
        shutdown_grace_seconds=5,
    )


async def cli(settings: StoreSettings, *args: str) -> subprocess.CompletedProcess[str]:
    """`iiot platform ...` as a process of its own, on the cell of `settings`."""
    env = os.environ | {
        "IIOT_DATABASE_URL": str(settings.database_url),
        "IIOT_DATABASE_SCHEMA": settings.database_schema,
        "IIOT_CELL": settings.cell,
    }
    command = [sys.executable, "-m", "iiot.cli", "platform", *args]
    return await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def fill(settings: StoreSettings, mqtt_url: str, unique: str) -> dict[str, str]:
    """A platform with some of everything: returns secrets issued (device -> secret)."""
    async with await connect(settings, autocommit=True) as conn:
        await upsert_platform(
            conn,
            PLATFORM,
            tier=Tier.GROWTH,
            region="440000",
            industry="Steel",
            metadata={"contact": "ops@plant-x"},
        )
        declared = enterprises.declare(
            CODE, name="华为技术有限公司", industry="39", above_size=True
        )
        await enterprises.upsert_enterprises(conn, PLATFORM, [declared])
        await enterprises.set_rule(conn, PLATFORM, "uscc")
        async with conn.transaction():
            await register_devices(
                conn,
                PLATFORM,
                [("meter-1", {"uscc": CODE}), ("meter-2", {}), ("old-1", {})],
                shard=3,
            )
            await decommission_devices(conn, PLATFORM, ["old-1"], shard=3)
        _, key = await create_key(
            conn, role=Role.OPERATOR, platform=PLATFORM, name="plant ops", created_by=None
        )
    root = f"test/{unique}/iiot/v1"
    ingest_settings = ingest(settings, mqtt_url, f"iiot-test-{unique}", root)
    now = datetime.now(UTC)
    async with (
        create_pool(ingest_settings, name="ingest") as pool,
        running(MqttIngest(ingest_settings, pool)),
        publisher(mqtt_url) as client,
    ):
        for n in range(4):
            reading = {"ts": (now - timedelta(minutes=n)).isoformat(), "metrics": {"kw": n + 0.5}}
            await client.publish(f"{root}/{PLATFORM}/meter-1/telemetry", payload(reading), qos=1)
            await client.publish(f"{root}/{PLATFORM}/sensor-{n}/telemetry", payload(reading), qos=1)
        gateway = {
            "devices": {"plc-1": {"metrics": {"rpm": 900}}, "plc-2": {"metrics": {"rpm": 5}}}
        }
        await client.publish(
            f"{root}/{PLATFORM}/gateways/edge-1/telemetry", payload(gateway), qos=1
        )
        await client.publish(
            f"{root}/{PLATFORM}/meter-2/status", payload({"state": "online", "session": 7}), qos=1
        )
        await client.publish(f"{root}/{PLATFORM}/sensor-3/status", b"offline", qos=1)
        await client.publish(f"{root}/{PLATFORM}/meter-1/telemetry", b"not json", qos=1)

        async def stored() -> bool:
            async with await connect(settings, autocommit=True) as conn:
                letters = await scalar(conn, "SELECT count(*) FROM dead_letters")
                offline = await scalar(
                    conn,
                    "SELECT count(*) FROM devices WHERE state = 'offline' "
                    "AND device_id = 'sensor-3'",
                )
                online = await scalar(
                    conn,
                    "SELECT count(*) FROM devices WHERE device_id = 'meter-2' AND state = 'online'",
                )
                return letters == 1 and offline == 1 and online == 1

        await eventually(stored, timeout=20)
    async with await connect(settings, autocommit=True) as conn:
        secret, _, _ = await issue_credential(
            conn, PLATFORM, CredentialKind.DEVICE, "meter-1", by=None
        )
        await issue_credential(conn, PLATFORM, CredentialKind.GATEWAY, "edge-1", by=None)
        await enterprises.link(conn, PLATFORM, "gateways", {"edge-1": CODE})
        for minutes in (2, 1):
            await history.sample(conn, timedelta(minutes=minutes))
        await refresh_activity(conn)
        await penetration.refresh_penetration(conn)
    return {"meter-1": secret, "key": key, "root": root}


@pytest.mark.slow  # runs `iiot platform export` and `import` as processes
async def test_a_platform_moves_to_another_cell_and_reads_the_same_there(
    database_url: str, mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    async with (
        cell_store(database_url, f"a_{unique}", "cell-a") as a,
        cell_store(database_url, f"b_{unique}", "cell-b") as b,
    ):
        issued = await fill(a, mqtt_url, unique)
        before = await observe(a)
        assert before["counts"]["registered"] == 8  # meter-1..2, sensor-0..3, plc-1..2
        file = tmp_path / "plant-x.iiot-platform.gz"

        # The CLI, as a process: export with --move-to, then import in the other cell.
        export = await cli(
            a,
            "export",
            PLATFORM,
            "--output",
            str(file),
            "--telemetry",
            "--move-to",
            "cell-b",
            "--settle",
            "0",
        )
        assert export.returncode == 0, export.stderr
        assert "moved" in export.stderr

        # The source refuses the platform now: counts, ingest, broker hooks, API.
        gone = await observe(a)
        assert gone["counts"] is None
        assert gone["listed"] == gone["gauges"] == gone["indicators"] == []
        assert gone["national"].platforms == 0

        # A truncated and an edited file are refused whole; B holds nothing of the platform.
        data = file.read_bytes()
        cut = tmp_path / "cut.gz"
        cut.write_bytes(data[: len(data) // 2])
        with cut.open("rb") as source, pytest.raises(Invalid, match="truncated"):
            await import_from(b, source)
        text = gzip.decompress(data)
        assert b"meter-2" in text
        edited = tmp_path / "edited.gz"
        edited.write_bytes(gzip.compress(text.replace(b"meter-2", b"meter-9", 1)))
        with edited.open("rb") as source, pytest.raises(Invalid, match="SHA-256"):
            await import_from(b, source)
        async with await connect(b, autocommit=True) as conn:
            assert await scalar(conn, "SELECT count(*) FROM platforms") == 0

        imported = await cli(b, "import", str(file))
        assert imported.returncode == 0, imported.stderr
        after = await observe(b)
        for what, value in before.items():
            if what != "distinct":
                assert after[what] == value, what
        for cell in (a, b):  # the samplers' next pass
            async with await connect(cell, autocommit=True) as conn:
                await refresh_activity(conn)
        assert (await observe(b))["distinct"] == before["distinct"]
        assert (await observe(a))["distinct"] == (0, 0, 0, 0)

        # The platform's key and the device's secret work in the new cell.
        async with await connect(b, autocommit=True) as conn:
            principal = await verify_key(conn, issued["key"])
            assert principal is not None
            assert principal.platform == PLATFORM
        # Importing the same file again is refused: the platform is served there now.
        with file.open("rb") as source, pytest.raises(Conflict):
            await import_from(b, source)

        await refused_in_the_old_cell(a, mqtt_url, unique, issued)

        # It goes on in B (usage, a count sample), then moves back to A: A's old record is
        # replaced, its append-only ledger kept and completed, and A reads what B read.
        async with await connect(b, autocommit=True) as conn:
            today = datetime.now(UTC).date()
            spent = usage.Usage(PLATFORM, today, "mqtt", messages=3, bytes=120, points=6)
            async with conn.transaction():
                await usage.record_usage(conn, [spent], shard=5)
            await history.sample(conn, timedelta(seconds=30))
        in_b = await observe(b)
        assert in_b["ledger"] != before["ledger"]
        back = tmp_path / "back.gz"
        with back.open("wb") as sink:
            await export_to(b, PLATFORM, sink, telemetry=True, move_to="cell-a", settle=0)
        with back.open("rb") as source:
            summary = await import_from(a, source)
        assert summary.returning
        assert summary.drift == (0, 0, 0)
        again = await observe(a)
        for what, value in in_b.items():
            if what not in ("distinct", "dead_letters"):
                assert again[what] == value, what
        # What A refused while the platform was away stays on record there.
        assert again["dead_letters"][: len(in_b["dead_letters"])] == in_b["dead_letters"]
        assert {letter[2] for letter in again["dead_letters"]} == {"invalid_json", "platform_moved"}
        assert (await observe(b))["counts"] is None


async def refused_in_the_old_cell(
    a: StoreSettings, mqtt_url: str, unique: str, issued: dict[str, str]
) -> None:
    root = issued["root"]
    ingest_settings = ingest(a, mqtt_url, f"iiot-test2-{unique}", root)
    async with (
        create_pool(ingest_settings, name="ingest") as pool,
        running(MqttIngest(ingest_settings, pool)),
        publisher(mqtt_url) as client,
    ):
        reading = payload({"metrics": {"kw": 1.0}})
        await client.publish(f"{root}/{PLATFORM}/meter-1/telemetry", reading, qos=1)
        await client.publish(f"{root}/{PLATFORM}/newcomer/telemetry", reading, qos=1)

        async def refused() -> list[Any]:
            async with await connect(a, autocommit=True) as conn:
                return await rows(
                    conn,
                    "SELECT topic, detail FROM dead_letters WHERE reason = 'platform_moved' "
                    "ORDER BY id",
                )

        letters = await eventually(lambda: _two(refused))
    assert all("'cell-b'" in detail for _, detail in letters)
    async with await connect(a, autocommit=True) as conn:
        # Nothing registered, stored or metered for it here.
        assert await scalar(conn, "SELECT count(*) FROM devices WHERE device_id = 'newcomer'") == 0
        before = await scalar(conn, "SELECT count(*) FROM usage_ledger")
        await history.sample(conn, timedelta(seconds=7))
        assert await scalar(conn, "SELECT count(*) FROM count_history WHERE seconds = 7") == 0
        assert await scalar(conn, "SELECT count(*) FROM usage_ledger") == before
        _, admin = await create_key(conn, role=Role.ADMIN, platform=None, name="t", created_by=None)
        _, broker = await create_key(
            conn, role=Role.BROKER, platform=None, name="b", created_by=None
        )
    settings = ApiSettings(
        database_url=a.database_url, database_schema=a.database_schema, mqtt_topic_root=root
    )
    async with api_in_process(settings, admin) as api:
        record = await api.get(f"/platforms/{PLATFORM}")
        assert record.status_code == 200
        assert record.json()["moved_to"] == "cell-b"
        for method, path in (
            ("GET", f"/platforms/{PLATFORM}/devices"),
            ("GET", f"/platforms/{PLATFORM}/devices/count"),
            ("PATCH", f"/platforms/{PLATFORM}"),
        ):
            answer = await api.request(
                method, path, json={"name": "x"} if method != "GET" else None
            )
            assert answer.status_code == 410, (path, answer.text)
            assert answer.json()["moved_to"] == "cell-b"
            assert answer.headers["content-type"] == "application/problem+json"
    async with api_in_process(settings, broker) as hooks:
        answer = await hooks.post(
            "/broker/authenticate",
            json={"username": f"{PLATFORM}/meter-1", "password": issued["meter-1"]},
        )
        assert answer.json()["result"] == "deny"
        assert answer.json()["reason"] == "platform_moved"
        assert answer.json()["moved_to"] == "cell-b"
        publish = {
            "username": f"{PLATFORM}/meter-1",
            "topic": f"{root}/{PLATFORM}/meter-1/telemetry",
            "action": "publish",
        }
        answer = await hooks.post("/broker/authorize", json=publish)
        assert answer.json() == {
            "result": "deny",
            "is_superuser": False,
            "reason": "platform_moved",
            "detail": answer.json()["detail"],
            "moved_to": "cell-b",
        }
        # Other clients' answers are as they were: no reason where none is due.
        answer = await hooks.post("/broker/authorize", json=publish | {"username": "x/y"})
        assert answer.json() == {"result": "deny", "is_superuser": False}


async def _two(check: Any) -> list[Any] | None:
    found = await check()
    return found if len(found) == 2 else None


async def test_an_export_streams_and_a_failed_move_is_undone(
    database_url: str, unique: str
) -> None:
    """300,000 points (about 12 MB of text) go through with little memory; an export that fails
    leaves the platform served where it was."""
    async with cell_store(database_url, f"a_{unique}", "cell-a") as a:
        async with await connect(a, autocommit=True) as conn:
            await upsert_platform(conn, PLATFORM)
            async with conn.transaction():
                await register_devices(
                    conn, PLATFORM, [(f"d-{n}", {}) for n in range(100)], shard=0
                )
            await conn.execute("INSERT INTO metrics (name) VALUES ('temperature'), ('pressure')")
            day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            await conn.execute(
                "SELECT iiot_ensure_telemetry_partitions(%s, %s)", (day.date(), day.date())
            )
            await conn.execute(
                """INSERT INTO telemetry (time, device_id, metric_id, value)
                   SELECT %s + s * interval '1 second', d.id, m.id, s * 0.25
                   FROM devices d, metrics m, generate_series(1, 1500) s""",
                (day,),
            )
        sink = io.BytesIO()
        tracemalloc.start()
        try:
            async with await connect(a) as conn:
                summary = await export_platform(conn, PLATFORM, sink, cell="cell-a", telemetry=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert summary.rows["telemetry"] == 300_000
        assert summary.bytes > 10_000_000
        assert peak < 3_000_000, f"the export held {peak} bytes at once"

        class Full(io.BytesIO):
            def write(self, data: Any) -> int:
                raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space"):
            await export_to(a, PLATFORM, Full(), telemetry=True, move_to="cell-b", settle=0)
        async with await connect(a, autocommit=True) as conn:
            assert await scalar(conn, "SELECT moved_to FROM platforms") is None
            # The operator's undo: only of a move, to a cell by its name, never to itself.
            with pytest.raises(Conflict, match="has not moved"):
                await unmove(conn, PLATFORM)
            for cell in ("Cell B", "cell-a"):
                with pytest.raises(Invalid):
                    await mark_moved(conn, PLATFORM, cell, here="cell-a")
            await mark_moved(conn, PLATFORM, "cell-b", here="cell-a")
            with pytest.raises(Conflict, match="undo that move first"):
                await mark_moved(conn, PLATFORM, "cell-c", here="cell-a")
            assert (await unmove(conn, PLATFORM)).cell == "cell-b"
            assert await scalar(conn, "SELECT moved_to FROM platforms") is None
            actions = await rows(
                conn, "SELECT action FROM audit_log WHERE action LIKE 'platform.%'"
            )
            assert actions == [("platform.move",), ("platform.unmove",)] * 2


def test_the_format_reference_lists_every_section_with_its_columns() -> None:
    reference = (Path(__file__).parent.parent / "docs" / "platform-transfer.md").read_text()
    for section in SECTIONS:
        columns = ", ".join(f"`{name}` {kind}" for name, kind in section.columns)
        assert f"| `{section.name}`" in reference, section.name
        assert f" | {columns} |" in reference, section.name


async def test_kafka_ingest_refuses_a_moved_platform_whole(
    kafka_settings: IngestSettings, pool: AsyncConnectionPool, db: Any, platform: str
) -> None:
    """Kafka records go through the same resolution as MQTT and Sparkplug messages: a moved
    platform's are dead-lettered as platform_moved, and nothing of them is registered, stored
    or metered; their offsets move on."""
    moved = await mark_moved(db, platform, "cell-b", here=kafka_settings.cell)
    ts = int(datetime.now(UTC).timestamp() * 1000)
    records: list[tuple[bytes | None, bytes]] = [
        (f"{platform}/press-1".encode(), payload({"ts": ts, "metrics": {"temp": 21.5}})),
        (
            f"{platform}/gateways/gw-1".encode(),
            payload({"devices": {"press-2": {"ts": ts, "metrics": {"rpm": 7}}}}),
        ),
    ]
    await produce(kafka_settings.require_kafka_bootstrap(), kafka_settings.kafka_topics[0], records)
    async with consuming(KafkaIngest(kafka_settings, pool)):
        await eventually(lambda: scalar(db, "SELECT count(*) = 2 FROM dead_letters"))
    letters = await rows(db, "SELECT reason, detail FROM dead_letters")
    assert {reason for reason, _ in letters} == {"platform_moved"}
    assert all(f"{moved.cell!r}" in detail for _, detail in letters)
    for table in ("devices", "gateways", "telemetry", "usage_ledger"):
        assert await scalar(db, f"SELECT count(*) FROM {table}") == 0, table
    assert await scalar(db, "SELECT sum(next_offset)::int FROM kafka_offsets") == len(records)


async def test_a_platform_moving_back_adds_up_its_ledger_rolled_up_elsewhere(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    """A keeps the ledger rows of a platform that left one by one; B's maintenance rolls them
    up into a daily row. When the platform comes back, A's ledger must add up to B's: the
    rows A still holds are taken off B's roll-up, not counted twice."""
    ledger_days = "SELECT * FROM usage_ledger_days WHERE platform_id = %s ORDER BY day"
    async with (
        cell_store(database_url, f"a_{unique}", "cell-a") as a,
        cell_store(database_url, f"b_{unique}", "cell-b") as b,
    ):
        async with await connect(a, autocommit=True) as conn:
            await upsert_platform(conn, PLATFORM)
            now = datetime.now(UTC)
            ages = ((timedelta(days=10), 5), (timedelta(days=10), 7), (timedelta(0), 1))
            for age, messages in ages:
                await conn.execute(
                    """INSERT INTO usage_ledger (recorded_at, platform_id, day, source, messages,
                           bytes, points, duplicate_points, refused_messages)
                       VALUES (%s, %s, %s, 'mqtt', %s, 100, 10, 0, 0)""",
                    (now - age, PLATFORM, (now - age).date(), messages),
                )
            held = await rows(conn, ledger_days, PLATFORM)
        file = tmp_path / "there.gz"
        with file.open("wb") as sink:
            await export_to(a, PLATFORM, sink, move_to="cell-b", settle=0)
        with file.open("rb") as source:
            await import_from(b, source)
        lifecycle = LifecycleSettings(**b.model_dump())
        assert await maintain_once(lifecycle, ingest_window=timedelta(days=7)) is not None
        async with await connect(b, autocommit=True) as conn:
            assert await scalar(conn, "SELECT count(*) FROM usage_ledger") == 1  # rolled up
            assert await rows(conn, ledger_days, PLATFORM) == held
        with file.open("wb") as sink:
            await export_to(b, PLATFORM, sink, move_to="cell-a", settle=0)
        with file.open("rb") as source:
            await import_from(a, source)
        async with await connect(a, autocommit=True) as conn:
            assert await rows(conn, ledger_days, PLATFORM) == held
            assert await scalar(conn, "SELECT count(*) FROM usage_ledger") == 3  # all kept


async def test_sparkplug_ingest_refuses_a_moved_platform(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: Any,
    platform: str,
    mqtt_url: str,
    unique: str,
) -> None:
    """An edge node of a moved platform's Sparkplug group: its births and data are refused as
    platform_moved, and neither it nor its devices are registered here."""
    group = f"sp-{unique}"
    settings = ingest_settings.model_copy(
        update={
            "sparkplug_groups": f"{group}={platform}",
            "sparkplug_host_id": f"iiot-{unique}",
            "sparkplug_reorder_wait_seconds": 0.3,
        }
    )
    await mark_moved(db, platform, "cell-b", here=settings.cell)
    async with (
        running(MqttIngest(settings, pool, sparkplug_host=True)),
        publisher(mqtt_url) as client,
    ):
        node = EdgeNode(client, group)
        await node.birth(0, "press-1")
        await node.send("NDATA", [MetricIn(None, 21.0, alias=1)])
        refused = "SELECT count(*) >= 3 FROM dead_letters WHERE reason = 'platform_moved'"
        await eventually(lambda: scalar(db, refused))
    others = "SELECT count(*) FROM dead_letters WHERE reason <> 'platform_moved'"
    assert await scalar(db, others) == 0
    for table in ("devices", "gateways", "telemetry", "usage_ledger"):
        assert await scalar(db, f"SELECT count(*) FROM {table}") == 0, table
