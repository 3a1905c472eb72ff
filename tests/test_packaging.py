"""Every file the packages ship besides their modules is declared as package data, so a wheel
(the container image installs one) carries it: migrations, data tables, the dashboard."""

import fnmatch
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_non_python_file_of_a_package_is_package_data() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared: dict[str, list[str]] = setuptools["package-data"]
    tracked = subprocess.run(
        ["git", "ls-files", *declared], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked, "git ls-files found nothing: run from a checkout"
    missing = []
    for path in tracked:
        package, _, inside = path.partition("/")
        if path.endswith(".py"):
            continue
        if not any(fnmatch.fnmatch(inside, pattern) for pattern in declared[package]):
            missing.append(path)
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
