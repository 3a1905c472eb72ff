"""The `iiot` command. Each subcommand builds its process role's settings from `IIOT_*`
environment variables and runs until SIGINT/SIGTERM."""

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from api.app import create_app
from api.settings import ApiSettings
from iiot import logs
from iiot.cell_commands import cell_app, national_push, national_pusher
from iiot.loop import serve
from iiot.national_cli import national_app
from iiot.server import ApiServer
from iiot.services import Service, ingest_services, run_until
from iiot.simulator import Simulator
from iiot.stack import RunSettings, cell_settings, run_cells, run_stack
from ingest.replay import list_dead_letters, replay
from ingest.settings import IngestSettings
from registry.access import Role, create_key, import_key, revoke_key
from registry.errors import Invalid, RegistryError
from registry.maintenance import Maintainer, maintain_once
from registry.migrate import migrate
from registry.moves import Moved, unmove
from registry.official_totals import import_totals
from registry.platform_export import ExportSummary, export_to
from registry.platform_import import import_from
from registry.platforms import PlatformType, Tier, upsert_platform
from registry.settings import StoreSettings
from registry.store import connect, create_pool

app = typer.Typer(help="iiot: industrial device ingest, registry and counts.", no_args_is_help=True)
ingest_app = typer.Typer(help="Run an ingest consumer.", no_args_is_help=True)
platform_app = typer.Typer(help="Manage platforms.", no_args_is_help=True)
dead_letters_app = typer.Typer(help="Inspect and replay refused messages.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(platform_app, name="platform")
app.add_typer(dead_letters_app, name="dead-letters")
keys_app = typer.Typer(help="Manage API keys (bootstrap an admin key here).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
enterprises_app = typer.Typer(help="Enterprises and penetration figures.", no_args_is_help=True)
app.add_typer(enterprises_app, name="enterprises")
app.add_typer(national_app, name="national")
app.add_typer(cell_app, name="cell")
national_app.command("push")(national_push)  # the cell's side: deliver its snapshots now


def _logging(verbose: bool = False) -> None:
    logs.configure(verbose=verbose)


def _run_until_signal(
    start: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], None]
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        await start()

    serve(main())


def _run_services_until_signal(services: list[Service]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_until(stop, services)

    serve(main())


@ingest_app.command("kafka")
def ingest_kafka() -> None:
    """Consume telemetry records from Kafka (IIOT_KAFKA_BOOTSTRAP, IIOT_KAFKA_TOPICS) into the
    store (IIOT_DATABASE_URL); offsets are kept in the store with the data."""
    _logging()
    settings = IngestSettings()
    settings.require_database_url()
    settings.require_kafka_bootstrap()
    settings.static_partitions()
    _ = settings.kafka_shard  # refuses a pod beyond its IIOT_COUNTER_SHARDS now, with the reason
    settings.kafka_client_options()  # fails now on a CA or client certificate it cannot load

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with create_pool(settings, name="ingest-kafka") as pool:
            await run_until(stop, ingest_services(settings, pool, "kafka"))

    serve(main())


@app.command("migrate")
def migrate_command() -> None:
    """Create the schema and apply pending migrations (idempotent)."""
    _logging()
    settings = StoreSettings()
    applied = asyncio.run(migrate(settings))
    typer.echo(f"applied {len(applied)} migration(s): {[m.name for m in applied]}")


@app.command("maintain")
def maintain_command(
    once: Annotated[
        bool, typer.Option(help="One run, a summary, then exit (a CronJob); else every interval.")
    ] = False,
) -> None:
    """Apply every retention, roll-up and downsampling step (docs/operations.md); one runner at
    a time across all processes. With --once the exit status is 1 when a step failed."""
    _logging()
    settings = IngestSettings()
    settings.require_database_url()
    if not once:
        if not settings.maintain_interval_seconds:
            raise typer.BadParameter("IIOT_MAINTAIN_INTERVAL_SECONDS is 0: run with --once")
        maintainer = Maintainer(settings, ingest_window=settings.window_past, first_delay=0)
        pusher = national_pusher()  # with IIOT_NATIONAL_URL: the cell's national snapshots too
        if pusher is None:
            _run_until_signal(maintainer.run, maintainer.stop)
        else:
            _run_services_until_signal([maintainer, pusher])
        return
    run = asyncio.run(maintain_once(settings, ingest_window=settings.window_past))
    if run is None:
        typer.echo("another process is running maintenance; nothing done")
        return
    typer.echo(run.summary())
    if not run.succeeded:
        raise typer.Exit(1)


@ingest_app.command("mqtt")
def ingest_mqtt() -> None:
    """Consume device telemetry from MQTT (IIOT_MQTT_URL) into the store (IIOT_DATABASE_URL)."""
    _logging()
    settings = IngestSettings()
    settings.require_database_url()
    settings.mqtt_endpoint()
    _ = settings.shard  # refuses a pod beyond its IIOT_COUNTER_SHARDS now, with the reason

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with create_pool(settings, name="ingest") as pool:
            await run_until(stop, ingest_services(settings, pool))

    serve(main())


@app.command("api")
def api_command() -> None:
    """Serve the operator API (IIOT_API_HOST, IIOT_API_PORT)."""
    _logging()
    settings = ApiSettings()
    settings.require_database_url()
    server = ApiServer(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=True,
        tls_cert_file=settings.api_tls_cert_file,
        tls_key_file=settings.api_tls_key_file,
    )
    _run_until_signal(server.run, server.stop)


@app.command("run")
def run_command(
    cells: Annotated[
        int | None,
        typer.Option(
            help="Run this many cells side by side (cell-1..N), each with its own database, "
            "broker, ingest, API and simulated platforms (docs/scaling.md).",
        ),
    ] = None,
    national: Annotated[
        bool,
        typer.Option(
            help="With --cells: the national aggregator beside them, every cell reporting to it "
            "(docs/national.md).",
        ),
    ] = True,
) -> None:
    """The whole stack in one process; embedded PostgreSQL and MQTT when none is configured."""
    # Readable lines in a terminal unless IIOT_LOG_FORMAT says otherwise.
    settings = logs.LogSettings()
    if "IIOT_LOG_FORMAT" not in os.environ:
        settings.log_format = "console"
    logs.configure(settings)
    run_settings = RunSettings()
    if cells is None:
        serve(run_stack(run_settings))
        return
    try:  # what cells cannot share is refused before anything starts
        cell_settings(run_settings, cells, server_url=str(run_settings.database_url or ""))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cells") from None
    serve(run_cells(run_settings, cells, national=national))


@app.command("simulate")
def simulate_command(
    platform: Annotated[str, typer.Option(help="Platform id the devices belong to.")] = "demo",
    devices: Annotated[int, typer.Option(min=1)] = 100,
    interval: Annotated[float, typer.Option(help="Seconds between a device's readings.")] = 1.0,
) -> None:
    """Publish simulated device telemetry to IIOT_MQTT_URL."""
    _logging()
    settings = IngestSettings()
    settings.mqtt_endpoint()  # fails early, with the reason, when IIOT_MQTT_URL is unset
    simulator = Simulator(
        str(settings.mqtt_url),
        platform=platform,
        devices=devices,
        interval=interval,
        topic_root=settings.mqtt_topic_root,
    )
    _run_until_signal(simulator.run, simulator.stop)


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option()],
    name: Annotated[str, typer.Option(help="What the key is for, e.g. 'prometheus'.")],
    platform: Annotated[str | None, typer.Option(help="For operator and viewer keys.")] = None,
) -> None:
    """Create an API key and print it (shown this once; stored as a digest)."""
    settings = StoreSettings()

    async def main() -> str:
        async with await connect(settings) as conn:
            _, key = await create_key(
                conn, role=role, platform=platform, name=name, created_by=None
            )
            await conn.commit()
            return key

    typer.echo(asyncio.run(main()))


