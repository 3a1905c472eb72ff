"""Platforms that moved to another cell (docs/operations.md, "Moving a platform between cells").

A moved platform stays in its old cell as a record of where it went (`platforms.moved_to`,
`moved_at`, migration 0032): its traffic is refused there as `platform_moved`, naming the new
cell; its API paths answer 410 but for its record; it counts no longer (migration 0034). An
operator can undo a move whose import failed (`unmove`). Each change is audited and announced,
so running ingest and API processes drop what they cached of the platform.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import AsyncConnection

from registry.access import audit
from registry.errors import Conflict, Invalid, NotFound
from registry.ids import is_platform_id
from registry.notifications import announce

REASON: Final = "platform_moved"
"""The refusal's stable code (docs/contract.md), in dead letters, broker answers and the API."""

MOVED_ONE = "SELECT moved_to, moved_at FROM platforms WHERE id = %s"
MOVED_ALL = "SELECT id, moved_to, moved_at FROM platforms WHERE moved_to IS NOT NULL"
MARK_MOVED = """
UPDATE platforms SET moved_to = %(cell)s, moved_at = now()
WHERE id = %(platform)s AND moved_to IS NULL
RETURNING moved_to, moved_at
"""
UNMOVE = """
UPDATE platforms p SET moved_to = NULL, moved_at = NULL
FROM (SELECT id, moved_to, moved_at FROM platforms WHERE id = %s FOR UPDATE) old
WHERE p.id = old.id AND old.moved_to IS NOT NULL
RETURNING old.moved_to, old.moved_at
"""


@dataclass(frozen=True, slots=True)
class Moved:
    platform: str
    cell: str
    at: datetime

    @property
    def detail(self) -> str:
        """What a refused client or caller is told: where to go now."""
        return (
            f"platform {self.platform!r} moved to cell {self.cell!r} at "
            f"{self.at.isoformat(timespec='seconds')}; its devices and operators use that cell now"
        )


async def where_moved(conn: AsyncConnection[Any], platform: str) -> Moved | None:
    """Where the platform moved to; None when it is here (or does not exist)."""
    row = await (await conn.execute(MOVED_ONE, (platform,))).fetchone()
    if row is None or row[0] is None:
        return None
    return Moved(platform, row[0], row[1])


async def moved_platforms(conn: AsyncConnection[Any]) -> dict[str, Moved]:
    cur = await conn.execute(MOVED_ALL)
    return {id_: Moved(id_, cell, at) for id_, cell, at in await cur.fetchall()}


async def mark_moved(conn: AsyncConnection[Any], platform: str, cell: str, *, here: str) -> Moved:
    """Records that `platform` moved to `cell`: refused here from the commit on. Conflict when
    it moved already (to another cell: undo that first); Invalid for this cell itself."""
    if not is_platform_id(cell):  # cells are named like platforms (IIOT_CELL)
        raise Invalid(f"not a cell name: {cell!r} (lower-case letters, digits and '-')")
    if cell == here:
        raise Invalid(f"cell {cell!r} is this cell (IIOT_CELL): a platform moves to another one")
    cur = await conn.execute(MARK_MOVED, {"platform": platform, "cell": cell})
    row = await cur.fetchone()
    if row is None:
        before = await where_moved(conn, platform)
        if before is None:
            raise NotFound(f"platform {platform!r}")
        if before.cell != cell:
            raise Conflict(
                f"{before.detail}; to move it to {cell!r} instead, undo that move first "
                f"(iiot platform unmove {platform})"
            )
        return before
    moved = Moved(platform, row[0], row[1])
    await audit(
        conn, "platform.move", platform, key_id=None, platform=platform, detail={"to_cell": cell}
    )
    await announce(conn, platform)
    return moved


async def unmove(conn: AsyncConnection[Any], platform: str) -> Moved:
    """Serves `platform` here again (a move whose import failed or was abandoned); returns the
    move it undid. Conflict when it has not moved."""
    row = await (await conn.execute(UNMOVE, (platform,))).fetchone()
    if row is None:
        if await (await conn.execute(MOVED_ONE, (platform,))).fetchone() is None:
            raise NotFound(f"platform {platform!r}")
        raise Conflict(f"platform {platform!r} has not moved: nothing to undo")
    undone = Moved(platform, row[0], row[1])
    await audit(
        conn,
        "platform.unmove",
        platform,
        key_id=None,
        platform=platform,
        detail={"was_moved_to": undone.cell, "moved_at": undone.at.isoformat()},
    )
    await announce(conn, platform)
    return undone
