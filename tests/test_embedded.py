"""The services `make run` starts when none is configured, and `iiot run` itself."""

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from iiot.embedded import EmbeddedPostgres, MosquittoBroker
from iiot.net import free_port
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from registry.migrate import migrate
from registry.settings import StoreSettings
from tests.conftest import eventually, payload, publisher, running, scalar
from tests.services import amqtt_in_thread
from tests.test_kafka_ingest import produce

# Every test here starts server processes of its own.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def amqtt_url() -> Iterator[str]:
    with amqtt_in_thread() as url:
        yield url


async def test_ingest_works_over_mqtt_311_with_the_python_broker(
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
    amqtt_url: str,
) -> None:
    settings = ingest_settings.model_copy(update={"mqtt_url": amqtt_url, "mqtt_protocol": "3.1.1"})
    topics = TopicScheme(settings.mqtt_topic_root)
    async with running(MqttIngest(settings, pool)), publisher(amqtt_url, "3.1.1") as client:
        for n in range(10):
            await client.publish(
                topics.telemetry(platform, f"d{n}"), payload({"metrics": {"v": n}}), qos=1
            )
        await eventually(lambda: scalar(db, "SELECT count(*) = 10 FROM telemetry"))
    assert await scalar(db, "SELECT count(*) FROM devices WHERE last_seen IS NOT NULL") == 10


def test_embedded_postgres_starts_restarts_and_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    try:
        url = server.start()
        asyncio.run(migrate(StoreSettings(database_url=url)))
        server.stop()
        assert not (tmp_path / "pg" / "postmaster.pid").exists()
        server.port = None
        url = server.start()  # same data directory, new port
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM iiot.schema_migrations").fetchone()
        assert row is not None
        assert row[0] >= 3
    finally:
        server.stop()


