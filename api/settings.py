"""Settings of the API process role (`iiot api`), from `IIOT_*` environment variables."""

from typing import Self

from pydantic import Field, SecretStr, model_validator

from ingest.settings import TopicSettings
from registry.settings import ShardSettings


class ApiSettings(TopicSettings, ShardSettings):
    api_host: str = Field(default="127.0.0.1", description="Bind address; loopback unless told.")
    api_port: int = Field(default=8000, ge=0, le=65535)
    # HTTPS when both are set (PEM files); otherwise plain HTTP behind a TLS-terminating proxy.
    api_tls_cert_file: str | None = None
    api_tls_key_file: str | None = None
    # The counter shard registrations and decommissions made through this API add to; unset:
    # from IIOT_COUNTER_SHARDS and the pod's ordinal, else 0.
    api_counter_shard: int = Field(default=0, ge=0, le=63)
    api_key_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="How long a verified key, or a broker client's standing, is trusted before "
        "it is looked up again: the longest a revocation made through another API process takes "
        "to apply if that process missed its notification (docs/access.md).",
    )
    api_rate_per_second: float = Field(default=100.0, gt=0, description="Requests/s per key.")
    api_rate_burst: int = Field(default=200, ge=1, description="Requests a key may burst.")
    api_unknown_key_rate_per_second: float = Field(
        default=1.0,
        gt=0,
        description="Requests/s with an unknown, revoked or expired key per client address "
        "(each costs a lookup in the store).",
    )
    api_unknown_key_burst: int = Field(default=20, ge=1, description="Such requests in a burst.")
    api_max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest request body; larger ones get 413 before they are read.",
    )
    # The broker calls the hooks for every connect and every uncached authorization: a reconnect
    # storm of a whole fleet must not meet a person's limit (docs/access.md).
    api_broker_rate_per_second: float = Field(
        default=20_000.0, gt=0, description="Requests/s per broker key."
    )
    api_broker_rate_burst: int = Field(
        default=200_000, ge=1, description="Requests a broker key may burst."
    )
    # EMQX's REST API (e.g. http://emqx:18083/api/v5) and an API key made in its dashboard:
    # when set, clients whose secret is revoked or rotated, and decommissioned devices, are
    # disconnected once the change commits.
    emqx_api_url: str | None = None
    emqx_api_key: str | None = None
    emqx_api_secret: SecretStr | None = None
    emqx_api_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    def certificate_files(self) -> dict[str, str | None]:
        return {**super().certificate_files(), "IIOT_API_TLS_CERT_FILE": self.api_tls_cert_file}

    @model_validator(mode="after")
    def _shard_from_range(self) -> Self:
        if "api_counter_shard" not in self.model_fields_set:
            ranged = self.shards_from_range()
            if ranged is not None:
                self.api_counter_shard = ranged
        return self

    @model_validator(mode="after")
    def _emqx_api_complete(self) -> Self:
        if self.emqx_api_url and not (self.emqx_api_key and self.emqx_api_secret):
            raise ValueError("IIOT_EMQX_API_URL needs IIOT_EMQX_API_KEY and IIOT_EMQX_API_SECRET")
        return self
