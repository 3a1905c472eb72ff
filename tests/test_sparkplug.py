"""Sparkplug B codec and edge node sessions, through the generated protobuf module."""

from datetime import UTC, datetime, timedelta

import pytest

from ingest.errors import Rejected
from ingest.sparkplug import (
    BOOLEAN,
    DOUBLE,
    FLOAT,
    INT8,
    INT16,
    INT32,
    INT64,
    STRING,
    UINT8,
    UINT32,
    UINT64,
    EdgeNodeSessions,
    MetricIn,
    Outcome,
    SessionChange,
    decode_payload,
    encode_payload,
    parse_topic,
    rebirth_request,
    state_payload,
)
from ingest.sparkplug_b_pb2 import Payload as PayloadMessage

NOW = datetime.now(UTC).replace(microsecond=0)
NOW_MS = int(NOW.timestamp() * 1000)


def decode(raw: bytes) -> list[float | None]:
    return [m.value for m in decode_payload(raw, max_bytes=65536, max_metrics=100).metrics]


def test_topics() -> None:
    t = parse_topic("spBv1.0/plant-a/DDATA/edge-1/press-7")
    assert (t.group, t.kind, t.edge_node, t.device) == ("plant-a", "DDATA", "edge-1", "press-7")
    assert parse_topic("spBv1.0/plant-a/NBIRTH/edge-1").device is None
    for bad, reason in [
        ("spBv1.0/plant-a/NDATA/edge-1/extra", "bad_topic"),
        ("spBv1.0/plant-a/DDATA/edge-1", "bad_topic"),
        ("spBv1.0/plant-a/XDATA/edge-1", "bad_topic"),
        ("spAv1.0/plant-a/NDATA/edge-1", "bad_topic"),
        ("spBv1.0/plant a/NDATA/edge-1", "bad_group_id"),
        ("spBv1.0/plant-a/NDATA/-edge", "bad_edge_node_id"),
        ("spBv1.0/plant-a/DDATA/edge-1/bad device", "bad_device_id"),
    ]:
        with pytest.raises(Rejected) as caught:
            parse_topic(bad)
        assert caught.value.reason == reason, bad


def test_every_numeric_datatype_round_trips() -> None:
    raw = encode_payload(
        [
            MetricIn("i8", -5, INT8),
            MetricIn("i16", -300, INT16),
            MetricIn("i32", -70_000, INT32),
            MetricIn("i64", -(2**40), INT64),
            MetricIn("u8", 250, UINT8),
            MetricIn("u32", 4_000_000_000, UINT32),
            MetricIn("u64", 2**63 + 5, UINT64),
            MetricIn("f", 1.5, FLOAT),
            MetricIn("d", -2.25, DOUBLE),
            MetricIn("b", True, BOOLEAN),
            MetricIn("off", False, BOOLEAN),
            MetricIn("null", None, DOUBLE),
            MetricIn("s", "text", STRING),
        ],
        seq=0,
        timestamp_ms=NOW_MS,
    )
    assert decode(raw) == [
        -5.0,
        -300.0,
        -70_000.0,
        float(-(2**40)),
        250.0,
        4_000_000_000.0,
        float(2**63 + 5),
        1.5,
        -2.25,
        1.0,
        0.0,
        None,
        None,
    ]


def test_int8_sent_as_an_8_bit_pattern_is_signed_too() -> None:
    message = PayloadMessage()
    metric = message.metrics.add()
    metric.name, metric.datatype, metric.int_value = "t", INT8, 0xFF
    assert decode(message.SerializeToString()) == [-1.0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    with pytest.raises(Rejected) as caught:
        decode(encode_payload([MetricIn("v", value, DOUBLE)], seq=0))
    assert caught.value.reason == "invalid_value"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xff\xff", "invalid_protobuf"),
        (encode_payload([MetricIn("v", 1.0)], seq=0, timestamp_ms=NOW_MS)[:-3], "invalid_protobuf"),
        (b'{"metrics": {"v": 1}}', "invalid_protobuf"),
        (b"", "invalid_protobuf"),
        (b"x" * 70_000, "payload_too_large"),
        (encode_payload([MetricIn(f"m{n}", n) for n in range(101)], seq=0), "too_many_points"),
    ],
)
def test_bad_payloads_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        decode(raw)
    assert caught.value.reason == reason


