"""The private parts of paho-mqtt and aiomqtt that MQTT ingest relies on, checked at start-up.

Neither library promises them: a release may rename or drop any (paho 2.1 kept the time of the
last bytes received as `_last_msg_in` and read packets differently). `missing()` names every one
the installed releases lack; ingest then leaves paho's reading and acknowledging alone (paho's
public path: `on_message`, `ack`), slower but keeping every promise of docs/contract.md, and
says so in a warning. What aiomqtt 3 changes: docs/adr/0005-aiomqtt-3.md.

One part has no fallback: aiomqtt 2 keeps its paho client private (`Client._client`), and
only through it can ingest turn on manual acknowledgement (`manual_ack_set`), so that messages
are acknowledged after their batch commits. Without it ingest refuses to start (`paho_of`).
"""

import asyncio
import logging
from importlib.metadata import version
from typing import cast

import aiomqtt
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

TESTED = {"paho-mqtt": "2.2.0", "aiomqtt": "2.5.1"}
"""The releases these internals were checked against (the floors in pyproject.toml)."""

PAHO_CLIENT = (
    "_sock",  # the socket, read and checked for a connection
    "_sock_recv",  # replaced: paho reads every byte through it
    "_on_message_filtered",  # replaced: the per-topic callback table, skipped while empty
    "_in_packet",  # its "command" says whether paho is inside a packet
    "_packet_read",  # paho's reading of one packet
    "_loop_rc_handle",  # what paho does with a read error
    "_call_socket_register_write",  # asks the event loop to watch for writability (TLS)
    "_last_bytes_received",  # keepalive: when bytes last arrived
    "_protocol",  # MQTT 3.1.1 or 5
    "_packet_queue",  # queues a batch's PUBACKs as one write
)
"""Attributes of paho's `Client` that ingest/paho_speedups.py reads or replaces."""

PROPERTIES = frozenset({"packetType", "types", "names", "properties"})
"""Everything paho's `Properties.__init__` sets (ingest/paho_speedups.py sets it in one go)."""

AIOMQTT_CLIENT = (
    "_queue",  # aiomqtt's message queue, which receives one wake-up per burst
)
"""Attributes of aiomqtt's `Client` the fast path uses."""


def missing() -> list[str]:
    """The internals of the fast path that the installed paho-mqtt and aiomqtt lack (empty:
    the fast path can run). Call it in a running event loop (aiomqtt's `Client` wants one)."""
    gone: list[str] = []
    paho = PahoClient(CallbackAPIVersion.VERSION2)
    gone += [f"paho Client.{name}" for name in PAHO_CLIENT if not hasattr(paho, name)]
    if not isinstance(getattr(paho, "_in_packet", None), dict) or "command" not in paho._in_packet:
        gone.append('paho Client._in_packet["command"]')
    if not hasattr(getattr(MQTTMatcher(), "_root", None), "_children"):  # type: ignore[no-untyped-call]
        gone.append("paho MQTTMatcher._root._children")
    if set(vars(Properties(PacketTypes.PUBLISH))) != PROPERTIES:  # type: ignore[no-untyped-call]
        gone.append(f"paho Properties attributes {sorted(PROPERTIES)} only")
    client = aiomqtt.Client("127.0.0.1")
    gone += [f"aiomqtt Client.{name}" for name in AIOMQTT_CLIENT if not hasattr(client, name)]
    return gone


def use_fast_path(wanted: bool) -> bool:
    """Whether ingest may take the fast path (`IIOT_MQTT_PAHO_SPEEDUPS`); warns when it may not."""
    if not wanted:
        log.info("IIOT_MQTT_PAHO_SPEEDUPS is off: taking paho's public path")
        return False
    gone = missing()
    if gone:
        log.warning(
            "paho-mqtt %s / aiomqtt %s lack what ingest's speedups use (%s; tested with %s): "
            "taking paho's public path, which is slower",
            version("paho-mqtt"),
            version("aiomqtt"),
            ", ".join(gone),
            ", ".join(f"{name} {tested}" for name, tested in TESTED.items()),
        )
    return not gone


def paho_of(client: aiomqtt.Client) -> PahoClient:
    """aiomqtt's paho client: manual acknowledgement needs it (docs/adr/0002)."""
    paho = getattr(client, "_client", None)
    if not isinstance(paho, PahoClient):
        raise RuntimeError(  # noqa: TRY004 - not a caller's type error: the wrong aiomqtt
            f"aiomqtt {version('aiomqtt')} keeps no paho client at `Client._client`: ingest "
            "could not acknowledge messages after they are stored, so it does not start; "
            f"install aiomqtt {TESTED['aiomqtt']} (see docs/adr/0005-aiomqtt-3.md)"
        )
    return paho


def wakeups_of(client: aiomqtt.Client) -> "asyncio.Queue[None]":
    """aiomqtt's message queue, which the fast path fills with wake-ups (checked by `missing`)."""
    return cast("asyncio.Queue[None]", client._queue)
