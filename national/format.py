"""What a cell sends the national aggregator (docs/national.md): one JSON document per snapshot.

The cell signs the exact bytes of the HTTP body with its Ed25519 key and sends the signature
beside them (`SIGNATURE_HEADER`, `CELL_HEADER`); the aggregator verifies those bytes before it
parses them, so no canonical form of the JSON is needed and any change to a byte is refused.

Sequence numbers start at 1 and rise by one per snapshot of a cell; the aggregator takes each
number once and in order, so a replayed or skipped snapshot is refused and recorded.

Figures per platform are exact and are summed nationally. The one figure that cannot be summed,
devices counted once across platforms and cells, travels as a mergeable sketch of the national
identities (`metadata.global_id`) of the cell's connected devices; devices without one are
distinct per platform and are counted exactly (`connected_without_identity`).
"""

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT: Final = "iiot-snapshot/1"
CELL_HEADER: Final = "IIOT-Cell"
# "ed25519=" then the standard base64 of the 64-byte signature of the body.
SIGNATURE_HEADER: Final = "IIOT-Signature"
SIGNATURE_PREFIX: Final = "ed25519="

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlatformFigures(_Strict):
    """One platform the cell holds, with its attributes (every breakdown is derived from them)."""

    id: Name
    name: str
    tier: Literal["basic", "growth", "leading", "ecosystem"]
    type: Literal["professional", "industry", "collaborative"]
    region: Annotated[str, Field(pattern=r"^\d{6}$")]
    # GB/T 4754 division (two digits) when the platform's industry is mapped, else None.
    industry_code: Annotated[str, Field(pattern=r"^\d{2}$")] | None
    industry_text: str
    registered: Count
    connected: Count
    ever_connected: Count
    active_24h: Count
    active_30d: Count
    # When the cell last computed active_24h/active_30d; None before the first computation.
    activity_as_of: datetime | None


class Release(_Strict):
    """The cell gives up a platform that moved to another cell: the aggregator stops counting
    it here and lets `to_cell` claim it (a platform is held by one cell at a time)."""

    platform: Name
    to_cell: Name
    released_at: datetime


class DeviceSketch(_Strict):
    """A DataSketches HLL sketch (`hll_sketch.serialize_compact()`, standard base64) of the
    national identities of the cell's connected devices."""

    kind: Literal["datasketches-hll"] = "datasketches-hll"
    lg_k: Annotated[int, Field(ge=4, le=21)]
    # hll_sketch's target type name: HLL_4, HLL_6 or HLL_8.
    target: Literal["HLL_4", "HLL_6", "HLL_8"]
    data: str
    # The devices behind the sketch that the cell counted exactly (for the response's bound).
    identities: Count
    # Connected devices without a national identity: distinct per platform, summed exactly.
    connected_without_identity: Count


class Enterprise(_Strict):
    """An enterprise the cell's platforms serve, keyed by the HMAC-SHA256 of its Unified Social
    Credit Code under the key shared by the cells (never held by the aggregator), hex."""

    code_hmac: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    region: Annotated[str, Field(pattern=r"^\d{6}$")]
    industry_code: Annotated[str, Field(pattern=r"^\d{2}$")] | None
    above_designated_size: bool
    # With a device connected within the last 30 days (penetration definition "active").
    active_30d: bool
    # Registered as served by at least one platform of the cell (definition "served").
    served: bool


class Enterprises(_Strict):
    # Names the shared key (not the key), so a key change shows as a new series, never mixed.
    key_id: str
    definitions_version: str
    items: list[Enterprise]


class Snapshot(_Strict):
    format: Literal["iiot-snapshot/1"] = "iiot-snapshot/1"
    cell: Name
    sequence: Annotated[int, Field(ge=1)]
    taken_at: datetime
    # How long the cell took to compute the figures.
    took_seconds: Annotated[float, Field(ge=0)]
    # The cell's snapshot interval: the aggregator marks it stale after three without one.
    interval_seconds: Annotated[float, Field(gt=0)]
    # registry/counts.py DEFINITIONS_VERSION of the cell that counted.
    definitions_version: str
    platforms: list[PlatformFigures]
    releases: list[Release] = []
    devices: DeviceSketch
    enterprises: Enterprises | None = None
