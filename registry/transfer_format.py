"""The platform transfer file (docs/platform-transfer.md): what it holds, section by section,
and how it is written and read. gzip'd text, one pass each way with constant memory:

    {"format": "iiot-platform", "version": 1, "cell": ..., "platform": ..., ...}   header
    {"section": "devices", "columns": [["id", "bigint"], ...]}                     a section
    <one line per row, PostgreSQL's COPY text format>
    \\.
    ... every section ...
    {"trailer": {"rows": {...}, "sha256": "..."}}

The SHA-256 covers every byte before the trailer, so a truncated, corrupted or edited file is
refused; it proves integrity, not origin (carry the file over a trusted channel: it holds the
platform's credential digests). Writing: registry/platform_export.py; reading:
registry/platform_import.py.
"""

import asyncio
import hashlib
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, Final

from registry.errors import Invalid

FORMAT: Final = "iiot-platform"
VERSION: Final = 1
END: Final = b"\\.\n"
CHUNK: Final = 1 << 18  # bytes handed to zlib, COPY and the file at a time
MAX_LINE: Final = 1 << 28  # a row longer than this is not one we wrote


@dataclass(frozen=True, slots=True)
class Section:
    """One table's rows for one platform: the staging columns (name, SQL type), in the order
    `export` selects them ({platform}: the platform id, as a literal)."""

    name: str
    columns: tuple[tuple[str, str], ...]
    export: str
    optional: bool = False  # telemetry: only with --telemetry


def _columns(spec: str) -> tuple[tuple[str, str], ...]:
    pairs = (c.strip().split(" ", 1) for c in spec.split(","))
    return tuple((name, kind) for name, kind in pairs)


_DEVICE_STATE = """state text, session_managed boolean, session_epoch bigint,
    session_order bigint, state_changed_at timestamptz, expires_at timestamptz"""
USAGE_TYPES = """messages bigint, bytes bigint, points bigint, duplicate_points bigint,
    refused_messages bigint"""
USAGE_COLUMNS = "messages, bytes, points, duplicate_points, refused_messages"

