"""The MQTT topic contract (docs/contract.md, "Topics").

{root}/{platform}/{device}/telemetry              a device's own readings
{root}/{platform}/gateways/{gateway}/telemetry    readings of many devices via one gateway
"""

from dataclasses import dataclass
from typing import Literal

from ingest.errors import Rejected
from registry.ids import is_device_id, is_platform_id, is_reserved_device_id, reserved_device_id

GATEWAYS = "gateways"


KINDS = ("telemetry", "status")
# Topics parsed, kept: a fleet's topics repeat with every message (bounded; cleared when full).
_PARSED_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Address:
    """What a topic names."""

    platform: str
    # Exactly one of the two is set.
    device: str | None = None
    gateway: str | None = None
    kind: Literal["telemetry", "status"] = "telemetry"


class TopicScheme:
    """Builds and parses topics under one root (`iiot/v1` unless configured)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = root + "/"
        self._parsed: dict[str, Address] = {}

    def filters(self, shared_group: str | None = None) -> list[str]:
        """The subscriptions that receive every platform's telemetry and status."""
        return self.platform_filters("+", shared_group)

    def platform_filters(self, platform: str, shared_group: str | None = None) -> list[str]:
        """The subscriptions that receive one platform's telemetry and status ("+": all)."""
        topics = [f"{self.root}/{platform}/+/{kind}" for kind in KINDS] + [
            f"{self.root}/{platform}/{GATEWAYS}/+/{kind}" for kind in KINDS
        ]
        return [f"$share/{shared_group}/{t}" for t in topics] if shared_group else topics

    def telemetry(self, platform: str, device: str) -> str:
        return f"{self.root}/{platform}/{device}/telemetry"

    def gateway_telemetry(self, platform: str, gateway: str) -> str:
        return f"{self.root}/{platform}/{GATEWAYS}/{gateway}/telemetry"

    def status(self, platform: str, device: str) -> str:
        return f"{self.root}/{platform}/{device}/status"

    def gateway_status(self, platform: str, gateway: str) -> str:
        return f"{self.root}/{platform}/{GATEWAYS}/{gateway}/status"

    def parse(self, topic: str) -> Address:
        """What a topic names; raises Rejected for a topic outside the contract."""
        address = self._parsed.get(topic)
        if address is None:
            address = self._parse(topic)
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()
            self._parsed[topic] = address
        return address

    def _parse(self, topic: str) -> Address:
        if not topic.startswith(self._prefix):
            raise Rejected("bad_topic", f"topic is not under {self.root}/")
        parts = topic[len(self._prefix) :].split("/")
        kind = parts[-1]
        if kind not in KINDS or len(parts) not in (3, 4):
            raise Rejected(
                "bad_topic",
                "expected {root}/{platform}/{device}/{telemetry|status} "
                "or {root}/{platform}/gateways/{gateway}/{telemetry|status}",
            )
        platform = parts[0]
        if not is_platform_id(platform):
            raise Rejected("bad_platform_id", f"platform id {platform[:80]!r} breaks the id rules")
        if len(parts) == 4:
            if parts[1] != GATEWAYS:
                raise Rejected(
                    "bad_topic", "a four-level topic must be a gateway's", platform=platform
                )
            gateway = _checked(parts[2], "gateway", platform)
            return Address(
                platform, gateway=gateway, kind="telemetry" if kind == "telemetry" else "status"
            )
        device = _checked(parts[1], "device", platform)
        if is_reserved_device_id(device):
            raise Rejected("reserved_device_id", reserved_device_id(device), platform=platform)
        return Address(
            platform, device=device, kind="telemetry" if kind == "telemetry" else "status"
        )


def _checked(value: str, what: str, platform: str) -> str:
    if not is_device_id(value):
        raise Rejected(
            f"bad_{what}_id", f"{what} id {value[:80]!r} breaks the id rules", platform=platform
        )
    return value
