"""The application installs from requirements/*.lock: pinned, hash-checked, and within the ranges
that pyproject.toml declares for library users."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: str) -> dict[str, tuple[Version, str | None]]:
    """The lock's pins by canonical name, with their environment marker (if any)."""
    found: dict[str, tuple[Version, str | None]] = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        match = PIN.match(line)
        if match:
            name, version, marker = match.groups()
            found[canonicalize_name(name)] = (Version(version), marker)
    return found


def declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, wanted) if canonicalize_name(r.name) != "iiot"]


@pytest.mark.parametrize(
    ("lock", "extras"), [("app.lock", ()), ("dev.lock", ("embedded", "load", "dev"))]
)
def test_every_declared_dependency_is_pinned_within_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    pinned = pins(lock)
    assert pinned, f"no pins read from {lock}"
    for requirement in declared(*extras):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in {lock}: run `make lock`"
        version, _ = pinned[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside {requirement}: run `make lock`"
        )


def test_every_pin_carries_hashes() -> None:
    for lock in ("app.lock", "dev.lock"):
        text = (ROOT / "requirements" / lock).read_text()
        entries = [b for b in re.split(r"\n(?=\S)", text) if PIN.match(b.split("\n", 1)[0])]
        assert entries
        for entry in entries:
            assert "--hash=sha256:" in entry, f"{entry.splitlines()[0]} has no hash in {lock}"


def test_this_environment_was_installed_from_the_dev_lock() -> None:
    # What `make install` (and so CI) put here is what the lock says, not a fresh resolution.
    environment = default_environment()
    mismatched = []
    for name, (version, marker) in pins("dev.lock").items():
        if marker is not None and not Requirement(f"x; {marker}").marker.evaluate(environment):
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name} missing")
            continue
        if installed != version:
            mismatched.append(f"{name} {installed} != {version}")
    assert not mismatched, mismatched


def test_installs_read_the_lock_with_hash_checking() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements/dev.lock" in makefile
    assert "--no-deps -e ." in makefile
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes -r /tmp/app.lock" in dockerfile
    assert "COPY requirements/app.lock" in dockerfile