def test_commands_and_state() -> None:
    (metric,) = decode_payload(rebirth_request(), max_bytes=1024, max_metrics=10).metrics
    assert (metric.name, metric.value) == ("Node Control/Rebirth", 1.0)
    assert state_payload(True, 5) == b'{"online":true,"timestamp":5}'


class Node:
    """An edge node that encodes its messages with a running seq."""

    def __init__(self, sessions: EdgeNodeSessions, group: str = "g", edge: str = "e1") -> None:
        self.sessions, self.group, self.edge = sessions, group, edge
        self.seq = 0

    def send(
        self,
        kind: str,
        metrics: list[MetricIn],
        *,
        device: str | None = None,
        seq: int | None = None,
        ts: int = NOW_MS,
        now: float = 0.0,
        at: datetime = NOW,
    ) -> Outcome:
        if kind == "NBIRTH":
            self.seq = 0
        use = self.seq if seq is None else seq
        if kind != "NDEATH" and seq is None:
            self.seq = (self.seq + 1) % 256
        topic = f"spBv1.0/{self.group}/{kind}/{self.edge}" + (f"/{device}" if device else "")
        payload = decode_payload(
            encode_payload(metrics, seq=None if kind == "NDEATH" else use, timestamp_ms=ts),
            max_bytes=65536,
            max_metrics=1000,
        )
        return self.sessions.handle(parse_topic(topic), payload, at, now=now)

    def birth(self, bd_seq: int, ts: int = NOW_MS, at: datetime = NOW) -> Outcome:
        return self.send(
            "NBIRTH",
            [
                MetricIn("bdSeq", bd_seq, INT64),
                MetricIn("Node Control/Rebirth", False, BOOLEAN),
                MetricIn("Inputs/Temperature 1", 20.5, DOUBLE, alias=1),
            ],
            ts=ts,
            at=at,
        )


def sessions(**kwargs: float) -> EdgeNodeSessions:
    return EdgeNodeSessions(
        window_past=timedelta(days=7), window_future=timedelta(minutes=10), **kwargs
    )


def test_births_give_aliases_and_open_sessions() -> None:
    s = sessions()
    node = Node(s)
    born = node.birth(bd_seq=0)
    # Control metrics and bdSeq are not telemetry; the birth's values are.
    assert [(r.device, [(n, v) for _, n, v in r.live]) for r in born.readings] == [
        (None, [("Inputs/Temperature 1", 20.5)])
    ]
    assert born.changes == [SessionChange(True, NOW_MS)]
    device = node.send("DBIRTH", [MetricIn("Speed", 3.0, alias=7)], device="press", ts=NOW_MS + 1)
    assert device.changes == [SessionChange(True, NOW_MS + 1, "press")]
    data = node.send("DDATA", [MetricIn(None, 4.5, alias=7)], device="press")
    assert [(n, v) for _, n, v in data.readings[0].live] == [("Speed", 4.5)]
    node_data = node.send("NDATA", [MetricIn(None, 21.0, alias=1)])
    assert [(n, v) for _, n, v in node_data.readings[0].live] == [("Inputs/Temperature 1", 21.0)]
    assert s.take_rebirths() == []


