"""`iiot run`: the whole stack in one process, with embedded services for what is not configured.

Starts PostgreSQL and an MQTT broker when `IIOT_DATABASE_URL` / `IIOT_MQTT_URL` are unset,
applies migrations, makes sure the demo platform exists, then runs MQTT ingest, the API and a
small simulator until SIGINT/SIGTERM, and shuts all of it down in reverse order.

`iiot run --cells N` runs N such stacks side by side (docs/scaling.md): each a `Cell` with its
own database, broker, ingest, API and simulated platforms, as separate deployments would be,
and the national aggregator beside them (iiot/aggregator.py), every cell reporting to it.
"""

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, PostgresDsn
from structlog.contextvars import bound_contextvars

from api.app import create_app
from api.settings import ApiSettings
from iiot.aggregator import Aggregator
from iiot.demo_enterprises import seed_demo
from iiot.embedded import EmbeddedPostgres, create_database, embedded_broker
from iiot.net import free_port, port_is_free
from iiot.server import ApiServer
from iiot.services import Service, ingest_services, run_until
from iiot.simulator import Simulator
from ingest.kafka import KafkaIngest
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from national.cell.pusher import Pusher
from national.cell.settings import CellSettings
from national.settings import NationalSettings
from registry.access import replace_admin_key
from registry.migrate import migrate
from registry.platforms import upsert_platform
from registry.store import connect, create_pool

log = logging.getLogger(__name__)

MAX_CELLS = 20


class RunSettings(IngestSettings, ApiSettings):
    state_dir: Path = Field(default=Path(".iiot"), description="Embedded services keep data here.")
    demo_platform: str = "demo"
    simulate_devices: int = Field(default=50, ge=0)
    simulate_interval_seconds: float = Field(default=2.0, gt=0)
    cells_snapshot_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="With --cells, how often each cell pushes its snapshot to the aggregator "
        "beside them: a demo's pace (a deployed cell's is IIOT_SNAPSHOT_INTERVAL_SECONDS).",
    )


class Cell:
    """One cell's stack: its store, broker, ingest, API and the simulators of its platforms.

    `start()` starts the embedded services it is not given, applies migrations, creates its
    platforms (with simulated enterprises) and replaces its admin key; `run()` runs ingest, the
    API and the simulators until `stop()`; `close()` releases what `start()` opened, in reverse
    order. The owner calls `close()` whether or not `start()` succeeded."""

    def __init__(
        self,
        settings: RunSettings,
        *,
        platforms: Sequence[str],
        name_in_logs: bool = False,
        reporting: CellSettings | None = None,
    ) -> None:
        self.settings = settings
        # How it reports to the national aggregator; by default from IIOT_NATIONAL_URL etc.,
        # which cells side by side cannot share (each signs with its own key).
        self._reporting = reporting
        self.platforms = list(platforms)
        # Beside other cells, each log line names its cell (tasks inherit the bound context).
        self._log_context = {"cell": settings.cell} if name_in_logs else {}
        self.admin_key = ""
        self._resources = contextlib.AsyncExitStack()
        self._services: list[Service] = []
        self._stop = asyncio.Event()

    @property
    def name(self) -> str:
        return self.settings.cell

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    async def start(self) -> None:
        with bound_contextvars(**self._log_context):
            await self._start()

    async def _start(self) -> None:
        settings = self.settings
        updates: dict[str, object] = {}
        if settings.database_url is None:
            postgres = EmbeddedPostgres(settings.state_dir / "postgres")
            updates["database_url"] = await asyncio.to_thread(postgres.start)
            self._resources.callback(postgres.stop)
        if settings.mqtt_url is None:
            broker = embedded_broker(settings.state_dir / "mosquitto")
            updates["mqtt_url"] = await broker.start()
            self._resources.push_async_callback(broker.stop)
            updates["mqtt_protocol"] = broker.protocol
        if not port_is_free(settings.api_port, settings.api_host):
            updates["api_port"] = free_port(settings.api_host)
            log.warning("port %d is taken; the API uses %d", settings.api_port, updates["api_port"])
        self.settings = settings = settings.model_copy(update=updates)

        applied = await migrate(settings)
        log.info("migrations applied: %s", [m.name for m in applied] or "none pending")
        simulators = [
            Simulator(
                str(settings.mqtt_url),
                platform=platform,
                devices=settings.simulate_devices,
                interval=settings.simulate_interval_seconds,
                topic_root=settings.mqtt_topic_root,
            )
            for platform in self.platforms
        ]
        async with await connect(settings) as conn:
            for simulator, platform in zip(simulators, self.platforms, strict=True):
                await upsert_platform(conn, platform, name=f"Demo platform {platform}")
                if settings.simulate_devices:
                    # Enterprises for the simulated devices, so the penetration view shows figures.
                    year = datetime.now(UTC).year - 1
                    await seed_demo(conn, platform, simulator.devices, year=year)
            self.admin_key = await replace_admin_key(conn, "iiot run")
            await conn.commit()

        pool = create_pool(settings, name="ingest")
        await self._resources.enter_async_context(pool)
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
        self._services = [*consumers, api]
        if settings.simulate_devices:
            self._services += simulators
        # With a national URL this cell reports to the national aggregator.
        national = (self._reporting or CellSettings()).model_copy(
            update={
                "database_url": settings.database_url,
                "database_schema": settings.database_schema,
                "cell": settings.cell,
            }
        )
        if national.national_url is not None:
            self._services.append(Pusher(national))

    async def run(self) -> None:
        with bound_contextvars(**self._log_context):
            await run_until(self._stop, self._services)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self._resources.aclose()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_stack(settings: RunSettings) -> None:
    stop = _stop_on_signals()
    cell = Cell(settings, platforms=[settings.demo_platform])
    try:
        await cell.start()
        _announce(cell)
        await run_until(stop, [cell])
    finally:
        await cell.close()
    log.info("stopped")


