"""What a SIGKILLed Mosquitto loses of the QoS 1 messages it acknowledged, and what each of its
persistence options costs (docs/contract.md, "Broker settings").

Per option, on a private Mosquitto of its own (never the shared one): a subscriber's persistent
session is created and left offline, so that what is published queues for it (iiot's backlog
during an outage); one paho publisher sends QoS 1 messages as fast as the broker acknowledges
them, for at most `--seconds`; the broker is killed with SIGKILL right after the last PUBACK
(or at the time limit) and started again on the same store; the subscriber resumes its session
and counts what arrives. Lost = acknowledged to the publisher, never delivered. The publish rate
and the broker's CPU per message are given against persistence off, measured in the same run
(the Python publisher, not the broker, bounds the rate when saving is cheap). 60,037 messages:
not a multiple of `autosave_on_changes`' counts, so some come after the last save.

    .venv/bin/python -m bench.broker_durability [--messages 60037] [--seconds 30]
    .venv/bin/python -m bench.broker_durability --messages 200037 --seconds 90 --label 200k \
        --only "off,interval 1,10000,1000 changes"
"""

import argparse
import json
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.draining import process_cpu
from iiot.net import accepts_connections, free_port

RESULTS = Path(__file__).parent / "results" / "broker_durability-latest.json"
BASE = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence {persistence}
persistence_location {state}/
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 10000
log_dest file {state}/mosquitto.log
{user}
{options}
"""
# name -> (persistence, extra options)
VARIANTS: dict[str, tuple[bool, str]] = {
    "persistence off": (False, ""),
    "autosave_interval 1800 (Mosquitto's default)": (True, "autosave_interval 1800"),
    "autosave_interval 30": (True, "autosave_interval 30"),
    "autosave_interval 5": (True, "autosave_interval 5"),
    "autosave_interval 1": (True, "autosave_interval 1"),
    "autosave_on_changes, every 10000 changes": (
        True,
        "autosave_on_changes true\nautosave_interval 10000",
    ),
    "autosave_on_changes, every 1000 changes": (
        True,
        "autosave_on_changes true\nautosave_interval 1000",
    ),
    "autosave_on_changes, every 100 changes": (
        True,
        "autosave_on_changes true\nautosave_interval 100",
    ),
    "autosave_on_changes, every change": (True, "autosave_on_changes true\nautosave_interval 1"),
}
TOPIC = "bench/durability"
_WINDOW = 20_000


class Broker:
    def __init__(self, state: Path, persistence: bool, options: str) -> None:
        self.state, self.port = state, free_port()
        state.mkdir(parents=True, exist_ok=True)
        self.conf = state / "mosquitto.conf"
        self.conf.write_text(
            BASE.format(
                port=self.port,
                persistence="true" if persistence else "false",
                state=state,
                user="user root",
                options=options,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen(  # noqa: S603
            [mosquitto, "-c", str(self.conf)], stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not accepts_connections("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"mosquitto did not start: {self.state}/mosquitto.log")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its store as it exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None


def subscriber(port: int) -> tuple[paho.Client, set[int]]:
    """The consumer's persistent session (MQTT 5, never expiring while the broker runs)."""
    received: set[int] = set()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-consumer", protocol=paho.MQTTv5
    )

    def on_message(_: Any, __: Any, message: paho.MQTTMessage) -> None:
        received.add(int(message.payload.split(b",", 1)[0]))

    client.on_message = on_message
    props = paho.Properties(paho.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0xFFFFFFFF
    props.ReceiveMaximum = 65535
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    return client, received


def run_variant(
    root: Path, name: str, persistence: bool, options: str, args: Any
) -> dict[str, Any]:
    broker = Broker(root / str(time.time_ns()), persistence, options)
    broker.start()
    consumer, _ = subscriber(broker.port)
    consumer.loop_start()
    consumer.subscribe(TOPIC, qos=1)
    time.sleep(0.3)
    consumer.disconnect()
    consumer.loop_stop()
    broker.stop()  # the session is in the store from here on
    broker.start()

    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    publisher.max_inflight_messages_set(1000)
    publisher.max_queued_messages_set(0)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    body = b"," + b"x" * 90  # about the size of a small reading
    assert broker.process is not None
    cpu_before = process_cpu(str(broker.process.pid))
    started = time.monotonic()
    deadline = started + args.seconds
    infos: list[paho.MQTTMessageInfo] = []

    def acknowledged_until(n: int) -> bool:
        """Waits until message n has its PUBACK (PUBACKs come in order); False at the limit."""
        while not infos[n].is_published():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    for n in range(args.messages):
        # At most _WINDOW unacknowledged: paho refuses a packet id that is still in use.
        if n >= _WINDOW and not acknowledged_until(n - _WINDOW):
            break
        infos.append(publisher.publish(TOPIC, str(n).encode() + body, qos=1))
    acknowledged_until(len(infos) - 1)
    took = time.monotonic() - started
    broker_cpu = process_cpu(str(broker.process.pid)) - cpu_before
    broker.kill()  # right after the last PUBACK (or at the time limit)
    acknowledged = {n for n, info in enumerate(infos) if info.is_published()}
    publisher.loop_stop()
    saved = sum(p.stat().st_size for p in broker.state.glob("*.db"))  # the last save

    broker.start()
    consumer, received = subscriber(broker.port)
    consumer.loop_start()
    # Until all arrived, or nothing for 10 s: saving on changes slows the redelivery too (each
    # PUBACK of the consumer is a change).
    resumed = quiet = time.monotonic()
    last = -1
    while not acknowledged <= received and time.monotonic() - quiet < 10:
        if len(received) != last:
            quiet, last = time.monotonic(), len(received)
        time.sleep(0.05)
    redelivery = quiet - resumed
    consumer.disconnect()
    consumer.loop_stop()
    broker.kill()
    lost = len(acknowledged - received)
    return {
        "variant": name,
        "options": options.replace("\n", "; ") or ("persistence true" if persistence else ""),
        "acknowledged": len(acknowledged),
        "lost_after_sigkill": lost,
        "publish_msgs_per_s": round(len(acknowledged) / took),
        "broker_cpu_s": round(broker_cpu, 2),
        "store_bytes_at_kill": saved,
        "redelivery_s": round(redelivery, 1),
    }


def _version() -> str:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, check=False)  # noqa: S603
    return (out.stdout + out.stderr).splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=60_037)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--only", help="variants whose name contains one of these (a,b)")
    parser.add_argument("--label", help="results go to broker_durability-LABEL-latest.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="durability-") as tmp:
        for name, (persistence, options) in VARIANTS.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            row = run_variant(Path(tmp), name, persistence, options, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    baseline = next((r for r in rows if r["variant"] == "persistence off"), None)
    for row in rows:
        if baseline:
            row["rate_vs_persistence_off"] = round(
                row["publish_msgs_per_s"] / baseline["publish_msgs_per_s"], 2
            )
            # Per message acknowledged: the publisher (Python) limits the rate, not the broker.
            per_message = row["broker_cpu_s"] / row["acknowledged"]
            row["broker_cpu_per_message_vs_off"] = round(
                per_message / (baseline["broker_cpu_s"] / baseline["acknowledged"]), 1
            )
    result = {
        "messages": args.messages,
        "seconds_limit": args.seconds,
        "mosquitto": _version(),
        "variants": rows,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    results = (
        RESULTS.with_name(f"broker_durability-{args.label}-latest.json") if args.label else RESULTS
    )
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
