"""MQTT credentials of devices, gateways and a platform's provisioning (docs/access.md)."""

from typing import Annotated

from fastapi import APIRouter, Path, status

from api.auth import Caller, PlatformScope
from api.deps import Connection, DeviceId, PlatformId
from api.models import CredentialIssued
from registry import access
from registry.access import CredentialKind
from registry.ids import DEVICE_ID_PATTERN

router = APIRouter(
    prefix="/platforms/{platform}", tags=["credentials"], dependencies=[PlatformScope]
)
GatewayId = Annotated[str, Path(pattern=f"^{DEVICE_ID_PATTERN}$", description="Gateway id")]


def username(platform: str, kind: CredentialKind, subject: str) -> str:
    """The MQTT user name a credential is presented with (the broker hooks parse it back)."""
    if kind is CredentialKind.GATEWAY:
        return f"{platform}/gateways/{subject}"
    return f"{platform}/{subject}"


async def _issue(
    conn: Connection, caller: Caller, platform: str, kind: CredentialKind, subject: str
) -> CredentialIssued:
    secret, created_at, rotated_at = await access.issue_credential(
        conn, platform, kind, subject, by=caller.key_id
    )
    return CredentialIssued(
        username=username(platform, kind, subject),
        secret=secret,
        created_at=created_at,
        rotated_at=rotated_at,
    )


@router.post(
    "/devices/{device}/credential",
    operation_id="issue_device_credential",
    response_model=CredentialIssued,
)
async def issue_device_credential(
    platform: PlatformId, device: DeviceId, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue the device's MQTT secret, or rotate it (the old one stops working at once).
    The device must be registered."""
    return await _issue(conn, caller, platform, CredentialKind.DEVICE, device)


@router.delete(
    "/devices/{device}/credential",
    operation_id="revoke_device_credential",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def revoke_device_credential(
    platform: PlatformId, device: DeviceId, conn: Connection, caller: Caller
) -> None:
    await access.revoke_credential(conn, platform, CredentialKind.DEVICE, device, by=caller.key_id)


@router.post(
    "/gateways/{gateway}/credential",
    operation_id="issue_gateway_credential",
    response_model=CredentialIssued,
)
async def issue_gateway_credential(
    platform: PlatformId, gateway: GatewayId, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue or rotate a gateway's (or Sparkplug edge node's) MQTT secret; a gateway not yet
    seen is registered with it."""
    return await _issue(conn, caller, platform, CredentialKind.GATEWAY, gateway)


@router.delete(
    "/gateways/{gateway}/credential",
    operation_id="revoke_gateway_credential",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def revoke_gateway_credential(
    platform: PlatformId, gateway: GatewayId, conn: Connection, caller: Caller
) -> None:
    await access.revoke_credential(
        conn, platform, CredentialKind.GATEWAY, gateway, by=caller.key_id
    )


@router.post(
    "/provisioning-credential",
    operation_id="issue_provisioning_credential",
    response_model=CredentialIssued,
)
async def issue_provisioning_credential(
    platform: PlatformId, conn: Connection, caller: Caller
) -> CredentialIssued:
    """Issue or rotate the platform's provisioning secret: while the platform auto-provisions,
    a device or gateway without a credential of its own may connect with it (as user name its
    own, e.g. `{platform}/{device}`) and is registered by its first message."""
    issued = await _issue(conn, caller, platform, CredentialKind.PROVISIONING, "")
    return issued.model_copy(
        update={"username": f"{platform}/<device> or {platform}/gateways/<gateway>"}
    )
