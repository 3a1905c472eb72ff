"""What the MQTT broker asks the registry: may this client connect, publish, subscribe?

User names name the client: `{platform}/{device}` for a device, `{platform}/gateways/{gateway}`
for a gateway or Sparkplug edge node (docs/access.md). A device may publish to its own topics
only; a gateway to its own, to those of the devices registered behind it, and to its Sparkplug
topics in the groups mapped to its platform, and may subscribe to its Sparkplug commands and
the primary host's STATE. A client acts only while it stands: its platform exists and has not
moved to another cell (the denial then says `platform_moved` and names the cell), it is not a
decommissioned device, its own secret was not revoked, and a secret still admits it (its own,
or the provisioning one where the platform auto-provisions). iiot's own ingest processes
connect as `iiot-service` with a broker key and may do anything (EMQX's superuser). Everything
else is denied.
"""

import hmac
import time
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.errors import Rejected
from ingest.sparkplug import NAMESPACE, parse_topic
from ingest.topics import GATEWAYS, TopicScheme
from registry.access import GLOBAL_ROLES, CredentialKind, digest, verify_key
from registry.ids import is_device_id, is_platform_id, is_reserved_device_id
from registry.moves import Moved, where_moved

# What decides whether a client may connect and act: its platform's provisioning policy, its
# own credential (and whether that was revoked), the provisioning secret, and whether it is a
# decommissioned device. No row: no such platform.
STANDING = """
SELECT p.auto_provision, own.digest, own.revoked_at IS NOT NULL, p.moved_to IS NOT NULL,
       (SELECT digest FROM credentials
        WHERE platform_id = p.id AND kind = 'provisioning' AND subject = ''
          AND revoked_at IS NULL),
       %(kind)s = 'device' AND EXISTS (
           SELECT FROM devices WHERE platform_id = p.id AND device_id = %(subject)s
           AND decommissioned_at IS NOT NULL)
FROM platforms p
LEFT JOIN credentials own
       ON own.platform_id = p.id AND own.kind = %(kind)s AND own.subject = %(subject)s
WHERE p.id = %(platform)s
"""
BEHIND_GATEWAY = """
SELECT EXISTS (
    SELECT FROM devices d JOIN gateways g ON g.id = d.via_gateway
    WHERE d.platform_id = %(platform)s AND d.device_id = %(device)s
      AND d.decommissioned_at IS NULL AND g.gateway_id = %(gateway)s)
"""
PUBLISHED_KINDS = frozenset({"NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA"})


@dataclass(frozen=True, slots=True)
class Client:
    platform: str
    kind: CredentialKind  # DEVICE or GATEWAY (PROVISIONING: the platform's, id "")
    id: str

    @property
    def username(self) -> str:
        """The MQTT user name the client presents (`client_of` reads it back)."""
        if self.kind is CredentialKind.GATEWAY:
            return f"{self.platform}/{GATEWAYS}/{self.id}"
        return f"{self.platform}/{self.id}"


def client_of(username: str) -> Client | None:
    """The device or gateway a user name names; None when it names neither."""
    match username.split("/"):
        case [platform, device] if device != GATEWAYS:
            if (
                is_platform_id(platform)
                and is_device_id(device)
                and not is_reserved_device_id(device)
            ):
                return Client(platform, CredentialKind.DEVICE, device)
        case [platform, "gateways", gateway]:
            if is_platform_id(platform) and is_device_id(gateway):
                return Client(platform, CredentialKind.GATEWAY, gateway)
    return None


SERVICE_USER = "iiot-service"
"""The user name iiot's own ingest processes connect with, a broker key as password."""


async def is_service(conn: AsyncConnection[Any], username: str, password: str) -> bool:
    """iiot's own processes (they subscribe to every platform's topics): the service user name
    with a valid broker or admin key."""
    if username != SERVICE_USER:
        return False
    principal = await verify_key(conn, password)
    return principal is not None and principal.role in GLOBAL_ROLES


@dataclass(frozen=True, slots=True)
class Standing:
    """What the store says about a client now."""

    auto_provision: bool
    own: bytes | None  # the digest of its own secret, also when revoked
    revoked: bool  # its own secret was revoked, and no new one issued
    provisioning: bytes | None  # the platform's provisioning secret's digest
    decommissioned: bool
    moved: bool = False  # its platform moved to another cell (registry/moves.py)

    def admits(self, password: str) -> bool:
        """With its own secret; or, when it never had one, with the platform's provisioning
        secret while the platform auto-provisions. Nothing admits a decommissioned device or a
        client whose secret was revoked."""
        if self.decommissioned or self.revoked or self.moved:
            return False
        presented = digest(password)
        if self.own is not None:
            return hmac.compare_digest(self.own, presented)
        return self._provisioned and hmac.compare_digest(self.provisioning or b"", presented)

    @property
    def may_act(self) -> bool:
        """Some secret still admits it: its own, or the provisioning one (not yet registered
        devices and gateways where the platform auto-provisions)."""
        if self.decommissioned or self.revoked or self.moved:
            return False
        return self.own is not None or self._provisioned

    @property
    def _provisioned(self) -> bool:
        return self.auto_provision and self.provisioning is not None