def test_unknown_alias_and_data_before_birth_ask_for_a_rebirth() -> None:
    s = sessions()
    node = Node(s)
    with pytest.raises(Rejected) as caught:
        node.send("NDATA", [MetricIn("v", 1.0)])
    assert caught.value.reason == "no_birth"
    assert s.take_rebirths() == [("g", "e1")]
    node.birth(bd_seq=0)
    with pytest.raises(Rejected) as caught:
        node.send("NDATA", [MetricIn(None, 1.0, alias=99)])
    assert caught.value.reason == "unknown_alias"
    with pytest.raises(Rejected) as caught:
        node.send("DDATA", [MetricIn("v", 1.0)], device="never-born")
    assert caught.value.reason == "no_birth"
    assert s.take_rebirths() == [("g", "e1")]  # one request for both
    with pytest.raises(Rejected) as caught:
        node.send("NDATA", [MetricIn(None, 1.0)])
    assert caught.value.reason == "invalid_shape"


def test_seq_wraps_without_a_gap() -> None:
    s = sessions(reorder_wait=1.0)
    node = Node(s)
    node.birth(bd_seq=0)
    for _ in range(300):  # past 255 and round again
        node.send("NDATA", [MetricIn(None, 1.0, alias=1)])
    s.expire_gaps(now=100.0)
    assert (s.stats.gaps, s.take_rebirths()) == (0, [])


def test_a_gap_filled_within_the_wait_costs_nothing() -> None:
    s = sessions(reorder_wait=1.0)
    node = Node(s)
    node.birth(bd_seq=0)
    node.send("NDATA", [MetricIn(None, 1.0, alias=1)], seq=2, now=0.0)  # 1 is late
    s.expire_gaps(now=0.5)
    node.send("NDATA", [MetricIn(None, 2.0, alias=1)], seq=1, now=0.6)  # stored anyway
    s.expire_gaps(now=5.0)
    assert (s.stats.gaps, s.stats.out_of_order, s.take_rebirths()) == (0, 1, [])


def test_a_gap_not_filled_asks_for_one_rebirth() -> None:
    s = sessions(reorder_wait=1.0, rebirth_interval=10.0)
    node = Node(s)
    node.birth(bd_seq=0)
    node.send("NDATA", [MetricIn(None, 1.0, alias=1)], seq=3, now=0.0)  # 1 and 2 lost
    s.expire_gaps(now=0.9)
    assert s.take_rebirths() == []
    s.expire_gaps(now=1.0)
    assert (s.stats.gaps, s.take_rebirths()) == (2, [("g", "e1")])
    node.send("NDATA", [MetricIn(None, 1.0, alias=1)], seq=9, now=2.0)  # another gap
    s.expire_gaps(now=3.5)
    assert s.take_rebirths() == []  # a request is outstanding
    assert s.stats.rebirth_requests == 1


def test_a_stale_ndeath_does_not_end_the_newer_session() -> None:
    s = sessions()
    node = Node(s)
    node.birth(bd_seq=0, ts=NOW_MS)
    reborn = node.birth(bd_seq=1, ts=NOW_MS + 1000, at=NOW + timedelta(seconds=1))
    assert reborn.changes == [SessionChange(True, NOW_MS + 1000)]
    with pytest.raises(Rejected) as caught:  # the Will of the old connection, delivered late
        node.send("NDEATH", [MetricIn("bdSeq", 0, INT64)])
    assert caught.value.reason == "stale_death"
    node.send("NDATA", [MetricIn(None, 1.0, alias=1)])  # still alive
    died = node.send("NDEATH", [MetricIn("bdSeq", 1, INT64)])
    assert died.changes == [SessionChange(False, NOW_MS + 1000)]
    with pytest.raises(Rejected) as caught:
        node.send("NDEATH", [MetricIn("bdSeq", 1, INT64)])  # twice
    assert caught.value.reason == "stale_death"


def test_a_redelivered_birth_keeps_its_session_and_its_devices() -> None:
    s = sessions()
    node = Node(s)
    first = node.birth(bd_seq=4)
    node.send("DBIRTH", [MetricIn("Speed", 3.0, alias=7)], device="press")
    again = node.birth(bd_seq=4)
    assert again.changes == first.changes
    node.send("DDATA", [MetricIn(None, 4.5, alias=7)], device="press")