def test_iiot_run_brings_up_the_whole_stack_and_stops_cleanly(tmp_path: Path, kafka: str) -> None:
    port = free_port()
    # With a Kafka cluster configured, the stack reads its topic too: one device sends there.
    topic = f"iiot-run-{port}"
    record = payload({"metrics": {"v": 1}})
    asyncio.run(produce(kafka, topic, [(b"demo/from-kafka", record)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_STATE_DIR": str(tmp_path / "state"),
        "IIOT_API_PORT": str(port),
        "IIOT_SIMULATE_DEVICES": "7",
        "IIOT_SIMULATE_INTERVAL_SECONDS": "0.5",
        "IIOT_MQTT_CLIENT_ID": f"iiot-run-test-{port}",
        "IIOT_KAFKA_BOOTSTRAP": kafka,
        "IIOT_KAFKA_TOPICS": topic,
        "IIOT_KAFKA_GROUP_ID": f"iiot-run-{port}",
        "IIOT_KAFKA_CLIENT_ID": f"iiot-run-{port}",
    }
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:

        async def connected() -> Any:
            # The admin key `iiot run` prints with the URLs.
            printed = re.search(r"Admin API key: +(iiot_\S+)", (tmp_path / "run.log").read_text())
            if printed is None:
                assert process.poll() is None, (tmp_path / "run.log").read_text()
                return False
            url = f"http://127.0.0.1:{port}/platforms/demo/devices/count"
            try:
                async with httpx.AsyncClient() as http:
                    assert (await http.get(url)).status_code == 401
                    # Ready: the store answers, the MQTT consumer is subscribed and the Kafka
                    # consumer assigned.
                    ready = await http.get(f"http://127.0.0.1:{port}/readyz")
                    if ready.status_code != 200:
                        return False
                    response = await http.get(
                        url, headers={"Authorization": f"Bearer {printed.group(1)}"}
                    )
                # The simulator's 7 devices and the one that sent through Kafka.
                return response.status_code == 200 and response.json()["connected"] == 8
            except httpx.TransportError:
                assert process.poll() is None, (tmp_path / "run.log").read_text()
                return False

        asyncio.run(eventually(connected, timeout=60, interval=0.2))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "run.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert f"http://127.0.0.1:{port}" in output
    assert not (tmp_path / "state" / "postgres" / "postmaster.pid").exists(), (
        "PostgreSQL left running"
    )


def test_ctrl_c_on_iiot_run_stops_ingest_before_its_embedded_broker(tmp_path: Path) -> None:
    """A terminal's Ctrl+C signals the whole foreground process group. The embedded broker
    must not get it too: it would die under the consumer, which then waited out a timeout and
    logged errors instead of disconnecting before the broker stops."""
    if not MosquittoBroker.available():
        pytest.skip("Mosquitto is not installed: the broker is amqtt, inside iiot's process")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {
        "IIOT_STATE_DIR": str(tmp_path / "state"),
        "IIOT_API_PORT": str(port),
        "IIOT_SIMULATE_DEVICES": "3",
        "IIOT_MQTT_CLIENT_ID": f"iiot-run-ctrl-c-{port}",
    }
    log = tmp_path / "run.log"
    with log.open("w") as out:
        # In a process group of its own, as a shell runs a foreground job.
        process = subprocess.Popen(
            [sys.executable, "-m", "iiot.cli", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        async def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        asyncio.run(eventually(ready, timeout=60, interval=0.2))
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(30) == 0, log.read_text()
    finally:
        left = end_session(process, tmp_path)
    output = log.read_text()
    assert "connection lost" not in output, output
    assert "[error" not in output, output
    assert "stopped" in output
    assert left == [], "processes left running"


def end_session(process: "subprocess.Popen[bytes]", directory: Path) -> list[int]:
    """Kills a run in a session of its own if it is still going, and the processes left that
    name `directory` in their command line (a broker, in a session of its own, if iiot did not
    stop it); returns those left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    left = _processes_of(directory)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def _processes_of(directory: Path) -> list[int]:
    """The processes whose command line names the directory."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and str(directory).encode() in _cmdline(entry)
    ]


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def test_a_broker_that_a_killed_run_left_running_is_stopped_by_the_next(tmp_path: Path) -> None:
    """Its own session keeps the broker out of a Ctrl+C, so a run that is killed leaves it
    running; the next run on the same state directory stops it."""
    if not MosquittoBroker.available():
        pytest.skip("Mosquitto is not installed")
    state = tmp_path / "mosquitto"
    run = subprocess.Popen(
        [sys.executable, "-c", _RUN_A_BROKER, str(state)], stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    with run.stdout:
        orphan = int(run.stdout.readline())
    run.kill()
    run.wait()
    assert _cmdline(Path(f"/proc/{orphan}")), "the broker ended with its run"

    async def next_run() -> None:
        broker = MosquittoBroker(state)
        await broker.start()
        try:
            assert not _cmdline(Path(f"/proc/{orphan}"))  # ended (a zombie's is empty too)
        finally:
            await broker.stop()

    asyncio.run(next_run())


async def test_a_running_broker_s_state_directory_is_refused_to_another(tmp_path: Path) -> None:
    if not MosquittoBroker.available():
        pytest.skip("Mosquitto is not installed")
    first = MosquittoBroker(tmp_path / "mosquitto")
    await first.start()
    try:
        with pytest.raises(RuntimeError, match="another running iiot"):
            await MosquittoBroker(tmp_path / "mosquitto").start()
        assert first._process is not None
        assert first._process.poll() is None  # untouched
    finally:
        await first.stop()
    second = MosquittoBroker(tmp_path / "mosquitto")  # free again once stopped
    await second.start()
    await second.stop()


# A run that starts the broker, prints its pid and waits to be killed.
_RUN_A_BROKER = """
import asyncio, sys
from pathlib import Path
from iiot.embedded import MosquittoBroker

async def main():
    broker = MosquittoBroker(Path(sys.argv[1]))
    await broker.start()
    print(broker._process.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_running_postgres_data_directory_is_refused_to_another(tmp_path: Path) -> None:
    """A second run on the same state directory must not stop the first one's database as a
    leftover (it did: `pg_ctl stop -m immediate`)."""
    first = EmbeddedPostgres(tmp_path / "pg")
    url = first.start()
    try:
        with pytest.raises(RuntimeError, match="another running iiot"):
            EmbeddedPostgres(tmp_path / "pg").start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # still up
    finally:
        first.stop()
    second = EmbeddedPostgres(tmp_path / "pg")  # free again once stopped
    second.start()
    second.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the private directory is for runs as root")
def test_as_root_postgres_runs_from_a_private_directory_and_opens_no_caller_directory(
    tmp_path: Path,
) -> None:
    """As root the server's user needs no permission on the caller's directories (it used to get
    o+rx added to every parent of the data directory and of the venv's binaries, this test's
    0700 directory among them)."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    # Only directories of this test's own: other runs on the machine may share the ones above.
    before = {p: p.stat().st_mode for p in [closed, tmp_path]}
    server = EmbeddedPostgres(closed / "pg")
    try:
        url = server.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert (closed / "pg").is_symlink()
        private = (closed / "pg").resolve()
        assert private.is_relative_to(Path("/var/lib/iiot-postgres"))
        assert (closed / "pg" / "postmaster.pid").exists()  # the link leads to the live data
    finally:
        server.stop()
    assert {p: p.stat().st_mode for p in [closed, tmp_path]} == before

    # Deleting the link (as `make clean` or pytest's clean-up does) leaves garbage that the
    # next start of any embedded server removes.
    (closed / "pg").unlink()
    other = EmbeddedPostgres(tmp_path / "other")
    try:
        other.start()
        assert not private.exists()
    finally:
        other.stop()
