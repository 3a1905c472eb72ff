"""Numbered SQL files applied once each, in order, recorded in `schema_migrations`: the runner
the registry's store (registry/migrate.py) and the national aggregator's own database
(national/migrate.py) share; each names the package whose `migrations/` it applies.

Idempotent and safe to run from several processes at once: an advisory lock serialises runners,
and each file is applied in its own transaction together with its row in `schema_migrations`.
"""

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
APPLIED_VERSIONS = "SELECT version FROM schema_migrations"
RECORD_VERSION = "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)"
# Any constant will do; it only has to be the same for every runner.
LOCK = "SELECT pg_advisory_lock(hashtext(current_schema() || '.iiot_migrate'))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext(current_schema() || '.iiot_migrate'))"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str


def migrations_of(package: str) -> list[Migration]:
    """The files of `package`'s migrations/ directory, in version order."""
    found = []
    for entry in resources.files(package).joinpath("migrations").iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a number: {versions}")
    return found


async def apply_migrations(
    conn: AsyncConnection[Any], schema: str, package: str, *, through: int | None = None
) -> list[Migration]:
    """Creates `schema` if needed and applies `package`'s pending migrations in it (up to
    version `through`, when given). `conn`: autocommit, with `schema` first on its search path."""
    applied: list[Migration] = []
    await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    await conn.execute(LOCK)
    try:
        await conn.execute(CREATE_LEDGER)
        cur = await conn.execute(APPLIED_VERSIONS)
        done = {row[0] for row in await cur.fetchall()}
        for migration in migrations_of(package):
            if migration.version in done:
                continue
            if through is not None and migration.version > through:
                break
            await _apply(conn, migration)
            applied.append(migration)
    finally:
        await conn.execute(UNLOCK)
    return applied


async def _apply(conn: AsyncConnection[Any], migration: Migration) -> None:
    log.info("applying migration %04d_%s", migration.version, migration.name)
    async with conn.transaction():
        # Migration files are trusted text shipped with the package, not user input.
        await conn.execute(migration.text.encode())
        await conn.execute(RECORD_VERSION, (migration.version, migration.name))