def test_sessions_follow_arrival_not_the_edge_clock() -> None:
    # The edge clock runs five minutes fast, then is corrected; the host restarts in between.
    fast = NOW_MS + 300_000
    first = Node(sessions())
    born = first.birth(bd_seq=0, ts=fast)
    died = first.send("NDEATH", [MetricIn("bdSeq", 0, INT64)], ts=fast + 10)
    assert born.changes[0].session == died.changes[0].session == NOW_MS  # by arrival
    restarted = Node(sessions())
    later = NOW + timedelta(seconds=20)
    again = restarted.birth(bd_seq=1, ts=NOW_MS + 20_000, at=later)
    assert again.changes[0].session == NOW_MS + 20_000 > died.changes[0].session
    # One arrival millisecond: each number still sorts after the one before.
    older_clock = restarted.birth(bd_seq=2, ts=NOW_MS - 60_000, at=later)
    assert older_clock.changes[0].session == NOW_MS + 20_001


def test_historical_points_are_kept_apart() -> None:
    s = sessions()
    node = Node(s)
    node.birth(bd_seq=0)
    out = node.send(
        "NDATA",
        [
            MetricIn(None, 1.0, alias=1, timestamp_ms=NOW_MS - 3_600_000, historical=True),
            MetricIn(None, 2.0, alias=1),
        ],
    )
    (readings,) = out.readings
    assert [v for *_, v in readings.historical] == [1.0]
    assert [v for *_, v in readings.live] == [2.0]


def test_points_outside_the_time_window_are_refused() -> None:
    s = sessions()
    node = Node(s)
    node.birth(bd_seq=0)
    with pytest.raises(Rejected) as caught:
        node.send("NDATA", [MetricIn(None, 1.0, alias=1, timestamp_ms=NOW_MS + 86_400_000)])
    assert caught.value.reason == "timestamp_out_of_window"


def test_restored_births_give_back_aliases_and_bdseq() -> None:
    s = sessions()
    nbirth = encode_payload(
        [MetricIn("bdSeq", 3, INT64), MetricIn("Temp", 1.0, alias=1)], seq=0, timestamp_ms=NOW_MS
    )
    dbirth = encode_payload([MetricIn("Speed", 1.0, alias=2)], seq=1, timestamp_ms=NOW_MS)
    s.restore_birth(parse_topic("spBv1.0/g/NBIRTH/e1"), nbirth, NOW, NOW_MS + 5)
    s.restore_birth(parse_topic("spBv1.0/g/DBIRTH/e1/press"), dbirth, NOW, None)
    node = Node(s)
    node.seq = 57  # where the node happens to be: the first message after a restore is the base
    out = node.send("DDATA", [MetricIn(None, 9.0, alias=2)], device="press")
    assert [(n, v) for _, n, v in out.readings[0].live] == [("Speed", 9.0)]
    with pytest.raises(Rejected) as caught:
        node.send("NDEATH", [MetricIn("bdSeq", 2, INT64)])
    assert caught.value.reason == "stale_death"
    # The numbers the sessions were given (a BIRTH stored before numbers: its arrival).
    assert node.send("NDEATH", [MetricIn("bdSeq", 3, INT64)]).changes == [
        SessionChange(False, NOW_MS + 5),
        SessionChange(False, NOW_MS, "press"),
    ]
    s.expire_gaps(now=1e9)
    assert s.take_rebirths() == []


def test_device_births_before_the_node_birth_do_not_use_up_the_rebirth_requests() -> None:
    s = sessions(rebirth_interval=0.0)
    node = Node(s)
    for attempt in range(5):  # a restarted host that missed the NBIRTH: each asks again
        with pytest.raises(Rejected) as caught:
            node.send("DBIRTH", [MetricIn("Speed", 1.0, alias=2)], device="press", now=attempt)
        assert caught.value.reason == "no_birth"
        assert s.take_rebirths() == [("g", "e1")]