async def run_cells(settings: RunSettings, count: int, *, national: bool = True) -> None:
    """`count` cells on this machine until SIGINT/SIGTERM (`cell_settings` says how they differ),
    with the national aggregator beside them unless `national` is False (iiot/aggregator.py):
    its database `<database>_national` on the cells' server, every cell reporting to it.

    With no `IIOT_DATABASE_URL`, one embedded PostgreSQL server holds every cell's database:
    one server's memory and start-up instead of N, at the price that the cells share its
    CPU, its configuration and its fate (a production cell has a server of its own)."""
    stop = _stop_on_signals()
    async with contextlib.AsyncExitStack() as resources:
        server_url = None if settings.database_url is None else str(settings.database_url)
        if server_url is None:
            postgres = EmbeddedPostgres(
                settings.state_dir / "cells" / "postgres",
                # One share more than the cells': the aggregator's pool and sampler.
                max_connections=max(100, 10 + _connections_per_cell(settings) * (count + 1)),
            )
            server_url = await asyncio.to_thread(postgres.start)
            resources.callback(postgres.stop)
        every = cell_settings(settings, count, server_url=server_url)
        for cell_settings_ in every:
            database = _database_name(str(cell_settings_.database_url))
            await asyncio.to_thread(create_database, server_url, database)
        aggregator = None
        reporting: dict[str, CellSettings] = {}
        if national:
            database = f"{_database_name(server_url) or 'iiot'}_national"
            await asyncio.to_thread(create_database, server_url, database)
            aggregator = Aggregator(
                NationalSettings(database_url=PostgresDsn(_on_server(server_url, database))),
                state_dir=settings.state_dir / "cells",
                interval=settings.cells_snapshot_interval_seconds,
            )
            reporting = await aggregator.prepare([(c.cell, c.state_dir) for c in every])
        cells = []
        for cell_settings_ in every:
            name = cell_settings_.cell
            platforms = demo_platforms(name)
            cell = Cell(
                cell_settings_,
                platforms=platforms,
                name_in_logs=True,
                reporting=reporting.get(name),
            )
            resources.push_async_callback(cell.close)  # closed in reverse order of start
            cells.append(cell)
        # One after the other: the log reads in order, and a failure names its cell.
        for cell in cells:
            try:
                await cell.start()
            except Exception as exc:
                raise RuntimeError(f"{cell.name} did not start: {exc}") from exc
        # Listed last, the aggregator stops first; the cells keep what they could not deliver.
        services: list[Service] = [*cells, *([aggregator.server()] if aggregator else [])]
        _announce_cells(cells, aggregator)
        await run_until(stop, services)
    log.info("stopped")


