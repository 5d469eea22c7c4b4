"""``requirements.lock`` pins every dependency of pyproject.toml (and its ``deploy``
and ``otel`` extras) at a version the project accepts. ``python -m
tests.deploy.lockcheck`` exits 1 naming what is missing or out of range (then run
bin/lock)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pinned(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    versions = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            versions[canonicalize_name(name.split("[", 1)[0])] = version.strip()
    return versions


def problems(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["deploy"], *extras["otel"]]
    versions = pinned()
    found = []
    for spec in wanted:
        requirement = Requirement(spec)
        version = versions.get(canonicalize_name(requirement.name))
        if version is None:
            found.append(f"{requirement.name} is not in requirements.lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement.name}=={version} does not satisfy {spec!r}")
    return found


if __name__ == "__main__":
    issues = problems()
    for issue in issues:
        print(f"requirements.lock: {issue} (run bin/lock)", file=sys.stderr)
    sys.exit(1 if issues else 0)