@keys_app.command("import")
def keys_import(
    role: Annotated[Role, typer.Option()],
    name: Annotated[str, typer.Option()],
    from_env: Annotated[
        str, typer.Option(help="The environment variable holding the key (iiot_<prefix>_...).")
    ],
    platform: Annotated[str | None, typer.Option(help="For operator and viewer keys.")] = None,
) -> None:
    """Register a pre-shared key (a deployment's broker or Prometheus key from a secret);
    does nothing when it is registered already."""
    _logging()
    key = os.environ.get(from_env, "")
    settings = StoreSettings()

    async def main() -> bool:
        async with await connect(settings) as conn:
            added = await import_key(conn, key, role=role, platform=platform, name=name)
            await conn.commit()
            return added

    added = asyncio.run(main())
    typer.echo(f"{'imported' if added else 'already registered'}: {name} ({role})")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id (GET /keys).")]) -> None:
    """Revoke an API key."""
    settings = StoreSettings()

    async def main() -> None:
        async with await connect(settings) as conn:
            revoked = await revoke_key(conn, key_id, platform=None, by=None)
            await conn.commit()
            typer.echo(f"revoked {revoked.prefix} ({revoked.role}, {revoked.name})")

    asyncio.run(main())


@platform_app.command("add")
def platform_add(  # noqa: PLR0917 - typer maps parameters to options
    platform_id: Annotated[str, typer.Argument(help="Platform slug, e.g. 'acme-steel'.")],
    name: Annotated[str | None, typer.Option()] = None,
    tier: Annotated[Tier, typer.Option()] = Tier.BASIC,
    type_: Annotated[PlatformType, typer.Option("--type")] = PlatformType.PROFESSIONAL,
    region: Annotated[str, typer.Option(help="Province-level region code.")] = "000000",
    industry: Annotated[str, typer.Option()] = "unspecified",
    liveness_seconds: Annotated[int, typer.Option(min=1, max=86400)] = 300,
    auto_provision: Annotated[bool, typer.Option()] = True,
) -> None:
    """Create or update a platform."""
    settings = StoreSettings()

    async def main() -> None:
        async with await connect(settings) as conn:
            platform = await upsert_platform(
                conn,
                platform_id,
                name=name,
                tier=tier,
                type=type_,
                region=region,
                industry=industry,
                liveness_seconds=liveness_seconds,
                auto_provision=auto_provision,
            )
            await conn.commit()
        typer.echo(f"platform {platform.id}: {platform}")

    asyncio.run(main())


