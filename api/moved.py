"""Platforms that moved to another cell, as the API refuses them: every path of a moved
platform answers 410 Gone (problem+json naming the new cell) but the read of its record,
which says where it went (docs/operations.md, "Moving a platform between cells").

The moved platforms are read from the store and cached until a registry change is announced
(a move or its undo is: registry/moves.py) or the cache time passes, so the check costs a dict
lookup.
"""

import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from api.problems import Problem
from registry.moves import REASON, Moved, moved_platforms


class MovedPlatforms:
    """`ttl`: the longest a read is trusted (IIOT_API_KEY_CACHE_SECONDS), in case an
    announcement is missed while the listening connection is silently dead."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._moved: dict[str, Moved] = {}
        self._until = float("-inf")
        # A read that an announcement overtook is not kept (it may predate the change).
        self._generation = 0

    def forget(self, platform: str) -> None:
        """A registry change was announced (any platform, or "*")."""
        self._generation += 1
        self._until = float("-inf")

    async def get(self, pool: AsyncConnectionPool, platform: str) -> Moved | None:
        now = time.monotonic()
        if now >= self._until:
            generation = self._generation
            async with pool.connection() as conn:
                moved = await moved_platforms(conn)
            if generation == self._generation:
                self._moved, self._until = moved, now + self._ttl
            return moved.get(platform)
        return self._moved.get(platform)


def gone(moved: Moved) -> Problem:
    return Problem(
        410,
        "Gone",
        moved.detail,
        reason=REASON,
        moved_to=moved.cell,
        moved_at=moved.at.isoformat(),
    )


async def refuse_moved(state: Any, platform: str) -> None:
    """410 when `platform` moved to another cell."""
    cache: MovedPlatforms = state.moved_platforms
    moved = await cache.get(state.pool, platform)
    if moved is not None:
        raise gone(moved)
