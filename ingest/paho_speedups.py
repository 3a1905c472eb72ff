"""Measured fixes for paho-mqtt's receive path (cProfile and py-spy of `make bench`).

`share_property_tables`: paho builds a `Properties` object for every MQTT 5 packet it reads,
and each one rebuilds three lookup tables in `__init__` (and `clear()` recompresses every
property name): more than half of ingest's CPU per message when it was profiled.
The tables are never modified after construction, so every instance can share one set.

`read_in_bulk` and `acknowledge`: see their docstrings.

All three rely on paho's private attributes; ingest/mqtt_internals.py checks them at start-up,
and `read_publicly` and `acknowledge_each` are paho's public path when they are missing.
"""

import ssl
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from paho.mqtt.client import PUBACK, PUBLISH, MQTTMessage, MQTTv5
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_applied = False

# (topic, payload, packet id, QoS, DUP) of a received PUBLISH. DUP: the broker sends it again
# (a session resumed with it unacknowledged), so it may be stored already (ingest/redelivery.py).
Publish = tuple[str, bytes, int, int, bool]
OnPublish = Callable[[str, bytes, int, int, bool], None]


def share_property_tables() -> None:
    """Makes paho's `Properties` share its constant tables (idempotent, process-wide)."""
    global _applied  # noqa: PLW0603 - a process-wide patch is applied once
    if _applied:
        return
    template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types, names, properties = template.types, template.names, template.properties
    compressed = [name.replace(" ", "") for name in names]

    def __init__(self: Any, packetType: int) -> None:
        # Past paho's __setattr__, which checks every name it is given (4 calls a packet).
        self.__dict__.update(packetType=packetType, types=types, names=names, properties=properties)

    def clear(self: Any) -> None:
        # paho clears every Properties it unpacks, nearly always a fresh one holding only the
        # four attributes above: then there is nothing to pop (27 pops a packet otherwise).
        attributes = self.__dict__
        if len(attributes) > 4:
            for name in compressed:
                attributes.pop(name, None)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    _applied = True


# Packets one readable-socket callback handles before it lets other tasks (the writer) run.
_PACKETS_PER_READ = 100
_CHUNK = 65536
_DUP = 0x08  # the DUP flag's bit in a PUBLISH's command byte


class _EmptyMatcher(MQTTMatcher):
    """paho's per-topic callback table, skipped while it is empty (ingest never fills it)."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)  # type: ignore[no-untyped-call,no-any-return]


def read_in_bulk(client: PahoClient, on_publish: OnPublish | None = None) -> None:
    """Makes one paho client read its socket in chunks and handle every packet that is there.

    paho reads each packet with three or more `recv` calls (command byte, each length byte,
    body) and handles one packet per readable-socket callback, so a backlog costs an event
    loop turn, an epoll call and several system calls per message. Here the socket is read
    64 KiB at a time, paho's reads are served from that buffer, and one callback handles up
    to _PACKETS_PER_READ packets and always empties the buffer (nothing may stay buffered
    while the socket looks idle, or it would wait for the next packet to arrive).

    `on_publish`: received messages go to it as (topic, payload, packet id, QoS, DUP), in arrival
    order, instead of to paho's on_message. A PUBLISH that `parse_publish` takes is parsed
    here (paho spent about a fifth of ingest's CPU building an MQTTMessage, its Properties
    and aiomqtt's Message for each); any other packet, and any PUBLISH split across reads,
    goes through paho as before.
    """
    reader = _BulkReader(client, on_publish)
    client._sock_recv = reader.sock_recv  # type: ignore[method-assign]
    client.loop_read = reader.loop_read  # type: ignore[method-assign]
    client._on_message_filtered = _EmptyMatcher()  # type: ignore[no-untyped-call]
    if on_publish is not None:
        client.on_message = _on_message(on_publish, then=None)


def read_publicly(client: PahoClient, on_publish: OnPublish) -> None:
    """paho's public path, for releases whose internals `read_in_bulk` cannot rely on
    (ingest/mqtt_internals.py): paho reads and parses every packet, and each message goes to
    `on_publish` from paho's on_message, then to the on_message set before (aiomqtt's, which
    wakes its message iterator)."""
    client.on_message = _on_message(on_publish, then=client.on_message)


def _on_message(on_publish: OnPublish, then: Any) -> Callable[[PahoClient, Any, MQTTMessage], None]:
    def on_message(paho: PahoClient, userdata: Any, message: MQTTMessage) -> None:
        dup = bool(message.dup)
        on_publish(message.topic, bytes(message.payload), message.mid, message.qos, dup)
        if then is not None:
            then(paho, userdata, message)

    return on_message


class _BulkReader:
    def __init__(self, client: PahoClient, on_publish: OnPublish | None) -> None:
        self.client = client
        self.on_publish = on_publish
        self.version5 = client._protocol == MQTTv5
        self.data = b""
        self.position = 0
        self.reading: object = None  # the socket `data` came from; a new one drops the rest

    def sock_recv(self, bufsize: int) -> bytes:
        client = self.client
        sock = client._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        if sock is not self.reading:
            self.data, self.position, self.reading = b"", 0, sock
        if self.position >= len(self.data):
            try:
                self.data = sock.recv(_CHUNK)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError from err
            except ssl.SSLWantWriteError as err:
                client._call_socket_register_write()
                raise BlockingIOError from err
            self.position = 0
            if not self.data:
                return b""  # closed by the peer
            client._last_bytes_received = time.monotonic()  # paho's keepalive reads it
        chunk = self.data[self.position : self.position + bufsize]
        self.position += len(chunk)
        return chunk

    def buffered(self) -> bool:
        return self.client._sock is self.reading and self.position < len(self.data)

    def take_publish(self, deliver: OnPublish) -> bool:
        """Hands over the PUBLISH at the buffer's position if `parse_publish` takes it, at a
        packet boundary of paho's, and moves past it."""
        client = self.client
        if (
            self.position >= len(self.data)
            or client._in_packet["command"]
            or client._sock is not self.reading
        ):
            return False
        parsed = parse_publish(self.data, self.position, self.version5)
        if parsed is None:
            return False
        publish, self.position = parsed
        deliver(*publish)
        return True

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        client, on_publish = self.client, self.on_publish
        handled = 0
        while True:
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            if on_publish is not None and self.take_publish(on_publish):
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            else:
                rc = client._packet_read()
                if rc > 0:
                    return client._loop_rc_handle(rc)
            handled += 1
            # AGAIN with bytes buffered: paho paused inside a large packet; go on with it.
            if not self.buffered() and (
                rc == MQTTErrorCode.MQTT_ERR_AGAIN or handled >= _PACKETS_PER_READ
            ):
                return MQTTErrorCode.MQTT_ERR_SUCCESS


