"""The national aggregator `iiot run --cells N` starts beside its cells (docs/national.md).

It gets what a deployment's operator would set up by hand (`iiot national add-cell`, `keys
create`, `iiot cell keygen`): its own database on the cells' PostgreSQL server, migrated; an
Ed25519 key pair per cell, kept in the cell's state directory across runs, its public half
registered (replaced) at each start; one enterprise hash key the cells share, kept in the cells'
state directory; and a national viewer key, new each run, the previous one revoked.
"""

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import psycopg
from pydantic import AnyHttpUrl, SecretStr

from iiot.net import free_port, port_is_free
from iiot.server import ApiServer
from national.app import create_app
from national.cell.keys import generate_signing_key, load_signing_key, public_key_pem
from national.cell.settings import CellSettings
from national.keys import (
    add_cell,
    create_viewer_key,
    list_viewer_keys,
    load_public_key,
    revoke_viewer_key,
)
from national.migrate import connection_options, migrate
from national.settings import NationalSettings

VIEWER_KEY_NAME = "iiot run"
SIGNING_KEY_FILE = "national-signing-key.pem"
HASH_KEY_FILE = "enterprise-hash-key"


class Aggregator:
    """`prepare()` readies the database and the keys and says how each cell reports;
    `server()` is the aggregator's HTTP server, run beside the cells."""

    def __init__(self, settings: NationalSettings, *, state_dir: Path, interval: float) -> None:
        if not port_is_free(settings.port, settings.host):
            settings = settings.model_copy(update={"port": free_port(settings.host)})
        self.settings = settings
        self._state_dir = state_dir
        self._interval = interval
        self.viewer_key = ""

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    async def prepare(self, cells: Sequence[tuple[str, Path]]) -> dict[str, CellSettings]:
        """Migrates the database, registers each cell (name, state directory) with its key and
        creates the viewer key; returns each cell's reporting settings (its store unset)."""
        await migrate(self.settings)
        hash_key = _hash_key(self._state_dir / HASH_KEY_FILE)
        reporting = {}
        async with await psycopg.AsyncConnection.connect(
            self.settings.require_database_url(),
            options=connection_options(self.settings.database_schema),
        ) as conn:
            for name, state_dir in cells:
                key_file = _signing_key(state_dir / SIGNING_KEY_FILE)
                await add_cell(
                    conn, name, load_public_key(public_key_pem(load_signing_key(key_file)))
                )
                reporting[name] = CellSettings(
                    cell=name,
                    national_url=AnyHttpUrl(self.url),
                    cell_signing_key=key_file,
                    enterprise_hash_key=SecretStr(str(hash_key)),
                    snapshot_interval_seconds=self._interval,
                )
            for old in await list_viewer_keys(conn):
                if old.name == VIEWER_KEY_NAME and old.revoked_at is None:
                    await revoke_viewer_key(conn, old.id)
            _, self.viewer_key = await create_viewer_key(conn, VIEWER_KEY_NAME)
            await conn.commit()
        return reporting

    def server(self) -> ApiServer:
        return ApiServer(
            create_app(self.settings), host=self.settings.host, port=self.settings.port
        )


def _signing_key(path: Path) -> Path:
    """The cell's signing key, made on its first run and kept (like a deployed cell's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        generate_signing_key(path)
    return path


def _hash_key(path: Path) -> Path:
    """The cells' shared enterprise hash key (32 random bytes, hex), made once and kept: the
    aggregator counts an enterprise once only while every cell hashes with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))
    return path
