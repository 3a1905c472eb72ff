"""API keys on every request: who is asking, how fast, and what they may see (docs/access.md).

`KeyMiddleware` checks every request but the public paths before routing: it reads
`Authorization: Bearer <key>` (or `X-API-Key: <key>`), verifies the key (cached for
`api_key_cache_seconds`; a revocation drops it at once in the process that made it, and in
the others when its notification arrives, within the cache time at worst), takes a token from
the key's bucket (empty: 429 with `Retry-After`), and leaves the principal in the request's
state. Doing this once per request in plain ASGI, not in a chain of dependencies, keeps a
cached check to microseconds.

Platform checks answer 404 for another platform's objects, exactly as for objects that do not
exist, so a key learns nothing about platforms it may not see; a viewer trying to write, or a
platform key asking for cross-platform figures, gets 403.
"""

import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.moved import refuse_moved
from api.problems import Problem, send_problem
from api.settings import ApiSettings
from registry.access import GLOBAL_ROLES, Principal, Role, verify_key
from registry.errors import NotFound

PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        # The dashboard's files hold no data; the page reads the API with the operator's key.
        "/dashboard",
        "/dashboard/app.js",
        "/dashboard/style.css",
    }
)
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key: `iiot_...`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_MAX_CACHED = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float

    def wait(self, now: float, rate: float, burst: float) -> int:
        """Refills the bucket; 0 when it holds a token, else the seconds until it does."""
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        return 0 if self.tokens >= 1 else math.ceil((1 - self.tokens) / rate)


def _too_many(wait: int, detail: str) -> Problem:
    return Problem(429, "Too Many Requests", detail, headers={"Retry-After": str(wait)})


class Authenticator:
    """Verifies keys (with a short cache) and meters each key's request rate."""

    def __init__(self, settings: ApiSettings) -> None:
        self._ttl = settings.api_key_cache_seconds
        self._rate = settings.api_rate_per_second
        self._burst = float(settings.api_rate_burst)
        self._broker_rate = settings.api_broker_rate_per_second
        self._broker_burst = float(settings.api_broker_rate_burst)
        self._verified: dict[bytes, tuple[Principal, float]] = {}
        self._buckets: dict[int, _Bucket] = {}
        # Unknown keys, per client address: each costs a lookup in the store.
        self._unknown_rate = settings.api_unknown_key_rate_per_second
        self._unknown_burst = float(settings.api_unknown_key_burst)
        self._unknown: dict[str, _Bucket] = {}
        # Counts revocations seen: a lookup that a revocation overtook is not cached, since it
        # may have read the key before the revocation committed.
        self._generation = 0

    async def principal(self, pool: Any, key: str, client: str = "") -> Principal:
        """`client`: the caller's address, whose unknown keys are rate-limited."""
        fingerprint = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        cached = self._verified.get(fingerprint)
        if cached is not None and cached[1] > now:
            return cached[0]
        guesses = self._unknown.get(client)
        if guesses is not None and (
            wait := guesses.wait(now, self._unknown_rate, self._unknown_burst)
        ):
            detail = f"too many unknown keys from this address; retry in {wait} s"
            raise _too_many(wait, detail)
        generation = self._generation
        async with pool.connection() as conn:
            principal = await verify_key(conn, key)
        if principal is None:
            self._verified.pop(fingerprint, None)
            if len(self._unknown) >= _MAX_CACHED:
                self._unknown.clear()  # bounded memory, like the cache of verified keys
            guesses = self._unknown.setdefault(client, _Bucket(self._unknown_burst, now))
            guesses.wait(now, self._unknown_rate, self._unknown_burst)
            guesses.tokens -= 1
            raise Problem(401, "Unauthorized", "the API key is unknown, revoked or expired")
        if len(self._verified) >= _MAX_CACHED:
            self._verified.clear()
        until = now + self._ttl
        if principal.expires_at is not None:
            left = (principal.expires_at - datetime.now(UTC)).total_seconds()
            until = min(until, now + left)
        if generation == self._generation:
            self._verified[fingerprint] = (principal, until)
        return principal

    def forget(self, key_id: int | None) -> None:
        """Drops a revoked key (None: every key) from the cache; call once the revocation has
        committed."""
        self._generation += 1
        for fingerprint, (principal, _) in list(self._verified.items()):
            if key_id is None or principal.key_id == key_id:
                del self._verified[fingerprint]

    def admit(self, principal: Principal) -> None:
        """Takes one token from the key's bucket, or refuses with the wait until the next."""
        now = time.monotonic()
        rate, burst = self._rate, self._burst
        if principal.role is Role.BROKER:  # a whole fleet's reconnect storm, not a person
            rate, burst = self._broker_rate, self._broker_burst
        bucket = self._buckets.setdefault(principal.key_id, _Bucket(burst, now))
        if wait := bucket.wait(now, rate, burst):
            raise _too_many(wait, f"this key may make {rate:g} requests per second; retry later")
        bucket.tokens -= 1


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip().decode("latin-1")
        if name == b"x-api-key":
            return value.strip().decode("latin-1")
    return None


class KeyMiddleware:
    """Authenticates and rate-limits every request to a non-public path (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        try:
            client = scope["client"][0] if scope.get("client") else ""
            principal = await self._admit(state, presented_key(scope["headers"]), client)
        except Problem as problem:
            await send_problem(scope, send, problem)
            return
        except psycopg.OperationalError:
            unavailable = Problem(
                503,
                "Service Unavailable",
                "the store is unavailable; retry",
                headers={"Retry-After": "5"},
            )
            await send_problem(scope, send, unavailable)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    @staticmethod
    async def _admit(state: Any, key: str | None, client: str) -> Principal:
        if not key:
            raise Problem(
                401,
                "Unauthorized",
                "send an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        authenticator: Authenticator = state.authenticator
        principal = await authenticator.principal(state.pool, key, client)
        authenticator.admit(principal)
        return principal


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Adds the key schemes to an OpenAPI schema: every operation but the public ones."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema["paths"].items():
        if path not in PUBLIC_PATHS:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return schema


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


async def operator(request: Request) -> Principal:
    """The request's principal, unless it holds a broker key (403)."""
    principal = _principal(request)
    if principal.role is Role.BROKER:
        raise Problem(403, "Forbidden", "a broker key may only call the broker hooks")
    return principal


def check_broker(request: Request) -> None:
    """403 unless the request holds a broker (or admin) key. Called in the hooks themselves:
    the broker calls them more than anything else, and a dependency costs each call."""
    if _principal(request).role not in GLOBAL_ROLES:
        raise Problem(403, "Forbidden", "only a broker (or admin) key may ask this")


Caller = Annotated[Principal, Depends(operator)]
"""An operator's key (admin, operator or viewer)."""


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


async def _platform_scope(request: Request) -> None:
    """Router dependency: checks the `{platform}` of the path against the key, reads for GET
    and HEAD, writes for everything else. Routes need not remember it."""
    caller = await operator(request)
    platform = request.path_params.get("platform")
    if platform is None:
        return
    if request.method in ("GET", "HEAD"):
        check_read(caller, platform)
    else:
        check_write(caller, platform)
    # A moved platform answers 410 naming its new cell, but for the read of its record.
    record = getattr(request.scope.get("route"), "path", "") == "/platforms/{platform}"
    if request.method not in ("GET", "HEAD") or not record:
        await refuse_moved(request.app.state, platform)


PlatformScope = Depends(_platform_scope)
