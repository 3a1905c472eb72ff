from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Caller, check_national
from api.deps import Connection
from api.models import KafkaPartitionLag
from registry.kafka_offsets import partition_lag

router = APIRouter(prefix="/ingest", tags=["ingest"])


@router.get("/kafka/lag", operation_id="kafka_lag", response_model=list[KafkaPartitionLag])
async def kafka_lag(
    conn: Connection,
    caller: Caller,
    group: Annotated[str | None, Query(max_length=200)] = None,
) -> list[KafkaPartitionLag]:
    """Each consumed partition's stored offset and how far behind the end of the partition it
    was when the offset was stored (records) (keys for all platforms)."""
    check_national(caller)
    return [
        KafkaPartitionLag(
            group=p.group_id,
            topic=p.topic,
            partition=p.partition,
            next_offset=p.next_offset,
            log_end_offset=p.log_end_offset,
            lag=p.lag,
            updated_at=p.updated_at,
        )
        for p in await partition_lag(conn, group)
    ]
