"""`iiot cell keygen` and `iiot national push`: the cell's side of the national aggregator
(docs/operations.md, "National snapshots")."""

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from national.cell.keys import UnusableKey, generate_signing_key
from national.cell.pusher import Pusher, push_now
from national.cell.settings import CellSettings

cell_app = typer.Typer(help="This cell's keys for the national aggregator.", no_args_is_help=True)


@cell_app.command("keygen")
def cell_keygen(
    out: Annotated[Path, typer.Option(help="Where to write the private key (mode 0600).")],
) -> None:
    """Make the cell's Ed25519 signing key; prints its public key for the aggregator's operator
    (`iiot national add-cell`). Set IIOT_CELL_SIGNING_KEY to the file."""
    try:
        public = generate_signing_key(out)
    except UnusableKey as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(public, nl=False)


def national_push(
    resume: Annotated[
        bool, typer.Option(help="Lift a halted delivery first (after its cause is dealt with).")
    ] = False,
) -> None:
    """Build a snapshot now and deliver every undelivered one (IIOT_NATIONAL_URL). Exit status 1
    when something stayed undelivered."""
    settings = CellSettings()
    try:
        sequence, result = asyncio.run(push_now(settings, resume=resume))
    except (ValueError, UnusableKey) as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    built = "outbox full: no snapshot built" if sequence is None else f"snapshot {sequence} built"
    typer.echo(f"{built}; {result.delivered} delivered")
    if result.failure is not None:
        state = "HALTED" if result.halted else "not delivered"
        typer.echo(f"{state}: {result.failure} (docs/operations.md)", err=True)
        raise typer.Exit(1)


def national_pusher() -> Pusher | None:
    """The cell's pusher when IIOT_NATIONAL_URL is set, else None; a missing or unusable key
    stops the command at once, saying what to do."""
    settings = CellSettings()
    if settings.national_url is None:
        return None
    try:
        return Pusher(settings)
    except ValueError as exc:  # UnusableKey is one
        raise typer.BadParameter(str(exc)) from None
