"""Every kind of bad input lands in the dead-letter table with its reason, while the good
messages around it are stored (docs/contract.md, "What iiot does with a message").

One stream over the real Mosquitto: each bad message is followed by a good one carrying a
unique value, so the test also shows that nothing good near a bad message is lost.
"""

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool

from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.sparkplug import FLOAT, INT64, STRING, MetricIn, encode_payload
from ingest.topics import TopicScheme
from registry.platforms import upsert_platform
from tests.conftest import eventually, publisher, running, scalar

MAX_POINTS = 100
MAX_BYTES = 16 * 1024


def j(document: Any) -> bytes:
    return orjson.dumps(document)


def bad_inputs(root: str, now: datetime) -> list[tuple[str, str, bytes, str]]:
    """(what, topic, payload, expected reason): one of each kind the contract names."""
    t = TopicScheme(root)
    dev = t.telemetry("plant-1", "d1")
    gw = t.gateway_telemetry("plant-1", "gw-1")
    status = t.status("plant-1", "d1")
    ms = int(now.timestamp() * 1000)
    ok: dict[str, Any] = {"v": 1}
    many = {f"m{n}": n for n in range(MAX_POINTS + 1)}
    return [
        # Not JSON at all.
        ("truncated JSON", dev, b'{"metrics": {"v": ', "invalid_json"),
        ("empty payload", dev, b"", "invalid_json"),
        ("plain text", dev, b"hello", "invalid_json"),
        ("NaN literal", dev, b'{"metrics": {"v": NaN}}', "invalid_json"),
        ("Infinity literal", dev, b'{"metrics": {"v": Infinity}}', "invalid_json"),
        ("-Infinity literal", dev, b'{"metrics": {"v": -Infinity}}', "invalid_json"),
        ("float beyond 64 bits", dev, b'{"metrics": {"v": 1e400}}', "invalid_json"),
        ("ts as an object", dev, j({"ts": {"s": 1}, "metrics": ok}), "invalid_timestamp"),
        ("invalid UTF-8", dev, b'{"metrics": {"v\xff": 1}}', "invalid_json"),
        ("trailing garbage", dev, b'{"metrics": {"v": 1}} x', "invalid_json"),
        # JSON of the wrong shape.
        ("a number", dev, b"42", "invalid_shape"),
        ("a string", dev, b'"reading"', "invalid_shape"),
        ("null", dev, b"null", "invalid_shape"),
        ("empty list", dev, b"[]", "invalid_shape"),
        ("list of numbers", dev, b"[1, 2]", "invalid_shape"),
        ("no metrics", dev, j({"ts": ms}), "invalid_shape"),
        ("metrics as a list", dev, j({"metrics": [1, 2]}), "invalid_shape"),
        ("empty metrics", dev, j({"metrics": {}}), "invalid_shape"),
        ("unknown field", dev, j({"metrics": ok, "unit": "C"}), "invalid_shape"),
        ("historical not boolean", dev, j({"metrics": ok, "historical": "yes"}), "invalid_shape"),
        (
            "live and historical mixed",
            dev,
            j([{"metrics": ok}, {"metrics": ok, "ts": ms - 1, "historical": True}]),
            "invalid_shape",
        ),
        # Values.
        ("string value", dev, j({"metrics": {"v": "high"}}), "invalid_value"),
        ("null value", dev, j({"metrics": {"v": None}}), "invalid_value"),
        ("object value", dev, j({"metrics": {"v": {"x": 1}}}), "invalid_value"),
        ("list value", dev, j({"metrics": {"v": [1]}}), "invalid_value"),
        # Metric names.
        ("empty metric name", dev, j({"metrics": {"": 1}}), "invalid_metric_name"),
        ("metric name with a tab", dev, j({"metrics": {"a\tb": 1}}), "invalid_metric_name"),
        ("metric name with a leading blank", dev, j({"metrics": {" v": 1}}), "invalid_metric_name"),
        (
            "metric name of 200 characters",
            dev,
            j({"metrics": {"m" * 200: 1}}),
            "invalid_metric_name",
        ),
        # Timestamps.
        ("ts in words", dev, j({"ts": "yesterday", "metrics": ok}), "invalid_timestamp"),
        (
            "ts without offset",
            dev,
            j({"ts": "2026-11-24T08:00:00", "metrics": ok}),
            "invalid_timestamp",
        ),
        ("ts boolean", dev, j({"ts": True, "metrics": ok}), "invalid_timestamp"),
        ("ts null", dev, j({"ts": None, "metrics": ok}), "invalid_timestamp"),
        ("ts implausible epoch", dev, j({"ts": 10**18, "metrics": ok}), "invalid_timestamp"),
        (
            "ts a day ahead",
            dev,
            j({"ts": ms + 86_400_000, "metrics": ok}),
            "timestamp_out_of_window",
        ),
        (
            "ts 30 days back",
            dev,
            j({"ts": ms - 30 * 86_400_000, "metrics": ok}),
            "timestamp_out_of_window",
        ),
        ("ts at epoch 0", dev, j({"ts": 0, "metrics": ok}), "timestamp_out_of_window"),
        (
            "ts far future as text",
            dev,
            j({"ts": (now + timedelta(days=400)).isoformat(), "metrics": ok}),
            "timestamp_out_of_window",
        ),
        # Limits.
        ("too many points", dev, j({"metrics": many}), "too_many_points"),
        ("oversized payload", dev, j({"metrics": ok, "pad": "x" * MAX_BYTES}), "payload_too_large"),
        # Gateway messages.
        ("gateway without devices", gw, j({"metrics": ok}), "invalid_shape"),
        ("gateway with no devices", gw, j({"devices": {}}), "invalid_shape"),
        (
            "gateway with a bad device id",
            gw,
            j({"devices": {"bad id": {"metrics": ok}}}),
            "bad_device_id",
        ),
        (
            "gateway with a bad value",
            gw,
            j({"devices": {"d7": {"metrics": {"v": "x"}}}}),
            "invalid_value",
        ),
        (
            "gateway over the point limit in all",
            gw,
            j({"devices": {"d7": {"metrics": many}, "d8": {"metrics": ok}}}),
            "too_many_points",
        ),
        # Topics and registration.
        (
            "unknown platform",
            t.telemetry("no-such-plant", "d1"),
            j({"metrics": ok}),
            "unknown_platform",
        ),
        ("bad platform id", f"{root}/Plant_1/d1/telemetry", j({"metrics": ok}), "bad_platform_id"),
        (
            "bad device id",
            f"{root}/plant-1/bad device/telemetry",
            j({"metrics": ok}),
            "bad_device_id",
        ),
        (
            "bad gateway id",
            f"{root}/plant-1/gateways/-gw/telemetry",
            j({"metrics": ok}),
            "bad_gateway_id",
        ),
        (
            "unknown device, closed platform",
            t.telemetry("closed", "d1"),
            j({"metrics": ok}),
            "unknown_device",
        ),
        (
            "unknown gateway, closed platform",
            t.gateway_telemetry("closed", "gw-9"),
            j({"devices": {"d1": {"metrics": ok}}}),
            "unknown_gateway",
        ),
        # Status.
        ("status in other words", status, b"maybe", "invalid_status"),
        ("status JSON with a bad state", status, j({"state": "asleep"}), "invalid_status"),
        (
            "status with a negative session",
            status,
            j({"state": "online", "session": -1}),
            "invalid_status",
        ),
        (
            "status with a boolean session",
            status,
            j({"state": "online", "session": True}),
            "invalid_status",
        ),
        (
            "status with an extra field",
            status,
            j({"state": "online", "why": "boot"}),
            "invalid_status",
        ),
        ("status that is too large", status, b"o" * 2048, "payload_too_large"),
    ]


