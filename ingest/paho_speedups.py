"""Measured fixes for paho-mqtt's receive path (cProfile and py-spy of `make bench`).

`share_property_tables`: paho builds a `Properties` object for every MQTT 5 packet it reads,
and each one rebuilds three lookup tables in `__init__` (and `clear()` recompresses every
property name): about 55 µs per received message, more than half of ingest's CPU per message.
The tables are never modified after construction, so every instance can share one set.

`read_in_bulk` and `acknowledge`: see their docstrings.
"""

import ssl
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from paho.mqtt.client import PUBACK
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_applied = False


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


class _EmptyMatcher(MQTTMatcher):
    """paho's per-topic callback table, skipped while it is empty (ingest never fills it)."""

    def iter_match(self, topic: str) -> Iterator[Any]:
        if not self._root._children:
            return iter(())
        return super().iter_match(topic)  # type: ignore[no-untyped-call,no-any-return]


def read_in_bulk(client: PahoClient) -> None:
    """Makes one paho client read its socket in chunks and handle every packet that is there.

    paho reads each packet with three or more `recv` calls (command byte, each length byte,
    body) and handles one packet per readable-socket callback, so a backlog costs an event
    loop turn, an epoll call and several system calls per message. Here the socket is read
    64 KiB at a time, paho's reads are served from that buffer, and one callback handles up
    to _PACKETS_PER_READ packets and always empties the buffer (nothing may stay buffered
    while the socket looks idle, or it would wait for the next packet to arrive).
    """
    data = b""
    position = 0
    reading: object = None  # the socket `data` came from; a new connection drops the rest

    def sock_recv(bufsize: int) -> bytes:
        nonlocal data, position, reading
        sock = client._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        if sock is not reading:
            data, position, reading = b"", 0, sock
        if position >= len(data):
            try:
                data = sock.recv(_CHUNK)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError from err
            except ssl.SSLWantWriteError as err:
                client._call_socket_register_write()
                raise BlockingIOError from err
            position = 0
            if not data:
                return b""  # closed by the peer
        chunk = data[position : position + bufsize]
        position += len(chunk)
        return chunk

    def buffered() -> bool:
        return client._sock is reading and position < len(data)

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        handled = 0
        while True:
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)
            handled += 1
            # AGAIN with bytes buffered: paho paused inside a large packet; go on with it.
            if not buffered() and (
                rc == MQTTErrorCode.MQTT_ERR_AGAIN or handled >= _PACKETS_PER_READ
            ):
                return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._sock_recv = sock_recv  # type: ignore[method-assign]
    client.loop_read = loop_read  # type: ignore[method-assign]
    client._on_message_filtered = _EmptyMatcher()  # type: ignore[no-untyped-call]


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
        for mid, qos in acks:
            if qos and (rc := client.ack(mid, qos)) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    pack = _PUBACK.pack
    data = b"".join([pack(PUBACK, 2, mid) for mid, qos in acks if qos == 1])
    if not data:
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    return client._packet_queue(PUBACK, data, 0, 1)
