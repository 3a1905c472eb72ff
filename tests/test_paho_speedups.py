"""ingest/paho_speedups.py's own parsing, against paho's: the packets ingest parses itself must
come out as paho reads them, and everything else must be left to paho."""

import pytest
from paho.mqtt import _packet
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from ingest.paho_speedups import Publish, parse_publish, read_in_bulk, share_property_tables


def variable_byte_integer(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int,
    mid: int = 7,
    version5: bool,
    props: bytes = b"",
    dup: bool = True,
) -> bytes:
    """A PUBLISH packet as a broker sends it (retain set, to show it is ignored)."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if version5:
        body += variable_byte_integer(len(props)) + props
    body += payload
    command = 0x30 | (0x08 if dup else 0) | (qos << 1) | 0x01
    return bytes([command]) + variable_byte_integer(len(body)) + body


@pytest.mark.parametrize("version5", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", [0, 100, 200, 20_000, 3_000_000])
@pytest.mark.parametrize("dup", [True, False])
def test_a_whole_publish_is_read_as_paho_reads_it(
    version5: bool, qos: int, size: int, dup: bool
) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    packet = publish("iiot/v1/é/d".encode(), payload, qos=qos, version5=version5, dup=dup)
    before, after = b"\xd0\x00", b"\x40\x02\x00\x01"  # a PINGRESP before, a PUBACK after
    parsed = parse_publish(before + packet + after, len(before), version5)
    assert parsed is not None
    (topic, body, mid, got_qos, got_dup), end = parsed
    assert end == len(before) + len(packet)
    fixed_header = 2  # the command byte and the length's bytes, the last without bit 7
    while packet[fixed_header - 1] & 0x80:
        fixed_header += 1
    version = MQTTProtocolVersion.MQTTv5 if version5 else MQTTProtocolVersion.MQTTv311
    paho = _packet.decode_publish(packet[0], packet[fixed_header:], version)
    assert (topic, body, mid, got_qos, got_dup) == (
        paho.topic.decode(),
        paho.payload,
        paho.mid,
        paho.qos,
        bool(paho.dup),
    )
    assert got_dup is dup


@pytest.mark.parametrize(
    ("packet", "version5"),
    [
        (publish(b"t", b"p", qos=2, version5=False), False),  # QoS 2: paho keeps its state
        (publish(b"", b"p", qos=1, version5=True), True),  # a topic alias
        (publish(b"t", b"p", qos=1, version5=True, props=b"\x02\x00\x00\x00\x3c"), True),
        (publish(b"\xff\xfe", b"p", qos=1, version5=False), False),  # topic not UTF-8
        (publish(b"t", b"p" * 300, qos=1, version5=False)[:-1], False),  # cut off
        (publish(b"t", b"p" * 300, qos=1, version5=False)[:2], False),  # cut in its length
        (b"\x40\x02\x00\x01", False),  # a PUBACK
    ],
    ids=["qos2", "alias", "properties", "utf8", "cut-body", "cut-length", "puback"],
)
def test_other_packets_are_left_to_paho(packet: bytes, version5: bool) -> None:
    assert parse_publish(packet, 0, version5) is None


def test_shared_property_tables_unpack_what_paho_packs() -> None:
    share_property_tables()
    sent = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    sent.UserProperty = [("site", "a")]
    sent.MessageExpiryInterval = 60
    sent.ContentType = "application/json"
    received = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    received.unpack(sent.pack())  # type: ignore[no-untyped-call]
    assert (received.UserProperty, received.MessageExpiryInterval, received.ContentType) == (
        [("site", "a")],
        60,
        "application/json",
    )
    # Unpacked again, an object holds only the new packet's properties.
    received.unpack(Properties(PacketTypes.PUBLISH).pack())  # type: ignore[no-untyped-call]
    assert not hasattr(received, "ContentType")
    with pytest.raises(MQTTException):  # names are still checked
        sent.NoSuchProperty = 1


@pytest.mark.parametrize("dup", [True, False])
def test_a_publish_paho_reads_keeps_its_dup_flag(dup: bool) -> None:
    """Packets ingest does not parse (properties, split across reads) reach it through paho's
    on_message: the DUP flag must come along."""
    received: list[Publish] = []
    client = Client(CallbackAPIVersion.VERSION2)
    read_in_bulk(client, on_publish=lambda *publish: received.append(publish))
    message = MQTTMessage(mid=9, topic=b"iiot/v1/p/d/telemetry")
    message.payload, message.qos, message.dup = b"{}", 1, dup
    client.on_message(client, None, message)  # type: ignore[misc]
    assert received == [("iiot/v1/p/d/telemetry", b"{}", 9, 1, dup)]
