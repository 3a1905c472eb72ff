"""The JSON payload contract of docs/contract.md, accepted and refused."""

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ingest.decoding import TelemetryDecoder
from ingest.errors import Rejected
from ingest.settings import Limits

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.fixture
def decoder() -> TelemetryDecoder:
    return TelemetryDecoder(Limits(max_payload_bytes=4096, max_points_per_message=5))


def decode(decoder: TelemetryDecoder, document: object) -> list[tuple[datetime, str, float]]:
    return decoder.decode("p", "d", orjson.dumps(document), NOW).points


def test_one_reading_with_epoch_milliseconds(decoder: TelemetryDecoder) -> None:
    points = decode(decoder, {"ts": NOW_MS - 1500, "metrics": {"temp": 21.5, "count": 3}})
    ts = NOW - timedelta(milliseconds=1500)
    assert points == [(ts, "temp", 21.5), (ts, "count", 3.0)]


def test_a_list_of_readings_with_rfc3339_times(decoder: TelemetryDecoder) -> None:
    telemetry = decoder.decode(
        "p",
        "d",
        orjson.dumps(
            [
                {"ts": "2026-11-24T11:59:00Z", "metrics": {"a": 1}},
                {"ts": "2026-11-24T19:59:30+08:00", "metrics": {"a": 2}},
            ]
        ),
        NOW,
    )
    assert telemetry.points == [
        (datetime(2026, 11, 24, 11, 59, tzinfo=UTC), "a", 1.0),
        (datetime(2026, 11, 24, 11, 59, 30, tzinfo=UTC), "a", 2.0),
    ]
    assert (telemetry.first, telemetry.last) == (telemetry.points[0][0], telemetry.points[1][0])
    assert telemetry.historical is False


def test_missing_time_means_arrival_time_and_booleans_are_numbers(
    decoder: TelemetryDecoder,
) -> None:
    assert decode(decoder, {"metrics": {"running": True, "fault": False}}) == [
        (NOW, "running", 1.0),
        (NOW, "fault", 0.0),
    ]


def test_historical_flag_is_kept(decoder: TelemetryDecoder) -> None:
    document = {"ts": NOW_MS - 3_600_000, "historical": True, "metrics": {"a": 1}}
    assert decoder.decode("p", "d", orjson.dumps(document), NOW).historical is True


