"""Who the aggregator trusts: each cell's Ed25519 public key (`iiot national add-cell`), and
the national viewers' API keys (`iiot national keys create`).

A viewer key reads `iiotn_{prefix}_{secret}` (256 random bits), is shown once and stored as the
SHA-256 digest of the whole key; the prefix finds the row.
"""

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from psycopg import AsyncConnection

UPSERT_CELL = """
INSERT INTO cells (name, public_key) VALUES (%s, %s)
ON CONFLICT (name) DO UPDATE SET public_key = excluded.public_key, retired_at = NULL
RETURNING (xmax = 0) AS added
"""
CELL_KEY = "SELECT public_key FROM cells WHERE name = %s AND retired_at IS NULL"
HELD_PLATFORMS = "SELECT array_agg(id ORDER BY id) FROM platforms WHERE cell = %s"
RETIRE_CELL = "UPDATE cells SET retired_at = now() WHERE name = %s AND retired_at IS NULL"
INSERT_VIEWER_KEY = """
INSERT INTO viewer_keys (prefix, digest, name) VALUES (%s, %s, %s) RETURNING id
"""
FIND_VIEWER_KEY = (
    "SELECT id, digest, name FROM viewer_keys WHERE prefix = %s AND revoked_at IS NULL"
)
REVOKE_VIEWER_KEY = """
UPDATE viewer_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s RETURNING name
"""
LIST_VIEWER_KEYS = "SELECT id, prefix, name, created_at, revoked_at FROM viewer_keys ORDER BY id"


class BadPublicKey(ValueError):
    """Not an Ed25519 public key in a form `add-cell` reads."""


def load_public_key(text: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as PEM (SubjectPublicKeyInfo, what
    `openssl pkey -pubout` writes) or as the base64 or hex of the 32 raw bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise BadPublicKey(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BadPublicKey(f"the PEM key is {type(key).__name__}, not Ed25519")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    raise BadPublicKey(
        "give the cell's Ed25519 public key as PEM, or as the base64 or hex of its 32 bytes"
    )


async def add_cell(conn: AsyncConnection[Any], name: str, public_key: bytes) -> bool:
    """Registers a cell or replaces its key (a key rotation); True when the cell is new."""
    cur = await conn.execute(UPSERT_CELL, (name, public_key))
    row = await cur.fetchone()
    return bool(row and row[0])


class StillHolding(ValueError):
    """A cell that holds platforms cannot be retired: they would stop being counted."""


async def retire_cell(conn: AsyncConnection[Any], name: str) -> bool:
    """Takes a cell out of service; False when no such cell is in service. Refuses (StillHolding)
    while the cell holds platforms: move them first (the cell releases, the other claims)."""
    cur = await conn.execute(HELD_PLATFORMS, (name,))
    row = await cur.fetchone()
    held = row[0] if row else None
    if held:
        shown = ", ".join(held[:20]) + (" ..." if len(held) > 20 else "")
        raise StillHolding(
            f"cell {name} holds {len(held)} platform(s): {shown}; move them to another cell "
            "(released by this one, claimed by the other) before retiring it"
        )
    cur = await conn.execute(RETIRE_CELL, (name,))
    return cur.rowcount == 1


async def cell_key(conn: AsyncConnection[Any], name: str) -> Ed25519PublicKey | None:
    cur = await conn.execute(CELL_KEY, (name,))
    row = await cur.fetchone()
    return Ed25519PublicKey.from_public_bytes(bytes(row[0])) if row else None


@dataclass(frozen=True, slots=True)
class ViewerKey:
    id: int
    prefix: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_viewer_key(conn: AsyncConnection[Any], name: str) -> tuple[int, str]:
    """A new national viewer key: (its id, the key, shown this once)."""
    prefix = secrets.token_hex(4)
    key = f"iiotn_{prefix}_{secrets.token_urlsafe(32)}"
    cur = await conn.execute(INSERT_VIEWER_KEY, (prefix, _digest(key), name))
    row = await cur.fetchone()
    assert row is not None
    return row[0], key


async def verify_viewer_key(conn: AsyncConnection[Any], key: str) -> int | None:
    """The key's id when it is a live viewer key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "iiotn":
        return None
    cur = await conn.execute(FIND_VIEWER_KEY, (parts[1],))
    row = await cur.fetchone()
    if row is None or not hmac.compare_digest(bytes(row[1]), _digest(key)):
        return None
    return int(row[0])


async def revoke_viewer_key(conn: AsyncConnection[Any], key_id: int) -> str | None:
    cur = await conn.execute(REVOKE_VIEWER_KEY, (key_id,))
    row = await cur.fetchone()
    return row[0] if row else None


async def list_viewer_keys(conn: AsyncConnection[Any]) -> list[ViewerKey]:
    cur = await conn.execute(LIST_VIEWER_KEYS)
    return [ViewerKey(*row) for row in await cur.fetchall()]
