"""`iiot national ...`: the national aggregator (docs/national.md). Its settings are
`IIOT_NATIONAL_*`: its own database, never a cell's."""

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from iiot import logs
from iiot.loop import serve
from iiot.server import ApiServer
from national.app import create_app
from national.keys import (
    BadPublicKey,
    StillHolding,
    add_cell,
    create_viewer_key,
    list_viewer_keys,
    load_public_key,
    retire_cell,
    revoke_viewer_key,
)
from national.migrate import connection_options, migrate
from national.settings import NationalSettings
from registry.errors import Invalid
from registry.official_totals import import_totals

national_app = typer.Typer(
    help="The national aggregator: every cell's signed snapshots, national figures.",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="National viewer keys (the ministry's readers).", no_args_is_help=True)
national_app.add_typer(keys_app, name="keys")


async def _connect(settings: NationalSettings) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(
        settings.require_database_url(), options=connection_options(settings.database_schema)
    )


@national_app.command("migrate")
def migrate_command() -> None:
    """Create the aggregator's schema and apply its pending migrations (idempotent)."""
    logs.configure()
    applied = asyncio.run(migrate(NationalSettings()))
    typer.echo(f"applied {len(applied)} migration(s): {[m.name for m in applied]}")


@national_app.command("serve")
def serve_command() -> None:
    """Serve the aggregator (IIOT_NATIONAL_HOST, IIOT_NATIONAL_PORT) on its own database
    (IIOT_NATIONAL_DATABASE_URL), migrating it first."""
    logs.configure()
    settings = NationalSettings()
    settings.require_database_url()

    async def main() -> None:
        await migrate(settings)
        server = ApiServer(
            create_app(settings), host=settings.host, port=settings.port, access_log=True
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.run()

    serve(main())


@national_app.command("add-cell")
def add_cell_command(
    name: Annotated[str, typer.Argument(help="The cell's name (its IIOT_CELL).")],
    public_key: Annotated[
        str,
        typer.Option(help="The cell's Ed25519 public key: a PEM file, or PEM/base64/hex text."),
    ],
) -> None:
    """Register a cell and the public key its snapshots are verified with (again: a new key)."""
    settings = NationalSettings()
    path = Path(public_key)
    text = path.read_text(encoding="utf-8") if path.is_file() else public_key
    try:
        raw = load_public_key(text)
    except BadPublicKey as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None

    async def main() -> bool:
        await migrate(settings)
        async with await _connect(settings) as conn:
            added = await add_cell(conn, name, raw)
            await conn.commit()
            return added

    try:
        added = asyncio.run(main())
    except psycopg.errors.CheckViolation:
        typer.echo(f"refused: {name!r} is not a cell name (a-z, 0-9, -)", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{'added' if added else 'key replaced for'} cell {name}")


@national_app.command("retire-cell")
def retire_cell_command(
    name: Annotated[str, typer.Argument(help="The cell taken out of service.")],
) -> None:
    """Take a cell out of service: it leaves the coverage (no longer stale), its snapshots are
    refused, its history stays. Refused while it holds platforms; `add-cell` brings it back."""
    settings = NationalSettings()

    async def main() -> bool:
        async with await _connect(settings) as conn:
            retired = await retire_cell(conn, name)
            await conn.commit()
            return retired

    try:
        retired = asyncio.run(main())
    except StillHolding as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    if not retired:
        typer.echo(f"no cell {name} in service", err=True)
        raise typer.Exit(1)
    typer.echo(f"retired cell {name}")


@national_app.command("import-totals")
def import_totals_command(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="CSV: year,region,industry,enterprises"),
    ],
    source: Annotated[
        str, typer.Option(help="Where the figures come from: publication, table, date.")
    ],
) -> None:
    """Import official totals of industrial enterprises above designated size into the
    aggregator (the format of `iiot enterprises import-totals`); a bad file is refused whole."""
    settings = NationalSettings()

    async def main() -> str:
        await migrate(settings)
        async with await _connect(settings) as conn:
            done = await import_totals(
                conn, file.read_text(encoding="utf-8"), source=source, file_name=file.name
            )
            await conn.commit()
        years = ", ".join(map(str, done.years))
        return f"import {done.id}: {done.rows} totals for {years} (sha256 {done.sha256})"

    try:
        typer.echo(asyncio.run(main()))
    except Invalid as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="Who or what the key is for.")]) -> None:
    """Create a national viewer key and print it (shown this once; stored as a digest)."""
    settings = NationalSettings()

    async def main() -> str:
        await migrate(settings)
        async with await _connect(settings) as conn:
            _, key = await create_viewer_key(conn, name)
            await conn.commit()
            return key

    typer.echo(asyncio.run(main()))


@keys_app.command("list")
def keys_list() -> None:
    """List national viewer keys (their prefixes, never the keys)."""
    settings = NationalSettings()

    async def main() -> None:
        async with await _connect(settings) as conn:
            for key in await list_viewer_keys(conn):
                revoked = f"\trevoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else ""
                typer.echo(
                    f"{key.id}\t{key.prefix}\t{key.name}\t{key.created_at:%Y-%m-%d}{revoked}"
                )

    asyncio.run(main())


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id (`keys list`).")]) -> None:
    """Revoke a national viewer key (it stops working within IIOT_NATIONAL_KEY_CACHE_SECONDS)."""
    settings = NationalSettings()

    async def main() -> str | None:
        async with await _connect(settings) as conn:
            name = await revoke_viewer_key(conn, key_id)
            await conn.commit()
            return name

    name = asyncio.run(main())
    if name is None:
        typer.echo(f"no key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id} ({name})")
