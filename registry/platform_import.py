"""Importing a platform from a transfer file (registry/transfer_format.py) into this cell.

Rows stream into temporary tables (COPY), so nothing is held in memory and nothing reaches the
real tables until the whole file has been read and its digest checked; then one transaction
maps the rows in: internal ids (devices, gateways, events, keys, ledger rows) are this cell's,
metric names are looked up in its dictionary.

A platform coming back to a cell it moved away from replaces its old record there, except that
the append-only usage ledger keeps its rows: the file's rows that are not there already are
added, and the daily roll-up is adjusted so that the ledger adds up to the file's exactly.
"""

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any, Final

import psycopg
from psycopg import AsyncConnection, sql

from registry.access import audit
from registry.errors import Conflict, Invalid
from registry.notifications import announce
from registry.settings import StoreSettings
from registry.store import connect
from registry.transfer_format import (
    BY_NAME,
    CHUNK,
    END,
    FORMAT,
    SCHEMA_VERSION,
    SECTIONS,
    USAGE_COLUMNS,
    USAGE_TYPES,
    VERSION,
    GzipLines,
    Section,
)

# The statements that map staged rows in, in order.

# One import of a platform at a time (a second waits, then finds it served here).
IMPORT_LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.import.' || %s))"
PLATFORM_STATE = "SELECT moved_to FROM platforms WHERE id = %s FOR UPDATE"
# A returning platform: the file must hold every device and gateway the old record has
# (devices are decommissioned, never deleted, so a file from the platform's cell does).
MISSING_HERE = """
SELECT (SELECT count(*) FROM devices d WHERE d.platform_id = %(platform)s
        AND NOT EXISTS (SELECT FROM transfer_devices s WHERE s.device_id = d.device_id)),
       (SELECT count(*) FROM gateways g WHERE g.platform_id = %(platform)s
        AND NOT EXISTS (SELECT FROM transfer_gateways s WHERE s.gateway_id = g.gateway_id))
"""
# What a returning platform's old record holds that the file replaces whole.
CLEAR_RETURNING = tuple(
    f"DELETE FROM {table} WHERE platform_id = %(platform)s"
    for table in (
        "enterprise_rules",
        "credentials",
        "platform_counters",
        "platform_activity",
        "platform_enterprise_stats",
        "count_history",
        "connection_events",
        "usage_daily",
        "usage_ledger_daily",
    )
)

UPSERT_PLATFORM = """
INSERT INTO platforms AS p (id, name, tier, type, region, industry, liveness_seconds,
                            auto_provision, metadata, created_at)
SELECT id, name, tier, type, region, industry, liveness_seconds, auto_provision, metadata,
       created_at
FROM transfer_platform WHERE id = %(platform)s
ON CONFLICT (id) DO UPDATE SET
    name = excluded.name, tier = excluded.tier, type = excluded.type, region = excluded.region,
    industry = excluded.industry, liveness_seconds = excluded.liveness_seconds,
    auto_provision = excluded.auto_provision, metadata = excluded.metadata,
    created_at = excluded.created_at, moved_to = NULL, moved_at = NULL
"""
# This cell's own mapping of the text wins; one it lacks is taken from the file.
INDUSTRY_MAPPING = """
INSERT INTO industry_mappings (text, industry, mapped_by, mapped_at)
SELECT text, industry, mapped_by, mapped_at FROM transfer_industry_mapping
ON CONFLICT (text) DO NOTHING
"""
ENTERPRISES = """
INSERT INTO enterprises AS e (platform_id, code, name, industry, above_size, region,
                              region_reason, created_at, updated_at)
SELECT %(platform)s, code, name, industry, above_size, region, region_reason, created_at,
       updated_at
FROM transfer_enterprises ORDER BY code
ON CONFLICT (platform_id, code) DO UPDATE SET
    name = excluded.name, industry = excluded.industry, above_size = excluded.above_size,
    region = excluded.region, region_reason = excluded.region_reason,
    created_at = excluded.created_at, updated_at = excluded.updated_at
"""
ENTERPRISE_RULE = """
INSERT INTO enterprise_rules (platform_id, metadata_key)
SELECT %(platform)s, metadata_key FROM transfer_enterprise_rule
"""
_STATE_SET = """state = excluded.state, session_managed = excluded.session_managed,
    session_epoch = excluded.session_epoch, session_order = excluded.session_order,
    state_changed_at = excluded.state_changed_at, expires_at = excluded.expires_at,
    session_flipped = excluded.session_flipped, session_first = excluded.session_first,
    metadata = excluded.metadata, created_at = excluded.created_at,
    first_seen = excluded.first_seen, last_seen = excluded.last_seen,
    enterprise = excluded.enterprise"""
