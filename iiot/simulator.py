"""A small telemetry simulator: devices of one platform publishing JSON readings over MQTT.

`make run` starts it so the counts move; load tests (loadtests/) simulate at scale.
"""

import asyncio
import contextlib
import logging
import math
import random
import time
from urllib.parse import urlsplit

import aiomqtt
import orjson

from ingest.topics import TopicScheme

log = logging.getLogger(__name__)


class Simulator:
    """Publishes one reading per device every `interval` seconds until `stop()`."""

    def __init__(
        self,
        mqtt_url: str,
        *,
        platform: str,
        devices: int,
        interval: float = 1.0,
        topic_root: str = "iiot/v1",
        client_id: str | None = None,
    ) -> None:
        self._url = urlsplit(mqtt_url)
        self._platform = platform
        self._devices = [f"sim-{n:06d}" for n in range(devices)]
        self._interval = interval
        self._topics = TopicScheme(topic_root)
        self._client_id = client_id or f"iiot-simulator-{platform}"
        self._stopping = asyncio.Event()
        self.published = 0

    @property
    def devices(self) -> list[str]:
        """The ids of the simulated devices."""
        return list(self._devices)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._publish_until_stopped()
            except aiomqtt.MqttError as exc:
                log.warning("simulator lost the broker (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await self._stopping.wait()

    async def _publish_until_stopped(self) -> None:
        async with aiomqtt.Client(
            self._url.hostname or "127.0.0.1",
            self._url.port or 1883,
            username=self._url.username,
            password=self._url.password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
        ) as client:
            rng = random.Random(self._platform)  # noqa: S311 - simulated readings, not secrets
            while not self._stopping.is_set():
                started = time.monotonic()
                now_ms = int(time.time() * 1000)
                for n, device in enumerate(self._devices):
                    reading = {
                        "ts": now_ms,
                        "metrics": {
                            "temperature": round(20 + 5 * math.sin(now_ms / 60_000 + n), 3),
                            "pressure": round(1 + rng.random() / 10, 4),
                            "running": True,
                        },
                    }
                    await client.publish(
                        self._topics.telemetry(self._platform, device), orjson.dumps(reading), qos=1
                    )
                    self.published += 1
                elapsed = time.monotonic() - started
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, self._interval - elapsed)):
                        await self._stopping.wait()
