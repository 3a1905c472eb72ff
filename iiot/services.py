"""Composition of long-running services into processes.

Every service has `run()` (until stopped) and `stop()` (ask it to finish what it holds and
return). `run_until` runs a set of them and owns their tasks: when the stop event is set or one
of them ends (a failure included), it asks every service to stop, in reverse order, and waits
for them to finish what they hold; a service still running after a grace period is cancelled.
"""

import asyncio
from datetime import timedelta
from typing import Literal, Protocol

from psycopg_pool import AsyncConnectionPool

from iiot.monitor import Monitor
from ingest.certificates import CertificateExpiry
from ingest.kafka import KafkaIngest
from ingest.metrics import Consumer, IngestCollector
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from registry.history import HistorySampler
from registry.maintenance import Maintainer
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
    if settings.maintain_interval_seconds > 0:
        services.append(Maintainer(settings, ingest_window=settings.window_past))
    if settings.metrics_port is not None:
        ready = [ingest.subscribed if isinstance(ingest, MqttIngest) else ingest.assigned]
        sources: list[tuple[str, Consumer]] = [(consumer, ingest)]
        if host is not None:
            ready.append(host.subscribed)
            sources.append(("sparkplug", host))
        services.append(
            Monitor(
                IngestCollector(sources),
                CertificateExpiry(settings.certificate_files()),
                pool=pool,
                consumer_ready=lambda: all(event.is_set() for event in ready),
                host=settings.metrics_address,
                port=settings.metrics_port,
                progress=ingest.progress,
                stall_seconds=settings.stall_seconds,
                cell=settings.cell,
            )
        )
    return services


async def run_until(
    stop: asyncio.Event, services: list[Service], *, grace_seconds: float = 30.0
) -> None:
    """Runs `services` until `stop` is set or one of them returns or fails, then stops them all.

    A TaskGroup would cancel the others the moment one fails, so a consumer would never get to
    write and acknowledge what it holds; here each is asked to stop and given `grace_seconds`.
    Raises an ExceptionGroup of every service that failed (as a TaskGroup would)."""
    running = [asyncio.create_task(s.run(), name=type(s).__name__) for s in services]
    waiting = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([waiting, *running], return_when=asyncio.FIRST_COMPLETED)
        for service in reversed(services):
            service.stop()
        await asyncio.wait(running, timeout=grace_seconds)
    finally:
        # Cancelled from outside, or past the grace period: no task is left without its owner.
        waiting.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(waiting, *running, return_exceptions=True)
    failed = [t.exception() for t in running if not t.cancelled() and t.exception() is not None]
    errors = [e for e in failed if isinstance(e, Exception)]
    if errors:
        raise ExceptionGroup("a service failed", errors)
