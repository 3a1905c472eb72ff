"""Settings of the cell's national snapshots, from `IIOT_*` environment variables."""

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import AnyHttpUrl, Field, SecretStr

from national.cell.keys import EnterpriseHashKey, load_enterprise_hash_key, load_signing_key
from registry.settings import StoreSettings


class CellSettings(StoreSettings):
    """What a cell needs to report to the national aggregator; IIOT_CELL names the cell."""

    national_url: AnyHttpUrl | None = Field(
        default=None,
        description="The national aggregator's base URL; unset: no snapshots are built or sent.",
    )
    cell_signing_key: Path | None = Field(
        default=None,
        description="The cell's Ed25519 private key (PEM, `iiot cell keygen`); the aggregator "
        "holds its public key.",
    )
    enterprise_hash_key: SecretStr | None = Field(
        default=None,
        description="The key the cells share for their enterprises' keyed hashes: hex (at least "
        "32 bytes), or a file holding it; unset: snapshots carry no enterprises.",
    )
    snapshot_interval_seconds: float = Field(
        default=60.0, gt=0, description="A snapshot is built and delivered every interval."
    )
    snapshot_release_days: float = Field(
        default=30.0,
        gt=0,
        description="How long after a platform moved its release is repeated in every snapshot.",
    )
    snapshot_keep_delivered_hours: float = Field(
        default=24.0, ge=0, description="Delivered snapshots are kept this long, then deleted."
    )
    snapshot_outbox_limit: int = Field(
        default=50_000,
        ge=10,
        description="Undelivered snapshots kept at most (about 35 days at one a minute); at the "
        "limit no new one is built (never one dropped) and /metrics says so.",
    )
    national_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    def require_national(self) -> tuple[str, Path]:
        """The aggregator's URL and the signing key's path; ValueError says which is missing."""
        if self.national_url is None:
            raise ValueError("IIOT_NATIONAL_URL is not set: the aggregator's base URL")
        if self.cell_signing_key is None:
            raise ValueError(
                "IIOT_CELL_SIGNING_KEY is not set: the path of the cell's Ed25519 private key "
                "(make one with `iiot cell keygen --out FILE`)"
            )
        return str(self.national_url).rstrip("/"), self.cell_signing_key


@dataclass(frozen=True, slots=True)
class Reporting:
    """CellSettings with its keys loaded: what building and signing a snapshot needs."""

    cell: str
    signing_key: Ed25519PrivateKey
    hash_key: EnterpriseHashKey | None
    interval_seconds: float
    release_period: timedelta
    outbox_limit: int
    keep_delivered: timedelta

    @classmethod
    def load(cls, settings: CellSettings, signing_key: Path) -> Self:
        """Loads the keys now: a missing or unusable key fails at start, saying what to do."""
        secret = settings.enterprise_hash_key
        hash_key = None if secret is None else load_enterprise_hash_key(secret.get_secret_value())
        return cls(
            cell=settings.cell,
            signing_key=load_signing_key(signing_key),
            hash_key=hash_key,
            interval_seconds=settings.snapshot_interval_seconds,
            release_period=timedelta(days=settings.snapshot_release_days),
            outbox_limit=settings.snapshot_outbox_limit,
            keep_delivered=timedelta(hours=settings.snapshot_keep_delivered_hours),
        )
