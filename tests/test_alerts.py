"""The Prometheus alert rules of deploy/prometheus, checked and unit-tested by promtool
(Debian's `prometheus` package) against series that stall, stop and recover."""

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).parent.parent / "deploy" / "prometheus"


def test_the_alerts_pass_promtools_check_and_their_unit_tests() -> None:
    """Every alert of alerts.yml, against series that should fire it and series beside them
    that should not (a stall, a stopped consumer, lag, dead letters, drift, maintenance,
    scrapes, certificates)."""
    if shutil.which("promtool") is None:  # `make test` installs it (make promtool)
        pytest.fail("promtool is missing: `make promtool` (Debian's prometheus package)")
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            ["promtool", *command],
            cwd=PROMETHEUS,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_national_aggregators_alerts_pass_promtools_check_and_their_unit_tests() -> None:
    """A stale cell, a platform claimed by two cells, and refused snapshots (not retries)."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make promtool` (Debian's prometheus package)")
    for command in (
        ["check", "rules", "national_alerts.yml"],
        ["test", "rules", "national_alerts_test.yml"],
    ):
        done = subprocess.run(
            ["promtool", *command], cwd=PROMETHEUS, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