SECTIONS: Final = (
    Section(
        "platform",
        _columns(
            "id text, name text, tier text, type text, region text, industry text, "
            "liveness_seconds integer, auto_provision boolean, metadata jsonb, "
            "created_at timestamptz"
        ),
        """SELECT id, name, tier, type, region, industry, liveness_seconds, auto_provision,
                  metadata, created_at
           FROM platforms WHERE id = {platform}""",
    ),
    # The dictionary entry the platform's industry text maps to, if any (migration 0031).
    Section(
        "industry_mapping",
        _columns("text text, industry text, mapped_by text, mapped_at timestamptz"),
        """SELECT m.text, m.industry, m.mapped_by, m.mapped_at
           FROM industry_mappings m JOIN platforms p ON m.text = lower(btrim(p.industry))
           WHERE p.id = {platform}""",
    ),
    Section(
        "enterprises",
        _columns(
            "code text, name text, industry text, above_size boolean, region text, "
            "region_reason text, created_at timestamptz, updated_at timestamptz"
        ),
        """SELECT code, name, industry, above_size, region, region_reason, created_at, updated_at
           FROM enterprises WHERE platform_id = {platform} ORDER BY code""",
    ),
    Section(
        "enterprise_rule",
        _columns("metadata_key text"),
        "SELECT metadata_key FROM enterprise_rules WHERE platform_id = {platform}",
    ),
    Section(
        "gateways",
        _columns(
            "id bigint, gateway_id text, metadata jsonb, created_at timestamptz, "
            f"first_seen timestamptz, last_seen timestamptz, {_DEVICE_STATE}, bd_seq smallint, "
            "session_flipped boolean, session_first boolean, enterprise text"
        ),
        """SELECT id, gateway_id, metadata, created_at, first_seen, last_seen, state,
                  session_managed, session_epoch, session_order, state_changed_at, expires_at,
                  bd_seq, session_flipped, session_first, enterprise
           FROM gateways WHERE platform_id = {platform} ORDER BY id""",
    ),
    Section(
        "devices",
        _columns(
            "id bigint, device_id text, metadata jsonb, created_at timestamptz, "
            "first_seen timestamptz, last_seen timestamptz, via_gateway bigint, "
            f"{_DEVICE_STATE}, decommissioned_at timestamptz, session_flipped boolean, "
            "session_first boolean, enterprise text"
        ),
        """SELECT id, device_id, metadata, created_at, first_seen, last_seen, via_gateway, state,
                  session_managed, session_epoch, session_order, state_changed_at, expires_at,
                  decommissioned_at, session_flipped, session_first, enterprise
           FROM devices WHERE platform_id = {platform} ORDER BY id""",
    ),
    Section(
        "credentials",
        _columns(
            "kind text, subject text, digest bytea, created_at timestamptz, "
            "rotated_at timestamptz, revoked_at timestamptz"
        ),
        """SELECT kind, subject, digest, created_at, rotated_at, revoked_at
           FROM credentials WHERE platform_id = {platform} ORDER BY kind, subject""",
    ),
    # The platform's own operator and viewer keys (as digests): its operators' integrations
    # keep working against the new cell. Admin, broker and national keys stay with their cell.
    Section(
        "api_keys",
        _columns(
            "id bigint, prefix text, digest bytea, role text, name text, "
            "created_at timestamptz, revoked_at timestamptz, expires_at timestamptz"
        ),
        """SELECT id, prefix, digest, role, name, created_at, revoked_at, expires_at
           FROM api_keys WHERE platform_id = {platform} ORDER BY id""",
    ),
    # The counters summed over the source's writer shards: one row, exact as read.
    Section(
        "counters",
        _columns("registered bigint, connected bigint, ever_connected bigint"),
        """SELECT coalesce(sum(registered), 0), coalesce(sum(connected), 0),
                  coalesce(sum(ever_connected), 0)
           FROM platform_counters WHERE platform_id = {platform}""",
    ),
    Section(
        "activity",
        _columns("active_24h bigint, active_30d bigint, as_of timestamptz"),
        """SELECT active_24h, active_30d, as_of
           FROM platform_activity WHERE platform_id = {platform}""",
    ),
    Section(
        "enterprise_stats",
        _columns(
            "enterprises bigint, above_size bigint, connected_30d bigint, industries integer, "
            "provinces integer, prefectures integer, linked_devices bigint"
        ),
        """SELECT enterprises, above_size, connected_30d, industries, provinces, prefectures,
                  linked_devices
           FROM platform_enterprise_stats WHERE platform_id = {platform}""",
    ),
    Section(
        "count_history",
        _columns(
            "time timestamptz, registered bigint, connected bigint, ever_connected bigint, "
            "seconds integer, connected_seconds bigint, connected_min bigint, "
            "connected_max bigint"
        ),
        """SELECT time, registered, connected, ever_connected, seconds, connected_seconds,
                  connected_min, connected_max
           FROM count_history WHERE platform_id = {platform} ORDER BY time""",
    ),
    Section(
        "connection_events",
        _columns(
            "id bigint, time timestamptz, subject text, subject_id bigint, state text, "
            "cause text, devices_affected integer"
        ),
        """SELECT id, time, subject, subject_id, state, cause, devices_affected
           FROM connection_events WHERE platform_id = {platform} ORDER BY time, id""",
    ),
    Section(
        "usage_ledger",
        _columns(f"id bigint, recorded_at timestamptz, day date, source text, {USAGE_TYPES}"),
        f"""SELECT id, recorded_at, day, source, {USAGE_COLUMNS}
            FROM usage_ledger WHERE platform_id = {{platform}} ORDER BY id""",
    ),
    Section(
        "usage_ledger_daily",
        _columns(f"day date, source text, {USAGE_TYPES}, batches bigint"),
        f"""SELECT day, source, {USAGE_COLUMNS}, batches
            FROM usage_ledger_daily WHERE platform_id = {{platform}} ORDER BY day, source""",
    ),
    Section(
        "usage_daily",
        _columns(f"day date, shard smallint, {USAGE_TYPES}"),
        f"""SELECT day, shard, {USAGE_COLUMNS}
            FROM usage_daily WHERE platform_id = {{platform}} ORDER BY day, shard""",
    ),
    Section(
        "audit_log",
        _columns(
            "id bigint, time timestamptz, key_id bigint, action text, subject text, detail jsonb"
        ),
        """SELECT id, time, key_id, action, subject, detail
           FROM audit_log WHERE platform_id = {platform} ORDER BY id""",
    ),
    # Refused messages, so that they can still be inspected and replayed in the new cell (a
    # returning platform keeps those it has here: what arrived while it was away, too).
    Section(
        "dead_letters",
        _columns(
            "id bigint, received_at timestamptz, source text, topic text, reason text, "
            "detail text, payload bytea, replayed_at timestamptz, replay_outcome text, "
            "kafka_partition integer, kafka_offset bigint, kafka_key bytea, "
            "kafka_headers bytea[], raw_topic bytea, sparkplug_topic text"
        ),
        """SELECT id, received_at, source, topic, reason, detail, payload, replayed_at,
                  replay_outcome, kafka_partition, kafka_offset, kafka_key, kafka_headers,
                  raw_topic, sparkplug_topic
           FROM dead_letters WHERE platform_id = {platform} ORDER BY id""",
    ),
    # In time order, with metric names (the importing cell has its own metric ids).
    Section(
        "telemetry",
        _columns("time timestamptz, device bigint, metric text, value double precision"),
        """SELECT t.time, t.device_id, m.name, t.value
           FROM telemetry t
           JOIN devices d ON d.id = t.device_id
           JOIN metrics m ON m.id = t.metric_id
           WHERE d.platform_id = {platform}
           ORDER BY t.time, t.device_id, t.metric_id""",
        optional=True,
    ),
)
BY_NAME: Final = {s.name: s for s in SECTIONS}
SCHEMA_VERSION = "SELECT max(version) FROM schema_migrations"


