"""constraints.txt, the pins the README's install and .ci/run install with, agrees with
pyproject.toml: every dependency (and dev extra) is pinned, at a version its range admits, so a
range changed in pyproject.toml without `.ci/lock` fails here instead of in pip's resolver."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def pins(text: str) -> dict[str, Version]:
    """name -> pinned version of a constraints file's `name==version` lines."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            found[canonicalize_name(name)] = Version(version)
    return found


def unpinned(requirements: list[str], pinned: dict[str, Version]) -> list[str]:
    """The requirements `pinned` leaves out or pins outside their range."""
    bad = []
    for text in requirements:
        requirement = Requirement(text)
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            bad.append(f"{text} (constraints.txt: {version or 'missing'})")
    return bad


def test_constraints_pin_every_dependency_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    bad = unpinned(requirements, pins((REPO / "constraints.txt").read_text()))
    assert not bad, f"constraints.txt is behind pyproject.toml (run .ci/lock): {bad}"


def test_the_check_sees_a_range_the_pins_left():
    """Negative control: a pin outside its range and a missing package are both named."""
    pinned = pins("pytest==8.4.0\n# a comment\n")
    assert unpinned(["pytest>=9", "pytest>=8", "playwright==1.65.2"], pinned) == [
        "pytest>=9 (constraints.txt: 8.4.0)", "playwright==1.65.2 (constraints.txt: missing)"]
