"""Settings of the ingest process role (`iiot ingest mqtt`), from `IIOT_*` environment variables."""

import ssl
from datetime import timedelta
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from registry.devices import DEFAULT_MAX_CACHED_IDS
from registry.ids import is_platform_id
from registry.lifecycle import LifecycleSettings
from registry.settings import ShardSettings, StoreSettings, hashed_shard


def kafka_topic(cell: str) -> str:
    """The Kafka topic of a cell's telemetry (docs/operations.md, "Cells")."""
    return f"iiot.{cell}.telemetry"


class Limits(StoreSettings):
    """What a message may contain; anything beyond is dead-lettered with a reason."""

    max_payload_bytes: int = Field(default=256 * 1024, ge=64)
    max_points_per_message: int = Field(default=10_000, ge=1)
    # Device clocks: accept points this far back (gateway backlogs) and ahead (clock skew).
    time_window_past_seconds: int = Field(default=7 * 86400, ge=60)
    time_window_future_seconds: int = Field(default=600, ge=0)

    @property
    def window_past(self) -> timedelta:
        return timedelta(seconds=self.time_window_past_seconds)

    @property
    def window_future(self) -> timedelta:
        return timedelta(seconds=self.time_window_future_seconds)


class TopicSettings(StoreSettings):
    """Where devices publish: shared by ingest and by the API's broker access hooks."""

    mqtt_topic_root: str = Field(default="iiot/v1", pattern=r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")

    # Sparkplug B groups this process consumes, as group=platform pairs
    # ("plant-a=plant-1,plant-b=plant-2"); "*" takes every group whose id is a platform id;
    # empty turns Sparkplug off. Each group must have one consuming process (births, deaths and
    # seq are ordered per edge node), so with several processes give each its own groups.
    sparkplug_groups: str = "*"

    def sparkplug_platforms(self) -> dict[str, str] | None:
        """group id -> platform id; {} for every group as its own platform; None: off."""
        text = self.sparkplug_groups.strip()
        if not text:
            return None
        if text == "*":
            return {}
        pairs = {}
        for item in text.split(","):
            group, _, platform = item.strip().partition("=")
            if not group or not is_platform_id(platform):
                raise ValueError(f"IIOT_SPARKPLUG_GROUPS: {item!r} is not group=platform")
            pairs[group] = platform
        return pairs


class IngestSettings(Limits, TopicSettings, ShardSettings, LifecycleSettings):
    mqtt_url: str | None = Field(
        default=None,
        description="mqtt://[user:password@]host[:port]; unset in `iiot run` means embedded.",
    )
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    # TLS (mqtts:// URLs): CA bundle to trust instead of the system's, and a client certificate.
    mqtt_ca_file: str | None = None
    mqtt_cert_file: str | None = None
    mqtt_key_file: str | None = None
    # A stable client id and a persistent session keep what arrives while ingest is down.
    mqtt_client_id: str = "iiot-ingest-0"
    mqtt_session_expiry_seconds: int = Field(default=7 * 86400, ge=1)
    # How many unacknowledged QoS 1 messages the broker may send us (MQTT 5 Receive Maximum);
    # it bounds a batch, since messages are acknowledged only after their batch commits.
    mqtt_receive_maximum: int = Field(default=65535, ge=1, le=65535)
    mqtt_keepalive_seconds: int = Field(default=30, ge=5)
    mqtt_shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    # Off: paho reads and acknowledges every message itself (its public API), slower; taken
    # anyway when paho or aiomqtt lack the internals the speedups use (ingest/mqtt_internals.py).
    mqtt_paho_speedups: bool = True
    # What MQTT ingest subscribes to (docs/operations.md, "Cells"): "platforms", the topics of
    # each platform this cell serves (followed as platforms are created and moved, without a
    # restart), so cells can share a broker; "all", every platform under the topic root (a
    # broker, or a topic root, of the cell's own). Sparkplug's "*" groups follow the same.
    mqtt_scope: Literal["platforms", "all"] = "platforms"
    # The backstop of that following: the served platforms are read again this often even if
    # no change was announced (a missed notification costs at most this long).
    mqtt_scope_refresh_seconds: float = Field(default=60.0, gt=0)
    # A platform moved to another cell stays subscribed this long, its traffic refused and
    # recorded as `platform_moved` rather than discarded by the broker while its devices find
    # the new cell. On a broker shared by cells, the new cell receives the same messages once
    # it imported the platform: there, shorten it to the export-and-import window.
    mqtt_moved_hold_seconds: float = Field(default=86400.0, ge=0)

    # The primary host id announced on spBv1.0/STATE/{id} (retained, with a Will); empty: none.
    sparkplug_host_id: str = Field(default="iiot", pattern=r"^[A-Za-z0-9._:-]{0,64}$")
    # How long a seq gap may wait for the missing message before a Rebirth is requested.
    sparkplug_reorder_wait_seconds: float = Field(default=2.0, gt=0)
    # After the host (re)connects (a clean session: an NDEATH sent meanwhile went to nobody), an
    # edge node it knew that stays silent this long is asked for a Rebirth; silent as long
    # again, its session ends.
    sparkplug_confirm_seconds: float = Field(default=30.0, gt=0)

    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka bootstrap servers, host:port[,host:port...]."
    )
    # Comma-separated in the environment: IIOT_KAFKA_TOPICS=telemetry-a,telemetry-b
    kafka_topics: Annotated[list[str], NoDecode] = Field(default=["iiot.telemetry"], min_length=1)
    kafka_group_id: str = "iiot-ingest"
    kafka_client_id: str = "iiot-ingest-0"
    # Whose records the topics carry (docs/operations.md, "Cells"): "all", this cell's alone
    # (`iiot.<cell>.telemetry`), so a record for a platform the store lacks is dead-lettered
    # `unknown_platform`; "platforms", topics shared by cells, so such a record belongs to
    # another cell: skipped and counted (`iiot_foreign_records_total`), never dead-lettered.
    kafka_scope: Literal["all", "platforms"] = "all"
    # Records fetched per poll; memory is bounded by this and aiokafka's fetch limits.
    kafka_max_records: int = Field(default=10_000, ge=1)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)
    # Owned partitions are spread over this many writers (a partition always to the same one),
    # each committing its batches and their offsets on a connection of its own: with one
    # transaction at a time, this process and PostgreSQL took turns and a core stood idle.
    kafka_write_lanes: int = Field(default=2, ge=1, le=16)
    # Static assignment instead of the group's: IIOT_KAFKA_PARTITIONS=topic:0,topic:1
    kafka_partitions: Annotated[list[str], NoDecode] | None = None
    # TLS (SSL, SASL_SSL): the CA to trust instead of the system's, and a client certificate;
    # SASL (SASL_SSL, SASL_PLAINTEXT): SCRAM with a user and password. Not exercised against a
    # broker in iiot's tests (the mock cluster has neither): kafka_client_options() is.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT"] = "PLAINTEXT"
    kafka_ca_file: str | None = None
    kafka_cert_file: str | None = None
    kafka_key_file: str | None = None
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    # Serve Prometheus metrics on /metrics at this port (ingest/metrics.py); unset: off.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_address: str = "127.0.0.1"
    stall_seconds: float = Field(
        default=120.0,
        gt=0,
        description="/readyz fails when the consumer has held messages this long without "
        "acknowledging any (a stuck partition or store); see iiot_ingest_stalled_seconds.",
    )

    device_cache_max: int = Field(
        default=DEFAULT_MAX_CACHED_IDS,
        ge=1000,
        description="Device ids (and gateway ids, and the gateway each device was seen through) "
        "a process keeps in memory, oldest dropped first; each costs about 450 bytes "
        "(bench/id_cache_memory.py). Devices beyond it are looked up in the store again.",
    )

    batch_max_points: int = Field(default=50_000, ge=1)
    batch_max_delay_seconds: float = Field(default=0.2, gt=0)
    queue_max_messages: int = Field(default=20_000, ge=1)
    shutdown_grace_seconds: float = Field(default=20.0, gt=0)
    # Partitions are made this many days ahead of today (plain PostgreSQL only).
    partitions_ahead_days: int = Field(default=2, ge=1, le=60)
    # Which row of each platform's counters this process adds to (Kafka: the first of one per
    # write lane); distinct processes should use distinct shards. Unset: from
    # IIOT_COUNTER_SHARDS and the pod's ordinal, else derived from the client id.
    counter_shard: int | None = Field(default=None, ge=0, le=63)
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    activity_renew_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="Live data renews a device's activity session in the store at most once per "
        "this many seconds (each renewal rewrites the device's row); the sweeper waits as long "
        "past a stored expiry, so an activity session ends between the liveness window and the "
        "window plus this after the device's last data. 0 renews with every batch.",
    )
    history_interval_seconds: int = Field(default=60, ge=1, le=3600)
    reconcile_interval_seconds: float = Field(default=300.0, gt=0)

    @property
    def shard(self) -> int:
        """The MQTT consumer's counter shard."""
        if self.counter_shard is not None:
            return self.counter_shard
        ranged = self.shards_from_range()
        return hashed_shard(self.mqtt_client_id) if ranged is None else ranged

    @property
    def kafka_shard(self) -> int:
        """The first of the Kafka consumer's shards, one per write lane."""
        if self.counter_shard is not None:
            return self.counter_shard
        ranged = self.shards_from_range(self.kafka_write_lanes)
        return hashed_shard(self.kafka_client_id) if ranged is None else ranged

    def static_partitions(self) -> list[tuple[str, int]] | None:
        """`kafka_partitions` as (topic, partition) pairs, or None to use the group's."""
        if not self.kafka_partitions:
            return None
        pairs = []
        for item in self.kafka_partitions:
            topic, _, partition = item.rpartition(":")
            if not topic or not partition.isdigit():
                raise ValueError(f"IIOT_KAFKA_PARTITIONS: {item!r} is not topic:partition")
            pairs.append((topic, int(partition)))
        return pairs

    @field_validator("kafka_topics", "kafka_partitions", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
                raise ValueError("expected mqtt[s]://[user:password@]host[:port]")
        return value

    @model_validator(mode="after")
    def _cell_names_its_clients(self) -> Self:
        """A named cell's MQTT client id, Kafka topic and Kafka group default to its own, so
        that cells sharing a broker neither take over each other's session (one client id)
        nor split each other's partitions (one group). Set explicitly, they are kept."""
        cell = self.cell
        if cell == "default":
            return self
        given = self.model_fields_set
        if "mqtt_client_id" not in given:
            self.mqtt_client_id = f"iiot-{cell}-ingest-0"
        if "kafka_topics" not in given:
            self.kafka_topics = [kafka_topic(cell)]
        if "kafka_group_id" not in given:
            self.kafka_group_id = f"iiot-{cell}-ingest"
        return self

    @model_validator(mode="after")
    def _kafka_security_is_whole(self) -> Self:
        """Refuses settings aiokafka would ignore or fail on only when it connects."""
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol in ("SSL", "SASL_SSL")
        has_credentials = self.kafka_sasl_username is not None or self.kafka_sasl_password
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"IIOT_KAFKA_SECURITY_PROTOCOL={protocol} needs IIOT_KAFKA_SASL_USERNAME and "
                "IIOT_KAFKA_SASL_PASSWORD"
            )
        if has_credentials and not sasl:
            raise ValueError(
                "IIOT_KAFKA_SASL_USERNAME/PASSWORD are set but IIOT_KAFKA_SECURITY_PROTOCOL is "
                f"{protocol}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        files = {
            "IIOT_KAFKA_CA_FILE": self.kafka_ca_file,
            "IIOT_KAFKA_CERT_FILE": self.kafka_cert_file,
            "IIOT_KAFKA_KEY_FILE": self.kafka_key_file,
        }
        named = [name for name, path in files.items() if path is not None]
        if named and not tls:
            raise ValueError(
                f"{', '.join(named)} set but IIOT_KAFKA_SECURITY_PROTOCOL is {protocol}: "
                "use SSL or SASL_SSL"
            )
        if self.kafka_key_file is not None and self.kafka_cert_file is None:
            raise ValueError("IIOT_KAFKA_KEY_FILE needs IIOT_KAFKA_CERT_FILE")
        return self

    def kafka_client_options(self) -> dict[str, Any]:
        """aiokafka's connection security options for these settings."""
        protocol = self.kafka_security_protocol
        options: dict[str, Any] = {"security_protocol": protocol}
        if protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = _tls_context(
                self.kafka_ca_file, self.kafka_cert_file, self.kafka_key_file
            )
        if protocol.startswith("SASL_"):
            assert self.kafka_sasl_password is not None  # checked by the validator
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            # aiokafka's names; SCRAM reads them too.
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return options

    def certificate_files(self) -> dict[str, str | None]:
        return {
            **super().certificate_files(),
            "IIOT_MQTT_CA_FILE": self.mqtt_ca_file,
            "IIOT_MQTT_CERT_FILE": self.mqtt_cert_file,
            "IIOT_KAFKA_CA_FILE": self.kafka_ca_file,
            "IIOT_KAFKA_CERT_FILE": self.kafka_cert_file,
        }

    def require_kafka_bootstrap(self) -> str:
        if not self.kafka_bootstrap:
            raise ValueError("IIOT_KAFKA_BOOTSTRAP is not set")
        return self.kafka_bootstrap

    def mqtt_endpoint(self) -> tuple[str, int, str | None, str | None]:
        """(host, port, username, password) of the broker."""
        if self.mqtt_url is None:
            raise ValueError("IIOT_MQTT_URL is not set")
        parts = urlsplit(self.mqtt_url)
        assert parts.hostname is not None  # checked by the validator
        port = parts.port or (8883 if self.mqtt_tls else 1883)
        return parts.hostname, port, parts.username, parts.password

    @property
    def mqtt_tls(self) -> bool:
        return self.mqtt_url is not None and urlsplit(self.mqtt_url).scheme in ("mqtts", "ssl")

    def mqtt_tls_context(self) -> ssl.SSLContext | None:
        """For mqtts:// URLs: the system's CA store, or IIOT_MQTT_CA_FILE; the broker's name
        is verified. IIOT_MQTT_CERT_FILE/KEY_FILE add a client certificate."""
        if not self.mqtt_tls:
            return None
        return _tls_context(self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)


def _tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    """The system's CA store or `ca_file`, the server's name verified; a client certificate
    when `cert_file` is given (its key in it, or in `key_file`)."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