def test_sparkplug_style_metric_names_are_allowed(decoder: TelemetryDecoder) -> None:
    assert (
        decode(decoder, {"metrics": {"Line 1/Motor:speed.rpm": 1450}})[0][1]
        == "Line 1/Motor:speed.rpm"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "invalid_json"),
        (b'{"metrics": {"a": NaN}}', "invalid_json"),
        # orjson refuses numbers beyond float64 and integers beyond 64 bits as invalid JSON.
        (b'{"metrics": {"a": 1e400}}', "invalid_json"),
        (b'{"metrics": {"a": -1e400}}', "invalid_json"),
        (b'{"metrics": {"a": "12"}}', "invalid_value"),
        (b'{"metrics": {"a": null}}', "invalid_value"),
        (b'{"metrics": {"a": [1]}}', "invalid_value"),
        (b'{"metrics": {"a": 1' + b"0" * 400 + b"}}", "invalid_json"),
        (b'{"metrics": {}}', "invalid_shape"),
        (b"[]", "invalid_shape"),
        (b"42", "invalid_shape"),
        (b'"text"', "invalid_shape"),
        (b'{"metrics": [1, 2]}', "invalid_shape"),
        (b'{"ts": 1, "values": {"a": 1}}', "invalid_shape"),
        (b'{"metrics": {"a": 1}, "historical": "yes"}', "invalid_shape"),
        (b'[{"metrics": {"a": 1}}, {"metrics": {"b": 1}, "historical": true}]', "invalid_shape"),
        (b'{"metrics": {"": 1}}', "invalid_metric_name"),
        (b'{"metrics": {" a": 1}}', "invalid_metric_name"),
        (b'{"metrics": {"a\\u0000b": 1}}', "invalid_metric_name"),
        (b'{"metrics": {"' + b"m" * 129 + b'": 1}}', "invalid_metric_name"),
        (b'{"ts": "2026-11-24 12:00:00", "metrics": {"a": 1}}', "invalid_timestamp"),
        (b'{"ts": "yesterday", "metrics": {"a": 1}}', "invalid_timestamp"),
        (b'{"ts": true, "metrics": {"a": 1}}', "invalid_timestamp"),
        (b'{"ts": 1e300, "metrics": {"a": 1}}', "invalid_timestamp"),
        (b'{"ts": {"s": 1}, "metrics": {"a": 1}}', "invalid_timestamp"),
        (b'{"metrics": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}}', "too_many_points"),
        (b'{"metrics": {"a": 1}, "pad": "' + b"x" * 4096 + b'"}', "payload_too_large"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(
    decoder: TelemetryDecoder, raw: bytes, reason: str
) -> None:
    with pytest.raises(Rejected) as caught:
        decoder.decode("p", "d", raw, NOW)
    assert caught.value.reason == reason
    assert caught.value.platform == "p"
    assert caught.value.detail


@pytest.mark.parametrize(
    "ts",
    [
        NOW_MS - 7 * 86_400_000 - 1,  # older than the 7-day window
        NOW_MS + 600_001,  # more than 10 minutes ahead
        "2000-01-01T00:00:00Z",
    ],
)
def test_times_outside_the_window_are_rejected(decoder: TelemetryDecoder, ts: object) -> None:
    with pytest.raises(Rejected) as caught:
        decode(decoder, {"ts": ts, "metrics": {"a": 1}})
    assert caught.value.reason == "timestamp_out_of_window"


def test_window_edges_are_accepted(decoder: TelemetryDecoder) -> None:
    assert decode(decoder, {"ts": NOW_MS - 7 * 86_400_000, "metrics": {"a": 1}})
    assert decode(decoder, {"ts": NOW_MS + 600_000, "metrics": {"a": 1}})


def test_a_gateway_message_carries_several_devices(decoder: TelemetryDecoder) -> None:
    document = {
        "devices": {
            "plc-1": {"ts": NOW_MS, "metrics": {"a": 1}},
            "plc-2": [{"ts": NOW_MS, "metrics": {"a": 2}}, {"ts": NOW_MS + 1, "metrics": {"a": 3}}],
        }
    }
    decoded = decoder.decode_gateway("p", "edge", orjson.dumps(document), NOW)
    assert [(t.device, t.gateway, [p[2] for p in t.points]) for t in decoded] == [
        ("plc-1", "edge", [1.0]),
        ("plc-2", "edge", [2.0, 3.0]),
    ]


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"plc-1": {"metrics": {"a": 1}}}, "invalid_shape"),
        ({"devices": {}}, "invalid_shape"),
        ({"devices": [1]}, "invalid_shape"),
        ({"devices": {"a": {"metrics": {"a": 1}}}, "extra": 1}, "invalid_shape"),
        ({"devices": {"bad id": {"metrics": {"a": 1}}}}, "bad_device_id"),
        ({"devices": {"a": {"metrics": {"a": "x"}}}}, "invalid_value"),
        # The point limit (5 here) is per message, across its devices.
        (
            {
                "devices": {
                    "a": {"metrics": {"a": 1, "b": 2, "c": 3}},
                    "b": {"metrics": {"a": 1, "b": 2, "c": 3}},
                }
            },
            "too_many_points",
        ),
    ],
)
def test_bad_gateway_messages_are_rejected_whole(
    decoder: TelemetryDecoder, document: object, reason: str
) -> None:
    with pytest.raises(Rejected) as caught:
        decoder.decode_gateway("p", "edge", orjson.dumps(document), NOW)
    assert caught.value.reason == reason


def test_a_key_given_twice_in_an_object_keeps_its_last_value(decoder: TelemetryDecoder) -> None:
    # The fast parser (orjson) keeps the last of duplicate keys; docs/contract.md states it.
    payload = b'{"ts": %d, "metrics": {"temp": 1, "rpm": 5, "temp": 2}, "ts": %d}' % (
        NOW_MS - 2000,
        NOW_MS - 1000,
    )
    telemetry = decoder.decode("p", "d", payload, NOW)
    ts = NOW - timedelta(milliseconds=1000)
    assert telemetry.points == [(ts, "temp", 2.0), (ts, "rpm", 5.0)]
