"""Messages on their way from receive to acknowledge, and the collection of them into batches."""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Generic, TypeVar

from ingest.decoding import Decoded, Telemetry
from ingest.errors import Rejected

AckT = TypeVar("AckT")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record sits in a partitioned log (Kafka); kept with its dead letter."""

    partition: int
    offset: int
    key: bytes | None  # as it arrived: any bytes (dead letters keep them)
    # The Sparkplug topic named by the record's header, when it carries a Sparkplug payload.
    sparkplug_topic: str | None = None
    headers: Sequence[tuple[str, bytes | None]] = ()


@dataclass(slots=True)
class Received(Generic[AckT]):
    """One message after decoding, plus what acknowledges it.

    `outcome` is what the message says (readings per device, a gateway message has several;
    or a status) or the reason it was rejected.
    """

    source: str
    topic: str
    payload: bytes
    received_at: datetime
    outcome: Decoded | Rejected
    ack: AckT
    origin: Origin | None = None
    # The transport says it may have delivered this message before (MQTT's DUP flag).
    redelivered: bool = False

    @property
    def weight(self) -> int:
        """Rows this message costs the writer."""
        if isinstance(self.outcome, Rejected):
            return 1
        return sum(len(t.points) if isinstance(t, Telemetry) else 1 for t in self.outcome)


class EndOfStream:
    """Put on a queue after the last message: the collector flushes and stops."""


END: Final = EndOfStream()


async def collect(
    queue: "asyncio.Queue[Received[AckT] | EndOfStream]", *, max_points: int, max_delay: float
) -> tuple[list[Received[AckT]], bool]:
    """Waits for a first message, then takes more until `max_points` rows or `max_delay` seconds.

    Returns the batch (in arrival order) and whether the end of the stream was reached.
    """
    first = await queue.get()
    if isinstance(first, EndOfStream):
        return [], True
    batch = [first]
    points = first.weight
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_delay
    while points < max_points:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    item = await queue.get()
            except TimeoutError:
                break
        if isinstance(item, EndOfStream):
            return batch, True
        batch.append(item)
        points += item.weight
    return batch, False