class GzipWriter:
    """Gzip-compresses what it is given into `sink`, a chunk at a time, and hashes it."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip member
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.size = 0

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        self._pending += self._zip.compress(data)
        if len(self._pending) >= CHUNK:
            await self._flush()

    def digest(self) -> str:
        return self._hash.hexdigest()

    async def close(self, last: bytes) -> None:
        """Writes `last` (unhashed: the trailer holds the hash) and ends the gzip member."""
        self._pending += self._zip.compress(last) + self._zip.flush()
        await self._flush()
        await asyncio.to_thread(self._sink.flush)

    async def _flush(self) -> None:
        data = bytes(self._pending)
        self._pending.clear()
        await asyncio.to_thread(self._sink.write, data)


class GzipLines:
    """The lines of a gzip'd file, read a chunk at a time; refuses a file cut short."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        unzip = zlib.decompressobj(31)
        started = False
        buffer = bytearray()
        while chunk := await asyncio.to_thread(self._source.read, CHUNK):
            data: bytes = chunk
            while data:
                started = True
                try:
                    buffer += unzip.decompress(data, CHUNK * 4)
                except zlib.error as exc:
                    raise Invalid(f"the file is corrupt (not gzip, or damaged): {exc}") from None
                data = unzip.unconsumed_tail
                if unzip.eof:  # another gzip member may follow
                    data, unzip, started = unzip.unused_data, zlib.decompressobj(31), False
                start = 0
                while (end := buffer.find(b"\n", start)) >= 0:
                    yield bytes(buffer[start : end + 1])
                    start = end + 1
                del buffer[:start]
                if len(buffer) > MAX_LINE:
                    raise Invalid("the file is corrupt: a line longer than any row")
        if started or buffer:
            raise Invalid("the file is truncated: it ends in the middle (copy it again)")


def json_line(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"
