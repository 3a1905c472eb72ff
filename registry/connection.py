"""The connection state machine of devices and gateways, applied per batch in SQL.

Rules (docs/counts.md):
- A device or gateway is `online` or `offline`. It counts as connected when it is online and,
  for a device behind a gateway, the gateway is online too: a gateway's death makes its devices
  unreachable in one step, and its return restores them.
- Live data renews an activity session: the row is online until `expires_at` (arrival + the
  platform's liveness window); the sweeper turns it offline once that passes. Rows that ever
  received a session event (status, birth, death) follow those events only: data no longer
  makes them online, so a late message after a disconnect cannot revive them.
- Every change of state adds a row to `connection_events` and its delta to `platform_counters`,
  in the same transaction.

Locking: gateways are always locked before devices, and each in id order (a device's session
event locks its row in the order its UPDATE visits the batch: see SESSION_EVENTS; a deadlock
there rolls one batch back and it is written again). A gateway's change
counts the devices behind it in a statement that starts after the gateway lock is held, and a
device's change reads its gateway's state under that lock, so the counters cannot drift.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from psycopg import AsyncConnection

from registry.arrays import BigintArray, BoolArray, TextArray, TimestamptzArray

LOCK_GATEWAYS = """
SELECT id FROM gateways
WHERE id = ANY(%(gateways)b)
   OR id IN (SELECT via_gateway FROM devices WHERE id = ANY(%(devices)b))
ORDER BY id
FOR UPDATE
"""

# Gateways that sent anything are alive: renew their activity session.
GATEWAY_ACTIVITY = """
WITH changed AS (
    UPDATE gateways g SET
        last_seen = greatest(g.last_seen, %(seen)s),
        first_seen = coalesce(g.first_seen, %(seen)s),
        state = CASE WHEN g.session_managed THEN g.state ELSE 'online' END,
        expires_at = CASE WHEN g.session_managed THEN g.expires_at
            ELSE greatest(g.expires_at, %(seen)s + p.liveness_seconds * interval '1 second') END,
        state_changed_at = CASE WHEN NOT g.session_managed AND g.state = 'offline'
            THEN %(seen)s ELSE g.state_changed_at END
    FROM platforms p, (SELECT id, state FROM gateways WHERE id = ANY(%(ids)b)) AS old
    WHERE g.id = ANY(%(ids)b) AND g.id = old.id AND p.id = g.platform_id
    RETURNING g.id, g.platform_id, old.state AS before, g.state AS after
)
SELECT id, platform_id, after FROM changed WHERE before <> after
"""

# Devices whose data is live: renew activity sessions; note first connections.
DEVICE_ACTIVITY = """
WITH old AS (
    SELECT id, state, first_seen IS NULL AS first_time FROM devices
    WHERE id = ANY(%(ids)b) AND decommissioned_at IS NULL ORDER BY id FOR UPDATE
), changed AS (
    UPDATE devices d SET
        last_seen = greatest(d.last_seen, %(seen)s),
        first_seen = coalesce(d.first_seen, %(seen)s),
        state = CASE WHEN d.session_managed THEN d.state ELSE 'online' END,
        expires_at = CASE WHEN d.session_managed THEN d.expires_at
            ELSE greatest(d.expires_at, %(seen)s + p.liveness_seconds * interval '1 second') END,
        state_changed_at = CASE WHEN NOT d.session_managed AND d.state = 'offline'
            THEN %(seen)s ELSE d.state_changed_at END
    FROM old, platforms p
    WHERE d.id = ANY(%(ids)b) AND d.id = old.id AND p.id = d.platform_id
    RETURNING d.id, d.platform_id, d.via_gateway, old.state AS before, d.state AS after,
              old.first_time
), flips AS (
    INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)
    SELECT %(seen)s, platform_id, 'device', id, after, 'data' FROM changed WHERE before <> after
)
SELECT c.platform_id,
       count(*) FILTER (WHERE c.before <> c.after AND (g.id IS NULL OR g.state = 'online')),
       count(*) FILTER (WHERE c.first_time)
