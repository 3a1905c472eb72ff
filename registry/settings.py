"""Settings every process role that talks to the store shares."""

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