def parse_publish(data: bytes, start: int, version5: bool) -> tuple[Publish, int] | None:
    """The PUBLISH packet at data[start], and where it ends: if it is QoS 0 or 1, lies whole in
    `data`, names its topic (no alias) in valid UTF-8 and carries no MQTT 5 properties.
    None for anything else, which paho then reads."""
    command = data[start]
    qos = (command >> 1) & 3
    if command & 0xF0 != PUBLISH or qos > 1:
        return None
    header = _variable_byte_integer(data, start + 1)
    if header is None:
        return None
    length, at = header
    end = at + length
    if end > len(data) or at + 2 > end:
        return None
    topic_end = at + 2 + ((data[at] << 8) | data[at + 1])
    body = topic_end + 2 * qos + version5  # past the packet id and the properties' length
    if topic_end == at + 2 or body > end or (version5 and data[body - 1] != 0):
        return None
    try:
        topic = data[at + 2 : topic_end].decode()
    except UnicodeDecodeError:
        return None
    mid = (data[topic_end] << 8) | data[topic_end + 1] if qos else 0
    return (topic, data[body:end], mid, qos, bool(command & _DUP)), end


def _variable_byte_integer(data: bytes, at: int) -> tuple[int, int] | None:
    """MQTT's variable byte integer at data[at] and the position after it; None if cut off."""
    value = 0
    for shift in (0, 7, 14, 21):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    return None


_PUBACK = struct.Struct("!BBH")  # fixed header, remaining length 2, packet id (success)


def acknowledge(client: PahoClient, acks: Sequence[tuple[int, int]]) -> MQTTErrorCode:
    """Acknowledges received messages, given as (packet id, QoS), in this order.

    paho queues each acknowledgement as a packet of its own, asks the event loop to watch the
    socket for each, and writes each with a `send` call of its own: 5,000 system calls for a
    batch of 5,000 messages. Here the PUBACKs of a batch (4 bytes each, the same in MQTT 3.1.1
    and 5 for success) are one packet in paho's queue, written as one. Messages of QoS 2 (which
    ingest does not subscribe with) are left to paho, in order.
    """
    if client._sock is None:
        return MQTTErrorCode.MQTT_ERR_NO_CONN
    if any(qos == 2 for _, qos in acks):
        return acknowledge_each(client, acks)
    pack = _PUBACK.pack
    data = b"".join([pack(PUBACK, 2, mid) for mid, qos in acks if qos == 1])
    if not data:
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    return client._packet_queue(PUBACK, data, 0, 1)


def acknowledge_each(client: PahoClient, acks: Sequence[tuple[int, int]]) -> MQTTErrorCode:
    """paho's public path: one `ack` per received message (packet id, QoS), in this order."""
    if not client.is_connected():
        return MQTTErrorCode.MQTT_ERR_NO_CONN  # paho would queue them for the next connection
    for mid, qos in acks:
        if qos > 0 and (rc := client.ack(mid, qos)) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return rc
    return MQTTErrorCode.MQTT_ERR_SUCCESS
