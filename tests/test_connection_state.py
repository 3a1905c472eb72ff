"""The connection state machine and its counters, on the real PostgreSQL (docs/counts.md)."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from ingest.batching import Received
from ingest.decoding import MessageDecoder
from ingest.settings import Limits
from ingest.stats import IngestStats
from ingest.topics import TopicScheme
from ingest.writer import TelemetryWriter
from registry.counts import platform_counts
from registry.history import DEVICE_EVENTS, device_events
from registry.reconcile import find_drift, reconcile
from registry.settings import StoreSettings
from registry.store import create_pool
from registry.sweeper import Sweeper
from tests.conftest import scalar

TOPICS = TopicScheme("iiot/v1")
DECODE = MessageDecoder(TOPICS, Limits())


class Feed:
    """Sends messages through decoding and the writer, as ingest does, one batch per call."""

    def __init__(self, pool: AsyncConnectionPool, platform: str) -> None:
        self.writer = TelemetryWriter(pool, stats=IngestStats(), counter_shard=3)
        self.platform = platform

    async def send(self, *messages: tuple[str, Any], at: datetime | None = None) -> None:
        now = at or datetime.now(UTC)
        batch = []
        for topic, body in messages:
            raw = body if isinstance(body, bytes) else orjson.dumps(body)
            batch.append(Received("mqtt", topic, raw, now, DECODE(topic, raw, now), None))
        report = await self.writer.write(batch)
        assert report.dead_letters == 0

    def data(self, device: str, **extra: Any) -> tuple[str, Any]:
        return TOPICS.telemetry(self.platform, device), {"metrics": {"v": 1}, **extra}

    def status(self, device: str, state: str, session: int | None = None) -> tuple[str, Any]:
        body: Any = state.encode() if session is None else {"state": state, "session": session}
        return TOPICS.status(self.platform, device), body

    def gateway_data(self, gateway: str, devices: list[str]) -> tuple[str, Any]:
        body = {"devices": {d: {"metrics": {"v": 1}} for d in devices}}
        return TOPICS.gateway_telemetry(self.platform, gateway), body

    def gateway_status(self, gateway: str, state: str, session: int) -> tuple[str, Any]:
        body = {"state": state, "session": session}
        return TOPICS.gateway_status(self.platform, gateway), body


@pytest.fixture
def feed(pool: AsyncConnectionPool, platform: str) -> Feed:
    return Feed(pool, platform)


async def connected(db: psycopg.AsyncConnection[Any], platform: str) -> int:
    counts = await platform_counts(db, platform)
    assert counts is not None
    assert await find_drift(db) == []  # the counters always equal a recount
    return counts.connected


async def state(db: psycopg.AsyncConnection[Any], device: str) -> str:
    return await scalar(db, "SELECT state FROM devices WHERE device_id = %s", device)


async def test_status_events_apply_by_session_not_by_arrival(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(feed.status("d", "online", 2))
    assert (await state(db, "d"), await connected(db, platform)) == ("online", 1)
    await feed.send(feed.status("d", "offline", 1))  # a stale Will from an older session
    assert (await state(db, "d"), await connected(db, platform)) == ("online", 1)
    await feed.send(feed.status("d", "online", 2))  # a duplicate (a retained redelivery)
    await feed.send(feed.status("d", "offline", 2))
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)
    await feed.send(feed.status("d", "online", 2))  # late duplicate after the end: ignored
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)
    await feed.send(feed.status("d", "online", 3))
    assert (await state(db, "d"), await connected(db, platform)) == ("online", 1)


async def test_out_of_order_status_in_one_batch(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(
        feed.status("d", "offline", 5), feed.status("d", "online", 5), feed.status("d", "online", 4)
    )
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)


async def test_plain_text_status_applies_in_arrival_order(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(feed.status("d", "online"))
    await feed.send(feed.status("d", "offline"))
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)
    await feed.send(feed.status("d", "online"))
    assert (await state(db, "d"), await connected(db, platform)) == ("online", 1)


async def test_data_after_a_disconnect_does_not_revive_a_session_device(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(feed.data("d"))  # data only: online by activity
    assert (await state(db, "d"), await connected(db, platform)) == ("online", 1)
    await feed.send(feed.status("d", "offline", 1))
    await feed.send(feed.data("d"))  # late data after the disconnect
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)
    assert await scalar(db, "SELECT last_seen IS NOT NULL FROM devices") is True


async def test_back_filled_data_never_connects(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(feed.data("d", historical=True))
    assert (await state(db, "d"), await connected(db, platform)) == ("offline", 0)
    counts = await platform_counts(db, platform)
    assert counts is not None
    assert (counts.registered, counts.ever_connected) == (1, 0)


async def test_liveness_expiry_is_stamped_with_the_expiry_time(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str, pool: AsyncConnectionPool
) -> None:
    sent = datetime.now(UTC).replace(microsecond=0)
    await feed.send(feed.data("d"), at=sent)
    sweeper = Sweeper(pool, counter_shard=7)
    assert await sweeper.sweep_once(sent + timedelta(seconds=299)) == 0
    assert await sweeper.sweep_once(sent + timedelta(seconds=301)) == 1
    assert await connected(db, platform) == 0
    cur = await db.execute(
        "SELECT state, cause, time FROM connection_events WHERE subject = 'device' ORDER BY id"
    )
    assert await cur.fetchall() == [
        ("online", "data", sent),
        ("offline", "liveness expired", sent + timedelta(seconds=300)),
    ]


async def test_coalesced_renewals_never_end_a_session_before_its_window(
    db: psycopg.AsyncConnection[Any], platform: str, pool: AsyncConnectionPool
) -> None:
    """Ingest renews a device's stored expiry at most every 5 s; the sweeper allows for it."""
    feed = Feed(pool, platform)
    feed.writer = TelemetryWriter(pool, stats=IngestStats(), counter_shard=3, renew_seconds=5)
    sweeper = Sweeper(pool, counter_shard=7, grace=timedelta(seconds=5))
    sent = datetime.now(UTC).replace(microsecond=0)

    async def last_seen() -> datetime:
        return await scalar(db, "SELECT last_seen FROM devices WHERE device_id = 'd'")

    await feed.send(feed.data("d"), at=sent)
    await feed.send(feed.data("d"), at=sent + timedelta(seconds=3))
    assert await last_seen() == sent  # the second renewal was not written
    # The stored expiry (sent + 300 s) has passed, the window of the last data (303 s) has not.
    assert await sweeper.sweep_once(sent + timedelta(seconds=302)) == 0
    await feed.send(feed.data("d"), at=sent + timedelta(seconds=6))
    assert await last_seen() == sent + timedelta(seconds=6)
    assert await sweeper.sweep_once(sent + timedelta(seconds=310)) == 0
    assert await sweeper.sweep_once(sent + timedelta(seconds=312)) == 1
    assert await connected(db, platform) == 0
    cur = await db.execute(
        "SELECT state, time FROM connection_events WHERE subject = 'device' ORDER BY id"
    )
    assert await cur.fetchall() == [("online", sent), ("offline", sent + timedelta(seconds=306))]
    assert await find_drift(db) == []