async def test_every_kind_of_bad_input_is_dead_lettered_and_the_good_ones_around_it_stored(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
) -> None:
    await upsert_platform(db, "closed", auto_provision=False)
    # Every platform's topics (a broker of the cell's own): unknown and malformed platform ids
    # reach ingest only so; scoped to its platforms, the broker keeps them away.
    settings = ingest_settings.model_copy(
        update={
            "max_points_per_message": MAX_POINTS,
            "max_payload_bytes": MAX_BYTES,
            "mqtt_scope": "all",
        }
    )
    now = datetime.now(UTC)
    cases = bad_inputs(settings.mqtt_topic_root, now)
    ms = int(now.timestamp() * 1000)
    assert len(cases) >= 50
    assert len({what for what, *_ in cases}) == len(cases)
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)) as ingest, publisher(mqtt_url) as client:
        for n, (_, topic, body, _) in enumerate(cases):
            await client.publish(topic, body, qos=1)
            good = orjson.dumps({"ts": ms + n, "metrics": {"marker": n}})
            await client.publish(topics.telemetry(platform, "good"), good, qos=1)
        await eventually(lambda: scalar(db, "SELECT count(*) = %s FROM telemetry", len(cases)))
        await eventually(lambda: scalar(db, "SELECT count(*) = %s FROM dead_letters", len(cases)))

    rows = await (
        await db.execute("SELECT topic, payload, reason FROM dead_letters ORDER BY id")
    ).fetchall()
    assert [(what, r[2]) for (what, *_), r in zip(cases, rows, strict=True)] == [
        (what, reason) for what, _, _, reason in cases
    ]
    assert [(r[0], bytes(r[1])) for r in rows] == [(topic, body) for _, topic, body, _ in cases]
    markers = await (await db.execute("SELECT value FROM telemetry ORDER BY value")).fetchall()
    assert [int(m[0]) for m in markers] == list(range(len(cases)))
    rejected = sum(ingest.stats.rejected.values())
    assert rejected == len(cases)


