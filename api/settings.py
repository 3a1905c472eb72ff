"""Settings of the API process role (`iiot api`), from `IIOT_*` environment variables."""

from pydantic import Field

from registry.settings import StoreSettings


class ApiSettings(StoreSettings):
    api_host: str = Field(default="127.0.0.1", description="Bind address; loopback unless told.")
    api_port: int = Field(default=8000, ge=0, le=65535)
    # The counter shard registrations and decommissions made through this API add to.
    api_counter_shard: int = Field(default=0, ge=0, le=63)
