"""What a batch used, per platform and day, and which platforms are over their hard quota.

The writer feeds a `BatchMeter` while it builds a batch and records its `usage()` in the batch's
transaction (registry/usage.py); `QuotaGuard` tells it which platforms' messages to refuse.
"""

import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from datetime import UTC, date, datetime
from typing import Any

from psycopg import AsyncConnection

from registry.platforms import Platform
from registry.usage import Quota, Usage, points_on, quotas

# (platform, UTC day the message was received, source)
MeterKey = tuple[str, date, str]


def meter_key(platform: str, received_at: datetime, source: str) -> MeterKey:
    return platform, received_at.astimezone(UTC).date(), source


class BatchMeter:
    """Counts one batch: messages and bytes accepted, points offered, messages refused."""

    def __init__(self) -> None:
        self._messages: dict[MeterKey, int] = defaultdict(int)
        self._bytes: dict[MeterKey, int] = defaultdict(int)
        self._refused: dict[MeterKey, int] = defaultdict(int)
        # Points offered per key and device, in the order they were offered.
        self._rows: dict[tuple[MeterKey, int], int] = defaultdict(int)

    def accepted(self, key: MeterKey, payload_bytes: int) -> None:
        self._messages[key] += 1
        self._bytes[key] += payload_bytes

    def refused(self, key: MeterKey) -> None:
        self._refused[key] += 1

    def points(self, key: MeterKey, device: int, count: int) -> None:
        self._rows[(key, device)] += count

    def usage(self, new_by_device: Mapping[int, int] | None) -> list[Usage]:
        """The batch's usage. `new_by_device`: points each device newly stored (None: all the
        points offered were new). A device's new points go to its keys in offering order; only
        a device whose messages span two keys and hold duplicates could be split otherwise."""
        stored: dict[MeterKey, int] = defaultdict(int)
        offered: dict[MeterKey, int] = defaultdict(int)
        left = dict(new_by_device) if new_by_device is not None else None
        for (key, device), count in self._rows.items():
            offered[key] += count
            if left is None:
                stored[key] += count
            else:
                new = min(count, left.get(device, 0))
                left[device] = left.get(device, 0) - new
                stored[key] += new
        keys = sorted(self._messages.keys() | self._refused.keys() | offered.keys())
        return [
            Usage(
                platform,
                day,
                source,
                messages=self._messages.get(key, 0),
                bytes=self._bytes.get(key, 0),
                points=stored.get(key, 0),
                duplicate_points=offered.get(key, 0) - stored.get(key, 0),
                refused_messages=self._refused.get(key, 0),
            )
            for key in keys
            for platform, day, source in (key,)
        ]


class QuotaGuard:
    """Knows the tiers' quotas (re-read every `refresh_seconds`) and which platforms have
    reached their hard quota today. A platform can overshoot by the batches in flight when it
    reaches it (at most one per ingest process)."""

    def __init__(self, refresh_seconds: float = 30.0) -> None:
        self._refresh = refresh_seconds
        self._quotas: dict[str, Quota] = {}
        self._read_at = float("-inf")

    async def over_hard_quota(
        self, conn: AsyncConnection[Any], platforms: Collection[Platform], day: date
    ) -> dict[str, str]:
        """Platform -> why its points are refused, for the platforms at their hard quota."""
        now = time.monotonic()
        if now - self._read_at > self._refresh:
            self._quotas = await quotas(conn)
            self._read_at = now
        limits = {
            p.id: (p.tier, quota.hard_points_per_day)
            for p in platforms
            if (quota := self._quotas.get(p.tier)) and quota.hard_points_per_day is not None
        }
        if not limits:
            return {}
        used = await points_on(conn, day, sorted(limits))
        return {
            platform: (
                f"platform {platform!r} stored {used[platform]} points on {day}; the {tier} "
                f"tier's hard quota is {hard} points per day"
            )
            for platform, (tier, hard) in limits.items()
            if used.get(platform, 0) >= hard
        }
