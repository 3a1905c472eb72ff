"""Intake of the cells' snapshots (docs/national.md, "Intake"): verify, order, count, record.

Order of checks, each refusal recorded with the cell named, the sequence when known, the reason
and the SHA-256 of the bytes received:
1. the cell is known (403 unknown-cell);
2. the Ed25519 signature of the exact body bytes verifies under the cell's key, before a byte
   is parsed (401 bad-signature: tampered, or signed with another key);
3. the bytes are a valid snapshot of that cell, with a sketch that deserializes and a time not
   ahead of ours (422 invalid-snapshot);
4. the sequence is the cell's next one (the same number with the same bytes again: 200
   duplicate; with other bytes: 409 replayed; a number beyond: 409 out-of-order).
An accepted snapshot's platforms are the cell's claims: a platform another cell holds is
refused from it (recorded as a conflict) unless that cell released it to this one.

One cell's snapshots are taken one at a time (its row is locked for the transaction); platform
rows are locked in id order, so cells claiming the same platforms cannot deadlock.
"""

import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from national import format as wire
from national import sketches
from national.keys import cell_key
from national.settings import NationalSettings

log = logging.getLogger(__name__)

RECORD_REFUSAL = """
INSERT INTO refusals (cell, sequence, reason, detail, body_sha256, body_bytes)
VALUES (%s, %s, %s, %s, %s, %s)
"""
LOCK_CELL = """
SELECT next_sequence, enterprises_sha256 FROM cells WHERE name = %s AND retired_at IS NULL
FOR UPDATE
"""
TAKEN_DIGEST = "SELECT body_sha256 FROM snapshots WHERE cell = %s AND sequence = %s"
LOCK_PLATFORMS = """
SELECT id, cell, released_to FROM platforms WHERE id = ANY(%s) OR cell = %s ORDER BY id FOR UPDATE
"""
UPSERT_PLATFORMS = """
INSERT INTO platforms (id, name, tier, type, region, industry_code, industry_text, registered,
    connected, ever_connected, active_24h, active_30d, activity_as_of, cell, sequence, taken_at)
SELECT u.*, %(cell)s, %(sequence)s, %(taken_at)s
FROM unnest(%(id)s::text[], %(name)s::text[], %(tier)s::text[], %(type)s::text[],
            %(region)s::text[], %(industry_code)s::text[], %(industry_text)s::text[],
            %(registered)s::bigint[], %(connected)s::bigint[], %(ever_connected)s::bigint[],
            %(active_24h)s::bigint[], %(active_30d)s::bigint[],
            %(activity_as_of)s::timestamptz[]) AS u
ON CONFLICT (id) DO UPDATE SET
    (name, tier, type, region, industry_code, industry_text, registered, connected,
     ever_connected, active_24h, active_30d, activity_as_of, cell, sequence, taken_at,
     released_to, released_at)
  = (excluded.name, excluded.tier, excluded.type, excluded.region, excluded.industry_code,
     excluded.industry_text, excluded.registered, excluded.connected, excluded.ever_connected,
     excluded.active_24h, excluded.active_30d, excluded.activity_as_of, excluded.cell,
     excluded.sequence, excluded.taken_at, NULL, NULL)
-- Another cell's claim that committed while this one waited on the row is not overwritten.
WHERE platforms.cell = excluded.cell OR platforms.released_to = excluded.cell
RETURNING id
"""
HOLDER = "SELECT cell FROM platforms WHERE id = %s"
# A platform the cell no longer lists and did not release is no longer counted (removed there).
DROP_UNLISTED = """
DELETE FROM platforms WHERE cell = %s AND released_to IS NULL AND NOT (id = ANY(%s))
"""
RELEASE = "UPDATE platforms SET released_to = %s, released_at = %s WHERE id = %s"
OPEN_MOVE = """
INSERT INTO moves (platform, from_cell, to_cell, released_at, release_sequence)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (platform) WHERE claimed_at IS NULL DO UPDATE SET
    from_cell = excluded.from_cell, to_cell = excluded.to_cell,
    released_at = excluded.released_at, release_sequence = excluded.release_sequence
"""
CLOSE_MOVE = """
UPDATE moves SET claimed_at = now(), claim_sequence = %s
WHERE platform = %s AND to_cell = %s AND claimed_at IS NULL
"""
CELL_FIGURES = """
SELECT count(*), coalesce(sum(registered), 0), coalesce(sum(connected), 0),
       coalesce(sum(ever_connected), 0), coalesce(sum(active_24h), 0),
       coalesce(sum(active_30d), 0)
FROM platforms WHERE cell = %s
"""
RECORD_CONFLICT = """
INSERT INTO conflicts (platform, claimed_by, sequence, held_by, reason) VALUES (%s, %s, %s, %s, %s)
"""
INSERT_SNAPSHOT = """
INSERT INTO snapshots (cell, sequence, taken_at, took_seconds, interval_seconds,
    definitions_version, body_sha256, signature, body, platforms, refused_platforms, registered,
    connected, ever_connected, active_24h, active_30d, sketch, sketch_lg_k, sketch_target,
    identities, connected_without_identity)
VALUES (%(cell)s, %(sequence)s, %(taken_at)s, %(took_seconds)s, %(interval_seconds)s,
    %(definitions_version)s, %(body_sha256)s, %(signature)s, %(body)s, %(platforms)s,
    %(refused_platforms)s, %(registered)s, %(connected)s, %(ever_connected)s, %(active_24h)s,
    %(active_30d)s, %(sketch)s, %(sketch_lg_k)s, %(sketch_target)s, %(identities)s,
    %(connected_without_identity)s)
"""
ADVANCE_CELL = """
UPDATE cells SET next_sequence = %(sequence)s + 1, interval_seconds = %(interval_seconds)s,
    last_taken_at = %(taken_at)s, last_received_at = now(),
    enterprises_sha256 = %(enterprises_sha256)s
WHERE name = %(cell)s
"""
CLEAR_ENTERPRISES = "DELETE FROM cell_enterprises WHERE cell = %s"
INSERT_ENTERPRISES = """
INSERT INTO cell_enterprises (cell, key_id, code_hmac, region, industry_code, above_size,
    active_30d, served)
SELECT %(cell)s, %(key_id)s, u.* FROM unnest(%(code_hmac)s::text[], %(region)s::text[],
    %(industry_code)s::text[], %(above_size)s::boolean[], %(active_30d)s::boolean[],
    %(served)s::boolean[]) AS u
"""
# A snapshot of a minute already sampled: the sampler recomputes from that minute.
MARK_BACKLOG = """
INSERT INTO history_backlog (since) VALUES (date_trunc('minute', %(taken_at)s::timestamptz))
ON CONFLICT (only_row) DO UPDATE SET since = least(history_backlog.since, excluded.since)
"""

