"""Kafka over TLS and SASL/SCRAM: the settings refuse incomplete combinations, and the options
they give aiokafka are accepted by its consumer and make a TLS handshake (with the client
certificate) against openssl's own server. The mock cluster speaks neither TLS nor SASL, so no
broker is involved here (docs/contract.md says so)."""

import asyncio
import contextlib
import shutil
import ssl
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from iiot.net import free_port
from ingest.settings import IngestSettings
from tests.test_mqtt_tls import make_certificates, sign_certificate

needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs IIOT_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "iiot"},
            "needs IIOT_KAFKA_SASL_USERNAME and IIOT_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_sasl_username": "iiot", "kafka_sasl_password": "secret"},
            "IIOT_KAFKA_SECURITY_PROTOCOL is PLAINTEXT: use SASL_SSL",
        ),
        ({"kafka_ca_file": "/etc/ca.pem"}, "IIOT_KAFKA_CA_FILE set but"),
        (
            {
                "kafka_security_protocol": "SASL_PLAINTEXT",
                "kafka_sasl_username": "iiot",
                "kafka_sasl_password": "secret",
                "kafka_cert_file": "/etc/client.pem",
            },
            "IIOT_KAFKA_CERT_FILE set but IIOT_KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_key_file": "/etc/client.key"},
            "IIOT_KAFKA_KEY_FILE needs IIOT_KAFKA_CERT_FILE",
        ),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "PLAIN",
                "kafka_sasl_username": "iiot",
                "kafka_sasl_password": "secret",
            },
            "kafka_sasl_mechanism",
        ),
    ],
)
def test_incomplete_kafka_security_is_refused(settings: dict[str, str], refusal: str) -> None:
    with pytest.raises(ValidationError, match=refusal):
        IngestSettings(**settings)  # type: ignore[arg-type]


async def test_plaintext_by_default_and_aiokafka_takes_the_options() -> None:
    options = IngestSettings().kafka_client_options()
    assert options == {"security_protocol": "PLAINTEXT"}
    await AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", **options).stop()


@needs_openssl
async def test_sasl_ssl_gives_scram_and_a_verifying_tls_context(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    settings = IngestSettings(
        kafka_security_protocol="SASL_SSL",
        kafka_ca_file=str(tmp_path / "ca.pem"),
        kafka_sasl_username="iiot-ingest",
        kafka_sasl_password="s3cret",  # type: ignore[arg-type]
    )
    options = settings.kafka_client_options()
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "iiot-ingest",
        "sasl_plain_password": "s3cret",
    }
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [dict(c["subject"][0])["commonName"] for c in context.get_ca_certs()] == ["iiot test ca"]
    assert "s3cret" not in repr(settings)  # a SecretStr: kept out of logs and reprs
    # aiokafka's own checks of the combination (it refuses e.g. SASL_SSL without a context).
    await AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", ssl_context=context, **options).stop()


async def _handshake(context: ssl.SSLContext, port: int) -> None:
    for _ in range(100):  # until openssl listens
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
        except ConnectionRefusedError:
            await asyncio.sleep(0.05)
            continue
        writer.write(b"ping\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("openssl s_server did not listen")


@needs_openssl
async def test_the_tls_context_completes_a_mutual_handshake_with_openssl(tmp_path: Path) -> None:
    """openssl s_server requires a client certificate signed by the CA (-Verify) and gives up
    without one; the context from the settings passes, one without the client certificate or
    trusting another CA does not."""
    make_certificates(tmp_path)
    sign_certificate(tmp_path, "client", "/CN=iiot-ingest")

    def settings(**files: str) -> IngestSettings:
        return IngestSettings(
            kafka_security_protocol="SSL", **{k: str(tmp_path / v) for k, v in files.items()}
        )

    mutual = settings(
        kafka_ca_file="ca.pem", kafka_cert_file="client.pem", kafka_key_file="client.key"
    )
    no_client = settings(kafka_ca_file="ca.pem")
    wrong_ca = settings(
        kafka_ca_file="other-ca.pem", kafka_cert_file="client.pem", kafka_key_file="client.key"
    )
    for case, passes in ((mutual, True), (no_client, False), (wrong_ca, False)):
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            "openssl", "s_server", "-accept", str(port), "-naccept", "1", "-quiet",
            "-cert", "server.pem", "-key", "server.key", "-CAfile", "ca.pem",
            "-Verify", "1", "-verify_return_error",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            context = case.kafka_client_options()["ssl_context"]
            with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
                await _handshake(context, port)
            output, _ = await asyncio.wait_for(server.communicate(), timeout=10)
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
        # openssl reports each certificate of the client's chain it verified.
        verified = b"CN = iiot-ingest\nverify return:1" in output
        assert verified is passes, output.decode(errors="replace")
