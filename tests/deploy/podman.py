"""Rootful podman as it runs on these machines, set up by files of its own (never by
edits in /etc): ``runc`` (``crun`` refuses hybrid cgroups: "cgroups in hybrid mode not
supported"), cgroupfs, overlay storage, host networking, and the highest default
ulimits the machine grants (``nofile`` 4096, ``nproc`` 5000).

Everything lives under ``AGENTS_IMAGE_CACHE`` (default ``/var/cache/agents-image``,
which a machine keeps between runs): the configuration files, written on every run,
and the image store, so that the base image and the build's layers are reused. The
run-time state goes to ``/run/agents-image`` (gone at reboot, as it should be).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("AGENTS_IMAGE_CACHE", "/var/cache/agents-image"))
RUN_DIR = Path("/run/agents-image") if Path("/run").is_dir() else CACHE / "run"

CONTAINERS_CONF = """\
[containers]
netns = "host"
default_ulimits = ["nofile=4096:4096", "nproc=5000:5000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{run}/events.log"
tmp_dir = "{run}/libpod"
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{cache}/storage"
runroot = "{run}/storage"
"""

# Short names (FROM python:...) resolve as Docker resolves them.
REGISTRIES_CONF = """\
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
"""


class PodmanMissing(RuntimeError):
    pass


def require() -> None:
    """Fail loudly (never skip) where podman cannot run: .ci/run installs it."""
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        raise PodmanMissing(
            f"{' and '.join(missing)} missing: apt-get install podman runc debootstrap "
            "(as .ci/run does)"
        )
    if os.geteuid() != 0:
        raise PodmanMissing("the image is built with rootful podman: run as root")


def environment(cache: Path = CACHE) -> dict[str, str]:
    """This process's environment plus podman's configuration files (written here)."""
    conf = cache / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    files = {
        "CONTAINERS_CONF": ("containers.conf", CONTAINERS_CONF),
        "CONTAINERS_STORAGE_CONF": ("storage.conf", STORAGE_CONF),
        "CONTAINERS_REGISTRIES_CONF": ("registries.conf", REGISTRIES_CONF),
    }
    env = dict(os.environ)
    for variable, (name, template) in files.items():
        path = conf / name
        path.write_text(template.format(cache=cache, run=RUN_DIR))
        env[variable] = str(path)
    return env


def podman(
    *args: str | Path,
    env: dict[str, str],
    timeout: float = 600,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *map(str, args)],
        env=env,
        capture_output=True,
        timeout=timeout,
        input=input,
    )
    result = subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"podman {' '.join(map(str, args[:3]))} ... exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result