# Upserts: a returning platform's devices and gateways keep their row ids here (and with them
# the telemetry this cell still holds of them).
GATEWAYS = f"""
INSERT INTO gateways (platform_id, gateway_id, metadata, created_at, first_seen, last_seen,
                      state, session_managed, session_epoch, session_order, state_changed_at,
                      expires_at, bd_seq, session_flipped, session_first, enterprise)
SELECT %(platform)s, gateway_id, metadata, created_at, first_seen, last_seen, state,
       session_managed, session_epoch, session_order, state_changed_at, expires_at, bd_seq,
       session_flipped, session_first, enterprise
FROM transfer_gateways ORDER BY gateway_id
ON CONFLICT (platform_id, gateway_id) DO UPDATE SET {_STATE_SET}, bd_seq = excluded.bd_seq
"""
DEVICES = f"""
INSERT INTO devices (platform_id, device_id, metadata, created_at, first_seen, last_seen,
                     via_gateway, state, session_managed, session_epoch, session_order,
                     state_changed_at, expires_at, decommissioned_at, session_flipped,
                     session_first, enterprise)
SELECT %(platform)s, s.device_id, s.metadata, s.created_at, s.first_seen, s.last_seen, g.new,
       s.state, s.session_managed, s.session_epoch, s.session_order, s.state_changed_at,
       s.expires_at, s.decommissioned_at, s.session_flipped, s.session_first, s.enterprise
FROM transfer_devices s LEFT JOIN transfer_gateway_ids g ON g.old = s.via_gateway
ORDER BY s.device_id
ON CONFLICT (platform_id, device_id) DO UPDATE SET {_STATE_SET},
    via_gateway = excluded.via_gateway, decommissioned_at = excluded.decommissioned_at
"""
ID_MAPS = {
    "transfer_gateway_ids": """
INSERT INTO transfer_gateway_ids
SELECT s.id, g.id FROM transfer_gateways s
JOIN gateways g ON g.platform_id = %(platform)s AND g.gateway_id = s.gateway_id
""",
    "transfer_device_ids": """
INSERT INTO transfer_device_ids
SELECT s.id, d.id FROM transfer_devices s
JOIN devices d ON d.platform_id = %(platform)s AND d.device_id = s.device_id
""",
}
# A returning platform's enterprises the file no longer declares (links moved off them above).
STALE_ENTERPRISES = """
DELETE FROM enterprises e WHERE e.platform_id = %(platform)s
AND NOT EXISTS (SELECT FROM transfer_enterprises s WHERE s.code = e.code)
"""
CREDENTIALS = """
INSERT INTO credentials (platform_id, kind, subject, digest, created_at, rotated_at, revoked_at)
SELECT %(platform)s, kind, subject, digest, created_at, rotated_at, revoked_at
FROM transfer_credentials
"""
# A prefix taken here by another platform's key leaves the file's key out (found below).
API_KEYS = """
INSERT INTO api_keys AS k (prefix, digest, role, platform_id, name, created_at, revoked_at,
                           expires_at)
SELECT prefix, digest, role, %(platform)s, name, created_at, revoked_at, expires_at
FROM transfer_api_keys ORDER BY id
ON CONFLICT (prefix) DO UPDATE SET
    digest = excluded.digest, role = excluded.role, name = excluded.name,
    created_at = excluded.created_at, revoked_at = excluded.revoked_at,
    expires_at = excluded.expires_at
WHERE k.platform_id = excluded.platform_id
"""
KEY_MAP = """
INSERT INTO transfer_key_ids
SELECT s.id, k.id FROM transfer_api_keys s
JOIN api_keys k ON k.prefix = s.prefix AND k.platform_id = %(platform)s AND k.digest = s.digest
"""
COUNTERS = """
INSERT INTO platform_counters (platform_id, shard, registered, connected, ever_connected)
SELECT %(platform)s, 0, registered, connected, ever_connected FROM transfer_counters
"""
ACTIVITY = """
INSERT INTO platform_activity (platform_id, active_24h, active_30d, as_of)
SELECT %(platform)s, active_24h, active_30d, as_of FROM transfer_activity
"""
ENTERPRISE_STATS = """
INSERT INTO platform_enterprise_stats (platform_id, enterprises, above_size, connected_30d,
                                       industries, provinces, prefectures, linked_devices)
SELECT %(platform)s, enterprises, above_size, connected_30d, industries, provinces,
       prefectures, linked_devices
FROM transfer_enterprise_stats
"""
COUNT_HISTORY = """
INSERT INTO count_history (time, platform_id, registered, connected, ever_connected, seconds,
                           connected_seconds, connected_min, connected_max)
SELECT time, %(platform)s, registered, connected, ever_connected, seconds, connected_seconds,
       connected_min, connected_max
FROM transfer_count_history
"""
CONNECTION_EVENTS = """
INSERT INTO connection_events (time, platform_id, subject, subject_id, state, cause,
                               devices_affected)
SELECT s.time, %(platform)s, s.subject, coalesce(d.new, g.new), s.state, s.cause,
       s.devices_affected
FROM transfer_connection_events s
LEFT JOIN transfer_device_ids d ON s.subject = 'device' AND d.old = s.subject_id
LEFT JOIN transfer_gateway_ids g ON s.subject = 'gateway' AND g.old = s.subject_id
WHERE coalesce(d.new, g.new) IS NOT NULL
ORDER BY s.id
"""
_LEDGER_ROW = f"recorded_at, day, source, {USAGE_COLUMNS}"
# The ledger is append-only: rows this cell holds already (a returning platform's, from before
# it left) stay, and only the file's other rows are added. Rows held here one by one that the
# file holds rolled up into a day (the other cell's maintenance rolled them up) are taken off
# that day's roll-up, so that the ledger adds up to the file's exactly.
LEDGER_HELD_HERE = f"""
INSERT INTO transfer_ledger_held
SELECT day, source, sum(messages), sum(bytes), sum(points), sum(duplicate_points),
       sum(refused_messages), count(*)
FROM (SELECT {_LEDGER_ROW} FROM usage_ledger WHERE platform_id = %(platform)s
      EXCEPT ALL
      SELECT {_LEDGER_ROW} FROM transfer_usage_ledger) held
GROUP BY day, source
"""
LEDGER_UNACCOUNTED = """
SELECT h.day, h.source FROM transfer_ledger_held h
LEFT JOIN transfer_usage_ledger_daily d USING (day, source)
WHERE d.day IS NULL OR d.batches < h.batches OR d.messages < h.messages OR d.bytes < h.bytes
   OR d.points < h.points OR d.duplicate_points < h.duplicate_points
   OR d.refused_messages < h.refused_messages
LIMIT 1
"""
LEDGER_DAILY = """
INSERT INTO usage_ledger_daily (platform_id, day, source, messages, bytes, points,
                                duplicate_points, refused_messages, batches)
SELECT %(platform)s, d.day, d.source, d.messages - coalesce(h.messages, 0),
       d.bytes - coalesce(h.bytes, 0), d.points - coalesce(h.points, 0),
       d.duplicate_points - coalesce(h.duplicate_points, 0),
       d.refused_messages - coalesce(h.refused_messages, 0), d.batches - coalesce(h.batches, 0)
FROM transfer_usage_ledger_daily d LEFT JOIN transfer_ledger_held h USING (day, source)
WHERE d.batches > coalesce(h.batches, 0)
"""
LEDGER = f"""
INSERT INTO usage_ledger (platform_id, {_LEDGER_ROW})
SELECT %(platform)s, {_LEDGER_ROW}
FROM (SELECT {_LEDGER_ROW} FROM transfer_usage_ledger
      EXCEPT ALL
      SELECT {_LEDGER_ROW} FROM usage_ledger WHERE platform_id = %(platform)s) fresh
ORDER BY recorded_at
"""
USAGE_DAILY = f"""
INSERT INTO usage_daily (platform_id, day, shard, {USAGE_COLUMNS})
SELECT %(platform)s, day, shard, {USAGE_COLUMNS} FROM transfer_usage_daily
"""
# Append-only too: entries this cell has already (a returning platform's) are not repeated.
AUDIT_LOG = """
INSERT INTO audit_log (time, key_id, platform_id, action, subject, detail)
SELECT s.time, k.new, %(platform)s, s.action, s.subject, s.detail
FROM transfer_audit_log s LEFT JOIN transfer_key_ids k ON k.old = s.key_id
WHERE NOT EXISTS (SELECT FROM audit_log a WHERE a.platform_id = %(platform)s
                  AND a.time = s.time AND a.action = s.action AND a.subject = s.subject)
ORDER BY s.id
"""
DEAD_LETTERS = """
INSERT INTO dead_letters (received_at, source, topic, platform_id, reason, detail, payload,
                          replayed_at, replay_outcome, kafka_partition, kafka_offset, kafka_key,
                          kafka_headers, raw_topic, sparkplug_topic)
SELECT received_at, source, topic, %(platform)s, reason, detail, payload, replayed_at,
       replay_outcome, kafka_partition, kafka_offset, kafka_key, kafka_headers, raw_topic,
       sparkplug_topic
FROM transfer_dead_letters s
WHERE NOT EXISTS (SELECT FROM dead_letters d WHERE d.platform_id = %(platform)s
                  AND d.received_at = s.received_at AND d.topic = s.topic
                  AND d.reason = s.reason AND d.payload = s.payload)
ORDER BY id
"""
METRIC_NAMES = """
INSERT INTO metrics (name) SELECT DISTINCT metric FROM transfer_telemetry ORDER BY 1
ON CONFLICT (name) DO NOTHING
"""
TELEMETRY = """
INSERT INTO telemetry (time, device_id, metric_id, value)
SELECT s.time, d.new, m.id, s.value
FROM transfer_telemetry s
JOIN transfer_device_ids d ON d.old = s.device
JOIN metrics m ON m.name = s.metric
ON CONFLICT DO NOTHING
"""
# After the import: the counters as imported against a recount of the devices as imported.
RECOUNT = """
SELECT (SELECT registered FROM transfer_counters) - count(d.id),
       (SELECT connected FROM transfer_counters)
           - count(d.id) FILTER (WHERE d.state = 'online' AND (g.id IS NULL OR g.state = 'online')),
       (SELECT ever_connected FROM transfer_counters) - count(d.first_seen)
FROM devices d LEFT JOIN gateways g ON g.id = d.via_gateway
WHERE d.platform_id = %(platform)s AND d.decommissioned_at IS NULL
"""

# Time ranges of the partitioned tables' staged rows, for their partitions (made beforehand).
DAYS = {
    "telemetry": "SELECT min(time), max(time) FROM transfer_telemetry",
    "connection_events": "SELECT min(time), max(time) FROM transfer_connection_events",
    "count_history": "SELECT min(time), max(time) FROM transfer_count_history",
    "usage_ledger": "SELECT min(recorded_at), max(recorded_at) FROM transfer_usage_ledger",
}
ENSURE_TELEMETRY_PARTITIONS = "SELECT iiot_ensure_telemetry_partitions(%s, %s)"
ENSURE_DAILY_PARTITIONS = "SELECT iiot_ensure_daily_partitions(%s, %s, %s)"
# As migration 0026: rows older than a year go to the default partition.
_OLDEST_PARTITION: Final = timedelta(days=366)


@dataclass(slots=True)
class ImportSummary:
    platform: str
    from_cell: str
    exported_at: str
    returning: bool
    rows: dict[str, int] = field(default_factory=dict)
    sha256: str = ""
    # Counters as imported minus a recount of the devices as imported (all 0: exact).
    drift: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True, slots=True)
class _Header:
    platform: str
    cell: str
    exported_at: str
    moved_to: str | None
    schema_version: int


async def import_platform(
    conn: AsyncConnection[Any],
    source: IO[bytes],
    *,
    cell: str,
    partitions: AsyncConnection[Any],
) -> ImportSummary:
    """Loads an exported platform into this cell (`cell`) in one transaction on `conn` (not in
    one already), or refuses it (RegistryError: NotFound, Conflict or Invalid, saying why) and
    changes nothing. `partitions`: a second connection (autocommit) that makes the day
    partitions the rows need before they are written, each in a short transaction of its own,
    so that this one never holds a partitioned table's lock for long."""
    lines = aiter(GzipLines(source))
    hasher = hashlib.sha256()

    async def line() -> bytes | None:
        return await anext(lines, None)

    first = await line()
    if first is None:
        raise Invalid("the file is empty")
    hasher.update(first)
    header = _read_header(first)
    async with conn.transaction():
        await _check_target(conn, header, cell)
        returning = await _platform_state(conn, header.platform)
        summary = ImportSummary(header.platform, header.cell, header.exported_at, returning)
        while True:
            text = await line()
            if text is None:
                raise Invalid("the file is truncated: it ends before its trailer")
            if text.startswith(b'{"trailer"'):
                break
            hasher.update(text)
            section = _read_section(text, summary.rows)
            summary.rows[section.name] = await _stage(conn, section, line, hasher)
        _check_trailer(text, hasher.hexdigest(), summary.rows)
        if await line() is not None:
            raise Invalid("the file is corrupt: something follows its trailer")
        summary.sha256 = hasher.hexdigest()
        if "platform" not in summary.rows or summary.rows["platform"] != 1:
            raise Invalid("the file holds no platform record")
        for section in SECTIONS:  # an older file may lack a section: it holds no rows
            if section.name not in summary.rows:
                await _create_stage(conn, section)
        await _make_partitions(conn, partitions)
        await _apply(conn, header.platform, returning)
        drift = await (await conn.execute(RECOUNT, {"platform": header.platform})).fetchone()
        summary.drift = tuple(int(d) for d in drift) if drift else (0, 0, 0)  # type: ignore[assignment]
        await audit(
            conn,
            "platform.import",
            header.platform,
            key_id=None,
            platform=header.platform,
            detail={
                "from_cell": header.cell,
                "exported_at": header.exported_at,
                "sha256": summary.sha256,
                "rows": summary.rows,
                "returning": returning,
            },
        )
        await announce(conn, header.platform)
    return summary


def _read_header(text: bytes) -> _Header:
    try:
        header = json.loads(text)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise Invalid("not a platform export (no iiot-platform header)")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise Invalid(
            f"the file is format version {version}; this iiot reads version {VERSION} and "
            "older: upgrade iiot in this cell first"
        )
    try:
        return _Header(
            str(header["platform"]),
            str(header["cell"]),
            str(header["exported_at"]),
            header.get("moved_to"),
            int(header["schema_version"]),
        )
    except (KeyError, TypeError, ValueError):
        raise Invalid("the file's header is incomplete") from None


async def _check_target(conn: AsyncConnection[Any], header: _Header, cell: str) -> None:
    if header.cell == cell:
        raise Invalid(f"the file was exported from this cell ({cell!r})")
    if header.moved_to != cell:
        what = (
            "exported without a move (the source still serves it)"
            if header.moved_to is None
            else f"moved to cell {header.moved_to!r}"
        )
        raise Invalid(
            f"platform {header.platform!r} was {what}, not to this cell ({cell!r}): a platform "
            f"is served by one cell; export it with --move-to {cell}"
        )
    row = await (await conn.execute(SCHEMA_VERSION)).fetchone()
    here = row[0] if row else 0
    if header.schema_version > here:
        raise Invalid(
            f"the file comes from a store at migration {header.schema_version}; this one is at "
            f"{here}: run `iiot migrate` with a newer iiot here first"
        )


async def _platform_state(conn: AsyncConnection[Any], platform: str) -> bool:
    """Whether the platform returns to this cell (its moved-away record is here); Conflict if
    it is served here."""
    await conn.execute(IMPORT_LOCK, (platform,))
    row = await (await conn.execute(PLATFORM_STATE, (platform,))).fetchone()
    if row is None:
        return False
    if row[0] is None:
        raise Conflict(f"platform {platform!r} exists in this cell already (and has not moved)")
    return True


def _read_section(text: bytes, seen: dict[str, int]) -> Section:
    try:
        document = json.loads(text)
        name, columns = document["section"], [tuple(c) for c in document["columns"]]
    except (ValueError, KeyError, TypeError):
        raise Invalid("the file is corrupt: a section header does not read") from None
    section = BY_NAME.get(name)
    if section is None:
        raise Invalid(f"the file has a section this iiot does not know: {name!r}")
    if name in seen:
        raise Invalid(f"the file is corrupt: section {name!r} appears twice")
    if tuple(columns) != section.columns:
        raise Invalid(f"section {name!r} has other columns than format version {VERSION}'s")
    return section


async def _create_stage(conn: AsyncConnection[Any], section: Section) -> None:
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in section.columns
    )
    await conn.execute(
        sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
            sql.Identifier(f"transfer_{section.name}"), columns
        )
    )