async def test_a_gateway_death_makes_its_devices_unreachable_in_one_step(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    devices = [f"plc-{n}" for n in range(1000)]
    await feed.send(feed.gateway_status("edge", "online", 1))
    await feed.send(feed.gateway_data("edge", devices))
    await feed.send(feed.data("solo"))
    assert await connected(db, platform) == 1001

    await feed.send(feed.gateway_status("edge", "offline", 1))  # its Will
    assert await connected(db, platform) == 1
    # One event for the gateway, none per device; the devices' own state is untouched.
    cur = await db.execute(
        "SELECT subject, state, devices_affected FROM connection_events "
        "WHERE state = 'offline' ORDER BY id"
    )
    assert await cur.fetchall() == [("gateway", "offline", 1000)]
    assert await scalar(db, "SELECT count(*) FROM devices WHERE state = 'online'") == 1001

    await feed.send(feed.gateway_status("edge", "online", 2))  # rebirth
    assert await connected(db, platform) == 1001


async def test_a_mass_disconnect_of_10000_devices_counts_exactly(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    devices = [f"d{n}" for n in range(10_000)]
    for start in range(0, 10_000, 2_500):
        await feed.send(*(feed.status(d, "online", 1) for d in devices[start : start + 2_500]))
    assert await connected(db, platform) == 10_000
    # All Wills fire at once; duplicates and stale births are mixed in.
    storm = [feed.status(d, "offline", 1) for d in devices[:7_000]]
    storm += [feed.status(d, "online", 1) for d in devices[:500]]
    await feed.send(*storm)
    assert await connected(db, platform) == 3_000


async def test_writers_applying_the_same_devices_at_once_keep_exact_counts(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    """Three ingest processes' writers (shards of their own), each with batches that update the
    same 3,000 devices at the same time, sessions interleaved: every device ends in its latest
    session's state, and the counters equal a recount. A lock-order deadlock between them
    would surface here as a batch that is never written (or as an error)."""
    devices = [f"d{n}" for n in range(3_000)]
    writers = [Feed(pool, platform) for _ in range(3)]
    for k, feed in enumerate(writers):
        feed.writer = TelemetryWriter(pool, stats=IngestStats(), counter_shard=10 + k)

    async def storm(k: int, feed: Feed) -> None:
        for session in range(1, 7):
            # Writer k sends session 3s+k's events; sessions decide, whoever commits first.
            state = "online" if session % 2 else "offline"
            order = devices if k % 2 else devices[::-1]
            messages = [feed.status(d, state, session * 3 + k) for d in order]
            async with asyncio.timeout(60):
                await feed.send(*messages)

    await asyncio.gather(*(storm(k, feed) for k, feed in enumerate(writers)))
    # The latest session of every device is 6 * 3 + 2 (writer 2, session 6: offline).
    assert await scalar(db, "SELECT count(*) FROM devices WHERE session_epoch = 20") == 3_000
    assert await scalar(db, "SELECT count(*) FROM devices WHERE state = 'online'") == 0
    assert await connected(db, platform) == 0
    assert await scalar(
        db, "SELECT count(*) FROM connection_events WHERE state = 'online'"
    ) == await scalar(db, "SELECT count(*) FROM connection_events WHERE state = 'offline'")


async def test_state_changes_of_newly_registered_devices_are_hot_updates(
    store: StoreSettings, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    """A change that has to move the row to another page writes every index of devices too:
    the table leaves room on each page (migration 0015) so that even the first changes after
    registration stay on the page."""
    devices = [f"d{n}" for n in range(4_000)]
    async with create_pool(store, name="test") as own:
        feed = Feed(own, platform)
        for state_ in ("online", "offline", "online"):
            for start in range(0, len(devices), 1_000):
                chunk = devices[start : start + 1_000]
                await feed.send(*(feed.status(d, state_) for d in chunk))
    # The pool's backends report their statistics as they exit.
    query = """SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
               WHERE relid = 'devices'::regclass"""
    async with asyncio.timeout(10):
        while True:
            await db.execute("SELECT pg_stat_clear_snapshot()")
            updates, hot = await (await db.execute(query)).fetchone() or (0, 0)
            if updates >= 3 * len(devices):
                break
            await asyncio.sleep(0.1)
    assert hot / updates > 0.8, (hot, updates)  # 0.31 at fillfactor 85


async def test_state_and_counts_survive_a_restart(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await Feed(pool, platform).send(Feed(pool, platform).status("d", "online", 1))
    fresh = Feed(pool, platform)  # a new process: no caches
    await fresh.send(fresh.status("d", "online", 1), fresh.data("e"))
    assert await connected(db, platform) == 2


async def test_reconciliation_finds_and_fixes_drift(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    await feed.send(feed.data("a"), feed.data("b"))
    await db.execute(
        "UPDATE platform_counters SET connected = connected + 5 "
        "WHERE platform_id = %s AND shard = 3",
        (platform,),
    )
    drift = await reconcile(db, shard=9)
    assert [(d.platform, d.connected) for d in drift] == [(platform, 5)]
    assert await connected(db, platform) == 2


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["online", "offline", "data", "gw-data", "gw-online", "gw-offline"]),
        st.integers(0, 5),  # device
        st.integers(0, 3),  # session
        st.integers(0, 1),  # gateway
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(EVENTS, min_size=1, max_size=4), expire=st.booleans())
async def test_counters_equal_a_recount_after_any_event_storm(
    pool: AsyncConnectionPool, db: psycopg.AsyncConnection[Any], batches: list[Any], expire: bool
) -> None:
    await db.execute("DELETE FROM connection_events")
    await db.execute("UPDATE devices SET via_gateway = NULL")
    await db.execute("DELETE FROM devices")
    await db.execute("DELETE FROM gateways")
    await db.execute("DELETE FROM platform_counters")
    await db.execute(
        "INSERT INTO platforms (id, name) VALUES ('storm', 'storm') ON CONFLICT DO NOTHING"
    )
    feed = Feed(pool, "storm")
    for events in batches:
        messages = []
        for kind, device, session, gateway in events:
            name, gw = f"d{device}", f"g{gateway}"
            if kind in ("online", "offline"):
                messages.append(feed.status(name, kind, session))
            elif kind == "data":
                messages.append(feed.data(name))
            elif kind == "gw-data":
                messages.append(feed.gateway_data(gw, [name]))
            else:
                messages.append(feed.gateway_status(gw, kind.removeprefix("gw-"), session))
        await feed.send(*messages)
    if expire:
        await Sweeper(pool, counter_shard=5).sweep_once(datetime.now(UTC) + timedelta(hours=1))
    assert await find_drift(db) == []


async def test_a_device_s_history_is_its_own_and_its_gateway_s_events_newest_first(
    feed: Feed, db: psycopg.AsyncConnection[Any], platform: str
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    await feed.send(feed.gateway_status("spare", "online", 1), at=start - timedelta(seconds=1))
    await feed.send(feed.gateway_status("edge", "online", 1), at=start)
    await feed.send(feed.gateway_data("edge", ["plc"]), at=start + timedelta(seconds=1))
    await feed.send(feed.status("solo", "online", 1), at=start + timedelta(seconds=2))
    await feed.send(feed.gateway_status("edge", "offline", 1), at=start + timedelta(seconds=3))
    await feed.send(feed.status("plc", "offline", 1), at=start + timedelta(seconds=4))
    plc = await scalar(db, "SELECT id FROM devices WHERE device_id = 'plc'")
    edge = await scalar(db, "SELECT id FROM gateways WHERE gateway_id = 'edge'")
    assert plc != edge  # "spare" took a number: plc's number is another gateway's
    # Events of the other kind of subject that carry plc's or edge's number are someone else's.
    await db.execute(
        "INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause) "
        "VALUES (now(), %(p)s, 'gateway', %(plc)s, 'offline', 'x'), "
        "(now(), %(p)s, 'device', %(edge)s, 'offline', 'x')",
        {"p": platform, "plc": plc, "edge": edge},
    )

    events = await device_events(db, platform, "plc", limit=10)
    assert [(e.time - start, e.subject, e.state) for e in events] == [
        (timedelta(seconds=4), "device", "offline"),
        (timedelta(seconds=3), "gateway", "offline"),
        (timedelta(seconds=1), "device", "online"),
        (timedelta(seconds=0), "gateway", "online"),
    ]
    assert [e.time for e in await device_events(db, platform, "plc", limit=2)] == [
        start + timedelta(seconds=4),
        start + timedelta(seconds=3),
    ]
    # Read through the per-subject indexes, not by scanning every device's events.
    await db.execute("SET enable_seqscan = off")
    cur = await db.execute(
        "EXPLAIN " + DEVICE_EVENTS, {"platform": platform, "device": "plc", "limit": 10}
    )
    plan = "\n".join(row[0] for row in await cur.fetchall())
    # (Each daily partition has its own copy of the two partial indexes.)
    assert "Index Cond: (subject_id = d.id)" in plan, plan
    assert "Index Cond: (subject_id = d.via_gateway)" in plan, plan
    assert "Seq Scan on connection_events" not in plan, plan
