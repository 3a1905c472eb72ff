"""Failure isolation on its own: which store errors are about a message, how halving finds it,
and how dead-letter text is made storable. No store here; the writer's tests (test_writer.py,
test_store_errors.py) run the same paths on the real PostgreSQL."""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import errors

from ingest.batching import Origin, Received
from ingest.decoding import Telemetry
from ingest.errors import Rejected, Unstorable
from ingest.isolation import as_text, describe, is_data_error, isolate
from ingest.writer import WriteReport

NOW = datetime.now(UTC)


def message(n: int, *, ack: Any = None, origin: Origin | None = None) -> Received[Any]:
    outcome = [Telemetry("p", f"d{n}", [(NOW, "v", float(n))], False, NOW, NOW)]
    return Received("mqtt", f"t{n}", b"{}", NOW, outcome, ack, origin)


@pytest.mark.parametrize(
    ("error", "about_message"),
    [
        (errors.NumericValueOutOfRange("22003"), True),
        (errors.InvalidTextRepresentation("22P02"), True),
        (errors.UniqueViolation("23505"), True),
        (errors.CheckViolation("23514"), True),
        # Raised by psycopg before sending (a NUL in text): no SQLSTATE, classed by its type.
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), True),
        (errors.InsufficientPrivilege("42501"), False),
        (errors.UndefinedColumn("42703"), False),
        (errors.AdminShutdown("57P01"), False),
        (errors.ConnectionFailure("08006"), False),
        (errors.DiskFull("53100"), False),
        (psycopg.OperationalError("the connection is lost"), False),
    ],
)
def test_only_data_errors_are_about_a_message(error: psycopg.Error, about_message: bool) -> None:
    assert is_data_error(error) is about_message


def test_dead_letter_text_escapes_what_a_text_column_refuses() -> None:
    assert as_text("plain/topic é") == "plain/topic é"
    assert as_text("a\x00b") == "a\\x00b"
    # Bytes that were not UTF-8, decoded with surrogateescape.
    raw = b"iiot/\xff\xfe/x".decode(errors="surrogateescape")
    assert as_text(raw) == "iiot/\\udcff\\udcfe/x"
    assert as_text(raw + "\x00") == "iiot/\\udcff\\udcfe/x\\x00"


def test_a_message_is_described_where_an_operator_finds_it() -> None:
    kafka = Received("kafka", "in", b"", NOW, [], None, Origin(3, 42, None))
    assert describe(kafka) == "Kafka record in[3] at offset 42"
    assert describe(message(1, ack=(7, 1))) == "MQTT message on 't1' (packet id 7)"
    assert describe(Received("http", "x", b"", NOW, [], None)) == "http message on 'x'"


async def test_halving_finds_the_refused_message_and_ends_with_the_batch_end() -> None:
    batch = [message(n) for n in range(7)]
    poison = batch[4]
    error = errors.NumericValueOutOfRange("value out of range")
    written: list[tuple[list[str], bool, list[str]]] = []

    async def write(part: Sequence[Received[Any]], last: bool) -> WriteReport:
        """As the writer: a part holding the poison is refused, and isolated in turn."""
        if any(m is poison for m in part):
            return await isolate(part, error, lambda p, end: write(p, last and end))
        reasons = [m.outcome.reason for m in part if isinstance(m.outcome, Rejected)]
        written.append(([m.topic for m in part], last, reasons))
        return WriteReport(points_written=len(part) - len(reasons), dead_letters=len(reasons))

    report = await isolate(batch, error, write)
    assert written == [
        (["t0", "t1", "t2"], False, []),
        (["t3"], False, []),
        (["t4"], False, ["store_refused"]),
        (["t5", "t6"], True, []),  # the only part that runs the caller's statements
    ]
    assert (report.points_written, report.dead_letters) == (6, 1)


async def test_a_refusal_refused_again_stops_naming_the_message() -> None:
    refused = Received(
        "kafka", "in", b"\x00", NOW, Rejected("bad_json", "x"), None, Origin(0, 9, None)
    )

    async def write(part: Sequence[Received[Any]], last: bool) -> WriteReport:
        raise AssertionError("a refusal refused again is not written again")

    with pytest.raises(Unstorable, match=r"Kafka record in\[0\] at offset 9: refused \(bad_json"):
        await isolate([refused], errors.CharacterNotInRepertoire("22021"), write)
