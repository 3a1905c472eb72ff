"""Composition of long-running services into processes.

Every service has `run()` (until stopped) and `stop()` (ask it to finish what it holds and
return). `run_until` runs a set of them in one TaskGroup, so none is left without an owner,
and stops them all, in reverse order, when the stop event is set or one of them fails.
"""

import asyncio
from datetime import timedelta
from typing import Literal, Protocol

from psycopg_pool import AsyncConnectionPool

from ingest.kafka import KafkaIngest
from ingest.metrics import Consumer, IngestCollector
from ingest.monitor import Monitor
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from registry.history import HistorySampler
from registry.notifications import RegistryWatcher
from registry.reconcile import Reconciler
from registry.sweeper import Sweeper


class Service(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


def ingest_services(
    settings: IngestSettings, pool: AsyncConnectionPool, consumer: Literal["mqtt", "kafka"] = "mqtt"
) -> list[Service]:
    """What an ingest process runs: its consumer (over MQTT, with the Sparkplug B host on its own
    connection when Sparkplug is on) and the registry's background work."""
    ingest: MqttIngest | KafkaIngest
    host: MqttIngest | None = None
    if consumer == "mqtt":
        ingest, shard = MqttIngest(settings, pool), settings.shard
        if settings.sparkplug_platforms() is not None:
            host = MqttIngest(settings, pool, sparkplug_host=True)
    else:
        ingest = KafkaIngest(settings, pool, partitions=settings.static_partitions())
        shard = settings.kafka_shard
    readers = [ingest] if host is None else [ingest, host]

    def registry_changed(platform: str) -> None:
        for reader in readers:  # each writer caches registry rows
            reader.registry_changed(platform)

    services: list[Service] = [
        *readers,
        RegistryWatcher(settings, registry_changed),
        Sweeper(
            pool,
            counter_shard=shard,
            interval=settings.sweep_interval_seconds,
            grace=timedelta(seconds=settings.activity_renew_seconds),
        ),
        HistorySampler(pool, interval=timedelta(seconds=settings.history_interval_seconds)),
        Reconciler(settings, shard=shard, interval=settings.reconcile_interval_seconds),
    ]
    if settings.metrics_port is not None:
        ready = [ingest.subscribed if isinstance(ingest, MqttIngest) else ingest.assigned]
        sources: list[tuple[str, Consumer]] = [(consumer, ingest)]
        if host is not None:
            ready.append(host.subscribed)
            sources.append(("sparkplug", host))
        services.append(
            Monitor(
                IngestCollector(sources),
                pool=pool,
                consumer_ready=lambda: all(event.is_set() for event in ready),
                host=settings.metrics_address,
                port=settings.metrics_port,
            )
        )
    return services


async def run_until(stop: asyncio.Event, services: list[Service]) -> None:
    async with asyncio.TaskGroup() as tasks:
        running = [tasks.create_task(s.run()) for s in services]
        waiting = tasks.create_task(stop.wait())
        await asyncio.wait([waiting, *running], return_when=asyncio.FIRST_COMPLETED)
        for service in reversed(services):
            service.stop()
        waiting.cancel()