PROBLEM_BASE: Final = "/problems/"
_NONE: Final = wire.Enterprises(key_id="", definitions_version="", items=[])
_FIGURES: Final = ("registered", "connected", "ever_connected", "active_24h", "active_30d")


class Refused(Exception):
    """A snapshot the aggregator does not take: rendered as problem+json, already recorded."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        sequence: int | None = None,
        next_sequence: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.sequence = sequence
        self.next_sequence = next_sequence

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.reason


@dataclass(frozen=True, slots=True)
class Taken:
    """What the cell is told: `accepted` or `duplicate`, and the number it sends next."""

    status: str
    sequence: int
    next_sequence: int
    conflicts: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"status": self.status, "next_sequence": self.next_sequence}
        if self.status == "accepted":
            answer["sequence"] = self.sequence
            answer["refused_platforms"] = self.conflicts
        return answer


class Intake:
    """Takes snapshots into the aggregator's database (one per call, any number at once)."""

    def __init__(self, pool: AsyncConnectionPool, settings: NationalSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._keys: dict[str, tuple[Ed25519PublicKey, float]] = {}

    async def receive(self, cell: str | None, signature: str | None, body: bytes) -> Taken:
        digest = hashlib.sha256(body).digest()
        try:
            taken = await self._receive(cell or "", signature or "", body, digest)
        except Refused as refused:
            log.warning(
                "snapshot refused",
                extra={"cell": (cell or "")[:80], "reason": refused.reason, "why": refused.detail},
            )
            await self._record(cell or "", refused.sequence, refused.reason, refused.detail, body)
            raise
        if taken.status == "duplicate":  # answered 200; recorded beside the refusals
            detail = "the same bytes again (a retry); nothing changed"
            await self._record(cell or "", taken.sequence, "duplicate", detail, body)
        return taken

    async def _receive(self, cell: str, signature: str, body: bytes, digest: bytes) -> Taken:
        key = await self._key(cell)
        if key is None:
            raise Refused(403, "unknown-cell", f"no cell {cell[:80]!r} is registered here")
        try:
            key.verify(_signature(signature), body)
        except InvalidSignature:
            raise Refused(
                401,
                "bad-signature",
                f"the signature does not verify under cell {cell}'s key: the body was changed "
                "or signed with another key",
            ) from None
        snapshot = self._parse(cell, body)
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(LOCK_CELL, (cell,))
            row = await cur.fetchone()
            if row is None:  # retired since its key was read
                raise Refused(403, "unknown-cell", f"cell {cell!r} is retired here")
            expected, enterprises_before = row
            if snapshot.sequence < expected:
                return await _again(conn, snapshot, digest, expected)
            if snapshot.sequence > expected:
                raise Refused(
                    409,
                    "out-of-order",
                    f"sequence {snapshot.sequence} skips ahead: send {expected} next",
                    sequence=snapshot.sequence,
                    next_sequence=expected,
                )
            conflicts = await _accept(
                conn,
                snapshot,
                body=body,
                digest=digest,
                signature=_signature(signature),
                enterprises_before=enterprises_before,
            )
        return Taken("accepted", snapshot.sequence, snapshot.sequence + 1, conflicts)

    def _parse(self, cell: str, body: bytes) -> wire.Snapshot:
        try:
            snapshot = wire.Snapshot.model_validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:10]
            )
            raise Refused(422, "invalid-snapshot", f"not a valid snapshot: {problems}") from None
        if snapshot.cell != cell:
            raise Refused(
                422,
                "invalid-snapshot",
                f"the snapshot is of cell {snapshot.cell!r} but came signed by {cell!r}",
                sequence=snapshot.sequence,
            )
        if snapshot.taken_at.tzinfo is None:
            raise Refused(
                422,
                "invalid-snapshot",
                "taken_at has no UTC offset: send it as RFC 3339 with Z or an offset",
                sequence=snapshot.sequence,
            )
        ahead = snapshot.taken_at - datetime.now(UTC)
        if ahead > timedelta(seconds=self._settings.future_skew_seconds):
            raise Refused(
                422,
                "invalid-snapshot",
                f"taken_at is {ahead.total_seconds():.0f} s ahead of the aggregator's clock: "
                "synchronise the cell's clock (NTP)",
                sequence=snapshot.sequence,
            )
        for what, ids in (
            ("platform", [p.id for p in snapshot.platforms]),
            ("enterprise", [e.code_hmac for e in (snapshot.enterprises or _NONE).items]),
        ):
            if len(set(ids)) != len(ids):
                raise Refused(
                    422, "invalid-snapshot", f"a {what} is listed twice", sequence=snapshot.sequence
                )
        sketch = snapshot.devices
        try:
            sketches.check(_base64(sketch.data), sketch.lg_k, sketch.target)
        except sketches.BadSketch as exc:
            raise Refused(422, "invalid-snapshot", str(exc), sequence=snapshot.sequence) from None
        return snapshot

    async def _key(self, cell: str) -> Ed25519PublicKey | None:
        cached = self._keys.get(cell)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        if not cell:
            return None
        async with self._pool.connection() as conn:
            key = await cell_key(conn, cell)
        if key is not None:
            # A key replaced with `add-cell` applies within the cache time.
            self._keys[cell] = (key, now + self._settings.key_cache_seconds)
        return key

    async def _record(
        self, cell: str, sequence: int | None, reason: str, detail: str, body: bytes
    ) -> None:
        digest = hashlib.sha256(body).digest()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                RECORD_REFUSAL, (cell[:200], sequence, reason, detail, digest, len(body))
            )


