"""`iiot run`: the whole stack in one process, with embedded services for what is not configured.

Starts PostgreSQL and an MQTT broker when `IIOT_DATABASE_URL` / `IIOT_MQTT_URL` are unset,
applies migrations, makes sure the demo platform exists, then runs MQTT ingest, the API and a
small simulator until SIGINT/SIGTERM, and shuts all of it down in reverse order.
"""

import asyncio
import contextlib
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from api.app import create_app
from api.settings import ApiSettings
from iiot.demo_enterprises import seed_demo
from iiot.embedded import EmbeddedPostgres, embedded_broker
from iiot.net import free_port, port_is_free
from iiot.server import ApiServer
from iiot.services import ingest_services, run_until
from iiot.simulator import Simulator
from ingest.kafka import KafkaIngest
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from national.cell.pusher import Pusher
from national.cell.settings import CellSettings
from registry.access import replace_admin_key
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.store import connect, create_pool

log = logging.getLogger(__name__)


class RunSettings(IngestSettings, ApiSettings):
    state_dir: Path = Field(default=Path(".iiot"), description="Embedded services keep data here.")
    demo_platform: str = "demo"
    simulate_devices: int = Field(default=50, ge=0)
    simulate_interval_seconds: float = Field(default=2.0, gt=0)


async def run_stack(settings: RunSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as resources:
        updates: dict[str, object] = {}
        if settings.database_url is None:
            postgres = EmbeddedPostgres(settings.state_dir / "postgres")
            updates["database_url"] = await asyncio.to_thread(postgres.start)
            resources.callback(postgres.stop)
        if settings.mqtt_url is None:
            broker = embedded_broker(settings.state_dir / "mosquitto")
            updates["mqtt_url"] = await broker.start()
            resources.push_async_callback(broker.stop)
            updates["mqtt_protocol"] = broker.protocol
        if not port_is_free(settings.api_port, settings.api_host):
            updates["api_port"] = free_port(settings.api_host)
            log.warning("port %d is taken; the API uses %d", settings.api_port, updates["api_port"])
        settings = settings.model_copy(update=updates)

        applied = await migrate(settings)
        log.info("migrations applied: %s", [m.name for m in applied] or "none pending")
        simulator = Simulator(
            str(settings.mqtt_url),
            platform=settings.demo_platform,
            devices=settings.simulate_devices,
            interval=settings.simulate_interval_seconds,
            topic_root=settings.mqtt_topic_root,
        )
        async with await connect(settings) as conn:
            await upsert_platform(conn, settings.demo_platform, name="Demo platform")
            if settings.simulate_devices:
                # Enterprises for the simulated devices, so the penetration view shows figures.
                year = datetime.now(UTC).year - 1
                await seed_demo(conn, settings.demo_platform, simulator.devices, year=year)
            admin_key = await replace_admin_key(conn, "iiot run")
            await conn.commit()

        pool = create_pool(settings, name="ingest")
        await resources.enter_async_context(pool)
        consumers = ingest_services(settings, pool)
        ingest = consumers[0]
        assert isinstance(ingest, MqttIngest)  # the first service is the consumer
        ready = [("mqtt ingest", ingest.subscribed.is_set)]
        ready += [
            ("sparkplug host", service.subscribed.is_set)
            for service in consumers
            if isinstance(service, MqttIngest) and service.sparkplug is not None
        ]
        if settings.kafka_bootstrap:
            # A Kafka cluster configured: the stack reads its telemetry topics too (the
            # registry's background work already runs with the MQTT consumer).
            kafka = KafkaIngest(settings, pool, partitions=settings.static_partitions())
            consumers.append(kafka)
            ready.append(("kafka ingest", kafka.assigned.is_set))
        app = create_app(settings, consumers=ready)
        api = ApiServer(app, host=settings.api_host, port=settings.api_port)
        services = [*consumers, api]
        if settings.simulate_devices:
            services.append(simulator)
        # With IIOT_NATIONAL_URL this cell reports to the national aggregator.
        cell = CellSettings(
            database_url=settings.database_url, database_schema=settings.database_schema
        )
        if cell.national_url is not None:
            services.append(Pusher(cell))
        _announce(settings, f"http://{settings.api_host}:{settings.api_port}", admin_key)
        await run_until(stop, services)
        log.info("stopped")


def _announce(settings: RunSettings, base: str, admin_key: str) -> None:
    lines = [
        "",
        f"  iiot is running. API:   {base}  (OpenAPI docs: {base}/docs)",
        f"  Dashboard:              {base}/dashboard#key={admin_key}",
        f"  Admin API key:          {admin_key}",
        "                          (new each run, the previous one revoked; keep it secret)",
        f"  Device count:           curl -H 'Authorization: Bearer {admin_key}' \\",
        f"                               {base}/platforms/{settings.demo_platform}/devices/count",
        f"  Database:               {settings.database_url}",
        f"  MQTT broker:            {settings.mqtt_url}  (topics {settings.mqtt_topic_root}/...)",
        f"  Simulator:              {settings.simulate_devices} devices "
        f"on '{settings.demo_platform}'",
        "  Stop with Ctrl-C.",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
