"""Topic parsing: identifiers cannot smuggle wildcards, separators, path tricks or SQL."""

import pytest

from ingest.errors import Rejected
from ingest.topics import Address, TopicScheme

SCHEME = TopicScheme("iiot/v1")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("iiot/v1/demo/press-01/telemetry", Address("demo", "press-01")),
        (
            "iiot/v1/acme-steel/Line1.PLC:7_a/telemetry",
            Address("acme-steel", "Line1.PLC:7_a"),
        ),
        ("iiot/v1/0/0/telemetry", Address("0", "0")),
    ],
)
def test_valid_topics(topic: str, expected: Address) -> None:
    assert SCHEME.parse(topic) == expected
    assert SCHEME.telemetry(expected.platform, expected.device) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/v1/demo/d/telemetry", "bad_topic"),
        ("iiot/v2/demo/d/telemetry", "bad_topic"),
        ("iiot/v1/demo/d/state", "bad_topic"),
        ("iiot/v1/demo/d/telemetry/extra", "bad_topic"),
        ("iiot/v1/demo/telemetry", "bad_topic"),
        ("iiot/v1/Demo/d/telemetry", "bad_platform_id"),
        ("iiot/v1/-demo/d/telemetry", "bad_platform_id"),
        ("iiot/v1//d/telemetry", "bad_platform_id"),
        ("iiot/v1/de'mo/d/telemetry", "bad_platform_id"),
        ("iiot/v1/" + "p" * 64 + "/d/telemetry", "bad_platform_id"),
        ("iiot/v1/demo/+/telemetry", "bad_device_id"),
        ("iiot/v1/demo/#/telemetry", "bad_device_id"),
        ("iiot/v1/demo/../telemetry", "bad_device_id"),
        ("iiot/v1/demo/.hidden/telemetry", "bad_device_id"),
        ("iiot/v1/demo/d';DROP TABLE devices;--/telemetry", "bad_device_id"),
        ("iiot/v1/demo/d d/telemetry", "bad_device_id"),
        ("iiot/v1/demo/d\x00/telemetry", "bad_device_id"),
        ("iiot/v1/demo/" + "d" * 129 + "/telemetry", "bad_device_id"),
        ("iiot/v1/demo//telemetry", "bad_device_id"),
        ("iiot/v1/demo/gateway/edge-1/telemetry", "bad_topic"),
        ("iiot/v1/demo/gateways/+/telemetry", "bad_gateway_id"),
        ("iiot/v1/demo/gateways/../telemetry", "bad_gateway_id"),
        ("iiot/v1/demo/gateways/g/d/telemetry", "bad_topic"),
    ],
)
def test_invalid_topics_are_rejected(topic: str, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        SCHEME.parse(topic)
    assert caught.value.reason == reason


def test_subscription_filters() -> None:
    topics = [
        "iiot/v1/+/+/telemetry",
        "iiot/v1/+/+/status",
        "iiot/v1/+/gateways/+/telemetry",
        "iiot/v1/+/gateways/+/status",
    ]
    assert SCHEME.filters() == topics
    assert SCHEME.filters("ingest") == [f"$share/ingest/{t}" for t in topics]
