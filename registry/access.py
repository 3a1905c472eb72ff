"""Who may do what: operators' API keys, devices' MQTT credentials, and the audit log.

Secrets are generated here (256 random bits), returned once, and stored as SHA-256 digests
(docs/access.md). A key reads `iiot_{prefix}_{secret}`: the prefix finds the row, the digest
of the whole key proves it.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from registry.errors import Conflict, Invalid, NotFound
from registry.notifications import announce, announce_key_revoked


class Role(StrEnum):
    ADMIN = "admin"  # every platform, every operation
    OPERATOR = "operator"  # one platform, read and write
    VIEWER = "viewer"  # one platform (or, without one, all platforms), read only
    BROKER = "broker"  # the MQTT broker's access hooks, nothing else


GLOBAL_ROLES: Final = frozenset({Role.ADMIN, Role.BROKER})


class CredentialKind(StrEnum):
    DEVICE = "device"
    GATEWAY = "gateway"
    PROVISIONING = "provisioning"  # one per platform: admits unknown devices if auto-provisioning


PLATFORM_EXISTS = "SELECT 1 FROM platforms WHERE id = %s"
FIND_KEY = """
SELECT id, digest, role, platform_id, revoked_at, expires_at FROM api_keys WHERE prefix = %s
"""
INSERT_KEY = """
INSERT INTO api_keys (prefix, digest, role, platform_id, name, created_by, expires_at)
VALUES (%(prefix)s, %(digest)s, %(role)s, %(platform)s, %(name)s, %(by)s, %(expires_at)s)
RETURNING id, prefix, role, platform_id AS platform, name, created_at, revoked_at, expires_at
"""
LIST_KEYS = """
SELECT id, prefix, role, platform_id AS platform, name, created_at, revoked_at, expires_at
FROM api_keys
WHERE (%(platform)s::text IS NULL OR platform_id = %(platform)s)
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
ORDER BY id LIMIT %(limit)s
"""
REVOKE_KEY = """
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE id = %(id)s AND (%(platform)s::text IS NULL OR platform_id = %(platform)s)
RETURNING id, prefix, role, platform_id AS platform, name, created_at, revoked_at, expires_at
"""
REVOKE_NAMED = """
UPDATE api_keys SET revoked_at = now()
WHERE name = %s AND role = 'admin' AND revoked_at IS NULL RETURNING id, prefix
"""

# Issuing over a revoked credential starts it afresh (an issue, not a rotation).
UPSERT_CREDENTIAL = """
INSERT INTO credentials (platform_id, kind, subject, digest)
VALUES (%(platform)s, %(kind)s, %(subject)s, %(digest)s)
ON CONFLICT (platform_id, kind, subject)
DO UPDATE SET digest = excluded.digest,
    created_at = CASE WHEN credentials.revoked_at IS NULL
                      THEN credentials.created_at ELSE now() END,
    rotated_at = CASE WHEN credentials.revoked_at IS NULL THEN now() END,
    revoked_at = NULL
RETURNING created_at, rotated_at
"""
# Kept, marked revoked: a revoked client must not fall back to the provisioning secret.
REVOKE_CREDENTIAL = """
UPDATE credentials SET revoked_at = now()
WHERE platform_id = %s AND kind = %s AND subject = %s AND revoked_at IS NULL RETURNING 1
"""
# A credential needs its subject: a registered device, a gateway (registered here if new), or
# the platform itself. Each returns whether the subject exists (now).
SUBJECT_EXISTS = {
    CredentialKind.DEVICE: """
        SELECT EXISTS (SELECT FROM devices WHERE platform_id = %(platform)s
                       AND device_id = %(subject)s AND decommissioned_at IS NULL)""",
    CredentialKind.GATEWAY: """
        WITH p AS (SELECT id FROM platforms WHERE id = %(platform)s),
        added AS (INSERT INTO gateways (platform_id, gateway_id) SELECT id, %(subject)s FROM p
                  ON CONFLICT DO NOTHING)
        SELECT EXISTS (SELECT FROM p)""",
    CredentialKind.PROVISIONING: """
        SELECT EXISTS (SELECT FROM platforms WHERE id = %(platform)s) AND %(subject)s = ''""",
}

AUDIT = """
INSERT INTO audit_log (key_id, platform_id, action, subject, detail)
VALUES (%s, %s, %s, %s, %s)
"""
LIST_AUDIT = """
SELECT id, time, key_id, platform_id AS platform, action, subject, detail FROM audit_log
WHERE (%(platform)s::text IS NULL OR platform_id = %(platform)s)
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
ORDER BY id LIMIT %(limit)s
"""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified holder of an API key."""

    key_id: int
    role: Role
    platform: str | None  # None: all platforms (admin, broker, national viewer)
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    prefix: str
    role: str
    platform: str | None
    name: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    time: datetime
    key_id: int | None
    platform: str | None
    action: str
    subject: str
    detail: dict[str, Any]