FROM changed c LEFT JOIN gateways g ON g.id = c.via_gateway
GROUP BY c.platform_id
"""

# Online devices behind the given gateways, per gateway (run after the gateways are locked).
DEVICES_BEHIND = """
SELECT via_gateway, count(*) FROM devices
WHERE via_gateway = ANY(%s) AND state = 'online'
GROUP BY via_gateway
"""

GATEWAY_EVENT = """
INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause,
                               devices_affected)
VALUES (%s, %s, 'gateway', %s, %s, %s, %s)
"""

ADD_COUNTS = """
INSERT INTO platform_counters (platform_id, shard, registered, connected, ever_connected)
SELECT * FROM unnest(%(platforms)b::text[], %(shards)b::smallint[], %(registered)b::bigint[],
                     %(connected)b::bigint[], %(ever)b::bigint[])
ON CONFLICT (platform_id, shard) DO UPDATE SET
    registered = platform_counters.registered + EXCLUDED.registered,
    connected = platform_counters.connected + EXCLUDED.connected,
    ever_connected = platform_counters.ever_connected + EXCLUDED.ever_connected
"""

# Expired activity sessions, oldest first; SKIP LOCKED lets several sweepers share the work.
EXPIRED_GATEWAYS = """
SELECT id FROM gateways
WHERE expires_at <= %(now)s AND state = 'online'
ORDER BY id LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
EXPIRE_GATEWAYS = """
UPDATE gateways SET state = 'offline', state_changed_at = expires_at, expires_at = NULL
WHERE id = ANY(%s) AND state = 'online'
RETURNING id, platform_id, state_changed_at
"""
EXPIRED_DEVICES = """
SELECT id, via_gateway FROM devices
WHERE expires_at <= %(now)s AND state = 'online'
ORDER BY expires_at LIMIT %(limit)s
"""
LOCK_GATEWAYS_SHARED = "SELECT id FROM gateways WHERE id = ANY(%s) ORDER BY id FOR SHARE"
EXPIRE_DEVICES = """
WITH expired AS (
    SELECT id FROM devices
    WHERE id = ANY(%(ids)b) AND state = 'online' AND expires_at <= %(now)s
    ORDER BY id
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE devices d SET state = 'offline', state_changed_at = d.expires_at, expires_at = NULL
    FROM expired WHERE d.id = ANY(%(ids)b) AND d.id = expired.id
    RETURNING d.id, d.platform_id, d.via_gateway, d.state_changed_at
), flips AS (
    INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)
    SELECT state_changed_at, platform_id, 'device', id, 'offline', 'liveness expired'
    FROM changed
)
SELECT c.platform_id, count(*) FILTER (WHERE g.id IS NULL OR g.state = 'online'), count(*)
FROM changed c LEFT JOIN gateways g ON g.id = c.via_gateway
GROUP BY c.platform_id
"""

SHARDS: Final = 64


@dataclass
class CountDeltas:
    """Changes to a platform's counters, added up over a transaction."""

    registered: int = 0
    connected: int = 0
    ever_connected: int = 0


class Counters:
    """Collects counter deltas per platform and writes them to one shard in one statement."""

    def __init__(self, shard: int) -> None:
        self.shard = shard % SHARDS
        self.deltas: dict[str, CountDeltas] = {}

    def add(self, platform: str, *, registered: int = 0, connected: int = 0, ever: int = 0) -> None:
        d = self.deltas.setdefault(platform, CountDeltas())
        d.registered += registered
        d.connected += connected
        d.ever_connected += ever

    async def flush(self, conn: AsyncConnection[Any]) -> None:
        changed = {
            p: d
            for p, d in sorted(self.deltas.items())
            if d.registered or d.connected or d.ever_connected
        }
        if changed:
            await conn.execute(
                ADD_COUNTS,
                {
                    "platforms": list(changed),
                    "shards": [self.shard] * len(changed),
                    "registered": [d.registered for d in changed.values()],
                    "connected": [d.connected for d in changed.values()],
                    "ever": [d.ever_connected for d in changed.values()],
                },
            )
        self.deltas.clear()


async def lock_gateways(
    conn: AsyncConnection[Any], gateways: list[int], devices: list[int]
) -> None:
    """Locks the gateways a batch touches, directly or behind its devices (always first)."""
    if gateways or devices:
        await conn.execute(
            LOCK_GATEWAYS, {"gateways": BigintArray(gateways), "devices": BigintArray(devices)}
        )


