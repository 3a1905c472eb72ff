"""Exporting a platform: everything it has in this cell's store, streamed to a transfer file
(registry/transfer_format.py) from one consistent snapshot; with a move, the platform is
refused here first (docs/operations.md, "Moving a platform between cells").
"""

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from psycopg import AsyncConnection, sql

from registry.errors import NotFound
from registry.moves import Moved, mark_moved, unmove, where_moved
from registry.settings import StoreSettings
from registry.store import connect
from registry.transfer_format import (
    CHUNK,
    END,
    FORMAT,
    SCHEMA_VERSION,
    SECTIONS,
    VERSION,
    GzipWriter,
    Section,
    json_line,
)

# Text that every cell reads back the same: ISO times in UTC, hex bytea, exact floats.
SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
TEXT_SETTINGS = (
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'iso_8601'",
    "SET LOCAL bytea_output = 'hex'",
    "SET LOCAL extra_float_digits = 1",
)
PLATFORM_EXISTS = "SELECT 1 FROM platforms WHERE id = %s"


@dataclass(frozen=True, slots=True)
class ExportSummary:
    platform: str
    rows: dict[str, int]
    bytes: int  # uncompressed
    sha256: str
    moved: Moved | None


async def export_platform(
    conn: AsyncConnection[Any],
    platform: str,
    sink: IO[bytes],
    *,
    cell: str,
    telemetry: bool = False,
) -> ExportSummary:
    """Writes the platform to `sink` from one consistent snapshot (a transaction of its own on
    `conn`, which must not be in one). Rows stream through: memory stays flat whatever the
    platform holds. A moved platform can be exported again (a lost file); its header names the
    cell it moved to, the one cell that will import it."""
    out = GzipWriter(sink)
    rows: dict[str, int] = {}
    async with conn.transaction():
        await conn.execute(SNAPSHOT)
        for setting in TEXT_SETTINGS:
            await conn.execute(setting)
        if await (await conn.execute(PLATFORM_EXISTS, (platform,))).fetchone() is None:
            raise NotFound(f"platform {platform!r}")
        moved = await where_moved(conn, platform)
        version = await (await conn.execute(SCHEMA_VERSION)).fetchone()
        header = {
            "format": FORMAT,
            "version": VERSION,
            "cell": cell,
            "schema_version": version[0] if version else None,
            "platform": platform,
            "exported_at": datetime.now(UTC).isoformat(),
            "telemetry": telemetry,
            "moved_to": moved.cell if moved else None,
        }
        await out.write(json_line(header))
        for section in SECTIONS:
            if section.optional and not telemetry:
                continue
            await out.write(json_line({"section": section.name, "columns": section.columns}))
            rows[section.name] = await _copy_out(conn, section, platform, out)
            await out.write(END)
    digest = out.digest()
    await out.close(json_line({"trailer": {"rows": rows, "sha256": digest}}))
    return ExportSummary(platform, rows, out.size, digest, moved)


async def _copy_out(
    conn: AsyncConnection[Any], section: Section, platform: str, out: GzipWriter
) -> int:
    query = sql.SQL(section.export).format(platform=sql.Literal(platform))
    statement = sql.SQL("COPY ({}) TO STDOUT").format(query)
    count = 0
    pending = bytearray()
    async with conn.cursor() as cur, cur.copy(statement) as copy:
        async for data in copy:
            pending += data
            if len(pending) >= CHUNK:
                count += pending.count(b"\n")
                await out.write(bytes(pending))
                pending.clear()
    count += pending.count(b"\n")
    await out.write(bytes(pending))
    return count


async def export_to(
    settings: StoreSettings,
    platform: str,
    sink: IO[bytes],
    *,
    telemetry: bool = False,
    move_to: str | None = None,
    settle: float = 5.0,
) -> ExportSummary:
    """`iiot platform export`: with `move_to`, the platform is first marked moved, so that this
    cell refuses its traffic from then on, and exported `settle` seconds later (what ingest had
    accepted before the refusal took effect has committed by then): nothing it accepted is left
    out of the file. An export that fails undoes a move it made."""
    async with await connect(settings) as conn:
        made: Moved | None = None
        if move_to is not None:
            before = await where_moved(conn, platform)
            moved = await mark_moved(conn, platform, move_to, here=settings.cell)
            await conn.commit()
            if before is None:
                made = moved
                await asyncio.sleep(settle)
        try:
            return await export_platform(
                conn, platform, sink, cell=settings.cell, telemetry=telemetry
            )
        except BaseException:
            if made is not None:
                await unmove(conn, platform)
                await conn.commit()
            raise