def _connections_per_cell(settings: RunSettings) -> int:
    """The most connections a cell holds: its ingest and API pools, the two registry watchers,
    maintenance and reconciliation, and some to spare. PostgreSQL's default of 100 would
    refuse the sixth cell's under load."""
    return 2 * settings.database_pool_max + 8


def demo_platforms(cell: str) -> list[str]:
    """A cell's simulated platforms, distinct across cells: cell-1 serves demo-1a and demo-1b."""
    number = cell.rsplit("-", 1)[-1]
    return [f"demo-{number}a", f"demo-{number}b"]


def cell_settings(settings: RunSettings, count: int, *, server_url: str) -> list[RunSettings]:
    """The settings of cells cell-1 .. cell-`count`: each its own database on `server_url`
    (`<database>_cell_<n>`), its own embedded broker and state directory, API port
    `IIOT_API_PORT + n - 1` (a free one if taken), metrics port likewise when set, and with a
    Kafka cluster its own topics (`iiot.telemetry` becomes `iiot.cell-<n>.telemetry`) and
    consumer group. Raises ValueError for what cells cannot share."""
    if not 1 <= count <= MAX_CELLS:
        raise ValueError(f"--cells {count}: between 1 and {MAX_CELLS} cells run on one machine")
    if settings.mqtt_url is not None:
        raise ValueError(
            "each cell runs its own embedded broker: unset IIOT_MQTT_URL for --cells "
            "(cells on separate brokers are separate `iiot` deployments, docs/scaling.md)"
        )
    database = _database_name(server_url) or "iiot"
    found = []
    for n in range(1, count + 1):
        name = f"cell-{n}"
        url = _on_server(server_url, f"{database}_cell_{n}")
        updates: dict[str, object] = {
            "cell": name,
            "database_url": url,
            "state_dir": settings.state_dir / "cells" / name,
            "api_port": settings.api_port + n - 1,
        }
        if settings.metrics_port is not None:
            updates["metrics_port"] = settings.metrics_port + n - 1
        if settings.kafka_bootstrap:
            updates["kafka_topics"] = [_cell_topic(t, name) for t in settings.kafka_topics]
            updates["kafka_group_id"] = f"{settings.kafka_group_id}-{name}"
        found.append(settings.model_copy(update=updates))
    return found


def _cell_topic(topic: str, cell: str) -> str:
    head, dot, rest = topic.partition(".")
    return f"{head}.{cell}.{rest}" if dot else f"{topic}.{cell}"


def _on_server(server_url: str, database: str) -> str:
    return urlsplit(server_url)._replace(path=f"/{database}").geturl()


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _announce(cell: Cell) -> None:
    settings, base, admin_key = cell.settings, cell.api_url, cell.admin_key
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


def _announce_cells(cells: Sequence[Cell], aggregator: Aggregator | None) -> None:
    lines = [
        "",
        f"  iiot is running {len(cells)} cells (admin keys are new each run; keep them secret).",
    ]
    for cell in cells:
        settings, base = cell.settings, cell.api_url
        simulated = (
            f"{settings.simulate_devices} simulated devices each"
            if settings.simulate_devices
            else "no simulator"
        )
        lines += [
            "",
            f"  {cell.name}",
            f"    API:        {base}  (OpenAPI docs: {base}/docs)",
            f"    Dashboard:  {base}/dashboard#key={cell.admin_key}",
            f"    Admin key:  {cell.admin_key}",
            f"    Broker:     {settings.mqtt_url}  (topics {settings.mqtt_topic_root}/...)",
            f"    Database:   {settings.database_url}",
            f"    Platforms:  {', '.join(cell.platforms)} ({simulated})",
        ]
    if aggregator is not None:
        base, key = aggregator.url, aggregator.viewer_key
        lines += [
            "",
            "  national aggregator (every cell reports to it "
            f"every {cells[0].settings.cells_snapshot_interval_seconds:g} s)",
            f"    API:        {base}  (OpenAPI docs: {base}/docs)",
            f"    Dashboard:  {base}/dashboard#key={key}",
            f"    Viewer key: {key}",
            f"    Totals:     curl -H 'Authorization: Bearer {key}' {base}/national/totals",
            f"    Database:   {aggregator.settings.database_url}",
        ]
    lines += ["", "  Stop them all with Ctrl-C.", ""]
    print("\n".join(lines), file=sys.stderr, flush=True)
