"""The national `distinct` count of connected devices: the union of the cells' DataSketches HLL
sketches of national identities, plus the devices without one, which are distinct per platform
and summed exactly. Every response that uses it names the sketch and states its bounds."""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import datasketches

SKETCH_NAME: Final = "datasketches HLL"
# Standard deviations for get_lower_bound/get_upper_bound: 2 gives about 95.4 % confidence.
BOUND_DEVIATIONS: Final = 2
CONFIDENCE: Final = 0.954
_TARGETS: Final = {
    "HLL_4": datasketches.tgt_hll_type.HLL_4,
    "HLL_6": datasketches.tgt_hll_type.HLL_6,
    "HLL_8": datasketches.tgt_hll_type.HLL_8,
}
# The union keeps the largest lg_k it is given up to this (a sketch of a larger lg_k is
# downsampled); cells sending 12 keep 12.
MAX_LG_K: Final = 21


class BadSketch(ValueError):
    """The snapshot's sketch does not deserialize as the HLL sketch it says it is."""


def check(data: bytes, lg_k: int, target: str) -> None:
    try:
        sketch = datasketches.hll_sketch.deserialize(data)
    except (ValueError, RuntimeError) as exc:
        raise BadSketch(f"the device sketch is not a DataSketches HLL sketch: {exc}") from None
    if sketch.lg_config_k != lg_k or sketch.tgt_type != _TARGETS[target]:
        raise BadSketch(
            f"the device sketch is lg_k {sketch.lg_config_k}, {sketch.tgt_type.name}; "
            f"the snapshot says lg_k {lg_k}, {target}"
        )


@dataclass(frozen=True, slots=True)
class Distinct:
    """Distinct connected devices: `exact` (without identity) + the union's estimate."""

    estimate: float
    lower: float
    upper: float
    exact: int
    sketches: int
    lg_k: int | None
    target: str | None
    identities_reported: int

    def describe(self) -> dict[str, object]:
        return {
            "connected_devices": round(self.estimate),
            "estimate": self.estimate,
            "lower_bound": self.lower,
            "upper_bound": self.upper,
            "confidence": CONFIDENCE,
            "without_identity_exact": self.exact,
            "identities_reported": self.identities_reported,
            "sketch": {
                "name": SKETCH_NAME,
                "lg_k": self.lg_k,
                "target": self.target,
                "cells_merged": self.sketches,
                "relative_error_95": relative_error(self.lg_k) if self.lg_k else 0.0,
            },
            "method": (
                "devices without a national identity (exact, distinct per platform) plus the "
                "union of the cells' HLL sketches of national identities; bounds at "
                f"{BOUND_DEVIATIONS} standard deviations. Summed figures are exact; this one is "
                "an estimate within the bounds."
            ),
        }


def relative_error(lg_k: int) -> float:
    """The HLL's relative standard error at `lg_k` times the bound's deviations (about 95 %)."""
    return BOUND_DEVIATIONS * 1.04 / math.sqrt(1 << lg_k)


def union(sketches: Iterable[tuple[bytes, int, str, int, int]]) -> Distinct:
    """`sketches`: (data, lg_k, target, identities, connected_without_identity) per cell."""
    items = list(sketches)
    exact = sum(i[4] for i in items)
    identities = sum(i[3] for i in items)
    if not items:
        return Distinct(0.0, 0.0, 0.0, 0, 0, None, None, 0)
    lg_k = min(MAX_LG_K, max(i[1] for i in items))
    target = max((i[2] for i in items), key=list(_TARGETS).index)
    merged = datasketches.hll_union(lg_k)
    for data, *_ in items:
        merged.update(datasketches.hll_sketch.deserialize(data))
    result = merged.get_result(_TARGETS[target])
    return Distinct(
        estimate=exact + result.get_estimate(),
        lower=exact + result.get_lower_bound(BOUND_DEVIATIONS),
        upper=exact + result.get_upper_bound(BOUND_DEVIATIONS),
        exact=exact,
        sketches=len(items),
        lg_k=result.lg_config_k,
        target=target,
        identities_reported=identities,
    )
