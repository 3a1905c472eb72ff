"""The load test's own Sparkplug B encoder (loadtests/sparkplug_payloads.py) writes the bytes an
independent implementation writes, and iiot reads them: the load test shares no encoder with
the system it checks."""

import json
from pathlib import Path

import pytest

from ingest.sparkplug import decode_payload
from loadtests.sparkplug_payloads import BOOLEAN, DOUBLE, INT64, Metric, encode, node_topic

REFERENCE = json.loads(
    (Path(__file__).parent / "fixtures" / "sparkplug_reference.json").read_text()
)
PAYLOADS = {name: bytes.fromhex(raw) for name, raw in REFERENCE["payloads"].items()}
BASE_MS = REFERENCE["base_ms"]


@pytest.mark.parametrize(
    ("reference", "ours"),
    [
        (
            "ndeath_bdseq_1",
            encode([Metric("bdSeq", 1, INT64, timestamp_ms=BASE_MS)], timestamp_ms=BASE_MS),
        ),
        (
            "nbirth_bdseq_1",
            encode(
                [
                    Metric("bdSeq", 1, INT64, timestamp_ms=BASE_MS),
                    Metric("Node Control/Rebirth", False, BOOLEAN, timestamp_ms=BASE_MS),
                    Metric("Temperature", 20.0, DOUBLE, alias=1, timestamp_ms=BASE_MS),
                ],
                seq=0,
                timestamp_ms=BASE_MS,
            ),
        ),
        (
            # DATA by alias, without the datatype its BIRTH gave.
            "ndata",
            encode(
                [Metric(None, 21.0, None, alias=1, timestamp_ms=BASE_MS)],
                seq=1,
                timestamp_ms=BASE_MS,
            ),
        ),
    ],
)
def test_the_encoder_writes_what_pysparkplug_writes(reference: str, ours: bytes) -> None:
    theirs = PAYLOADS[reference]
    decoded = decode_payload(theirs, max_bytes=1 << 20, max_metrics=100)
    assert decoded.metrics, reference
    assert ours == theirs, (reference, ours.hex(), theirs.hex())


def test_iiot_reads_what_the_fleet_sends() -> None:
    birth = encode([Metric("bdSeq", 7, INT64)], seq=0, timestamp_ms=1_700_000_000_000)
    data = encode(
        [Metric(None, -12.5, alias=1, timestamp_ms=1_700_000_000_123, historical=True)],
        seq=255,
        timestamp_ms=1_700_000_000_456,
    )
    device_birth = encode([Metric("v", None, alias=1)], seq=1, timestamp_ms=1_700_000_000_000)

    got = decode_payload(birth, max_bytes=1 << 20, max_metrics=100)
    assert got.seq == 0
    assert got.timestamp is not None
    assert int(got.timestamp.timestamp() * 1000) == 1_700_000_000_000
    (bdseq,) = got.metrics
    assert (bdseq.name, bdseq.value, bdseq.datatype) == ("bdSeq", 7.0, INT64)

    got = decode_payload(data, max_bytes=1 << 20, max_metrics=100)
    assert got.seq == 255
    (reading,) = got.metrics
    assert (reading.name, reading.alias, reading.value) == (None, 1, -12.5)
    assert reading.historical
    assert reading.timestamp_ms == 1_700_000_000_123

    (declared,) = decode_payload(device_birth, max_bytes=1 << 20, max_metrics=100).metrics
    assert (declared.name, declared.alias, declared.value, declared.datatype) == (
        "v",
        1,
        None,
        DOUBLE,
    )
    assert (
        node_topic("plant-1", "DDATA", "gw-00001", "d0001")
        == "spBv1.0/plant-1/DDATA/gw-00001/d0001"
    )
