"""The cell's keys: its Ed25519 signing key, and the enterprise hash key the cells share.

The signing key proves a snapshot comes from this cell and was not changed on the way; the
aggregator holds only the public half (`iiot national add-cell`). The enterprise hash key turns
an enterprise's unified social credit code into a keyed hash (HMAC-SHA256) that every cell
computes alike, so the aggregator counts each enterprise once without learning its code: the
codes are public, so a plain hash could be reversed by hashing every published code.
"""

import hashlib
import hmac
import os
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MIN_HASH_KEY_BYTES = 32


class UnusableKey(ValueError):
    """A key that cannot be used; the message says what to do."""


def generate_signing_key(out: Path) -> str:
    """Writes a new Ed25519 private key to `out` (PEM, PKCS#8, mode 0600; an existing file is
    never overwritten) and returns its public key (PEM) for the aggregator's operator."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UnusableKey(f"{out} exists: a cell's key is not replaced by accident") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return public_key_pem(key)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UnusableKey(
            f"cannot read the cell's signing key {path} ({exc}); make one with "
            "`iiot cell keygen --out FILE`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UnusableKey(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass(frozen=True, slots=True)
class EnterpriseHashKey:
    """The shared key; `key_id` names it (not the key) in every snapshot."""

    secret: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:16]

    def code_hmac(self, code: str) -> str:
        """The keyed hash of an 18-character unified social credit code, hex."""
        return hmac.new(self.secret, code.encode("ascii"), hashlib.sha256).hexdigest()


def load_enterprise_hash_key(value: str) -> EnterpriseHashKey:
    """`value` is the key in hex, or the path of a file holding it (hex, or raw bytes)."""
    text = value.strip()
    if _is_hex(text):
        secret = bytes.fromhex(text)
    else:
        try:
            raw = Path(text).read_bytes()
        except OSError as exc:
            raise UnusableKey(
                f"IIOT_ENTERPRISE_HASH_KEY is neither hex nor a readable file ({exc.strerror})"
            ) from None
        stripped = raw.strip()
        secret = bytes.fromhex(stripped.decode()) if _is_hex(stripped.decode("latin-1")) else raw
    if len(secret) < MIN_HASH_KEY_BYTES:
        raise UnusableKey(
            f"IIOT_ENTERPRISE_HASH_KEY holds {len(secret)} bytes; the cells' shared key needs at "
            f"least {MIN_HASH_KEY_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return EnterpriseHashKey(secret)


def _is_hex(text: str) -> bool:
    return bool(text) and len(text) % 2 == 0 and all(c in string.hexdigits for c in text)