@platform_app.command("export")
def platform_export(
    platform_id: Annotated[str, typer.Argument(help="The platform to export.")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="The file to write ('-': standard output); default <platform>.iiot-platform.gz.",
        ),
    ] = None,
    telemetry: Annotated[
        bool, typer.Option(help="Include the platform's stored telemetry (in time order).")
    ] = False,
    move_to: Annotated[
        str | None,
        typer.Option(
            help="Move the platform to this cell: refused here from now on, and "
            "served by that cell once it imports the file."
        ),
    ] = None,
    settle: Annotated[
        float,
        typer.Option(
            min=0,
            help="With --move-to: seconds between the refusal and the "
            "snapshot, for batches ingest had accepted to commit.",
        ),
    ] = 5.0,
) -> None:
    """Write a platform with everything it has in this cell to a file (docs/operations.md,
    "Moving a platform between cells")."""
    _logging()
    settings = StoreSettings()
    target = output or f"{platform_id}.iiot-platform.gz"

    async def main(sink: IO[bytes]) -> ExportSummary:
        return await export_to(
            settings, platform_id, sink, telemetry=telemetry, move_to=move_to, settle=settle
        )

    try:
        if target == "-":
            summary = asyncio.run(main(sys.stdout.buffer))
        else:
            partial = Path(f"{target}.partial")  # a file that is there is complete
            try:
                with partial.open("wb") as sink:
                    summary = asyncio.run(main(sink))
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
    except RegistryError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    rows = ", ".join(f"{n} {name}" for name, n in summary.rows.items() if n)
    typer.echo(f"exported {platform_id} to {target}: {rows} (sha256 {summary.sha256})", err=True)
    if summary.moved is not None:
        typer.echo(
            f"moved: {summary.moved.detail}. Run `iiot platform import` with this file in cell "
            f"{summary.moved.cell!r}; to undo, `iiot platform unmove {platform_id}` here.",
            err=True,
        )


@platform_app.command("import")
def platform_import(
    file: Annotated[
        str, typer.Argument(help="A file written by `iiot platform export` ('-': standard input).")
    ],
) -> None:
    """Load an exported platform into this cell (IIOT_CELL), in one transaction; a file that is
    truncated, changed, from a newer iiot or not moved to this cell is refused whole."""
    _logging()
    settings = StoreSettings()
    try:
        if file == "-":
            summary = asyncio.run(import_from(settings, sys.stdin.buffer))
        else:
            with Path(file).open("rb") as source:
                summary = asyncio.run(import_from(settings, source))
    except (RegistryError, OSError) as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    rows = ", ".join(f"{n} {name}" for name, n in summary.rows.items() if n)
    back = " (back in this cell)" if summary.returning else ""
    typer.echo(
        f"imported {summary.platform} from cell {summary.from_cell!r}{back}: {rows} "
        f"(sha256 {summary.sha256})"
    )
    if any(summary.drift):
        typer.echo(
            f"note: the imported counters differ from a recount by {summary.drift} (registered, "
            "connected, ever connected); the reconciler corrects them within its interval",
            err=True,
        )


