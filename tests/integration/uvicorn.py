"""The ASGI server as the image runs it (uvicorn), on the calling test's database."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.helpers import log_dir, tail, wait_until, worker_env
from tests.integration.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class AsgiServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log


@contextlib.contextmanager
def uvicorn_running(*args: str, **env_extra: str) -> Iterator[AsgiServer]:
    """``uvicorn agents_project.asgi:application`` (with ``args``) on this test's
    database and a free port, up (``/healthz`` answers) until the block ends."""
    port = free_port()
    log = log_dir() / f"uvicorn-{port}.log"
    env = {
        **os.environ,
        **worker_env(**env_extra),
        "DJANGO_SETTINGS_MODULE": "agents_project.settings",
    }
    command = [sys.executable, "-m", "uvicorn", "agents_project.asgi:application",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *args]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = AsgiServer(f"http://127.0.0.1:{port}", process, log)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"uvicorn exited:\n{tail(log)}")
        try:
            return httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=60, interval=0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