def test_the_cases_cover_every_reason_a_message_can_earn() -> None:
    reasons = {reason for *_, reason in bad_inputs("iiot/v1", datetime.now(UTC))}
    # Every refusal reason of the contract that a message can earn on MQTT appears.
    assert reasons >= {
        "invalid_json",
        "invalid_shape",
        "invalid_value",
        "invalid_metric_name",
        "invalid_timestamp",
        "timestamp_out_of_window",
        "too_many_points",
        "payload_too_large",
        "unknown_platform",
        "bad_platform_id",
        "bad_device_id",
        "bad_gateway_id",
        "unknown_device",
        "unknown_gateway",
        "invalid_status",
    }


def sparkplug_bad_inputs(group: str, now_ms: int) -> list[tuple[str, str, bytes, str]]:
    """(what, topic, payload, expected reason) after an NBIRTH of edge node e1 with bdSeq 0.

    The good NDATA sent after each carries the seq the edge node is at, so that bad messages
    without a usable seq do not count as gaps; those with one take the next seq themselves.
    """
    node = f"spBv1.0/{group}/NDATA/e1"
    ok = MetricIn(None, 1.0, alias=1)
    return [
        ("garbage bytes", node, b"\xff\xff\xff\xff", "invalid_protobuf"),
        ("JSON on a Sparkplug topic", node, j({"metrics": {"v": 1}}), "invalid_protobuf"),
        ("empty protobuf", node, b"", "invalid_protobuf"),
        (
            "truncated protobuf",
            node,
            encode_payload([MetricIn("Temperature", 1.0)], seq=1, timestamp_ms=now_ms)[:-4],
            "invalid_protobuf",
        ),
        ("NaN double", node, encode_payload([MetricIn("v", math.nan)], seq=1), "invalid_value"),
        (
            "infinite float",
            node,
            encode_payload([MetricIn("v", math.inf, FLOAT)], seq=1),
            "invalid_value",
        ),
        (
            "unknown alias",
            node,
            encode_payload([MetricIn(None, 1.0, alias=99)], seq=1),
            "unknown_alias",
        ),
        (
            "metric without name or alias",
            node,
            encode_payload([MetricIn(None, 1.0)], seq=1),
            "invalid_shape",
        ),
        ("no seq", node, encode_payload([ok]), "invalid_seq"),
        ("seq beyond 255", node, encode_payload([ok], seq=300), "invalid_seq"),
        (
            "DDATA before its DBIRTH",
            f"spBv1.0/{group}/DDATA/e1/never-born",
            encode_payload([MetricIn("v", 1.0)], seq=1),
            "no_birth",
        ),
        (
            "NDATA before its NBIRTH",
            f"spBv1.0/{group}/NDATA/e2",
            encode_payload([MetricIn("v", 1.0)], seq=0),
            "no_birth",
        ),
        (
            "stale NDEATH",
            f"spBv1.0/{group}/NDEATH/e1",
            encode_payload([MetricIn("bdSeq", 9, INT64)]),
            "stale_death",
        ),
        (
            "Sparkplug bad device id",
            f"spBv1.0/{group}/DDATA/e1/bad device",
            encode_payload([ok], seq=1),
            "bad_device_id",
        ),
        (
            "bad edge node id",
            f"spBv1.0/{group}/NDATA/-e1",
            encode_payload([ok], seq=1),
            "bad_edge_node_id",
        ),
        (
            "metric a day ahead",
            node,
            encode_payload([MetricIn(None, 1.0, alias=1, timestamp_ms=now_ms + 86_400_000)], seq=1),
            "timestamp_out_of_window",
        ),
        (
            "too many metrics",
            node,
            encode_payload([MetricIn(f"m{n}", n) for n in range(MAX_POINTS + 1)], seq=1),
            "too_many_points",
        ),
        (
            "oversized protobuf",
            node,
            encode_payload([MetricIn("s", "x" * MAX_BYTES, STRING)], seq=1),
            "payload_too_large",
        ),
        (
            "metric name with a control character",
            node,
            encode_payload([MetricIn("a\x01b", 1.0)], seq=1),
            "invalid_metric_name",
        ),
    ]


