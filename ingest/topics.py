"""The MQTT topic contract (docs/contract.md, "Topics")."""

from dataclasses import dataclass

from ingest.errors import Rejected
from registry.ids import is_device_id, is_platform_id


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    platform: str
    device: str


class TopicScheme:
    """Builds and parses `{root}/{platform}/{device}/telemetry` topics."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = root + "/"

    def telemetry_filter(self, shared_group: str | None = None) -> str:
        """The subscription that receives every platform's device telemetry."""
        topic = f"{self.root}/+/+/telemetry"
        return f"$share/{shared_group}/{topic}" if shared_group else topic

    def telemetry(self, platform: str, device: str) -> str:
        return f"{self.root}/{platform}/{device}/telemetry"

    def parse(self, topic: str) -> TelemetryTopic:
        if not topic.startswith(self._prefix):
            raise Rejected("bad_topic", f"topic is not under {self.root}/")
        parts = topic[len(self._prefix) :].split("/")
        if len(parts) != 3 or parts[2] != "telemetry":
            raise Rejected("bad_topic", "expected {root}/{platform}/{device}/telemetry")
        platform, device = parts[0], parts[1]
        if not is_platform_id(platform):
            raise Rejected("bad_platform_id", f"platform id {platform[:80]!r} breaks the id rules")
        if not is_device_id(device):
            raise Rejected(
                "bad_device_id", f"device id {device[:80]!r} breaks the id rules", platform=platform
            )
        return TelemetryTopic(platform, device)
