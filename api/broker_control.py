"""What the API does on the broker's side when a client's access changes (docs/access.md).

Once a change commits (a secret issued, rotated or revoked, a device decommissioned, a
platform's provisioning policy changed), this process forgets what it cached of the platform's
clients at once, and other API processes when the change's notification reaches them. When
EMQX's REST API is configured, the clients whose secret ended are also disconnected: MQTT
checks a password only at connect, so a client that connected before its secret was revoked
would otherwise stay connected, its publishes denied only once EMQX's own authorization cache
lets them through to the hook.
"""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import Request

from api.broker_access import TopicRules
from api.deps import after_commit
from api.settings import ApiSettings

log = logging.getLogger(__name__)

_PARALLEL = 8


class BrokerKicker:
    """Disconnects clients by user name through EMQX's REST API (v5): lists each user name's
    clients (`GET /clients?username=`) and kicks each (`DELETE /clients/{clientid}`). Open and
    close it (`async with`). Failures are logged, never raised: the change they follow has
    committed, and the authorize hook denies the client's next checks anyway."""

    def __init__(self, url: str, key: str, secret: str, *, timeout: float) -> None:
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"), auth=(key, secret), timeout=timeout
        )

    @classmethod
    def configured(cls, settings: ApiSettings) -> "BrokerKicker | None":
        if not settings.emqx_api_url:
            return None
        assert settings.emqx_api_key is not None
        assert settings.emqx_api_secret is not None
        return cls(
            settings.emqx_api_url,
            settings.emqx_api_key,
            settings.emqx_api_secret.get_secret_value(),
            timeout=settings.emqx_api_timeout_seconds,
        )

    async def __aenter__(self) -> "BrokerKicker":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._client.aclose()

    async def kick(self, usernames: Sequence[str]) -> int:
        """Disconnects every client connected with one of `usernames`, within the timeout for
        all of them; returns how many were disconnected."""
        limit = asyncio.Semaphore(_PARALLEL)
        kicked = 0
        failed: list[str] = []

        async def one(username: str) -> None:
            nonlocal kicked
            async with limit:
                try:
                    kicked += await self._kick(username)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    failed.append(f"{username} ({exc!r})")

        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.gather(*(one(username) for username in usernames))
        except TimeoutError:
            failed.append(f"the rest: not done within {self._timeout:g} s")
        if kicked:
            log.info("disconnected %d clients through EMQX's API", kicked)
        if failed:
            log.warning(
                "EMQX's API did not disconnect the clients of %s; the authorize hook denies "
                "them from their next check (docs/access.md)",
                ", ".join(failed[:5]),
            )
        return kicked

    async def _kick(self, username: str) -> int:
        listed = await self._client.get("/clients", params={"username": username, "limit": 100})
        listed.raise_for_status()
        clients: list[dict[str, Any]] = listed.json()["data"]
        for client in clients:
            gone = await self._client.delete(f"/clients/{quote(client['clientid'], safe='')}")
            if gone.status_code != 404:  # 404: it went on its own meanwhile
                gone.raise_for_status()
        return len(clients)


def clients_changed(request: Request, platform: str, kick: Sequence[str] = ()) -> None:
    """Once the request's change commits: forget what this process cached of `platform`'s
    clients, and disconnect the clients of the user names in `kick` (if EMQX's API is set)."""
    state = request.app.state

    async def act() -> None:
        rules: TopicRules = state.topic_rules
        rules.standings.forget(platform)
        kicker: BrokerKicker | None = state.kicker
        if kicker is not None and kick:
            await kicker.kick(kick)

    after_commit(request, act)
