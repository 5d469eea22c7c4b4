"""Real worker processes for integration tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agents_project.worker_process import kill_worker_group, start_gateway, start_worker
from llm.testing.chat_server import ChatServer
from tests.helpers import log_dir, tail, wait_until, worker_env
from tests.integration.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Starts worker subprocesses on this test's database; kills them all at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list = []

    def start(self, *, concurrency: int = 2, **env: str) -> subprocess.Popen[bytes]:
        index = len(self.processes)
        path = log_dir() / f"{self.name}-{index}.log"
        log = open(path, "wb")  # noqa: SIM115 (closed in stop_all)
        process = start_worker(
            env=worker_env(**env),
            concurrency=concurrency,
            hostname=self.node_name(index),
            output=log,
        )
        self.processes.append(process)
        self.logs.append((path, log))
        return process

    def start_gateway(self, **env: str) -> subprocess.Popen[bytes]:
        """Start a model gateway (``manage.py llm_gateway``) on this test's database;
        it is one of ``processes`` (``kill(index)``, the logs and the clean-up)."""
        index = len(self.processes)
        path = log_dir() / f"{self.name}-{index}-gateway.log"
        log = open(path, "wb")  # noqa: SIM115 (closed in stop_all)
        process = start_gateway(
            env=worker_env(AGENTS_LLM_GATEWAY_HEALTH_PORT="0", **env), output=log
        )
        self.processes.append(process)
        self.logs.append((path, log))
        return process

    def node_name(self, index: int) -> str:
        """Worker ``index``'s Celery node name, unique even across concurrent test runs
        (a node name owns an exclusive control queue on the broker)."""
        return f"{self.name}-{index}-{os.getpid()}@{socket.gethostname()}"

    def kill(self, index: int) -> None:
        """``kill -9`` worker ``index``: its main process and every pool child."""
        kill_worker_group(self.processes[index])

    def stop_all(self) -> None:
        for process in self.processes:
            kill_worker_group(process)
        for _, log in self.logs:
            log.close()

    def report(self) -> str:
        return "\n".join(f"--- {path}\n{tail(path)}" for path, _ in self.logs)


@pytest.fixture
def workers(request, transactional_db) -> Iterator[Workers]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    pool = Workers(name[-60:])
    yield pool
    pool.stop_all()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(pool.report())


@pytest.fixture
def chat(settings) -> Iterator[ChatServer]:
    server = ChatServer()
    with server.running():
        settings.LLM = {
            **settings.LLM,
            "BASE_URL": server.url,
            "MODEL": "scripted",
            "MODELS": {},
            "OWNER_DAILY_TOKENS": 0,
        }
        yield server


class AsgiServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log


@pytest.fixture
def asgi_server(transactional_db) -> Iterator[AsgiServer]:
    """``uvicorn agents_project.asgi:application`` on this test's database."""
    port = free_port()
    log = log_dir() / f"uvicorn-{port}.log"
    env = {
        **os.environ,
        **worker_env(AGENTS_EVENTS_POLL_INTERVAL="0.1"),
        "DJANGO_SETTINGS_MODULE": "agents_project.settings",
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "agents_project.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
