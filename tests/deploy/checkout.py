"""The checkout's files as a clone with the current changes would have them: git's
view (tracked and new files, less what .gitignore leaves out), without .venv, var/ or
the leftovers of earlier builds (setuptools packs whatever build/lib holds, even a
package no longer in pyproject's list)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from django.apps import apps
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
# The project package (settings, URLs, Celery app), shipped beside the apps.
PROJECT_PACKAGE = settings.ROOT_URLCONF.split(".")[0]


def project_apps() -> set[str]:
    """Top-level packages of the apps in ``INSTALLED_APPS`` that are this checkout's own
    (their folder is at the top of it, not in a virtualenv)."""
    found = set()
    for config in apps.get_app_configs():
        package = config.name.split(".")[0]
        if Path(config.path).resolve().is_relative_to(ROOT / package):
            found.add(package)
    return found


def files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]


def copy_to(dest: Path) -> Path:
    for name in files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest
