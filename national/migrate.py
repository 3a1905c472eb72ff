"""Applies national/migrations/ to the aggregator's own database (`iiot national migrate`;
`iiot national serve` does it at start)."""

from psycopg import AsyncConnection

from national.settings import NationalSettings
from registry.migration_files import Migration, apply_migrations


def connection_options(schema: str) -> str:
    return f"-c search_path={schema},public"


async def migrate(settings: NationalSettings) -> list[Migration]:
    async with await AsyncConnection.connect(
        settings.require_database_url(),
        autocommit=True,
        options=connection_options(settings.database_schema),
    ) as conn:
        return await apply_migrations(conn, settings.database_schema, "national")
