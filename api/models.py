"""Request and response bodies (the API's contract, visible in its OpenAPI document)."""

from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from registry.access import Role
from registry.classification import industry_name, region_name
from registry.counts import DEFINITIONS, DEFINITIONS_VERSION, DUPLICATES, Counts
from registry.ids import DEVICE_ID_PATTERN, PLATFORM_ID_PATTERN
from registry.json_limits import check_document, storable_text
from registry.platforms import Platform, PlatformType, Tier
from registry.registration import MAX_BULK

T = TypeVar("T")

PlatformIdField = Annotated[str, StringConstraints(pattern=f"^{PLATFORM_ID_PATTERN}$")]
DeviceIdField = Annotated[str, StringConstraints(pattern=f"^{DEVICE_ID_PATTERN}$")]


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    return check_document(value, "metadata")


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is outside 0001-01-01 to 9999-12-31 in UTC") from None


# Any offset on the way in, UTC from then on: a time that has no UTC form within the years
# 1 to 9999 (0001-01-01T00:00:00+01:00) is a 422, not an overflow later.
Instant = Annotated[AwareDatetime, AfterValidator(_utc)]
Text = AfterValidator(storable_text)
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True), Text]
Region = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
Industry = Annotated[str, StringConstraints(min_length=1, max_length=100), Text]
Liveness = Annotated[int, Field(ge=1, le=86400)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_after: str | None = Field(
        description="Pass as `after` for the next page; null at the end."
    )


class PlatformCreate(Strict):
    id: PlatformIdField
    name: Name
    tier: Tier = Tier.BASIC
    type: PlatformType = PlatformType.PROFESSIONAL
    region: Region = Field(default="000000", description="Province-level administrative code.")
    industry: Industry = "unspecified"
    liveness_seconds: Liveness = 300
    auto_provision: bool = True
    metadata: Metadata = Field(default_factory=dict)


class PlatformUpdate(Strict):
    name: Name | None = None
    tier: Tier | None = None
    type: PlatformType | None = None
    region: Region | None = None
    industry: Industry | None = None
    liveness_seconds: Liveness | None = None
    auto_provision: bool | None = None
    metadata: Metadata | None = None


class PlatformOut(BaseModel):
    id: str
    name: str
    tier: Tier
    type: PlatformType
    region: str
    industry: str
    liveness_seconds: int
    auto_provision: bool
    metadata: dict[str, Any]
    created_at: datetime
    moved_to: str | None = Field(
        default=None,
        description="The cell the platform moved to (docs/operations.md); its other paths "
        "answer 410 here.",
    )
    moved_at: datetime | None = None
    region_name: str | None = Field(
        default=None, description="The GB/T 2260 name of `region` (its prefecture's for a county)."
    )
    industry_code: str | None = Field(
        default=None,
        description="The GB/T 4754-2017 section or division `industry` maps to (GET "
        "/industry-mappings); null while the text is not mapped.",
    )
    industry_name: str | None = Field(default=None, description="The name of `industry_code`.")

    @classmethod
    def of(cls, platform: Platform) -> "PlatformOut":
        code = platform.industry_code
        return cls(
            **asdict(platform),
            region_name=region_name(platform.region),
            industry_name=industry_name(code) if code else None,
        )


class DeviceIn(Strict):
    device_id: DeviceIdField
    metadata: Metadata = Field(default_factory=dict)


class DeviceRegistration(Strict):
    devices: list[DeviceIn] = Field(min_length=1, max_length=MAX_BULK)


class DeviceIds(Strict):
    device_ids: list[DeviceIdField] = Field(min_length=1, max_length=MAX_BULK)


class DeviceUpdate(Strict):
    metadata: Metadata = Field(description="Merged into the device's metadata.")


class Affected(BaseModel):
    count: int


class DeviceOut(BaseModel):
    device_id: str
    platform_id: str
    gateway: str | None
    state: str
    connected: bool
    state_changed_at: datetime | None
    first_seen: datetime | None
    last_seen: datetime | None
    metadata: dict[str, Any]
    created_at: datetime


CellField = Annotated[
    str, Field(description="The cell (`IIOT_CELL`) whose store these figures come from.")
]


class CountsOut(BaseModel):
    registered: int
    connected: int
    ever_connected: int
    active_24h: int
    active_30d: int
    activity_as_of: datetime | None = Field(
        description="When the active counts were computed (a background pass each minute); "
        "for a sum, the oldest. Null until the first pass."
    )


class DeviceCounts(CountsOut):
    cell: CellField
    platform: str
    liveness_seconds: int
    as_of: datetime
    definitions_version: str = DEFINITIONS_VERSION
    definitions: dict[str, str] = Field(default_factory=lambda: dict(DEFINITIONS))


class PlatformCountsRow(CountsOut):
    platform: str


class GroupCountsRow(CountsOut):
    key: str
    platforms: int


class PlatformCountsPage(Page[PlatformCountsRow]):
    cell: CellField


class GroupedCounts(BaseModel):
    cell: CellField
    dimension: str
    groups: list[GroupCountsRow]
    definitions_version: str = DEFINITIONS_VERSION


class DistinctCountsOut(BaseModel):
    registered: int
    connected: int
    active_24h: int
    active_30d: int
    as_of: datetime


class NationalCounts(CountsOut):
    cell: CellField
    platforms: int
    as_of: datetime
    distinct: DistinctCountsOut | None = Field(
        description="The same with each device once across platforms (by metadata.global_id); "
        "computed by the background pass, null until its first."
    )
    duplicates: str = DUPLICATES
    definitions_version: str = DEFINITIONS_VERSION
    definitions: dict[str, str] = Field(default_factory=lambda: dict(DEFINITIONS))


class HistoryPoint(BaseModel):
    start: datetime
    connected_min: int
    connected_max: int
    connected_last: int
    registered_last: int
    samples: int


class CountHistory(BaseModel):
    cell: CellField
    platform: str
    bucket_seconds: int
    buckets: list[HistoryPoint]


class Health(BaseModel):
    status: str
    cell: str = Field(description="The cell (`IIOT_CELL`) this process serves.")


class KafkaPartitionLag(BaseModel):
    group: str
    topic: str
    partition: int
    next_offset: int = Field(description="The next offset to store: records before it are stored.")
    log_end_offset: int | None = Field(description="The partition's end when it was stored.")
    lag: int | None = Field(description="log_end_offset - next_offset: records not yet stored.")
    updated_at: datetime


def counts_out(counts: Counts) -> dict[str, Any]:
    """The figures every count response carries."""
    return {
        "registered": counts.registered,
        "connected": counts.connected,
        "ever_connected": counts.ever_connected,
        "active_24h": counts.active_24h,
        "active_30d": counts.active_30d,
        "activity_as_of": counts.activity_as_of,
    }


class DriftOut(BaseModel):
    platform: str
    registered: int = Field(description="Counter minus recount; corrected by the run.")
    connected: int
    ever_connected: int


class ReconciliationOut(BaseModel):
    id: int
    time: datetime
    platforms: int
    drift: list[DriftOut] = Field(description="Empty when the counters equalled the recount.")


class LatestValue(BaseModel):
    metric: str
    time: datetime
    value: float


class DeviceView(DeviceOut):
    latest: list[LatestValue] = Field(description="The newest point of each metric.")


class LatestValues(BaseModel):
    platform: str
    device: str
    values: list[LatestValue]


class TelemetryPoint(BaseModel):
    time: datetime
    value: float


class TelemetryBucket(BaseModel):
    start: datetime
    avg: float
    min: float
    max: float
    count: int


class TelemetryRange(BaseModel):
    platform: str
    device: str
    metric: str
    start: datetime
    end: datetime
    bucket_seconds: int | None = Field(description="Null for raw points.")
    points: list[TelemetryPoint] | None = Field(description="Raw points, when not bucketed.")
    buckets: list[TelemetryBucket] | None = Field(description="Per bucket, when bucketed.")
    next_after: datetime | None = Field(
        description="Raw points: pass as `after` for the next page; null at the end."
    )


class KeyCreate(Strict):
    role: Role
    platform: PlatformIdField | None = Field(
        default=None,
        description="The key's platform; none for admin and broker keys (and national viewers).",
    )
    name: Name
    expires_at: Instant | None = Field(
        default=None, description="Refused from this time on (RFC 3339); never if omitted."
    )


class KeyOut(BaseModel):
    id: int
    prefix: str
    role: Role
    platform: str | None
    name: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = Field(description="Refused from this time on; null: never.")


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored only as a digest.")


class AuditOut(BaseModel):
    id: int
    time: datetime
    key_id: int | None
    platform: str | None
    action: str
    subject: str
    detail: dict[str, Any]


class CredentialIssued(BaseModel):
    username: str = Field(description="The MQTT user name to connect with.")
    secret: str = Field(description="The MQTT password: shown this once, stored as a digest.")
    created_at: datetime
    rotated_at: datetime | None


class BrokerAuthn(BaseModel):
    """What EMQX's HTTP authenticator sends (its body template: docs/access.md)."""

    clientid: str = Field(default="", max_length=512)
    username: str = Field(default="", max_length=512)
    password: str = Field(default="", max_length=512)


class BrokerAuthz(BaseModel):
    """What EMQX's HTTP authorizer sends (its body template: docs/access.md)."""

    clientid: str = Field(default="", max_length=512)
    username: str = Field(default="", max_length=512)
    topic: str = Field(max_length=1024)
    action: Literal["publish", "subscribe"]


class BrokerAnswer(BaseModel):
    result: Literal["allow", "deny"]
    is_superuser: bool = False
    # Only on a denial whose reason the client's operator must act on (a moved platform);
    # answers leave them out otherwise. EMQX reads `result` and `is_superuser`.
    reason: Literal["platform_moved"] | None = None
    detail: str | None = None
    moved_to: str | None = Field(default=None, description="The cell to connect to now.")


class UsageDayOut(BaseModel):
    platform: str
    day: date
    messages: int = Field(description="Messages accepted (a broker's redelivery counts again).")
    bytes: int = Field(description="Payload bytes of the accepted messages.")
    points: int = Field(description="Points newly stored: the billed quantity, never twice.")
    duplicate_points: int = Field(description="Points accepted but already stored.")
    refused_messages: int = Field(description="Messages dead-lettered (incl. quota_exceeded).")
    connected_device_days: float = Field(
        description="Connected devices integrated over the day's count samples, in days."
    )
    sampled_seconds: int = Field(description="Seconds of the day the count samples cover.")
    soft_quota: int | None
    hard_quota: int | None
    over_soft_quota: bool


class UsageDays(BaseModel):
    platform: str
    start: date
    end: date
    days: list[UsageDayOut]


class QuotaIn(Strict):
    soft_points_per_day: int | None = Field(default=None, gt=0, le=2**62)
    hard_points_per_day: int | None = Field(default=None, gt=0, le=2**62)


class QuotaOut(QuotaIn):
    tier: Tier


class MinuteOut(BaseModel):
    minute: datetime
    messages: int
    points: int
    refused_messages: int


class RecentIngest(BaseModel):
    platform: str
    minutes: list[MinuteOut] = Field(description="Per minute, oldest first; idle minutes absent.")


class DeviceEventOut(BaseModel):
    time: datetime
    subject: Literal["device", "gateway"] = Field(
        description="The device's own event, or its gateway's (which reached every device "
        "behind it)."
    )
    state: str
    cause: str


class DeviceEvents(BaseModel):
    platform: str
    device: str
    events: list[DeviceEventOut] = Field(description="Newest first.")
