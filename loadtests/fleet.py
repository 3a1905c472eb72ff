"""A simulated fleet: gateways that each carry many devices, over MQTT, as factories run them.

Ids are deterministic, so a run can be checked afterwards: gateway `g` of a plan is
`gw-{g:05d}`; its devices are `gw-{g:05d}-d{d:04d}` (JSON gateway topic), or, for the gateways
that speak Sparkplug B (every `sparkplug_every`-th), edge node `gw-{g:05d}` with devices
`d{d:04d}`, registered by iiot as `gw-{g:05d}:d{d:04d}` (docs/contract.md).

`Gateway` speaks MQTT through `mqtt_wire.MqttConnection` (blocking calls on one socket), so it
runs the same under locust's gevent and in a plain script. It counts what it sent in a
`Tally`.
"""

import threading
import time
from dataclasses import dataclass, field

import orjson

from loadtests.mqtt_wire import MqttConnection
from loadtests.sparkplug_payloads import INT64, Metric, encode, node_topic


@dataclass(frozen=True, slots=True)
class FleetPlan:
    platform: str
    gateways: int
    devices_per_gateway: int
    sparkplug_every: int = 0  # every n-th gateway speaks Sparkplug B; 0: none
    topic_root: str = "iiot/v1"
    reading_interval: float = 60.0  # seconds between two readings of one device

    @property
    def devices(self) -> int:
        return self.gateways * self.devices_per_gateway

    def gateway_id(self, g: int) -> str:
        return f"gw-{g:05d}"

    def is_sparkplug(self, g: int) -> bool:
        return self.sparkplug_every > 0 and g % self.sparkplug_every == self.sparkplug_every - 1

    def device_names(self, g: int) -> list[str]:
        """As published: JSON device ids, or Sparkplug device names under the edge node."""
        if self.is_sparkplug(g):
            return [f"d{d:04d}" for d in range(self.devices_per_gateway)]
        return [f"{self.gateway_id(g)}-d{d:04d}" for d in range(self.devices_per_gateway)]

    def registered_id(self, g: int, name: str) -> str:
        """The device id iiot registers for a device of gateway `g`."""
        return f"{self.gateway_id(g)}:{name}" if self.is_sparkplug(g) else name


@dataclass
class Tally:
    """What the fleet sent (thread-safe; read by the controller)."""

    messages: int = 0
    points: int = 0
    historical_points: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, messages: int, points: int, historical: int = 0) -> None:
        with self.lock:
            self.messages += messages
            self.points += points
            self.historical_points += historical


