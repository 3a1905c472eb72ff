"""What the MQTT broker asks the registry: may this client connect, publish, subscribe?

User names name the client: `{platform}/{device}` for a device, `{platform}/gateways/{gateway}`
for a gateway or Sparkplug edge node (docs/access.md). A device may publish to its own topics
only; a gateway to its own, to those of the devices registered behind it, and to its Sparkplug
topics in the groups mapped to its platform, and may subscribe to its Sparkplug commands and
the primary host's STATE. iiot's own ingest processes connect as `iiot-service` with a broker
key and may do anything (EMQX's superuser). Everything else is denied.
"""

import hmac
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection

from ingest.errors import Rejected
from ingest.sparkplug import NAMESPACE, parse_topic
from ingest.topics import GATEWAYS, TopicScheme
from registry.access import GLOBAL_ROLES, CredentialKind, digest, verify_key
from registry.ids import is_device_id, is_platform_id, is_reserved_device_id

CONNECT = """
SELECT p.auto_provision,
       (SELECT digest FROM credentials
        WHERE platform_id = p.id AND kind = %(kind)s AND subject = %(subject)s),
       (SELECT digest FROM credentials
        WHERE platform_id = p.id AND kind = 'provisioning' AND subject = ''),
       %(kind)s = 'device' AND EXISTS (
           SELECT FROM devices WHERE platform_id = p.id AND device_id = %(subject)s
           AND decommissioned_at IS NOT NULL)
FROM platforms p WHERE p.id = %(platform)s
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
    kind: CredentialKind  # DEVICE or GATEWAY
    id: str


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


async def may_connect(conn: AsyncConnection[Any], username: str, password: str) -> bool:
    """With its own secret; or, when it has none and its platform auto-provisions, with the
    platform's provisioning secret. Decommissioned devices may not connect."""
    client = client_of(username)
    if client is None or not password:
        return False
    args = {"platform": client.platform, "kind": client.kind.value, "subject": client.id}
    row = await (await conn.execute(CONNECT, args)).fetchone()
    if row is None:
        return False  # no such platform
    auto_provision, own, provisioning, decommissioned = row
    if decommissioned:
        return False
    presented = digest(password)
    if own is not None:
        return hmac.compare_digest(bytes(own), presented)
    return bool(
        auto_provision
        and provisioning is not None
        and hmac.compare_digest(bytes(provisioning), presented)
    )


class TopicRules:
    """Decides publish and subscribe requests for one topic root and Sparkplug group map."""

    def __init__(self, topics: TopicScheme, sparkplug_groups: dict[str, str] | None) -> None:
        """`sparkplug_groups`: group -> platform; {} every group as its own platform; None off."""
        self._topics = topics
        self._groups = sparkplug_groups

    async def may(
        self,
        conn: AsyncConnection[Any],
        username: str,
        topic: str,
        action: Literal["publish", "subscribe"],
    ) -> bool:
        client = client_of(username)
        if client is None:
            return False
        if topic.startswith(NAMESPACE + "/"):
            return client.kind is CredentialKind.GATEWAY and self._sparkplug(client, topic, action)
        return action == "publish" and await self._own_topic(conn, client, topic)

    async def _own_topic(self, conn: AsyncConnection[Any], client: Client, topic: str) -> bool:
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
