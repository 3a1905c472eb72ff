"""A measured fix for paho-mqtt's MQTT 5 property objects on the receive path.

paho builds a `Properties` object for every MQTT 5 packet it reads, and each one rebuilds three
lookup tables in `__init__` (and `clear()` recompresses every property name): about 55 µs per
received message, more than half of ingest's CPU per message (cProfile of `make bench`). The
tables are never modified after construction, so every instance can share one set.
"""

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_applied = False


def share_property_tables() -> None:
    """Makes paho's `Properties` share its constant tables (idempotent, process-wide)."""
    global _applied  # noqa: PLW0603 - a process-wide patch is applied once
    if _applied:
        return
    template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types, names, properties = template.types, template.names, template.properties
    compressed = [name.replace(" ", "") for name in names]

    def __init__(self: Any, packetType: int) -> None:
        self.packetType = packetType
        self.types, self.names, self.properties = types, names, properties

    def clear(self: Any) -> None:
        for name in compressed:
            self.__dict__.pop(name, None)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    _applied = True