class Gateway:
    """One gateway connection: status with a Last Will, then readings of its devices in turn.

    Each `tick()` sends the devices whose reading is due, so every device reports once per
    `reading_interval`. `drop()` cuts the network without a DISCONNECT, so the broker publishes
    the Will; `rebirth()` reconnects with a new session and back-fills the readings missed
    meanwhile, marked historical.
    """

    def __init__(self, plan: FleetPlan, g: int, host: str, port: int, tally: Tally) -> None:
        self.plan, self.g, self.host, self.port, self.tally = plan, g, host, port, tally
        self.id = plan.gateway_id(g)
        self.names = plan.device_names(g)
        self.sparkplug = plan.is_sparkplug(g)
        self.session = 0  # JSON session number, or Sparkplug bdSeq
        self.online = False
        self._seq = 0
        self._next = 0  # index of the next device due
        self._last_tick = 0.0
        self._down_since: float | None = None
        self._client: MqttConnection | None = None

    # -- connection ----------------------------------------------------------------------

    def connect(self) -> None:
        topic, payload = self._will()
        self._client = MqttConnection(
            self.host,
            self.port,
            f"load-{self.plan.platform}-{self.id}",
            will=(topic, payload, not self.sparkplug),
        )
        self._announce()
        self.online = True
        self._last_tick = time.monotonic()

    def drop(self) -> None:
        """The network goes away: no DISCONNECT, the broker publishes the Will."""
        if self._client is not None:
            self._client.drop()
        self._client = None
        self.online = False
        self._down_since = time.time()

    def close(self) -> None:
        """A clean stop: offline status, then DISCONNECT (the Will is not published)."""
        if self._client is None:
            return
        topic, payload = self._will()
        self._publish(topic, payload, retain=not self.sparkplug)
        self._client.disconnect()
        self._client = None
        self.online = False

    def rebirth(self) -> None:
        """Reconnect with a new session, then back-fill what was missed, marked historical."""
        down_since = self._down_since or time.time()
        self.session += 1
        self.connect()
        self.backfill(down_since, time.time())
        self._down_since = None

    def stale_will(self) -> None:
        """The previous session's Will, arriving late (a rebirth race): must change nothing."""
        if self.sparkplug:
            stale = encode([Metric("bdSeq", self.session - 1, INT64)])
            self._publish(node_topic(self.plan.platform, "NDEATH", self.id), stale)
        else:
            body = orjson.dumps({"state": "offline", "session": self.session - 1})
            self._publish(self._status_topic(), body)

    # -- readings ------------------------------------------------------------------------

    def send_all(self) -> None:
        """A reading of every device now (a storm's first message registers them all)."""
        self._send(range(len(self.names)), time.time())

    def tick(self) -> None:
        """The readings due since the last tick."""
        now = time.monotonic()
        due = int(len(self.names) * (now - self._last_tick) / self.plan.reading_interval)
        if due <= 0:
            return
        self._last_tick = now
        due = min(due, len(self.names))
        indices = [(self._next + k) % len(self.names) for k in range(due)]
        self._next = (self._next + due) % len(self.names)
        self._send(indices, time.time())

    def backfill(self, start: float, end: float) -> None:
        """One historical reading per device per interval missed in [start, end)."""
        step = self.plan.reading_interval
        t = start
        while t < end:
            self._send(range(len(self.names)), t, historical=True)
            t += step

    def _send(self, indices: range | list[int], at: float, *, historical: bool = False) -> None:
        ms = int(at * 1000)
        if self.sparkplug:
            for i in indices:
                metric = Metric(None, float(ms % 100_000), alias=1, historical=historical)
                body = encode([metric], seq=self._next_seq(), timestamp_ms=ms)
                self._publish(node_topic(self.plan.platform, "DDATA", self.id, self.names[i]), body)
                self.tally.add(1, 1, 1 if historical else 0)  # counted as acknowledged
            return
        reading: dict[str, object] = {"ts": ms, "metrics": {"v": float(ms % 100_000)}}
        if historical:
            reading["historical"] = True
        # At most 5,000 readings a message: under the broker's and iiot's message limits.
        for chunk in range(0, len(indices), 5000):
            part = list(indices)[chunk : chunk + 5000]
            body = orjson.dumps({"devices": {self.names[i]: reading for i in part}})
            self._publish(self._telemetry_topic(), body)
            self.tally.add(1, len(part), len(part) if historical else 0)

    # -- protocol details ----------------------------------------------------------------

    def _announce(self) -> None:
        if not self.sparkplug:
            body = orjson.dumps({"state": "online", "session": self.session})
            self._publish(self._status_topic(), body, retain=True)
            return
        # A new session: NBIRTH with the bdSeq of this connection's Will (iiot orders sessions
        # by arrival and ties an NDEATH to its session by bdSeq, so the rebirth race needs no
        # clock), then a DBIRTH per device defining alias 1 (with no value: only readings make
        # points); after an NDEATH a device is back only with its DBIRTH.
        birth_ms = int(time.time() * 1000)
        self._seq = 0
        birth = encode([Metric("bdSeq", self.session, INT64)], seq=0, timestamp_ms=birth_ms)
        self._publish(node_topic(self.plan.platform, "NBIRTH", self.id), birth)
        for name in self.names:
            body = encode([Metric("v", None, alias=1)], seq=self._next_seq(), timestamp_ms=birth_ms)
            self._publish(node_topic(self.plan.platform, "DBIRTH", self.id, name), body)

    def _will(self) -> tuple[str, bytes]:
        if self.sparkplug:
            death = encode([Metric("bdSeq", self.session, INT64)])
            return node_topic(self.plan.platform, "NDEATH", self.id), death
        return self._status_topic(), orjson.dumps({"state": "offline", "session": self.session})

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _status_topic(self) -> str:
        return f"{self.plan.topic_root}/{self.plan.platform}/gateways/{self.id}/status"

    def _telemetry_topic(self) -> str:
        return f"{self.plan.topic_root}/{self.plan.platform}/gateways/{self.id}/telemetry"

    def _publish(self, topic: str, body: bytes, *, retain: bool = False) -> None:
        if self._client is None or not self._client.connected:
            raise RuntimeError(f"{self.id}: not connected")
        self._client.publish(topic, body, retain=retain)
