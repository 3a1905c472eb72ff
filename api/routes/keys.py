"""Operators' API keys and the audit log (docs/access.md)."""

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status

from api.auth import Authenticator, Caller, check_read, check_write
from api.deps import Connection, after_commit
from api.models import AuditOut, KeyCreate, KeyCreated, KeyOut, Page
from api.problems import Problem
from registry import access
from registry.access import Role
from registry.errors import Invalid
from registry.ids import PLATFORM_ID_PATTERN

router = APIRouter(tags=["access"])
KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post(
    "/keys",
    operation_id="create_key",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
)
async def create_key(body: KeyCreate, conn: Connection, caller: Caller) -> KeyCreated:
    """A new API key, returned once. An admin creates any key; an operator creates operator
    and viewer keys for its own platform."""
    if caller.role is not Role.ADMIN:
        if body.role not in (Role.OPERATOR, Role.VIEWER) or body.platform is None:
            raise Problem(403, "Forbidden", "an operator creates operator and viewer keys only")
        check_write(caller, body.platform)
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        raise Invalid("expires_at must be in the future")
    created, key = await access.create_key(
        conn,
        role=body.role,
        platform=body.platform,
        name=body.name,
        created_by=caller.key_id,
        expires_at=body.expires_at,
    )
    return KeyCreated(**asdict(created), key=key)


@router.get("/keys", operation_id="list_keys", response_model=Page[KeyOut])
async def list_keys(
    conn: Connection,
    caller: Caller,
    after: Annotated[str | None, Query(pattern=r"^[1-9][0-9]{0,17}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[KeyOut]:
    """Keys (never their secrets) in id order: all for an admin, a platform's for its keys."""
    if caller.platform is None and caller.role is not Role.ADMIN:
        raise Problem(403, "Forbidden", "only an admin key lists every key")
    found = await access.list_keys(
        conn, platform=caller.platform, after=int(after) if after else None, limit=limit
    )
    items = [KeyOut(**asdict(k)) for k in found]
    return Page(items=items, next_after=str(items[-1].id) if len(items) == limit else None)


@router.delete("/keys/{key_id}", operation_id="revoke_key", response_model=KeyOut)
async def revoke_key(key_id: KeyId, request: Request, conn: Connection, caller: Caller) -> KeyOut:
    """Revoke a key: refused by this API process once answered, by the others when they hear
    of it (docs/access.md)."""
    if caller.role is Role.VIEWER:
        raise Problem(403, "Forbidden", "a viewer key cannot change anything")
    revoked = await access.revoke_key(conn, key_id, platform=caller.platform, by=caller.key_id)
    authenticator: Authenticator = request.app.state.authenticator
    after_commit(request, lambda: authenticator.forget(key_id))
    return KeyOut(**asdict(revoked))


@router.get("/audit", operation_id="audit_log", response_model=Page[AuditOut])
async def audit_log(
    conn: Connection,
    caller: Caller,
    platform: Annotated[str | None, Query(pattern=f"^{PLATFORM_ID_PATTERN}$")] = None,
    after: Annotated[str | None, Query(pattern=r"^[1-9][0-9]{0,17}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[AuditOut]:
    """Changes to keys, platforms, devices and credentials, oldest first: who made each one
    (the key's id) and when. A platform's key sees its platform's entries."""
    if platform is not None:
        check_read(caller, platform)
    entries = await access.audit_entries(
        conn,
        platform=platform or caller.platform,
        after=int(after) if after else None,
        limit=limit,
    )
    items = [AuditOut(**asdict(e)) for e in entries]
    return Page(items=items, next_after=str(items[-1].id) if len(items) == limit else None)
