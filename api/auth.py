"""API keys on every request: who is asking, how fast, and what they may see (docs/access.md).

Each request presents `Authorization: Bearer <key>` (or `X-API-Key: <key>`). A verified key
is cached for `api_key_cache_seconds`, so a revocation through another API process takes
effect within that time (through this one: at once). Every key has a token bucket; an empty
bucket answers 429 with `Retry-After`.

Platform checks answer 404 for another platform's objects, exactly as for objects that do not
exist, so a key learns nothing about platforms it may not see; a viewer trying to write, or a
platform key asking for cross-platform figures, gets 403.
"""

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.problems import Problem
from api.settings import ApiSettings
from registry.access import GLOBAL_ROLES, Principal, Role, verify_key
from registry.errors import NotFound

_bearer = HTTPBearer(auto_error=False, description="An API key: `Bearer iiot_...`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key")
_MAX_CACHED = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Authenticator:
    """Verifies keys (with a short cache) and meters each key's request rate."""

    def __init__(self, settings: ApiSettings) -> None:
        self._ttl = settings.api_key_cache_seconds
        self._rate = settings.api_rate_per_second
        self._burst = float(settings.api_rate_burst)
        self._verified: dict[bytes, tuple[Principal, float]] = {}
        self._buckets: dict[int, _Bucket] = {}

    async def principal(self, request: Request, key: str) -> Principal:
        fingerprint = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        cached = self._verified.get(fingerprint)
        if cached is not None and cached[1] > now:
            return cached[0]
        async with request.app.state.pool.connection() as conn:
            principal = await verify_key(conn, key)
        if principal is None:
            self._verified.pop(fingerprint, None)
            raise Problem(401, "Unauthorized", "the API key is unknown or revoked")
        if len(self._verified) >= _MAX_CACHED:
            self._verified.clear()
        self._verified[fingerprint] = (principal, now + self._ttl)
        return principal

    def forget(self, key_id: int) -> None:
        """Drops a revoked key from the cache at once."""
        for fingerprint, (principal, _) in list(self._verified.items()):
            if principal.key_id == key_id:
                del self._verified[fingerprint]

    def admit(self, principal: Principal) -> None:
        """Takes one token from the key's bucket, or refuses with the wait until the next."""
        now = time.monotonic()
        bucket = self._buckets.setdefault(principal.key_id, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self._rate)
            raise Problem(
                429,
                "Too Many Requests",
                f"this key may make {self._rate:g} requests per second; retry later",
                headers={"Retry-After": str(wait)},
            )
        bucket.tokens -= 1


async def _principal(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    key = bearer.credentials if bearer else header
    if not key:
        raise Problem(
            401,
            "Unauthorized",
            "send an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.principal(request, key)
    authenticator.admit(principal)
    request.state.principal = principal
    return principal


async def _operator(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if principal.role is Role.BROKER:
        raise Problem(403, "Forbidden", "a broker key may only call the broker hooks")
    return principal


async def _broker(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    if principal.role not in GLOBAL_ROLES:
        raise Problem(403, "Forbidden", "only a broker (or admin) key may ask this")
    return principal


Caller = Annotated[Principal, Depends(_operator)]
"""An operator's key (admin, operator or viewer)."""
Broker = Annotated[Principal, Depends(_broker)]
"""The MQTT broker's key (or an admin's)."""


def can_see(principal: Principal, platform: str) -> bool:
    return principal.platform is None or principal.platform == platform


def check_read(principal: Principal, platform: str) -> None:
    """404 unless the key may read the platform (the same answer as for no such platform)."""
    if not can_see(principal, platform):
        raise NotFound(f"platform {platform!r}")


def check_write(principal: Principal, platform: str) -> None:
    check_read(principal, platform)
    if principal.role is Role.VIEWER:
        raise Problem(403, "Forbidden", "a viewer key cannot change anything")


def check_national(principal: Principal) -> None:
    """Figures across platforms: for admin keys and national viewers."""
    if principal.platform is not None:
        raise Problem(403, "Forbidden", "figures across platforms need a key for all platforms")


def check_admin(principal: Principal) -> None:
    if principal.role is not Role.ADMIN:
        raise Problem(403, "Forbidden", "only an admin key may do this")


async def _platform_scope(request: Request, caller: Caller) -> None:
    """Router dependency: checks the `{platform}` of the path against the key, reads for GET
    and HEAD, writes for everything else. Routes need not remember it."""
    platform = request.path_params.get("platform")
    if platform is None:
        return
    if request.method in ("GET", "HEAD"):
        check_read(caller, platform)
    else:
        check_write(caller, platform)


PlatformScope = Depends(_platform_scope)
