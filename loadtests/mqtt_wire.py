"""A minimal MQTT 3.1.1 publisher (QoS 1, Last Will, keepalive) on one plain socket.

Why not paho-mqtt here: each paho client holds three file descriptors (its socket and a wake-up
socket pair) and waits on them with `select()`, which cannot watch descriptors above 1,024; a
thousand gateways in one process went past that and paho closed their connections. This client
holds one socket, blocks in `recv` (a greenlet switch under locust's gevent), and does only
what the load test needs: CONNECT with a Will, PUBLISH at QoS 1 and wait for its PUBACK,
PINGREQ, and either a clean DISCONNECT or a dropped socket (which makes the broker publish the
Will).
"""

import socket
import struct
import threading
import time


class MqttError(Exception):
    pass


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


class MqttConnection:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 30,
        timeout: float = 60.0,
    ) -> None:
        """`will`: (topic, payload, retain), published by the broker at QoS 1."""
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timeout = timeout
        self._acks: dict[int, threading.Event] = {}
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._closed = False
        flags = 0x02  # clean session
        payload = _string(client_id.encode())
        if will is not None:
            topic, message, retain = will
            flags |= 0x04 | 0x08 | (0x20 if retain else 0)  # will, QoS 1, retain
            payload += _string(topic.encode()) + _string(message)
        header = _string(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
        self._sock.sendall(_packet(0x10, header + payload))
        kind, body = self._read()
        if kind != 0x20 or body[1] != 0:
            raise MqttError(f"connection refused (CONNACK {body.hex()})")
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._pinger = threading.Thread(target=self._ping_loop, args=(keepalive,), daemon=True)
        self._pinger.start()

    @property
    def connected(self) -> bool:
        return not self._closed

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publishes at QoS 1 and returns once the broker acknowledged it."""
        with self._send_lock:
            self._next_id = self._next_id % 65535 + 1
            packet_id = self._next_id
            acked = self._acks[packet_id] = threading.Event()
            body = _string(topic.encode()) + struct.pack("!H", packet_id) + payload
            self._send(_packet(0x32 | (0x01 if retain else 0), body))
        if not acked.wait(self._timeout):
            raise MqttError(f"no PUBACK within {self._timeout} s for {topic}")
        if self._closed and packet_id in self._acks:
            raise MqttError("the connection closed before the PUBACK")

    def disconnect(self) -> None:
        """A clean end: the broker discards the Will."""
        try:
            self._send(b"\xe0\x00")
        finally:
            self.drop()

    def drop(self) -> None:
        """Closes the socket without DISCONNECT: to the broker, the network went away."""
        if not self._closed:
            self._closed = True
            self._sock.close()
            for event in self._acks.values():
                event.set()

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise MqttError("not connected")
        self._sock.sendall(data)

    def _read_loop(self) -> None:
        try:
            while not self._closed:
                kind, body = self._read(timeout=None)
                if kind == 0x40:  # PUBACK
                    event = self._acks.pop(struct.unpack("!H", body[:2])[0], None)
                    if event is not None:
                        event.set()
        except (OSError, MqttError):
            self.drop()

    def _ping_loop(self, keepalive: int) -> None:
        while not self._closed:
            time.sleep(keepalive / 2)
            try:
                with self._send_lock:
                    self._send(b"\xc0\x00")
            except (OSError, MqttError):
                self.drop()

    def _read(self, timeout: float | None = 30.0) -> tuple[int, bytes]:
        self._sock.settimeout(timeout)
        first = self._exactly(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first & 0xF0, self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise MqttError("the broker closed the connection")
            data += chunk
        return bytes(data)
