"""What every benchmark does with its figures: keep them in bench/results and print them."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

Figure = tuple[str, str, str]
"""(what, measured, target)."""


def record(name: str, result: dict[str, Any], figures: list[Figure]) -> None:
    """Stamps the result, writes it to bench/results/{name}-latest.json and prints the figures
    beside their targets."""
    result["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(figure[0]) for figure in figures)
    for what, measured, target in figures:
        print(f"  {what:<{width}}  {measured:>26}  {target}")
