"""Applies the numbered SQL files in registry/migrations/ once each, in order
(registry/migration_files.py: idempotent, safe to run from several processes at once)."""

from registry.migration_files import Migration, apply_migrations, migrations_of
from registry.settings import StoreSettings
from registry.store import connect

__all__ = ["Migration", "available_migrations", "migrate"]


def available_migrations() -> list[Migration]:
    return migrations_of("registry")


async def migrate(settings: StoreSettings, *, through: int | None = None) -> list[Migration]:
    """Creates the schema if needed and applies pending migrations (up to version `through`,
    when given: tests of a migration arrange the rows it must carry); returns what it applied."""
    conn = await connect(settings, autocommit=True)
    async with conn:
        return await apply_migrations(conn, settings.database_schema, "registry", through=through)