async def _stage(
    conn: AsyncConnection[Any],
    section: Section,
    line: Callable[[], Awaitable[bytes | None]],
    hasher: "hashlib._Hash",
) -> int:
    """Copies a section's rows into its staging table; returns how many."""
    await _create_stage(conn, section)
    table = sql.Identifier(f"transfer_{section.name}")
    pending = bytearray()
    async with conn.cursor() as cur:
        try:
            async with cur.copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
                while (text := await line()) != END:
                    if text is None:
                        raise Invalid(f"the file is truncated: it ends in section {section.name}")
                    hasher.update(text)
                    pending += text
                    if len(pending) >= CHUNK:
                        await copy.write(bytes(pending))
                        pending.clear()
                hasher.update(text)
                await copy.write(bytes(pending))
        except psycopg.DataError as exc:
            # A row the store cannot read: the file was damaged or edited (the digest would
            # say so at its end).
            raise Invalid(
                f"the file is corrupt: a row of section {section.name} does not read "
                f"({exc.diag.message_primary})"
            ) from None
        count = cur.rowcount
    await conn.execute(sql.SQL("ANALYZE {}").format(table))
    return count


def _check_trailer(text: bytes, digest: str, rows: dict[str, int]) -> None:
    try:
        trailer = json.loads(text)["trailer"]
        expected, stated = trailer["sha256"], trailer["rows"]
    except (ValueError, KeyError, TypeError):
        raise Invalid("the file is corrupt: its trailer does not read") from None
    if expected != digest:
        raise Invalid(
            "the file is corrupt or was changed: its content does not match its SHA-256 "
            f"(trailer {str(expected)[:16]}..., content {digest[:16]}...); export it again"
        )
    if stated != rows:
        raise Invalid(f"the file is corrupt: its trailer counts {stated}, it holds {rows}")


