"""Failure isolation: what the store refuses, found and kept apart as dead letters.

What the store refuses is sorted by SQLSTATE. A data error (classes 22 and 23) is about a
message: the batch is split in halves until the message the store refuses is alone; that message
becomes a dead letter (`store_refused`), the rest is stored. Any other error (connection,
resources, schema, permissions: 08, 53, 57, 58, 42, ...) is about the store, not the data: the
writer raises Retryable with nothing committed, and the batch waits, so that a broken store
never turns a healthy stream into dead letters. Dead letters keep what arrived byte for byte; a
refusal whose dead letter is refused too raises Unstorable, naming the message (bounded: never
a loop).
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, Self, TypeVar

import psycopg
from psycopg import AsyncConnection

from ingest.batching import Received
from ingest.errors import Rejected, Unstorable

log = logging.getLogger(__name__)

# SQLSTATE classes of errors that the data written causes (22 data exception, 23 integrity
# constraint violation): only these isolate a message. Every other class is about the store.
_DATA_ERROR_CLASSES = frozenset({"22", "23"})


def is_data_error(error: psycopg.Error) -> bool:
    """Whether the data written caused `error` (isolate the message) rather than the store's
    state (wait and retry the batch): by SQLSTATE class, docs/contract.md."""
    state = error.sqlstate
    if state is None:  # raised by psycopg before the server saw it: a value it cannot send
        return isinstance(error, psycopg.DataError)
    return state[:2] in _DATA_ERROR_CLASSES


def as_text(text: str) -> str:
    """`text` as a text column can hold it: a NUL, which PostgreSQL refuses, and unpaired
    surrogates (bytes that were not UTF-8) are written as backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="backslashreplace").decode()
    return text


def describe(message: Received[Any]) -> str:
    """Where a message is, for an operator: Kafka topic, partition and offset; MQTT topic and
    packet id."""
    origin = message.origin
    if origin is not None:
        return f"Kafka record {message.topic}[{origin.partition}] at offset {origin.offset}"
    if message.source == "mqtt" and isinstance(message.ack, tuple):
        return f"MQTT message on {message.topic!r} (packet id {message.ack[0]})"
    return f"{message.source} message on {message.topic!r}"


class _Report(Protocol):
    def add(self, other: Self) -> Self: ...


ReportT = TypeVar("ReportT", bound=_Report)
WritePart = Callable[[Sequence[Received[Any]], bool], Awaitable[ReportT]]
"""Writes a part of a batch (whose own refusals isolate it in turn); True for the part that
ends the batch, which runs the caller's statements."""


async def isolate(
    batch: Sequence[Received[Any]], error: psycopg.Error, write: WritePart[ReportT]
) -> ReportT:
    """Finds what the store refuses by halving the batch; dead-letters it, stores the rest.

    Bounded: a message found alone is written once more as a dead letter; if that is refused
    too (it was a refusal already), Unstorable stops the consumer instead of a loop."""
    if len(batch) == 1:
        return await write([refused_by_store(batch[0], error)], True)
    middle = len(batch) // 2
    # The caller's statements run once, with the second half: they must commit with the
    # batch's end (Kafka offsets), and see only that half's refusals.
    first = await write(batch[:middle], False)
    second = await write(batch[middle:], True)
    return first.add(second)


def refused_by_store(message: Received[Any], error: psycopg.Error) -> Received[Any]:
    """The message the store refused, as a dead letter (`store_refused`); Unstorable if it was
    one already."""
    if isinstance(message.outcome, Rejected):
        raise Unstorable(
            f"{describe(message)}: refused ({message.outcome.reason}), and the store "
            f"refuses its dead letter too: {type(error).__name__}: {error}"
        ) from error
    log.error(
        "the store refused a message on %s: %s",
        message.topic,
        error,
        extra={"topic": message.topic},
    )
    refused = Rejected(
        "store_refused",
        f"{type(error).__name__}: {error}"[:2000],
        platform=message.outcome[0].platform,
    )
    return Received(
        message.source,
        message.topic,
        message.payload,
        message.received_at,
        refused,
        message.ack,
        message.origin,
    )


COPY_DEAD_LETTERS = """
COPY dead_letters (received_at, source, topic, platform_id, reason, detail, payload,
                  kafka_partition, kafka_offset, kafka_key, sparkplug_topic, kafka_headers,
                  raw_topic)
FROM STDIN (FORMAT BINARY)
"""
DEAD_LETTER_TYPES = (
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bytea",
    "int4",
    "int8",
    "bytea",
    "text",
    "bytea[]",
    "bytea",
)


async def copy_dead_letters(
    conn: AsyncConnection[Any], rejected: Sequence[tuple[Received[Any], Rejected]]
) -> None:
    """Records refused messages, byte for byte as they arrived, with their reasons."""
    async with conn.cursor() as cur, cur.copy(COPY_DEAD_LETTERS) as copy:
        copy.set_types(DEAD_LETTER_TYPES)
        for message, reason in rejected:
            origin = message.origin
            topic = as_text(message.topic)
            sparkplug_topic = origin and origin.sparkplug_topic
            await copy.write_row(
                (
                    message.received_at,
                    message.source,
                    topic,
                    reason.platform and as_text(reason.platform),
                    reason.reason,
                    as_text(reason.detail),
                    message.payload,
                    origin and origin.partition,
                    origin and origin.offset,
                    origin and origin.key,
                    sparkplug_topic and as_text(sparkplug_topic),
                    [[name.encode(), value] for name, value in origin.headers]
                    if origin and origin.headers
                    else None,
                    message.topic.encode(errors="surrogateescape")
                    if topic != message.topic
                    else None,
                )
            )
