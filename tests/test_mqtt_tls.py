"""MQTT over TLS (mqtts://): ingest verifies the broker against IIOT_MQTT_CA_FILE and stores
what arrives; a broker its CA did not sign is refused. Real Mosquitto with a TLS listener and
certificates made by openssl for this test."""

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from iiot.net import free_port
from ingest.mqtt import MqttIngest
from ingest.settings import IngestSettings
from ingest.topics import TopicScheme
from tests.conftest import eventually, payload, running, scalar

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto") and shutil.which("openssl")),
    reason="needs the mosquitto and openssl programs (Debian: mosquitto, openssl)",
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(tmp: Path) -> None:
    """A CA, a server certificate for localhost signed by it, and an unrelated CA."""
    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=iiot test {ca}",
            cwd=tmp,
        )  # fmt: skip
    (tmp / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    sign_certificate(tmp, "server", "/CN=localhost", "-extfile", "san.ext")


def sign_certificate(tmp: Path, name: str, subject: str, *options: str) -> None:
    """<name>.key and <name>.pem for `subject`, signed by ca.pem."""
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", subject, cwd=tmp,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *options, cwd=tmp,
    )  # fmt: skip


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[int]:
    make_certificates(tmp_path)
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
        f"keyfile {tmp_path / 'server.key'}\nallow_anonymous true\nmax_queued_messages 0\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    broker = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [shutil.which("mosquitto") or "mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                break
        yield port
    finally:
        broker.kill()
        broker.wait(10)


async def test_ingest_reads_a_tls_broker_it_trusts(
    tls_broker: int,
    tmp_path: Path,
    ingest_settings: IngestSettings,
    pool: AsyncConnectionPool,
    db: psycopg.AsyncConnection[Any],
    platform: str,
) -> None:
    settings = ingest_settings.model_copy(
        update={
            "mqtt_url": f"mqtts://localhost:{tls_broker}",
            "mqtt_ca_file": str(tmp_path / "ca.pem"),
        }
    )
    topics = TopicScheme(settings.mqtt_topic_root)
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    async with (
        running(MqttIngest(settings, pool)),
        aiomqtt.Client("localhost", tls_broker, tls_context=trusted) as client,
    ):
        await client.publish(
            topics.telemetry(platform, "secure-1"), payload({"metrics": {"v": 1.5}}), qos=1
        )
        await eventually(lambda: scalar(db, "SELECT count(*) = 1 FROM telemetry"))

    # Verification is on: trusting another CA, the handshake with this broker fails.
    untrusted = ssl.create_default_context(cafile=str(tmp_path / "other-ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("localhost", tls_broker, ssl=untrusted)
    assert IngestSettings(mqtt_url="mqtts://broker.example").mqtt_endpoint()[1] == 8883