async def _make_partitions(conn: AsyncConnection[Any], partitions: AsyncConnection[Any]) -> None:
    """Day partitions for the staged rows' days, made and committed on the side connection."""
    today = datetime.now(UTC).date()
    for table, query in DAYS.items():
        row = await (await conn.execute(query)).fetchone()
        if row is None or row[0] is None:
            continue
        first: date = row[0].astimezone(UTC).date()
        last: date = row[1].astimezone(UTC).date()
        if table == "telemetry":  # no default partition: every day needs its own
            await partitions.execute(ENSURE_TELEMETRY_PARTITIONS, (first, last))
        else:
            first = max(first, today - _OLDEST_PARTITION)
            if first <= last:
                await partitions.execute(ENSURE_DAILY_PARTITIONS, (table, first, last))


async def _apply(conn: AsyncConnection[Any], platform: str, returning: bool) -> None:
    args = {"platform": platform}
    for table in ("transfer_gateway_ids", "transfer_device_ids", "transfer_key_ids"):
        await conn.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE {} (old bigint PRIMARY KEY, new bigint) ON COMMIT DROP"
            ).format(sql.Identifier(table))
        )
    await conn.execute(
        f"""CREATE TEMPORARY TABLE transfer_ledger_held (day date, source text, {USAGE_TYPES},
            batches bigint) ON COMMIT DROP"""
    )
    if returning:
        row = await (await conn.execute(MISSING_HERE, args)).fetchone()
        if row and (row[0] or row[1]):
            raise Invalid(
                f"platform {platform!r} has {row[0]} device(s) and {row[1]} gateway(s) here "
                "that the file lacks: it is not an export of this platform's whole record"
            )
        for statement in CLEAR_RETURNING:
            await conn.execute(statement, args)
    await conn.execute(UPSERT_PLATFORM, args)
    for statement in (INDUSTRY_MAPPING, ENTERPRISES, ENTERPRISE_RULE, GATEWAYS):
        await conn.execute(statement, args)
    await conn.execute(ID_MAPS["transfer_gateway_ids"], args)
    await conn.execute(DEVICES, args)
    await conn.execute(ID_MAPS["transfer_device_ids"], args)
    await conn.execute("ANALYZE transfer_device_ids")
    for statement in (STALE_ENTERPRISES, CREDENTIALS, API_KEYS):
        await conn.execute(statement, args)
    cur = await conn.execute(KEY_MAP, args)
    keys = await (await conn.execute("SELECT count(*) FROM transfer_api_keys")).fetchone()
    if keys and cur.rowcount != keys[0]:
        raise Conflict(
            f"{keys[0] - cur.rowcount} of the platform's API keys have a prefix another "
            "platform's key holds here; revoke those keys in the source and export again"
        )
    for statement in (COUNTERS, ACTIVITY, ENTERPRISE_STATS, COUNT_HISTORY, CONNECTION_EVENTS):
        await conn.execute(statement, args)
    await conn.execute(LEDGER_HELD_HERE, args)
    unaccounted = await (await conn.execute(LEDGER_UNACCOUNTED)).fetchone()
    if unaccounted is not None:
        raise Invalid(
            f"the usage ledger here holds usage of {unaccounted[0]} ({unaccounted[1]}) that the "
            "file does not: it is not an export of this platform's whole ledger"
        )
    for statement in (LEDGER_DAILY, LEDGER, USAGE_DAILY, AUDIT_LOG, DEAD_LETTERS):
        await conn.execute(statement, args)
    await conn.execute(METRIC_NAMES)
    await conn.execute(TELEMETRY)


async def import_from(settings: StoreSettings, source: IO[bytes]) -> ImportSummary:
    """`iiot platform import`: loads the file into this cell (IIOT_CELL), or refuses it whole."""
    async with (
        await connect(settings) as conn,
        await connect(settings, autocommit=True) as partitions,
    ):
        return await import_platform(conn, source, cell=settings.cell, partitions=partitions)