def _signature(header: str) -> bytes:
    if not header.startswith(wire.SIGNATURE_PREFIX):
        raise Refused(401, "bad-signature", f"no {wire.SIGNATURE_HEADER}: ed25519=<base64> header")
    try:
        raw = base64.b64decode(header.removeprefix(wire.SIGNATURE_PREFIX), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise Refused(401, "bad-signature", "the signature is not the base64 of 64 bytes")
    return raw


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise sketches.BadSketch("the device sketch is not standard base64") from None


async def _again(
    conn: AsyncConnection[Any], snapshot: wire.Snapshot, digest: bytes, expected: int
) -> Taken:
    """A sequence number taken already: a retry of the same bytes, or a replay."""
    cur = await conn.execute(TAKEN_DIGEST, (snapshot.cell, snapshot.sequence))
    row = await cur.fetchone()
    if row is not None and bytes(row[0]) == digest:
        return Taken("duplicate", snapshot.sequence, expected)
    raise Refused(
        409,
        "replayed",
        f"sequence {snapshot.sequence} of cell {snapshot.cell} was taken with other bytes; "
        f"send {expected} next",
        sequence=snapshot.sequence,
        next_sequence=expected,
    )


async def _accept(
    conn: AsyncConnection[Any],
    snapshot: wire.Snapshot,
    *,
    body: bytes,
    digest: bytes,
    signature: bytes,
    enterprises_before: bytes | None,
) -> list[str]:
    """Stores the snapshot and its platforms' figures; the platforms refused (held elsewhere)."""
    cell, sequence = snapshot.cell, snapshot.sequence
    listed = sorted(p.id for p in snapshot.platforms)
    cur = await conn.execute(LOCK_PLATFORMS, (listed, cell))
    held = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
    for release in snapshot.releases:
        holder = held.get(release.platform)
        if holder is None or holder[0] != cell or holder[1] == release.to_cell:
            continue  # not this cell's to release, or released already (cells repeat them)
        await conn.execute(RELEASE, (release.to_cell, release.released_at, release.platform))
        await conn.execute(
            OPEN_MOVE, (release.platform, cell, release.to_cell, release.released_at, sequence)
        )
        held[release.platform] = (cell, release.to_cell)
    accepted: list[wire.PlatformFigures] = []
    refused: list[str] = []
    for platform in snapshot.platforms:
        holder = held.get(platform.id)
        if holder is None or (holder[0] == cell and holder[1] is None):
            accepted.append(platform)
        elif holder[1] == cell:  # the destination of a move claims it
            accepted.append(platform)
            await conn.execute(CLOSE_MOVE, (sequence, platform.id, cell))
        else:
            why = "released" if holder[0] == cell else "held"
            refused.append(platform.id)
            await conn.execute(RECORD_CONFLICT, (platform.id, cell, sequence, holder[0], why))
    await conn.execute(DROP_UNLISTED, (cell, listed))
    if accepted:
        cur = await conn.execute(UPSERT_PLATFORMS, _platform_columns(snapshot, accepted))
        taken = {row[0] for row in await cur.fetchall()}
        for platform in [p for p in accepted if p.id not in taken]:
            # Claimed by another cell's snapshot in the same moment, which committed first.
            cur = await conn.execute(HOLDER, (platform.id,))
            holder_row = await cur.fetchone()
            holder_cell = holder_row[0] if holder_row else "?"
            refused.append(platform.id)
            await conn.execute(RECORD_CONFLICT, (platform.id, cell, sequence, holder_cell, "held"))
    sketch = snapshot.devices
    # What the cell counts in now: its platforms accepted here and those it released that their
    # destination has not claimed yet (moving), so a history summing snapshots counts them once.
    cur = await conn.execute(CELL_FIGURES, (cell,))
    counted = await cur.fetchone()
    assert counted is not None
    figures = dict(zip(("platforms", *_FIGURES), counted, strict=True))
    await conn.execute(
        INSERT_SNAPSHOT,
        {
            "cell": cell,
            "sequence": sequence,
            "taken_at": snapshot.taken_at,
            "took_seconds": snapshot.took_seconds,
            "interval_seconds": snapshot.interval_seconds,
            "definitions_version": snapshot.definitions_version,
            "body_sha256": digest,
            "signature": signature,
            "body": body,
            "refused_platforms": len(refused),
            **figures,
            "sketch": _base64(sketch.data),
            "sketch_lg_k": sketch.lg_k,
            "sketch_target": sketch.target,
            "identities": sketch.identities,
            "connected_without_identity": sketch.connected_without_identity,
        },
    )
    enterprises = await _replace_enterprises(conn, snapshot, enterprises_before)
    await conn.execute(
        ADVANCE_CELL,
        {
            "cell": cell,
            "sequence": sequence,
            "interval_seconds": snapshot.interval_seconds,
            "taken_at": snapshot.taken_at,
            "enterprises_sha256": enterprises,
        },
    )
    if snapshot.taken_at < datetime.now(UTC).replace(second=0, microsecond=0):
        await conn.execute(MARK_BACKLOG, {"taken_at": snapshot.taken_at})
    return refused


def _platform_columns(
    snapshot: wire.Snapshot, platforms: list[wire.PlatformFigures]
) -> dict[str, Any]:
    columns: dict[str, Any] = {
        name: [getattr(p, name) for p in platforms]
        for name in (
            "id",
            "name",
            "tier",
            "type",
            "region",
            "industry_code",
            "industry_text",
            *_FIGURES,
            "activity_as_of",
        )
    }
    return columns | {
        "cell": snapshot.cell,
        "sequence": snapshot.sequence,
        "taken_at": snapshot.taken_at,
    }


async def _replace_enterprises(
    conn: AsyncConnection[Any], snapshot: wire.Snapshot, before: bytes | None
) -> bytes:
    """The latest snapshot's enterprise list replaces the cell's; an unchanged one (by digest)
    is left as it is. No list is an empty one."""
    listed = snapshot.enterprises
    items = listed.items if listed else []
    key_id = listed.key_id if listed else ""
    digest = hashlib.sha256(orjson.dumps([key_id, [item.model_dump() for item in items]])).digest()
    if before is not None and bytes(before) == digest:
        return digest
    await conn.execute(CLEAR_ENTERPRISES, (snapshot.cell,))
    if items:
        await conn.execute(
            INSERT_ENTERPRISES,
            {
                "cell": snapshot.cell,
                "key_id": key_id,
                "code_hmac": [e.code_hmac for e in items],
                "region": [e.region for e in items],
                "industry_code": [e.industry_code for e in items],
                "above_size": [e.above_designated_size for e in items],
                "active_30d": [e.active_30d for e in items],
                "served": [e.served for e in items],
            },
        )
    return digest