async def test_bad_sparkplug_input_is_dead_lettered_and_the_edge_node_goes_on(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    mqtt_url: str,
    unique: str,
) -> None:
    group = f"sp-{unique}"
    settings = ingest_settings.model_copy(
        update={
            "max_points_per_message": MAX_POINTS,
            "max_payload_bytes": MAX_BYTES,
            "sparkplug_groups": f"{group}={platform}",
            "sparkplug_host_id": "",
        }
    )
    ms = int(datetime.now(UTC).timestamp() * 1000)
    cases = sparkplug_bad_inputs(group, ms)
    birth = encode_payload(
        [MetricIn("bdSeq", 0, INT64), MetricIn("Temperature", 0.5, alias=1)], seq=0, timestamp_ms=ms
    )
    seq = 1
    host = MqttIngest(settings, pool, sparkplug_host=True)
    async with running(host) as ingest, publisher(mqtt_url) as client:
        await client.publish(f"spBv1.0/{group}/NBIRTH/e1", birth, qos=1)
        for n, (_, topic, body, _) in enumerate(cases):
            await client.publish(topic, body, qos=1)
            good = encode_payload(
                [MetricIn(None, float(n + 1), alias=1)], seq=seq, timestamp_ms=ms + n + 1
            )
            seq += 1
            await client.publish(f"spBv1.0/{group}/NDATA/e1", good, qos=1)
        expected_points = len(cases) + 1  # the birth's value and one per good NDATA
        await eventually(lambda: scalar(db, "SELECT count(*) = %s FROM telemetry", expected_points))
        await eventually(lambda: scalar(db, "SELECT count(*) = %s FROM dead_letters", len(cases)))

    rows = await (await db.execute("SELECT topic, reason FROM dead_letters ORDER BY id")).fetchall()
    assert [(what, r[1]) for (what, *_), r in zip(cases, rows, strict=True)] == [
        (what, reason) for what, _, _, reason in cases
    ]
    values = await (await db.execute("SELECT value FROM telemetry ORDER BY time")).fetchall()
    assert [v[0] for v in values] == [0.5] + [float(n + 1) for n in range(len(cases))]
    assert ingest.sparkplug is not None
    stats = ingest.sparkplug.sessions.stats
    # Only the bad messages that carried a seq of their own moved it: none left a gap behind.
    assert stats.gaps == 0


def test_mqtt_and_sparkplug_cases_together_are_more_than_fifty_kinds() -> None:
    now = datetime.now(UTC)
    kinds = bad_inputs("iiot/v1", now) + sparkplug_bad_inputs("g", int(now.timestamp() * 1000))
    assert len({what for what, *_ in kinds}) == len(kinds) >= 70
