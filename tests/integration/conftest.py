"""Real worker processes for integration tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agents_project.worker_process import kill_worker_group, start_gateway, start_worker
from tests.helpers import log_dir, tail, worker_env
from tests.integration.uvicorn import AsgiServer, uvicorn_running


class Workers:
    """Starts worker subprocesses on this test's database; kills them all at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list = []

    def start(
        self, *, concurrency: int = 2, prefix: tuple[str, ...] = (), **env: str
    ) -> subprocess.Popen[bytes]:
        """Start a worker; ``prefix`` runs it in another network namespace
        (``tests.integration.netns``)."""
        index = len(self.processes)
        path = log_dir() / f"{self.name}-{index}.log"
        log = open(path, "wb")  # noqa: SIM115 (closed in stop_all)
        process = start_worker(
            env=worker_env(**env),
            concurrency=concurrency,
            hostname=self.node_name(index),
            output=log,
            prefix=prefix,
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
def asgi_server(transactional_db) -> Iterator[AsgiServer]:
    """``uvicorn agents_project.asgi:application`` on this test's database."""
    with uvicorn_running(AGENTS_EVENTS_POLL_INTERVAL="0.1") as server:
        yield server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