async def record_activity(
    conn: AsyncConnection[Any],
    counters: Counters,
    *,
    gateways: list[int],
    devices: list[int],
    seen: datetime,
) -> None:
    """Live data arrived at `seen` from these gateways and devices (call `lock_gateways` first)."""
    if gateways:
        cur = await conn.execute(
            GATEWAY_ACTIVITY, {"ids": BigintArray(sorted(gateways)), "seen": seen}, binary=True
        )
        flipped = await cur.fetchall()
        await _gateways_flipped(conn, counters, flipped, seen, cause="data")
    if devices:
        cur = await conn.execute(
            DEVICE_ACTIVITY, {"ids": BigintArray(sorted(devices)), "seen": seen}, binary=True
        )
        for platform, connected, ever in await cur.fetchall():
            counters.add(platform, connected=connected, ever=ever)


async def sweep(
    conn: AsyncConnection[Any],
    counters: Counters,
    now: datetime,
    limit: int,
    *,
    device_grace: timedelta = timedelta(0),
) -> int:
    """Turns expired activity sessions offline; returns how many rows changed.

    `device_grace`: devices' stored expiries may lag their last data by this much (ingest
    renews them at most that often), so a device's session ends that long after it."""
    args = {"now": now, "limit": limit}
    cur = await conn.execute(EXPIRED_GATEWAYS, args)
    expired = [row[0] for row in await cur.fetchall()]
    changed = 0
    if expired:
        cur = await conn.execute(EXPIRE_GATEWAYS, (expired,))
        rows = await cur.fetchall()
        changed += len(rows)
        for gateway, platform, at in rows:
            await _gateways_flipped(
                conn, counters, [(gateway, platform, "offline")], at, cause="liveness expired"
            )
    args = {"now": now - device_grace, "limit": limit}
    cur = await conn.execute(EXPIRED_DEVICES, args)
    candidates = await cur.fetchall()
    if candidates:
        # Their gateways first (the lock order), so no gateway changes under the count.
        gateways = sorted({g for _, g in candidates if g is not None})
        if gateways:
            await conn.execute(LOCK_GATEWAYS_SHARED, (gateways,))
        ids = [d for d, _ in candidates]
        cur = await conn.execute(EXPIRE_DEVICES, {"ids": ids, "now": now - device_grace})
        for platform, connected, total in await cur.fetchall():
            counters.add(platform, connected=-connected)
            changed += total
    return changed


async def _gateways_flipped(
    conn: AsyncConnection[Any],
    counters: Counters,
    flipped: list[tuple[int, str, str]],
    at: datetime,
    *,
    cause: str,
) -> None:
    """Gateways changed state: their online devices became reachable or unreachable with them."""
    if not flipped:
        return
    cur = await conn.execute(DEVICES_BEHIND, ([g for g, _, _ in flipped],))
    behind = dict(await cur.fetchall())
    for gateway, platform, state in flipped:
        affected = behind.get(gateway, 0)
        counters.add(platform, connected=affected if state == "online" else -affected)
        await conn.execute(GATEWAY_EVENT, (at, platform, gateway, state, cause, affected))


@dataclass(slots=True)  # not frozen: one is made per status message, and frozen ones cost 4x
class SessionEvent:
    """A session started or ended, for one device or gateway (already resolved to its row).

    Events apply in order of (epoch, order): a session number given by the sender, and 1 for
    its start, 2 for its end (SESSION_EVENTS computes the same). An event
    without an epoch applies in arrival order.
    """

    subject: int
    online: bool
    epoch: int | None
    at: datetime
    cause: str

    @property
    def order(self) -> int:
        return 1 if self.online else 2


