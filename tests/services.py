"""Finds the PostgreSQL and MQTT broker the tests use, or starts private ones.

Order: the URL in the environment (IIOT_TEST_DATABASE_URL / IIOT_TEST_MQTT_URL), then the
machine's own services on their usual loopback ports, then an embedded server of our own.
"""

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from iiot.embedded import AmqttBroker, EmbeddedPostgres, MosquittoBroker
from iiot.net import accepts_connections

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_MQTT = "mqtt://127.0.0.1:1883"


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


@contextmanager
def postgres(tmp: Path) -> Iterator[str]:
    url = os.environ.get("IIOT_TEST_DATABASE_URL")
    if url:
        yield url
    elif _postgres_answers(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
    else:
        server = EmbeddedPostgres(tmp / "postgres", database="test")
        try:
            yield server.start()
        finally:
            server.stop()


@contextmanager
def mqtt_broker(tmp: Path) -> Iterator[str]:
    url = os.environ.get("IIOT_TEST_MQTT_URL")
    if url:
        yield url
    elif accepts_connections("127.0.0.1", 1883):
        yield LOCAL_MQTT
    elif MosquittoBroker.available():
        broker = MosquittoBroker(tmp / "mosquitto")
        yield asyncio.run(broker.start())
        broker.kill()
    else:
        with amqtt_in_thread() as url:
            yield url


@contextmanager
def amqtt_in_thread() -> Iterator[str]:
    """amqtt lives in an event loop; test loops come and go, so it gets a thread of its own."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    broker = AmqttBroker()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(broker.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(broker.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="amqtt", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("amqtt did not start")
    try:
        yield broker.url
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
