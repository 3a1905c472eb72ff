"""Sparkplug B payloads encoded by pysparkplug (tests/fixtures/make_sparkplug_reference.py), an
implementation independent of iiot's encoder, moved to the present for a test."""

import json
from functools import cache
from pathlib import Path
from typing import Any

from ingest.sparkplug_b_pb2 import Payload

_FIXTURE = Path(__file__).parent / "fixtures" / "sparkplug_reference.json"


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_FIXTURE.read_text())
    return document


def reference(name: str, *, at_ms: int, seq: int | None = None) -> bytes:
    """The payload `name`, every timestamp moved by the same offset so that the payload's own
    is `at_ms`, and its `seq` set if given: the only changes made to pysparkplug's bytes."""
    document = _document()
    raw = bytes.fromhex(document["payloads"][name])
    if name.startswith("state_"):
        state = json.loads(raw)
        return json.dumps({**state, "timestamp": at_ms}).encode()
    message = Payload.FromString(raw)
    shift = at_ms - document["base_ms"]
    if message.HasField("timestamp"):
        message.timestamp += shift
    for metric in message.metrics:
        if metric.HasField("timestamp"):
            metric.timestamp += shift
    if seq is not None:
        message.seq = seq
    return message.SerializeToString()
