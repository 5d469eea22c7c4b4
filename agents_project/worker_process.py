"""Starting and stopping a real Celery worker process (the demo, the tests, benchmarks).

The worker runs in its own process group, so a test can ``kill -9`` the whole worker
(main process and pool children) with one ``killpg``; on Linux it also dies with the
process that started it, so an interrupted demo leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
BASE_DIR = Path(__file__).resolve().parent.parent


def _die_with_parent(signum: int) -> Callable[[], None]:
    def arrange() -> None:
        # Not on Linux, there is no libc.so.6: the caller stops the worker itself.
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)

    return arrange


def start_worker(
    *,
    env: Mapping[str, str] | None = None,
    concurrency: int = 2,
    hostname: str = "worker@%h",
    output: IO[bytes] | int | None = None,
    extra_args: Sequence[str] = (),
    parent_death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start ``celery -A agents_project worker``; it gets ``parent_death_signal`` if the
    process that started it dies (SIGTERM: a warm shutdown; SIGKILL: a crash)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "agents_project",
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
        "--loglevel=INFO",
        *extra_args,
    ]
    return subprocess.Popen(
        command,
        cwd=BASE_DIR,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        preexec_fn=_die_with_parent(parent_death_signal),
    )


def start_gateway(
    *,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | int | None = None,
    parent_death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start the model gateway (``manage.py llm_gateway``), as ``start_worker`` does a
    worker: its own process group, ``parent_death_signal`` if its parent dies."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "llm_gateway"],
        cwd=BASE_DIR,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
        preexec_fn=_die_with_parent(parent_death_signal),
    )


def stop_worker(process: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """SIGTERM (warm shutdown: finish running steps), then SIGKILL the group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_worker_group(process)
    return process.returncode


def kill_worker_group(process: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the worker's main process and every child, at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
