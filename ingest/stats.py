"""Running totals of one ingest process (logged now, exported as metrics later)."""

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class IngestStats:
    messages: int = 0
    batches: int = 0
    points_written: int = 0
    duplicates_skipped: int = 0
    devices_registered: int = 0
    rejected: Counter[tuple[str | None, str]] = field(default_factory=Counter)
    """Dead letters by (platform, reason)."""
