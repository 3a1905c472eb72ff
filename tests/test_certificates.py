"""The certificate expiry gauge reads the same end of validity as openssl does, for both
encodings of the date (UTCTime before 2050, GeneralizedTime from 2050), and the earliest of a
bundle."""

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.certificates import CertificateExpiry, earliest_expiry

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


def make_certificate(tmp: Path, name: str, days: int) -> Path:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        ],
        cwd=tmp, check=True, capture_output=True,
    )  # fmt: skip
    return tmp / f"{name}.pem"


def openssl_end_date(path: Path) -> datetime:
    done = subprocess.run(
        ["openssl", "x509", "-enddate", "-noout", "-in", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    text = done.stdout.strip().removeprefix("notAfter=")  # e.g. "Dec  6 20:40:00 2026 GMT"
    return datetime.strptime(text, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)


@pytest.mark.parametrize("days", [2, 400, 20_000])  # 20,000 days ends after 2050
def test_expiry_is_openssls_end_date(tmp_path: Path, days: int) -> None:
    path = make_certificate(tmp_path, "server", days)
    assert earliest_expiry(str(path)) == openssl_end_date(path)


def test_a_bundle_reports_its_earliest_certificate(tmp_path: Path) -> None:
    late = make_certificate(tmp_path, "late", 900)
    soon = make_certificate(tmp_path, "soon", 3)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(late.read_text() + (tmp_path / "soon.key").read_text() + soon.read_text())
    assert earliest_expiry(str(bundle)) == openssl_end_date(soon)


def test_the_gauge_names_each_setting_and_skips_unreadable_files(tmp_path: Path) -> None:
    path = make_certificate(tmp_path, "ca", 30)
    collector = CertificateExpiry(
        {"IIOT_MQTT_CA_FILE": str(path), "IIOT_KAFKA_CA_FILE": None, "IIOT_X": "/nonexistent"}
    )
    (family,) = collector.collect()
    assert family.name == "iiot_tls_certificate_expiry_timestamp_seconds"
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"setting": "IIOT_MQTT_CA_FILE", "file": str(path)}, openssl_end_date(path).timestamp())
    ]
