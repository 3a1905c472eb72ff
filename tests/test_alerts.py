"""The Prometheus alert rules of deploy/prometheus, checked and unit-tested by promtool
(Debian's `prometheus` package) against series that stall, stop and recover."""

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).parent.parent / "deploy" / "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_ingest_alerts_fire_on_a_stall_and_a_stopped_consumer_and_clear() -> None:
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            ["promtool", *command],
            cwd=PROMETHEUS,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
