"""Locust users: MQTT gateways (JSON and Sparkplug B) carrying many devices each, a Kafka
producer of gateway records, and an operator reading counts and telemetry meanwhile.

`loadtests/run.py` drives a whole scenario (storm, steady, mass disconnect, rebirth race,
backlog flush) and checks the counts; this file is also a plain locustfile for ad-hoc and
distributed runs (loadtests/README.md), configured by environment variables:

  IIOT_LOADTEST_PLATFORM, IIOT_LOADTEST_DEVICES_PER_GATEWAY, IIOT_LOADTEST_SPARKPLUG_EVERY,
  IIOT_LOADTEST_READING_INTERVAL, IIOT_LOADTEST_MQTT (host:port), IIOT_MQTT_TOPIC_ROOT,
  IIOT_LOADTEST_FIRST_GATEWAY (this worker's first gateway number, for distributed runs),
  IIOT_LOADTEST_API_KEY (for ApiUser), IIOT_LOADTEST_KAFKA (bootstrap, for KafkaGatewayUser).
"""

import itertools
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from locust import HttpUser, User, between, constant, task

from loadtests.fleet import FleetPlan, Gateway, Tally


@dataclass
class Control:
    """What the scenario wants now, shared by the users of this process."""

    plan: FleetPlan = field(
        default_factory=lambda: FleetPlan(
            platform=os.environ.get("IIOT_LOADTEST_PLATFORM", "loadtest"),
            gateways=0,
            devices_per_gateway=int(os.environ.get("IIOT_LOADTEST_DEVICES_PER_GATEWAY", "1000")),
            sparkplug_every=int(os.environ.get("IIOT_LOADTEST_SPARKPLUG_EVERY", "10")),
            topic_root=os.environ.get("IIOT_MQTT_TOPIC_ROOT", "iiot/v1"),
            reading_interval=float(os.environ.get("IIOT_LOADTEST_READING_INTERVAL", "60")),
        )
    )
    broker: tuple[str, int] = ("127.0.0.1", 1883)
    first_gateway: int = int(os.environ.get("IIOT_LOADTEST_FIRST_GATEWAY", "0"))
    dropped: set[int] = field(default_factory=set)  # gateways whose network is down
    race: bool = False  # after a rebirth, also publish the old session's Will, late
    paused: bool = False  # no more sending: the run is about to stop the users
    busy: int = 0  # gateways in the middle of sending
    online: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    numbers: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_gateway(self) -> int:
        with self.lock:
            if self.numbers is None:
                self.numbers = itertools.count(self.first_gateway)
            number: int = next(self.numbers)
            return number


CONTROL = Control()
if "IIOT_LOADTEST_MQTT" in os.environ:
    _host, _port = os.environ["IIOT_LOADTEST_MQTT"].rsplit(":", 1)
    CONTROL.broker = (_host, int(_port))


class GatewayUser(User):
    """One gateway connection carrying `devices_per_gateway` devices."""

    wait_time = constant(1)

    def on_start(self) -> None:
        self.number = CONTROL.next_gateway()
        host, port = CONTROL.broker
        self.gateway = Gateway(CONTROL.plan, self.number, host, port, CONTROL.tally)
        self._timed("connect and birth", self.gateway.connect)
        self._timed("first readings", self.gateway.send_all)
        CONTROL.online.add(self.number)

    @task
    def tick(self) -> None:
        if CONTROL.paused:
            return
        CONTROL.busy += 1
        try:
            self._tick()
        finally:
            CONTROL.busy -= 1

    def _tick(self) -> None:
        gateway, number = self.gateway, self.number
        if number in CONTROL.dropped:
            if gateway.online:
                gateway.drop()
                CONTROL.online.discard(number)
            return
        if not gateway.online:
            self._timed("rebirth and backfill", gateway.rebirth)
            if CONTROL.race:
                self._timed("stale will", gateway.stale_will)
            CONTROL.online.add(number)
            return
        self._timed("readings", gateway.tick)

    def on_stop(self) -> None:
        if self.gateway.online:
            self.gateway.close()
            CONTROL.online.discard(self.number)

    def _timed(self, name: str, action: Any) -> None:
        started = time.perf_counter()
        error: Exception | None = None
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - reported to locust and to the run's report
            error = exc
            CONTROL.errors.append(f"{self.gateway.id} {name}: {exc}")
        self.environment.events.request.fire(
            request_type="MQTT",
            name=f"gateway {name}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )


class KafkaGatewayUser(User):
    """A gateway whose records go through Kafka (key `{platform}/gateways/{gateway}`, value
    the gateway JSON of docs/contract.md); its devices are `k{gateway}-d{n}`."""

    wait_time = constant(1)
    fixed_count = 0  # only when asked for: `--kafka` in run.py, or -u with this class

    def on_start(self) -> None:
        from confluent_kafka import Producer  # noqa: PLC0415 - only Kafka runs need it

        self.number = CONTROL.next_gateway()
        self.gateway_id = f"k{CONTROL.plan.gateway_id(self.number)}"
        self.producer = Producer(
            {"bootstrap.servers": os.environ["IIOT_LOADTEST_KAFKA"], "linger.ms": 20}
        )
        self.topic = os.environ.get("IIOT_LOADTEST_KAFKA_TOPIC", "iiot.telemetry")
        self.devices = [
            f"{self.gateway_id}-d{d:04d}" for d in range(CONTROL.plan.devices_per_gateway)
        ]
        self.next = 0
        self.last = time.monotonic()
        self._send(list(range(len(self.devices))))

    @task
    def tick(self) -> None:
        now = time.monotonic()
        due = int(len(self.devices) * (now - self.last) / CONTROL.plan.reading_interval)
        if due > 0:
            self.last = now
            indices = [(self.next + k) % len(self.devices) for k in range(due)]
            self.next = (self.next + due) % len(self.devices)
            self._send(indices)

    def _send(self, indices: list[int]) -> None:
        started = time.perf_counter()
        reading = {"ts": int(time.time() * 1000), "metrics": {"v": 1.0}}
        body = orjson.dumps({"devices": {self.devices[i]: reading for i in indices}})
        key = f"{CONTROL.plan.platform}/gateways/{self.gateway_id}"
        self.producer.produce(self.topic, body, key=key.encode())
        remaining = self.producer.flush(30)
        CONTROL.tally.add(1, len(indices))
        self.environment.events.request.fire(
            request_type="KAFKA",
            name="gateway record",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(body),
            exception=RuntimeError("not delivered") if remaining else None,
            context={},
        )


class ApiUser(HttpUser):
    """An operator watching while the fleet runs: counts, and a device's latest values."""

    wait_time = between(0.5, 1.5)
    fixed_count = 0  # run.py sets how many

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {os.environ['IIOT_LOADTEST_API_KEY']}"

    @task(3)
    def count(self) -> None:
        self.client.get(
            f"/platforms/{CONTROL.plan.platform}/devices/count", name="/platforms/{p}/devices/count"
        )

    @task(1)
    def latest(self) -> None:
        online = sorted(CONTROL.online)
        if not online:
            return
        g = random.choice(online)  # noqa: S311 - not security
        name = random.choice(CONTROL.plan.device_names(g))  # noqa: S311
        device = CONTROL.plan.registered_id(g, name)
        self.client.get(
            f"/platforms/{CONTROL.plan.platform}/devices/{device}/latest",
            name="/platforms/{p}/devices/{d}/latest",
        )
