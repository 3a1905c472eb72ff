"""Settings of the national aggregator (`iiot national ...`), from `IIOT_NATIONAL_*` variables.

The aggregator runs apart from every cell, with its own database: nothing here reads a cell's
`IIOT_DATABASE_URL`.
"""

import re
from typing import Final

from pydantic import Field, PostgresDsn, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A cell missing this many of its own intervals is stale (issue #28).
STALE_INTERVALS: Final = 3


class NationalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IIOT_NATIONAL_", extra="ignore")

    database_url: PostgresDsn | None = Field(
        default=None, description="The aggregator's own PostgreSQL (not a cell's store)."
    )
    database_schema: str = Field(default="iiot_national", description="Schema of its tables.")
    database_pool_max: int = Field(default=8, ge=1, le=200)
    host: str = Field(default="127.0.0.1", description="Bind address; loopback unless told.")
    port: int = Field(default=8100, ge=0, le=65535)
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest snapshot accepted (a cell's enterprise list makes most of it).",
    )
    sample_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How often the national figures are sampled into the history and the "
        "penetration numerators recomputed (history rows are per minute whatever this is).",
    )
    minute_history_days: float = Field(
        default=7.0, gt=0, description="Minute samples are kept this long, then hourly ones."
    )
    body_retention_days: float = Field(
        default=7.0,
        gt=0,
        description="Snapshot bodies are kept this long (each cell's latest always); their "
        "digests, signatures and figures stay.",
    )
    future_skew_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A snapshot taken further than this ahead of the aggregator's clock is "
        "refused: cells' clocks must be synchronised for staleness to mean anything.",
    )
    key_cache_seconds: float = Field(default=5.0, ge=0, le=300)

    @field_validator("database_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if _SCHEMA.fullmatch(value) is None:
            raise ValueError(f"not a plain lower-case SQL identifier: {value!r}")
        return value

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise ValueError("IIOT_NATIONAL_DATABASE_URL is not set (the aggregator's database)")
        return str(self.database_url)
