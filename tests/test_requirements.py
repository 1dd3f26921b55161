"""requirements.txt is the lock of requirements.in: every range there is pinned here, inside the range."""

import re
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[Requirement]:
    lines = (re.sub(r"\s+#.*", "", line).strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def test_the_lock_pins_every_range_of_requirements_in_inside_its_range():
    pins: dict[str, list[Requirement]] = {}
    for pin in _requirements(REPO / "requirements.txt"):
        (specifier,) = pin.specifier  # exactly one "==" per line: a lock, not ranges
        assert specifier.operator == "==", pin
        pins.setdefault(canonicalize_name(pin.name), []).append(pin)
    for wanted in _requirements(REPO / "requirements.in"):
        here = [
            p for p in pins.get(canonicalize_name(wanted.name), []) if p.marker is None or p.marker.evaluate()
        ]
        assert len(here) == 1, f"{wanted.name}: {len(here)} pins apply on this machine (regenerate the lock)"
        version = next(iter(here[0].specifier)).version
        assert wanted.specifier.contains(version, prereleases=True), f"{wanted} but the lock pins {version}"


def test_the_lock_holds_the_whole_environment_of_this_platform():
    """Every package a locked one needs is locked too (pip then resolves nothing on its own)."""
    from importlib.metadata import PackageNotFoundError, requires

    environment = default_environment()
    locked = {canonicalize_name(p.name) for p in _requirements(REPO / "requirements.txt")}
    for name in sorted(locked):
        try:
            needs = requires(name) or []
        except PackageNotFoundError:  # locked for another platform, or not installed in this environment
            continue
        for line in needs:
            need = Requirement(line)
            if need.marker is None or need.marker.evaluate({**environment, "extra": ""}):
                assert canonicalize_name(need.name) in locked, (
                    f"{name} needs {need.name}, which is not locked"
                )
