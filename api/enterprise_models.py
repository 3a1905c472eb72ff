"""Request and response bodies of the enterprise and penetration routes: every code goes out
with its name beside it (GB/T 4754 industries, GB/T 2260 regions)."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from api.models import CellField, DeviceIdField, Name, Strict, Text
from registry import classification
from registry.enterprises import MAX_BULK, Enterprise

CodeField = Annotated[str, StringConstraints(min_length=18, max_length=18, to_upper=True)]
Reason = Annotated[
    str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True), Text
]


class IndustryRef(BaseModel):
    code: str
    name: str | None
    section: str | None
    section_name: str | None

    @classmethod
    def of(cls, code: str) -> "IndustryRef":
        section = classification.section_of(code)
        return cls(
            code=code,
            name=classification.industry_name(code),
            section=section,
            section_name=classification.industry_name(section) if section else None,
        )


class RegionRef(BaseModel):
    code: str
    name: str | None
    province: str
    province_name: str | None
    prefecture: str | None
    prefecture_name: str | None

    @classmethod
    def of(cls, code: str) -> "RegionRef":
        prefecture = None if code.endswith("0000") else classification.prefecture_of(code)
        return cls(
            code=code,
            name=classification.region_name(code),
            province=classification.province_of(code),
            province_name=classification.province_name(code),
            prefecture=prefecture,
            prefecture_name=classification.prefecture_name(code),
        )


class EnterpriseIn(Strict):
    code: CodeField = Field(description="Unified social credit code (GB 32100-2015).")
    name: Name
    industry: Annotated[str, StringConstraints(min_length=2, max_length=6)] = Field(
        description="GB/T 4754-2017 division: `36`, `C36`, or a finer class such as `3670`."
    )
    above_size: bool = Field(
        description="An industrial enterprise above designated size (sections B, C, D only)."
    )
    region: Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")] | None = Field(
        default=None, description="Only to override the code's characters 3-8, with a reason."
    )
    region_reason: Reason | None = None


class EnterpriseDeclarations(Strict):
    enterprises: list[EnterpriseIn] = Field(min_length=1, max_length=MAX_BULK)


class DeclarationResult(BaseModel):
    added: int
    changed: int


class EnterpriseOut(BaseModel):
    code: str
    name: str
    industry: IndustryRef
    above_size: bool
    region: RegionRef
    region_reason: str | None = Field(description="Set when the region overrides the code's.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, e: Enterprise) -> "EnterpriseOut":
        return cls(
            code=e.code,
            name=e.name,
            industry=IndustryRef.of(e.industry),
            above_size=e.above_size,
            region=RegionRef.of(e.region),
            region_reason=e.region_reason,
            created_at=e.created_at,
            updated_at=e.updated_at,
        )


class EnterpriseLinks(Strict):
    devices: dict[DeviceIdField, CodeField | None] = Field(
        default_factory=dict, max_length=MAX_BULK, description="Device id: code, or null to clear."
    )
    gateways: dict[DeviceIdField, CodeField | None] = Field(
        default_factory=dict, max_length=MAX_BULK, description="Gateway id: code, or null."
    )


class LinksChanged(BaseModel):
    devices: int
    gateways: int


class LinkedDevice(BaseModel):
    device_id: str
    linked_by: Literal["device", "gateway", "rule"]


class DeviceEnterprise(BaseModel):
    device_id: str
    enterprise: str | None
    linked_by: Literal["device", "gateway", "rule"] | None


class EnterpriseRule(Strict):
    metadata_key: Annotated[str, StringConstraints(min_length=1, max_length=100), Text] | None = (
        Field(
            description=(
                "The metadata key whose value is a device's enterprise code, for devices without "
                "a link of their own or through their gateway; null: no rule."
            )
        )
    )


class TotalsVersion(BaseModel):
    import_id: int
    year: int
    source: str
    imported_at: datetime


class TotalsImportOut(BaseModel):
    id: int
    imported_at: datetime
    source: str
    file_name: str
    sha256: str
    rows: int
    years: list[int]


class PenetrationRow(BaseModel):
    key: str = Field(description="A region code, or an industry section or division.")
    name: str | None
    served: int
    connected_30d: int
    total: int | None = Field(description="The official total; null where none was imported.")
    served_rate: float | None
    connected_30d_rate: float | None


class Penetration(BaseModel):
    cell: CellField
    definitions_version: str
    definitions: dict[str, str]
    grouping: str
    region: RegionRef | None
    industry: IndustryRef | None
    totals: TotalsVersion | None
    as_of: datetime | None = Field(description="When the numerators were computed; null: not yet.")
    enterprises: int = Field(description="Enterprises declared by any platform, each once.")
    disputed: int = Field(description="Of those, declared differently by their platforms.")
    target_2028: float
    rows: list[PenetrationRow]


class PlatformIndicators(BaseModel):
    platform: str
    name: str
    tier: str
    type: str
    region: RegionRef
    industry_text: str
    industry: IndustryRef | None = Field(description="The text mapped; null: flagged, unmapped.")
    devices_registered: int
    devices_connected: int
    enterprises: int
    enterprises_above_size: int
    enterprises_connected_30d: int
    industries: int
    provinces: int
    prefectures: int
    linked_devices: int
    devices_per_enterprise: float | None


class IndicatorsOut(BaseModel):
    cell: CellField
    as_of: datetime | None
    items: list[PlatformIndicators]


class PlatformClassification(BaseModel):
    platform: str
    region: RegionRef
    industry_text: str = Field(description="As the platform was registered with it.")
    industry: IndustryRef | None = Field(description="The text mapped to GB/T 4754-2017.")
    industry_flagged: bool = Field(description="The text maps to nothing yet.")


class IndustryMapping(Strict):
    text: Annotated[str, StringConstraints(min_length=1, max_length=100), Text]
    industry: Annotated[str, StringConstraints(pattern="^([A-Ta-t]|[0-9]{2})$")]


class UnmappedIndustry(BaseModel):
    text: str
    platforms: int
    platform_ids: list[str]


class IndustryOut(BaseModel):
    code: str
    level: Literal["section", "division"]
    section: str
    industrial: bool
    name: str


class RegionOut(BaseModel):
    code: str
    level: Literal["province", "prefecture"]
    name: str