async def standing(conn: AsyncConnection[Any], client: Client) -> Standing | None:
    """None: its platform does not exist."""
    args = {"platform": client.platform, "kind": client.kind.value, "subject": client.id}
    row = await (await conn.execute(STANDING, args)).fetchone()
    if row is None:
        return None
    auto_provision, own, revoked, moved, provisioning, decommissioned = row
    return Standing(
        bool(auto_provision),
        None if own is None else bytes(own),
        bool(revoked),
        None if provisioning is None else bytes(provisioning),
        bool(decommissioned),
        bool(moved),
    )


async def moved_client(conn: AsyncConnection[Any], username: str) -> Moved | None:
    """Where the platform of a refused client moved to, if that is why it was refused: the
    hooks then say so (`platform_moved`), so that its operator points it at the new cell."""
    client = client_of(username)
    return None if client is None else await where_moved(conn, client.platform)


async def may_connect(conn: AsyncConnection[Any], username: str, password: str) -> bool:
    client = client_of(username)
    if client is None or not password:
        return False
    found = await standing(conn, client)
    return found is not None and found.admits(password)


_MAX_CACHED = 100_000


class Standings:
    """Whether clients may act (`Standing.may_act`), cached for `ttl` seconds per client: the
    authorize hook is called for every publish and subscribe EMQX has not cached. `forget`
    drops a platform's entries when its clients change (this process at once, others by
    notification)."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._known: dict[str, dict[tuple[CredentialKind, str], tuple[bool, float]]] = {}
        self._entries = 0
        # A lookup that a change overtook is not cached (it may have read the old state).
        self._generation = 0

    async def may_act(self, pool: AsyncConnectionPool, client: Client) -> bool:
        now = time.monotonic()
        known = self._known.get(client.platform)
        hit = None if known is None else known.get((client.kind, client.id))
        if hit is not None and hit[1] > now:
            return hit[0]
        generation = self._generation
        async with pool.connection() as conn:
            found = await standing(conn, client)
        allowed = found is not None and found.may_act
        if generation == self._generation and self._ttl > 0:
            if self._entries >= _MAX_CACHED:
                self._known.clear()
                self._entries = 0
            self._known.setdefault(client.platform, {})[(client.kind, client.id)] = (
                allowed,
                now + self._ttl,
            )
            self._entries += 1
        return allowed

    def forget(self, platform: str) -> None:
        """Drops what is cached of a platform's clients ("*": of every platform)."""
        self._generation += 1
        if platform == "*":
            self._known.clear()
            self._entries = 0
        else:
            self._entries -= len(self._known.pop(platform, {}))


class TopicRules:
    """Decides publish and subscribe requests for one topic root and Sparkplug group map: the
    topic must be the client's, and the client must still stand (`Standings`)."""

    def __init__(
        self,
        topics: TopicScheme,
        sparkplug_groups: dict[str, str] | None,
        standings: Standings,
    ) -> None:
        """`sparkplug_groups`: group -> platform; {} every group as its own platform; None off."""
        self._topics = topics
        self._groups = sparkplug_groups
        self.standings = standings

    async def may(
        self,
        pool: AsyncConnectionPool,
        username: str,
        topic: str,
        action: Literal["publish", "subscribe"],
    ) -> bool:
        client = client_of(username)
        if client is None:
            return False
        if topic.startswith(NAMESPACE + "/"):
            allowed = client.kind is CredentialKind.GATEWAY and self._sparkplug(
                client, topic, action
            )
        else:
            allowed = action == "publish" and await self._own_topic(pool, client, topic)
        return allowed and await self.standings.may_act(pool, client)

    async def _own_topic(self, pool: AsyncConnectionPool, client: Client, topic: str) -> bool:
        if "+" in topic or "#" in topic:
            return False
        try:
            address = self._topics.parse(topic)
        except Rejected:
            return False
        if address.platform != client.platform:
            return False
        if client.kind is CredentialKind.DEVICE:
            return address.device == client.id
        if address.gateway is not None:
            return address.gateway == client.id
        args = {"platform": client.platform, "device": address.device, "gateway": client.id}
        async with pool.connection() as conn:
            row = await (await conn.execute(BEHIND_GATEWAY, args)).fetchone()
        return bool(row and row[0])

    def _sparkplug(self, client: Client, topic: str, action: str) -> bool:
        parts = topic.split("/")
        if action == "subscribe" and len(parts) == 3 and parts[1] == "STATE":
            return parts[2] == "+" or is_device_id(parts[2])  # the primary host's state
        if action == "subscribe" and len(parts) == 5 and parts[2] == "DCMD" and parts[4] == "+":
            parts[4] = "any-device"  # commands to any of its devices
        try:
            address = parse_topic("/".join(parts))
        except Rejected:
            return False
        if address.edge_node != client.id or not self._maps(address.group, client.platform):
            return False
        if action == "publish":
            return address.kind in PUBLISHED_KINDS
        return address.kind in ("NCMD", "DCMD")

    def _maps(self, group: str, platform: str) -> bool:
        if self._groups is None:
            return False
        if not self._groups:
            return group == platform
        return self._groups.get(group) == platform