# The UPDATE records in the row what the event changed (session_flipped, session_first:
# evaluated on the row version it locks, so a concurrent change is seen) and returns it,
# instead of first reading and locking the old rows (a second index scan and a lock record per
# row). Gateways are already locked (lock_gateways). Devices are locked in the order the plan
# visits them, which for batches is ascending id as in every other statement (the sorted ids
# probe a hash of the rows, or an index scan visits them); a deadlock rolls one batch back, and
# the writer retries it.
SESSION_EVENTS = """
WITH ev AS (
    SELECT e.*, CASE WHEN e.online THEN 1 ELSE 2 END AS ord,
           CASE WHEN e.online THEN 'online' ELSE 'offline' END AS state
    FROM unnest(%(ids)b::bigint[], %(online)b::bool[], %(epochs)b::bigint[],
                %(times)b::timestamptz[], %(causes)b::text[]) AS e(id, online, epoch, at, cause)
), changed AS (
    UPDATE {table} t SET
        session_managed = true,
        session_epoch = coalesce(ev.epoch, t.session_epoch + 1),
        session_order = ev.ord,
        state = ev.state,
        expires_at = NULL,
        session_flipped = t.state <> ev.state,
        session_first = ev.online AND t.first_seen IS NULL,
        first_seen = CASE WHEN ev.online THEN coalesce(t.first_seen, ev.at) ELSE t.first_seen END,
        state_changed_at = CASE WHEN t.state = ev.state THEN t.state_changed_at ELSE ev.at END
    FROM ev
    WHERE t.id = ANY(%(ids)b) AND t.id = ev.id {in_service}
      AND (coalesce(ev.epoch, t.session_epoch + 1), ev.ord) > (t.session_epoch, t.session_order)
    RETURNING t.id, t.platform_id, {via} AS via, t.session_flipped AS flipped,
              t.state AS after, t.session_first AS first, ev.at, ev.cause
)
"""
DEVICE_SESSION_EVENTS = (
    SESSION_EVENTS.replace("{table}", "devices")
    .replace("{via}", "t.via_gateway")
    .replace("{in_service}", "AND t.decommissioned_at IS NULL")
    + """, flips AS (
    INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause)
    SELECT at, platform_id, 'device', id, after, cause FROM changed WHERE flipped
)
SELECT c.platform_id,
       coalesce(sum(CASE WHEN NOT c.flipped OR NOT (g.id IS NULL OR g.state = 'online')
                    THEN 0 WHEN c.after = 'online' THEN 1 ELSE -1 END), 0)::bigint,
       count(*) FILTER (WHERE c.first)
FROM changed c LEFT JOIN gateways g ON g.id = c.via
GROUP BY c.platform_id
"""
)
GATEWAY_SESSION_EVENTS = (
    SESSION_EVENTS.replace("{table}", "gateways")
    .replace("{via}", "NULL::bigint")
    .replace("{in_service}", "")
    + """
SELECT id, platform_id, after, at, cause FROM changed WHERE flipped
"""
)


async def apply_sessions(
    conn: AsyncConnection[Any],
    counters: Counters,
    *,
    gateways: list[SessionEvent],
    devices: list[SessionEvent],
) -> None:
    """Applies session events (call `lock_gateways` first). Of several events for one subject
    in a batch, only the latest by order key matters, so only that one is applied."""
    if gateways:
        cur = await conn.execute(GATEWAY_SESSION_EVENTS, _session_args(gateways))
        for gateway, platform, state, at, cause in await cur.fetchall():
            await _gateways_flipped(conn, counters, [(gateway, platform, state)], at, cause=cause)
    if devices:
        cur = await conn.execute(DEVICE_SESSION_EVENTS, _session_args(devices))
        for platform, connected, ever in await cur.fetchall():
            counters.add(platform, connected=connected, ever=ever)


def _session_args(events: list[SessionEvent]) -> dict[str, list[Any]]:
    latest: dict[int, SessionEvent] = {}
    for e in events:  # arrival order: a later event without an epoch wins over an earlier one
        held = latest.get(e.subject)
        if (
            held is None
            or e.epoch is None
            or held.epoch is None
            or (e.epoch, e.order) > (held.epoch, held.order)
        ):
            latest[e.subject] = e
    chosen = [latest[s] for s in sorted(latest)]
    return {
        "ids": BigintArray([e.subject for e in chosen]),
        "online": BoolArray([e.online for e in chosen]),
        "epochs": BigintArray([e.epoch for e in chosen]),
        "times": TimestamptzArray([e.at for e in chosen]),
        "causes": TextArray([e.cause for e in chosen]),
    }
