"""Where Kafka consumers stand, as the store keeps it: each partition's next offset, stored in
the same transaction as the data it produced (ingest/kafka.py writes it; the API reads it)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

LAG = """
SELECT group_id, topic, partition, next_offset, log_end_offset,
       greatest(log_end_offset - next_offset, 0) AS lag, updated_at
FROM kafka_offsets
WHERE %(group)s::text IS NULL OR group_id = %(group)s
ORDER BY group_id, topic, partition
"""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group_id: str
    topic: str
    partition: int
    next_offset: int
    log_end_offset: int | None
    lag: int | None
    updated_at: datetime


async def partition_lag(conn: AsyncConnection[Any], group: str | None = None) -> list[PartitionLag]:
    """Each partition's stored offset and how far behind the partition's end it was."""
    cursor = await conn.execute(LAG, {"group": group})
    return [PartitionLag(*row) for row in await cursor.fetchall()]