KEY_SHAPE = re.compile(r"iiot_([0-9a-f]{12})_([A-Za-z0-9_-]{32,})")


async def create_key(
    conn: AsyncConnection[Any],
    *,
    role: Role,
    platform: str | None,
    name: str,
    created_by: int | None,
    key: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret form, which is never stored and cannot be shown again.

    `key`: register this key instead of making one (a deployment's pre-shared broker or
    Prometheus key, `iiot keys import`); it must look like one we make.
    """
    if role in GLOBAL_ROLES and platform is not None:
        raise Invalid(f"a {role.value} key is for all platforms; give no platform")
    if role is Role.OPERATOR and platform is None:
        raise Invalid("an operator key is for one platform; give its platform")
    if platform is not None:
        cur = await conn.execute(PLATFORM_EXISTS, (platform,))
        if await cur.fetchone() is None:
            raise NotFound(f"platform {platform!r}")
    if key is None:
        prefix = secrets.token_hex(6)
        key = f"iiot_{prefix}_{secrets.token_urlsafe(32)}"
    elif (shape := KEY_SHAPE.fullmatch(key)) is None:
        raise Invalid("a key reads iiot_{12 hex digits}_{at least 32 URL-safe characters}")
    else:
        prefix = shape.group(1)
    args = {
        "prefix": prefix,
        "digest": digest(key),
        "role": role.value,
        "platform": platform,
        "name": name,
        "by": created_by,
        "expires_at": expires_at,
    }
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(INSERT_KEY, args)
        created = await cur.fetchone()
    assert created is not None
    await audit(
        conn,
        "api_key.create",
        created.prefix,
        key_id=created_by,
        platform=platform,
        detail={"role": role.value}
        | ({"expires_at": expires_at.isoformat()} if expires_at else {}),
    )
    return created, key


async def import_key(
    conn: AsyncConnection[Any], key: str, *, role: Role, platform: str | None, name: str
) -> bool:
    """Registers a pre-shared key unless it is registered already; True when it was added."""
    shape = KEY_SHAPE.fullmatch(key)
    if shape is not None:
        row = await (await conn.execute(FIND_KEY, (shape.group(1),))).fetchone()
        if row is not None:
            if not hmac.compare_digest(bytes(row[1]), digest(key)):
                raise Conflict(f"another key has the prefix {shape.group(1)}")
            return False
    await create_key(conn, role=role, platform=platform, name=name, created_by=None, key=key)
    return True


async def verify_key(conn: AsyncConnection[Any], key: str) -> Principal | None:
    """The principal a presented key stands for; None when it is unknown, malformed, revoked
    or expired."""
    parts = key.split("_", 2)  # the secret part may contain "_" itself
    if len(parts) != 3 or parts[0] != "iiot":
        return None
    cur = await conn.execute(FIND_KEY, (parts[1],))
    row = await cur.fetchone()
    if row is None:
        return None
    key_id, stored, role, platform, revoked_at, expires_at = row
    if revoked_at is not None or not hmac.compare_digest(bytes(stored), digest(key)):
        return None
    if expires_at is not None and expires_at <= datetime.now(UTC):
        return None
    return Principal(key_id, Role(role), platform, expires_at)


async def list_keys(
    conn: AsyncConnection[Any], *, platform: str | None, after: int | None, limit: int
) -> list[ApiKey]:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(LIST_KEYS, {"platform": platform, "after": after, "limit": limit})
        return await cur.fetchall()


async def revoke_key(
    conn: AsyncConnection[Any], key_id: int, *, platform: str | None, by: int | None
) -> ApiKey:
    """Revokes a key (of `platform`, unless None); revoking twice keeps the first time."""
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(REVOKE_KEY, {"id": key_id, "platform": platform})
        revoked = await cur.fetchone()
    if revoked is None:
        raise NotFound(f"API key {key_id}")
    await audit(conn, "api_key.revoke", revoked.prefix, key_id=by, platform=revoked.platform)
    await announce_key_revoked(conn, key_id)
    return revoked


async def replace_admin_key(conn: AsyncConnection[Any], name: str) -> str:
    """Revokes the admin keys called `name` and makes a new one (`iiot run`'s key per run)."""
    for key_id, prefix in await (await conn.execute(REVOKE_NAMED, (name,))).fetchall():
        await audit(conn, "api_key.revoke", prefix, key_id=None, platform=None)
        await announce_key_revoked(conn, key_id)
    _, key = await create_key(conn, role=Role.ADMIN, platform=None, name=name, created_by=None)
    return key


async def issue_credential(
    conn: AsyncConnection[Any],
    platform: str,
    kind: CredentialKind,
    subject: str,
    *,
    by: int | None,
) -> tuple[str, datetime, datetime | None]:
    """Issues (or rotates: the old secret stops working at once) the MQTT secret of a device,
    a gateway or the platform's provisioning credential. Returns the secret, shown once."""
    cur = await conn.execute(SUBJECT_EXISTS[kind], {"platform": platform, "subject": subject})
    row = await cur.fetchone()
    if not row or not row[0]:
        raise NotFound(f"{kind.value} {subject!r} on platform {platform!r}")
    secret = secrets.token_urlsafe(32)
    args = {"platform": platform, "kind": kind.value, "subject": subject, "digest": digest(secret)}
    cur = await conn.execute(UPSERT_CREDENTIAL, args)
    stamped = await cur.fetchone()
    assert stamped is not None
    created_at, rotated_at = stamped
    action = "credential.rotate" if rotated_at else "credential.issue"
    await audit(conn, action, f"{kind.value}:{subject}", key_id=by, platform=platform)
    await announce(conn, platform)  # API processes forget what they cached of its clients
    return secret, created_at, rotated_at


async def revoke_credential(
    conn: AsyncConnection[Any], platform: str, kind: CredentialKind, subject: str, *, by: int
) -> None:
    """Revokes a device's or gateway's secret: refused from the commit on, and the client is
    not admitted by the provisioning secret either, until a new secret is issued."""
    cur = await conn.execute(REVOKE_CREDENTIAL, (platform, kind.value, subject))
    if await cur.fetchone() is None:
        raise NotFound(f"credential of {kind.value} {subject!r} on platform {platform!r}")
    await audit(conn, "credential.revoke", f"{kind.value}:{subject}", key_id=by, platform=platform)
    await announce(conn, platform)


async def audit(
    conn: AsyncConnection[Any],
    action: str,
    subject: str,
    *,
    key_id: int | None,
    platform: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Appends to the audit log; call in the transaction of the change it records."""
    await conn.execute(AUDIT, (key_id, platform, action, subject, Jsonb(detail or {})))


async def audit_entries(
    conn: AsyncConnection[Any], *, platform: str | None, after: int | None, limit: int
) -> list[AuditEntry]:
    async with conn.cursor(row_factory=class_row(AuditEntry)) as cur:
        await cur.execute(LIST_AUDIT, {"platform": platform, "after": after, "limit": limit})
        return await cur.fetchall()
