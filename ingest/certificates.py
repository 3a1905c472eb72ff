"""When the TLS certificates a process is configured with expire, as a Prometheus gauge.

Read at every scrape, so a certificate renewed in place (a Kubernetes Secret's mounted file)
shows its new date. A file holding several certificates (a CA bundle, a chain) reports the
earliest. Only the validity field is read (X.509, RFC 5280 4.1): the standard library parses
no certificate it does not verify, and this needs no dependency.
"""

import logging
import ssl
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_BEGIN, _END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
_UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x17, 0x18, 0xA0


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at `at`."""
    tag, length, start = der[at], der[at + 1], at + 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
        count = length & 0x7F
        length, start = int.from_bytes(der[start : start + count]), start + count
    return tag, start, start + length


def not_after(der: bytes) -> datetime:
    """The end of a DER certificate's validity."""
    _, certificate, _ = _element(der, 0)
    _, at, _ = _element(der, certificate)  # tbsCertificate
    tag, _, end = _element(der, at)
    if tag == _VERSION:
        at = end
    for _ in range(3):  # serialNumber, signature, issuer
        at = _element(der, at)[2]
    _, validity, _ = _element(der, at)
    _, _, after_not_before = _element(der, validity)
    tag, start, end = _element(der, after_not_before)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"not a certificate validity time (tag {tag:#x})")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def earliest_expiry(path: str) -> datetime:
    """The earliest end of validity among the PEM certificates in `path`."""
    text = Path(path).read_text(encoding="ascii")
    blocks = [f"{_BEGIN}{part.split(_END)[0]}{_END}" for part in text.split(_BEGIN)[1:]]
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate")
    return min(not_after(ssl.PEM_cert_to_DER_cert(block)) for block in blocks)


class CertificateExpiry(Collector):
    """`iiot_tls_certificate_expiry_timestamp_seconds{setting, file}` for each configured
    certificate file (setting name -> path; unset settings are skipped)."""

    def __init__(self, files: Mapping[str, str | None]) -> None:
        self._files = {setting: path for setting, path in files.items() if path}

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "iiot_tls_certificate_expiry_timestamp_seconds",
            "When the earliest certificate in a configured TLS file expires.",
            labels=["setting", "file"],
        )
        for setting, path in sorted(self._files.items()):
            try:
                gauge.add_metric([setting, path], earliest_expiry(path).timestamp())
            except (OSError, ValueError, IndexError) as exc:
                # Missing from the scrape, which the certificate alert treats as a problem too.
                log.warning("cannot read the certificate in %s=%s: %s", setting, path, exc)
        yield gauge
