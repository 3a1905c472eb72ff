"""Running totals of one ingest process, exported as Prometheus metrics (ingest/metrics.py)."""

from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import Histogram

_POINT_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000)
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    # Not registered globally: each consumer owns its own, and its collector exports them.
    return Histogram(name, doc, buckets=buckets, registry=None)


@dataclass(slots=True)
class IngestStats:
    messages: int = 0
    batches: int = 0
    points_written: int = 0
    duplicates_skipped: int = 0
    devices_registered: int = 0
    rejected: Counter[tuple[str | None, str]] = field(default_factory=Counter)
    """Dead letters by (platform, reason)."""
    foreign_records: int = 0
    """Records for platforms of other cells, skipped (`IIOT_KAFKA_SCOPE=platforms`)."""
    batch_points: Histogram = field(
        default_factory=lambda: _histogram(
            "iiot_batch_points", "Rows per committed batch.", _POINT_BUCKETS
        )
    )
    delay_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "iiot_ingest_delay_seconds",
            "From the receipt of a batch's oldest message to the batch's commit: how far "
            "behind ingest is.",
            _DELAY_BUCKETS,
        )
    )
    write_seconds: Histogram = field(
        default_factory=lambda: _histogram(
            "iiot_batch_write_seconds", "Time to write and commit a batch.", _SECONDS_BUCKETS
        )
    )
