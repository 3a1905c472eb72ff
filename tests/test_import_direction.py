"""Packages import one way: api/ reads registry/ and ingest/'s contract, ingest/ reads registry/,
registry/ reads neither, and the load test shares no protocol code with the system it checks (it
still takes its simulated enterprises, registry data only, from iiot/demo_enterprises.py). iiot/
composes them all. A new import against that grain fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may not import (a top-level package, or one module of it).
FORBIDDEN = {
    "registry": {"api", "ingest", "iiot", "loadtests", "national"},
    "ingest": {"api", "iiot", "loadtests", "national"},
    # The aggregator runs apart from any cell: it shares only the wire format with them.
    "national": {"api", "ingest", "iiot", "loadtests"},
    "api": {"iiot", "loadtests", "ingest.kafka", "ingest.mqtt", "ingest.writer"},
    "loadtests": {"api", "ingest", "iiot.cli", "iiot.stack", "iiot.services"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_against_the_grain(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in imports(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[package]):
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong
