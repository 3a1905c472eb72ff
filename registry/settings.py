"""Settings every process role that talks to the store shares."""

import re
import zlib
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, PostgresDsn, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.ids import SCHEMA_NAME


class StoreSettings(BaseSettings):
    """Where the store is. Subclassed by each process role's settings; read from `IIOT_*`."""

    model_config = SettingsConfigDict(env_prefix="IIOT_", extra="ignore")

    database_url: PostgresDsn | None = Field(
        default=None,
        description="PostgreSQL or TimescaleDB URL; unset means `iiot run` starts an embedded one.",
    )
    database_schema: str = Field(
        default="iiot", description="Schema holding every iiot table (created by `iiot migrate`)."
    )
    database_pool_max: int = Field(default=8, ge=1, le=200)
    cell: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="This deployment's cell (docs/scaling.md): the platforms its store holds, "
        "named in /readyz, metrics, count responses and its national snapshots.",
    )

    @field_validator("database_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if SCHEMA_NAME.fullmatch(value) is None:
            raise ValueError(f"not a plain lower-case SQL identifier: {value!r}")
        return value

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise ValueError("IIOT_DATABASE_URL is not set")
        return str(self.database_url)

    def certificate_files(self) -> dict[str, str | None]:
        """The TLS certificate files this process uses, by setting (for their expiry)."""
        query = parse_qs(urlsplit(str(self.database_url or "")).query)
        return {
            f"IIOT_DATABASE_URL {name}": query[name][0]
            for name in ("sslrootcert", "sslcert")
            if name in query
        }


COUNTER_SHARDS = 64  # shards 0..63 (platform_counters.shard)
_RANGE = re.compile(r"(\d+)-(\d+)")
_ORDINAL = re.compile(r".*-(\d+)")


class ShardSettings(StoreSettings):
    """Which counter shards a process adds to (registry/connection.py: a platform's counts are
    rows summed over shards, so processes writing at once do not queue on one row).

    Each workload of a deployment gets a range (IIOT_COUNTER_SHARDS=first-last) and each of
    its pods its own part of it by ordinal (IIOT_POD_NAME, a StatefulSet pod's name ending in
    -<n>). Shards that collide cost lock waits, never wrong counts.
    """

    counter_shards: str | None = Field(
        default=None,
        pattern=r"^\d+-\d+$",
        description="This workload's shard range, first-last; a pod takes `lanes` shards from "
        "first + ordinal x lanes (the ordinal from IIOT_POD_NAME).",
    )
    pod_name: str | None = Field(
        default=None, description="This pod's name (the downward API's metadata.name)."
    )

    def shards_from_range(self, lanes: int = 1) -> int | None:
        """The first of this pod's `lanes` shards in IIOT_COUNTER_SHARDS; None when unset.
        Refuses (ValueError) a pod whose shards would fall outside the range."""
        if self.counter_shards is None:
            return None
        match = _RANGE.fullmatch(self.counter_shards)
        assert match is not None  # checked by the field's pattern
        first, last = int(match[1]), int(match[2])
        if not first <= last < COUNTER_SHARDS:
            raise ValueError(
                f"IIOT_COUNTER_SHARDS={self.counter_shards}: expected first-last within "
                f"0-{COUNTER_SHARDS - 1}"
            )
        ordinal = _ORDINAL.fullmatch(self.pod_name or "")
        if ordinal is None:
            raise ValueError(
                "IIOT_COUNTER_SHARDS needs IIOT_POD_NAME ending in the pod's ordinal "
                f"(a StatefulSet pod's name, e.g. iiot-api-0), not {self.pod_name!r}"
            )
        start = first + int(ordinal[1]) * lanes
        if start + lanes - 1 > last:
            raise ValueError(
                f"pod {self.pod_name} needs shards {start}-{start + lanes - 1}, beyond "
                f"IIOT_COUNTER_SHARDS={self.counter_shards}: widen the range (disjoint from the "
                "other workloads') or run fewer replicas"
            )
        return start


def hashed_shard(name: str) -> int:
    """A shard from a stable name, for processes given no shard: distinct names usually differ."""
    return zlib.crc32(name.encode()) % COUNTER_SHARDS
