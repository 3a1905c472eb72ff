"""Stores an MQTT broker's redelivery of a message without `ts` once (docs/contract.md, "Delivery").

A reading without `ts` takes its arrival time. When ingest dies after a batch commits but before
the broker has its PUBACKs, the broker sends those messages again when the session resumes, with
the DUP flag set; with a new arrival time each would become a second point. So, in each batch's
transaction, MQTT ingest records the QoS 1 messages that took the arrival time (client id,
packet id, a digest of topic and payload, the time), and a DUP message whose packet id and digest
are recorded is decoded again with the recorded time: the telemetry key then stores it once,
and the ledger counts its points as duplicates, not as stored points.

A message without DUP is never taken for a redelivery: the same reading sent twice is two
points. A publisher's own retry (its PUBACK lost) reaches iiot without DUP (brokers do not
forward the flag), so end to end a message without `ts` is at least once.

Which records may belong to an unacknowledged message: acknowledgements go out right after each
commit, so by the time a connection commits batch n + 2 the broker has read those of batch n
(a commit takes far longer than a PUBACK's way to the broker; should it not have, the message is
stored twice, never lost). Only the records of a connection's last two committed batches are
looked at: older ones may hold a packet id the broker has since given to another message (one
that was never stored and now comes again with DUP), and taking that for a redelivery would lose
it.
"""

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import Decoded, Telemetry
from ingest.errors import Rejected
from registry.arrays import BigintArray, TimestamptzArray

log = logging.getLogger(__name__)

RECORD = """
WITH connection AS (
    INSERT INTO mqtt_redelivery_connections AS c (client_id, connection, last_batch)
    VALUES (%(client)s, %(connection)s, %(batch)s)
    ON CONFLICT (client_id, connection) DO UPDATE
        SET last_batch = excluded.last_batch, updated_at = now()
)
INSERT INTO mqtt_redeliveries AS r
    (client_id, packet_id, digest, received_at, connection, batch)
SELECT %(client)s, m.packet_id, m.digest, m.received_at, %(connection)s, %(batch)s
FROM unnest(%(packet_ids)b::int8[], %(digests)b::int8[], %(times)b::timestamptz[])
    AS m(packet_id, digest, received_at)
ON CONFLICT (client_id, packet_id) DO UPDATE SET
    digest = excluded.digest, received_at = excluded.received_at,
    connection = excluded.connection, batch = excluded.batch
"""
RECORDED = """
SELECT r.packet_id, r.digest, r.received_at
FROM mqtt_redeliveries r JOIN mqtt_redelivery_connections c USING (client_id, connection)
WHERE r.client_id = %(client)s AND r.packet_id = ANY(%(packet_ids)s::int4[])
  AND r.batch > c.last_batch - %(batches)s
"""
PRUNE = """
WITH expired AS (
    DELETE FROM mqtt_redelivery_connections WHERE updated_at < now() - %(keep)s
    RETURNING client_id, connection
)
DELETE FROM mqtt_redeliveries
WHERE (client_id, connection) IN (SELECT client_id, connection FROM expired)
"""

# A connection's last batches whose acknowledgements the broker may not have read.
UNACKNOWLEDGED_BATCHES = 2
_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0

Decode = Callable[[str, bytes, datetime], Decoded | Rejected]
Message = Received[tuple[int, int]]
"""A received MQTT message; its `ack` is (packet id, QoS)."""


def digest(topic: str, payload: bytes) -> int:
    """8 bytes of blake2b over topic and payload, as a signed bigint (a topic holds no NUL)."""
    hashed = hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=8).digest()
    return int.from_bytes(hashed, "big", signed=True)


def took_arrival_time(message: Received[Any]) -> bool:
    """Whether some of the message's readings are stored at its arrival time (QoS 1 only: the
    broker never redelivers QoS 0)."""
    outcome = message.outcome
    if message.ack[1] == 0 or isinstance(outcome, Rejected):
        return False
    for item in outcome:  # noqa: SIM110 - per message: a loop costs less than any(generator)
        if isinstance(item, Telemetry) and item.arrival_time:
            return True
    return False


class RedeliveryRecord:
    """One MQTT consumer's record of the messages it stored at their arrival time.

    `connected()` at each new connection; `recorded_times(batch)` before a batch is prepared;
    `record(conn, batch)` in the batch's transaction, once per commit, in commit order.
    """

    def __init__(
        self, pool: AsyncConnectionPool, client_id: str, *, keep: timedelta, decode: Decode
    ) -> None:
        self._pool = pool
        self._client = client_id
        self._keep = keep
        self._decode = decode
        self._connection = 0
        self._batch = 0
        self._recorded_batch = -UNACKNOWLEDGED_BATCHES  # the last batch that recorded messages

    def connected(self) -> None:
        """A new connection numbers its batches afresh."""
        self._connection = time.time_ns()
        self._batch = 0
        self._recorded_batch = -UNACKNOWLEDGED_BATCHES

    async def recorded_times(self, batch: Sequence[Message]) -> Sequence[Message]:
        """The batch, with each redelivered message that was stored before decoded again at
        the time it was stored at. Waits while the store is unavailable."""
        redelivered = {
            message.ack[0]: n
            for n, message in enumerate(batch)
            if message.redelivered and took_arrival_time(message)
        }
        if not redelivered:
            return batch
        delay = _RETRY_FIRST
        while True:
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(
                        RECORDED,
                        {
                            "client": self._client,
                            "packet_ids": list(redelivered),
                            "batches": UNACKNOWLEDGED_BATCHES,
                        },
                    )
                    rows = await cur.fetchall()
                break
            except psycopg.OperationalError as exc:
                log.warning("redelivery record unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
        revised = list(batch)
        found = 0
        for packet_id, recorded_digest, received_at in rows:
            n = redelivered[packet_id]
            message = batch[n]
            if recorded_digest != digest(message.topic, message.payload):
                continue  # another message under the same packet id: not stored yet
            found += 1
            outcome = self._decode(message.topic, message.payload, received_at)
            revised[n] = Received(
                message.source,
                message.topic,
                message.payload,
                received_at,
                outcome,
                message.ack,
                message.origin,
                message.redelivered,
            )
        log.info(
            "%d of %d redelivered messages without ts were stored before", found, len(redelivered)
        )
        return revised

    async def record(self, conn: AsyncConnection[Any], batch: Sequence[Received[Any]]) -> None:
        """Records the batch's messages stored at their arrival time; call in its transaction.
        One statement, and none for a batch whose connection has nothing left to record."""
        self._batch += 1
        if self._batch == 1:
            # Records past `keep` go (the broker keeps a session, and with it unacknowledged
            # messages, only so long): once per connection.
            await conn.execute(PRUNE, {"keep": self._keep})
        # By packet id: a statement may not update one row twice.
        stored = {m.ack[0]: m for m in batch if took_arrival_time(m)}
        packet_ids = BigintArray(stored)
        digests = BigintArray(digest(m.topic, m.payload) for m in stored.values())
        times = TimestamptzArray(m.received_at for m in stored.values())
        if packet_ids:
            self._recorded_batch = self._batch
        elif self._batch - self._recorded_batch > UNACKNOWLEDGED_BATCHES:
            return  # the last recorded batch is out of reach already
        await conn.execute(
            RECORD,
            {
                "client": self._client,
                "connection": self._connection,
                "batch": self._batch,
                "packet_ids": packet_ids,
                "digests": digests,
                "times": times,
            },
        )
