"""MQTT credentials of devices, gateways and a platform's provisioning (docs/access.md)."""

from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from api.auth import Caller, PlatformScope
from api.broker_access import Client
from api.broker_control import clients_changed
from api.deps import Connection, DeviceId, PlatformId
from api.models import CredentialIssued
from registry import access
from registry.access import CredentialKind
from registry.ids import DEVICE_ID_PATTERN

router = APIRouter(
    prefix="/platforms/{platform}", tags=["credentials"], dependencies=[PlatformScope]
)
GatewayId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN}$", description="Gateway id")]


async def _issue(
    request: Request, conn: Connection, caller: Caller, client: Client
) -> CredentialIssued:
    secret, created_at, rotated_at = await access.issue_credential(
        conn, client.platform, client.kind, client.id, by=caller.key_id
    )
    # Whoever is connected under this name came in with another secret, which ends now.
    # (A provisioning secret admits many clients; its rotation ends none of their sessions.)
    kick = [] if client.kind is CredentialKind.PROVISIONING else [client.username]
    clients_changed(request, client.platform, kick)
    return CredentialIssued(
        username=client.username, secret=secret, created_at=created_at, rotated_at=rotated_at
    )


async def _revoke(request: Request, conn: Connection, caller: Caller, client: Client) -> None:
    await access.revoke_credential(conn, client.platform, client.kind, client.id, by=caller.key_id)
    clients_changed(request, client.platform, [client.username])


@router.post(
    "/devices/{device}/credential",
    operation_id="issue_device_credential",
    response_model=CredentialIssued,
)
async def issue_device_credential(
    platform: PlatformId, device: DeviceId, request: Request, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue the device's MQTT secret, or rotate it (the old one stops working at once, and a
    client connected with it is disconnected where EMQX's API is configured). The device must
    be registered."""
    return await _issue(request, conn, caller, Client(platform, CredentialKind.DEVICE, device))


@router.delete(
    "/devices/{device}/credential",
    operation_id="revoke_device_credential",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def revoke_device_credential(
    platform: PlatformId, device: DeviceId, request: Request, conn: Connection, caller: Caller
) -> None:
    """Revoke the device's MQTT secret: refused from now on, also the platform's provisioning
    secret, until a new secret is issued; a connected client is disconnected where EMQX's API is
    configured."""
    await _revoke(request, conn, caller, Client(platform, CredentialKind.DEVICE, device))


@router.post(
    "/gateways/{gateway}/credential",
    operation_id="issue_gateway_credential",
    response_model=CredentialIssued,
)
async def issue_gateway_credential(
    platform: PlatformId, gateway: GatewayId, request: Request, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue or rotate a gateway's (or Sparkplug edge node's) MQTT secret; a gateway not yet
    seen is registered with it."""
    return await _issue(request, conn, caller, Client(platform, CredentialKind.GATEWAY, gateway))


@router.delete(
    "/gateways/{gateway}/credential",
    operation_id="revoke_gateway_credential",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def revoke_gateway_credential(
    platform: PlatformId, gateway: GatewayId, request: Request, conn: Connection, caller: Caller
) -> None:
    """Revoke a gateway's MQTT secret, as for a device's."""
    await _revoke(request, conn, caller, Client(platform, CredentialKind.GATEWAY, gateway))


@router.post(
    "/provisioning-credential",
    operation_id="issue_provisioning_credential",
    response_model=CredentialIssued,
)
async def issue_provisioning_credential(
    platform: PlatformId, request: Request, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue or rotate the platform's provisioning secret: while the platform auto-provisions,
    a device or gateway without a credential of its own may connect with it (as user name its
    own, e.g. `{platform}/{device}`) and is registered by its first message."""
    provisioning = Client(platform, CredentialKind.PROVISIONING, "")
    issued = await _issue(request, conn, caller, provisioning)
    return issued.model_copy(
        update={"username": f"{platform}/<device> or {platform}/gateways/<gateway>"}
    )