@platform_app.command("unmove")
def platform_unmove(
    platform_id: Annotated[str, typer.Argument(help="A platform moved away from this cell.")],
) -> None:
    """Serve a moved platform here again (its import into the other cell failed or was
    abandoned). Do not use once the other cell serves it: it would be counted twice."""
    settings = StoreSettings()

    async def main() -> Moved:
        async with await connect(settings) as conn:
            undone = await unmove(conn, platform_id)
            await conn.commit()
            return undone

    try:
        undone = asyncio.run(main())
    except RegistryError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"platform {platform_id} is served here again (it had moved to {undone.cell!r})")


@dead_letters_app.command("list")
def dead_letters_list(
    platform: Annotated[str | None, typer.Option()] = None,
    reason: Annotated[str | None, typer.Option()] = None,
    include_replayed: Annotated[bool, typer.Option(help="Also show replayed ones.")] = False,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """List dead letters, oldest first."""
    settings = StoreSettings()

    async def main() -> None:
        async with await connect(settings) as conn:
            letters = await list_dead_letters(
                conn,
                platform=platform,
                reason=reason,
                include_replayed=include_replayed,
                limit=limit,
            )
        for d in letters:
            replayed = (
                f"  (replayed {d.replayed_at:%Y-%m-%d %H:%M}: {d.replay_outcome})"
                if d.replayed_at
                else ""
            )
            typer.echo(
                f"{d.id}\t{d.received_at:%Y-%m-%dT%H:%M:%S}\t{d.source}\t{d.platform_id or '-'}"
                f"\t{d.reason}\t{d.topic}\t{d.detail[:120]}{replayed}"
            )
        typer.echo(f"{len(letters)} dead letter(s)", err=True)

    asyncio.run(main())


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Dead letter ids (or use filters).")
    ] = None,
    platform: Annotated[str | None, typer.Option()] = None,
    reason: Annotated[str | None, typer.Option()] = None,
    ignore_time_window: Annotated[
        bool, typer.Option(help="Accept readings of any age (back-fill of old data).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1)] = 10_000,
) -> None:
    """Decode and write dead letters again; each records its outcome (stored or rejected)."""
    _logging()
    settings = IngestSettings()
    if not ids and platform is None and reason is None:
        raise typer.BadParameter("name dead letter ids, or filter with --platform / --reason")

    async def main() -> None:
        async with create_pool(settings, name="replay") as pool:
            async with pool.connection() as conn:
                letters = await list_dead_letters(
                    conn, ids=ids, platform=platform, reason=reason, limit=limit
                )
            report = await replay(pool, settings, letters, ignore_time_window=ignore_time_window)
        typer.echo(
            f"replayed {len(letters)}: {len(report.stored)} stored "
            f"({report.points_written} points), {len(report.rejected)} rejected again"
        )
        for id_, why in report.rejected.items():
            typer.echo(f"  {id_}: {why}")

    asyncio.run(main())


@enterprises_app.command("import-totals")
def enterprises_import_totals(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="CSV: year,region,industry,enterprises"),
    ],
    source: Annotated[
        str, typer.Option(help="Where the figures come from: publication, table, date.")
    ],
) -> None:
    """Import official totals of industrial enterprises above designated size (the penetration
    rate's denominators) as a new version; a file with any bad row is refused whole."""
    settings = StoreSettings()

    async def main() -> None:
        async with await connect(settings) as conn:
            done = await import_totals(
                conn, file.read_text(encoding="utf-8"), source=source, file_name=file.name
            )
            await conn.commit()
        years = ", ".join(map(str, done.years))
        typer.echo(f"import {done.id}: {done.rows} totals for {years} (sha256 {done.sha256})")

    try:
        asyncio.run(main())
    except Invalid as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
