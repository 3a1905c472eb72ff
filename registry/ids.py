"""Identifier rules for platforms, devices and metrics (docs/contract.md, "Identifiers").

Identifiers arrive in MQTT topics and URLs, so the character sets are deliberately small: no MQTT
wildcards (`+`, `#`), no topic separators, no path tricks (`..`), no quotes or whitespace.
"""

import re
from typing import Final

PLATFORM_ID: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Metric names come from PLC tag lists and Sparkplug (which uses `/` and spaces); they never reach
# a topic or an SQL text, so only control characters and surrounding blanks are refused.
METRIC_NAME: Final = re.compile(r"[^\x00-\x1f\x7f\s](?:[^\x00-\x1f\x7f]{0,126}[^\x00-\x1f\x7f\s])?")
SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Device ids that the API's paths or the broker's user names and topics give a meaning of their
# own: a device so named could not be addressed (`/platforms/{p}/devices/count` is the platform's
# count, `{p}/gateways/...` names a gateway). Refused everywhere as `reserved_device_id`
# (docs/contract.md, "Identifiers").
RESERVED_DEVICE_IDS: Final = frozenset({"count", "decommission", "gateways"})

PLATFORM_ID_PATTERN: Final = PLATFORM_ID.pattern
DEVICE_ID_PATTERN: Final = DEVICE_ID.pattern


def is_platform_id(value: str) -> bool:
    return PLATFORM_ID.fullmatch(value) is not None


def is_device_id(value: str) -> bool:
    return DEVICE_ID.fullmatch(value) is not None


def is_reserved_device_id(value: str) -> bool:
    return value in RESERVED_DEVICE_IDS


def reserved_device_id(value: str) -> str:
    """Why `value` cannot be a device id (the detail of a `reserved_device_id` refusal)."""
    return (
        f"device id {value!r} is reserved: the API's paths and the broker's topics give it a "
        f"meaning of its own ({', '.join(sorted(RESERVED_DEVICE_IDS))})"
    )


def is_metric_name(value: str) -> bool:
    return METRIC_NAME.fullmatch(value) is not None
