"""`make capacity`: the rule that says whether a cell held a fleet, and a small real step."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iiot.net import free_port
from loadtests.capacity import judge, per_million

ROOT = Path(__file__).parent.parent


def _step(**changes: Any) -> dict[str, Any]:
    """A step of 60,000 devices at one reading a minute (1,000 points/s), held 100 s from
    t=20: the rule's lag bound is 30,000 points, and the second half starts at t=70."""
    step: dict[str, Any] = {
        "devices": 60_000,
        "points_per_reading": 1,
        "reading_interval": 60.0,
        "hold_started_t": 20.0,
        "hold_seconds": 100.0,
        "checks": [
            {"phase": "storm", "expected": 60_000, "reported": 60_000, "ok": True},
            {"phase": "end of hold", "expected": 60_000, "reported": 60_000, "ok": True},
        ],
        # The storm's backlog drains in the first half; the second half stays a batch behind.
        "lag": [{"t": 20.0, "behind": 59_000}, {"t": 45.0, "behind": 31_000}]
        + [{"t": float(t), "behind": 900} for t in range(70, 121, 5)],
        "points_sent": 160_000,
        "points_stored": 160_000,
        "errors": [],
    }
    return step | changes


def test_a_cell_that_keeps_up_after_the_storm_holds_the_fleet() -> None:
    assert judge(_step()).ok


def test_lag_growing_in_the_hold_s_second_half_fails_the_step() -> None:
    behind = [{"t": float(t), "behind": 2_000 * (t - 60)} for t in range(70, 121, 5)]
    verdict = judge(_step(lag=_step()["lag"][:2] + behind))
    assert not verdict.ok
    assert verdict.reasons == [
        "lag 120,000 points in the hold's second half, over 30,000 (30 s of traffic)"
    ]


def test_a_count_off_by_one_or_a_point_missing_fails_the_step() -> None:
    checks = _step()["checks"]
    checks[1] = checks[1] | {"reported": 59_999, "ok": False}
    verdict = judge(_step(checks=checks, points_stored=159_999))
    assert verdict.reasons == [
        "end of hold: 59999 connected, expected 60000",
        "159999 points stored of 160000 sent",
    ]


def test_cores_per_million_devices_add_the_cell_s_parts_and_keep_the_generator_apart() -> None:
    step = {"devices": 250_000, "cores": {"iiot_run": 0.1, "postgres": 0.15, "broker": 0.02,
                                          "load_generator": 0.05, "machine": 1.9}}  # fmt: skip
    assert per_million(step) == {
        "iiot_run": 0.4, "postgres": 0.6, "broker": 0.08, "load_generator": 0.2, "cell": 1.08
    }  # fmt: skip
    # A server the cell was given, not started, is not measured: no total for the cell.
    given = step | {"cores": step["cores"] | {"postgres": None}}
    assert per_million(given)["cell"] is None


@pytest.mark.slow
def test_capacity_steps_a_small_fleet_against_a_fresh_cell(tmp_path: Path) -> None:
    """Two tiny fleets at a reading every 2 s, each against its own `iiot run` with embedded
    PostgreSQL and broker, whose CPU is measured."""
    results = tmp_path / "capacity.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env |= {"IIOT_API_PORT": str(free_port())}
    command = [
        sys.executable, "-m", "loadtests.capacity", "--fleets", "40,80",
        "--devices-per-gateway", "20", "--sparkplug-every", "2", "--reading-interval", "2",
        "--hold-seconds", "12", "--api-users", "1", "--timeout", "60",
        "--results", str(results),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(results.read_text())
    assert result["largest_fleet_held"] == 80
    assert [s["devices"] for s in result["steps"]] == [40, 80]
    for step in result["steps"]:
        assert step["ok"], step["reasons"]
        assert step["points_stored"] == step["points_sent"] > step["devices"]
        assert all(step["cores"][part] is not None for part in ("iiot_run", "postgres", "broker"))
        assert step["cores"]["iiot_run"] > 0
        assert step["cores_per_million_devices"]["cell"] > 0
