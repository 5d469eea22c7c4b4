"""Health: is this process alive, and can it do its work?

- ``GET /healthz`` (liveness): the process answers. Restart it only if this fails.
- ``GET /readyz`` (readiness), JSON: the database, the broker, Redis, every tool's
  availability probe, and the circuit breakers (an open one means a dependency is down).
  200 when every check passes; 503 with each failing check's reason otherwise.

The web process serves both (``tools/urls.py``). A worker serves the same from a thread
of its main process on ``AGENTS_WORKER_HEALTH_PORT`` (0: off), started by the
``ServeWorkerHealth`` bootstep (``agents.worker``). For exec probes,
``manage.py healthcheck [--worker]`` turns the same report into an exit code.

"Not ready" never means "not alive": a worker whose tools' dependencies are down keeps
running, its steps wait on open breakers, and it becomes ready again by itself once the
dependency is back. Restarting it would change nothing.

The checks are django-health-check ``HealthCheck`` objects (its ``Database`` and ``Redis``;
the broker, work-queue consumer, tool probe and breaker checks are here), run
concurrently, each within its own timeout. Their messages never include URLs or
credentials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import redis
import redis.asyncio
import structlog
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from health_check.base import HealthCheck, HealthCheckResult
from health_check.checks import Database
from health_check.contrib.redis import Redis
from health_check.exceptions import ServiceUnavailable
from kombu import Connection

from agents_project.celery import app as celery_app
from tools.breakers import OPEN, breaker_states
from tools.registry import find_tool, registered_tools

logger = structlog.get_logger(__name__)


@dataclasses.dataclass
class Broker(HealthCheck):
    """The broker accepts a connection (RabbitMQ, or the embedded SQLite broker)."""

    url: str = dataclasses.field(repr=False)
    timeout = timedelta(seconds=3)

    def __repr__(self) -> str:
        return "Broker"

    def run(self) -> None:
        try:
            with Connection(self.url, connect_timeout=self.timeout.total_seconds()) as conn:
                conn.connect()
        except Exception as exc:
            raise ServiceUnavailable(f"cannot connect: {type(exc).__name__}") from exc


@dataclasses.dataclass
class WorkQueueConsumer(HealthCheck):
    """Some Celery worker answers and consumes the work queue (``AGENTS_QUEUE``).

    One broadcast of ``active_queues`` that collects every reply for ``timeout``
    seconds. django-health-check's ``Ping`` asks the same in two rounds: a ping that
    waits its whole timeout, then ``active_queues`` from every worker that answered,
    which waits for the slowest of them. Every worker on the virtual host answers, so a
    busy or dying one (another deployment's, or a test's) pushed the second round past
    the check's own deadline, and the check failed although a worker was serving.
    """

    app: Any = dataclasses.field(repr=False)
    timeout: timedelta = dataclasses.field(default=timedelta(seconds=2), repr=False)

    def __repr__(self) -> str:
        return "WorkQueueConsumer"

    def run(self) -> None:
        try:
            replies = self.app.control.inspect(timeout=self.timeout.total_seconds())
            queues = replies.active_queues() or {}
        except OSError as exc:
            raise ServiceUnavailable(f"cannot ask the workers: {type(exc).__name__}") from exc
        if not queues:
            raise ServiceUnavailable("Celery workers unavailable")
        name = settings.AGENTS["QUEUE"]
        if not any(q.get("name") == name for served in queues.values() for q in served):
            raise ServiceUnavailable(f"No worker for Celery task queue {name}")


@dataclasses.dataclass
class ToolProbe(HealthCheck):
    """A tool's own availability probe passes (``@tool(..., probe=...)``)."""

    tool: str

    def run(self) -> None:
        tool = find_tool(self.tool)
        if tool is None or tool.probe is None:
            return
        try:
            tool.probe()
        except Exception as exc:
            raise ServiceUnavailable(f"probe failed: {type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass
class Breakers(HealthCheck):
    """No circuit breaker is open: every dependency the tools use is answering."""

    def run(self) -> None:
        try:
            states = breaker_states()
        except redis.RedisError as exc:
            raise ServiceUnavailable("breaker state unavailable: Redis unreachable") from exc
        down = [
            f"{s.name} (held open by an operator)"
            if s.forced
            else f"{s.name} (trial call in {s.remaining or 0:.0f} s)"
            for s in states
            if s.state == OPEN
        ]
        if down:
            raise ServiceUnavailable("open: " + ", ".join(down))


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    ok: bool
    error: str | None = None
    ms: float | None = None


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[CheckOutcome, ...]
    # Checks whose failure degrades the report without failing it (the web process's
    # breakers: an open one is one dependency of some tenants, not this process).
    advisory: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return all(check.ok or check.name in self.advisory for check in self.checks)

    @property
    def degraded(self) -> bool:
        return any(not check.ok and check.name in self.advisory for check in self.checks)

    def problems(self) -> list[str]:
        return [f"{c.name}: {c.error}" for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": ("degraded" if self.degraded else "ready") if self.ok else "not_ready",
            "checks": {c.name: {"ok": c.ok, "error": c.error, "ms": c.ms} for c in self.checks},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HealthReport:
        return cls(
            tuple(
                CheckOutcome(name, bool(c.get("ok")), c.get("error"), c.get("ms"))
                for name, c in data.get("checks", {}).items()
            )
        )


def readiness_checks() -> dict[str, HealthCheck]:
    """What ``/readyz`` checks, by name, in the web process and in workers alike."""
    checks: dict[str, HealthCheck] = {
        "database": Database(),
        "broker": Broker(url=settings.CELERY_BROKER_URL),
    }
    if settings.REDIS_URL:
        url = settings.REDIS_URL
        checks["redis"] = Redis(
            client_factory=lambda: redis.asyncio.Redis.from_url(
                url, socket_connect_timeout=2, socket_timeout=2
            )
        )
    checks.update(_tool_checks())
    return checks


def _tool_checks() -> dict[str, HealthCheck]:
    checks: dict[str, HealthCheck] = {
        f"tool:{name}": ToolProbe(tool=name)
        for name, tool in sorted(registered_tools().items())
        if tool.probe is not None
    }
    checks["breakers"] = Breakers()
    return checks


def health_report(
    checks: Mapping[str, HealthCheck], *, advisory: frozenset[str] = frozenset()
) -> HealthReport:
    """Run ``checks`` concurrently, each within its timeout; a failure of one named in
    ``advisory`` degrades the report but leaves it ``ok``."""

    async def run_all() -> list[HealthCheckResult]:
        executor = _DaemonThreads()
        return await asyncio.gather(*(check.get_result(executor) for check in checks.values()))

    results = asyncio.run(run_all())
    return HealthReport(
        tuple(
            CheckOutcome(
                name=name,
                ok=result.error is None,
                error=str(result.error) if result.error else None,
                ms=round(result.time_taken * 1000, 1),
            )
            for name, result in zip(checks, results, strict=True)
        ),
        advisory=advisory,
    )


def readiness() -> HealthReport:
    return health_report(readiness_checks())


def worker_readiness() -> HealthReport:
    """The worker's view, for ``healthcheck --worker`` (an exec probe in its container).

    With ``AGENTS_WORKER_HEALTH_PORT`` set, the local worker's own ``/readyz``: that
    proves the worker process answers, and reports what it sees. Without it: the broker,
    the tools' probes and breakers from here, and an ``active_queues`` broadcast proving
    that some worker answers and consumes the work queue (``WorkQueueConsumer``).
    """
    conf = settings.AGENTS
    if conf["WORKER_HEALTH_PORT"]:
        host = conf["WORKER_HEALTH_HOST"]
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        return _remote_report(f"http://{host}:{conf['WORKER_HEALTH_PORT']}/readyz")
    checks: dict[str, HealthCheck] = {
        "broker": Broker(url=settings.CELERY_BROKER_URL),
        **_tool_checks(),
        "worker": WorkQueueConsumer(app=celery_app),
    }
    return health_report(checks)


def _remote_report(url: str) -> HealthReport:
    try:
        # A hanging probe takes its timeout (5 s) plus a second before it is reported.
        response = httpx.get(url, timeout=10.0)
        return HealthReport.from_dict(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        return HealthReport(
            (CheckOutcome("worker", False, f"no answer at {url}: {type(exc).__name__}"),)
        )


class _DaemonThreads(Executor):
    """Run each synchronous check in its own daemon thread.

    A check that hangs past its timeout is reported and left behind: unlike a thread
    pool's, its thread neither delays the report nor keeps ``healthcheck`` from exiting.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                connections.close_all()  # this thread's own connections

        threading.Thread(target=run, name="health-check", daemon=True).start()
        return future


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers."""
    return JsonResponse({"status": "alive"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness of the web process: 200 if every check passes (``"degraded"`` when a
    circuit breaker is open: a dependency of some tasks is down, but this process serves
    on), 503 with the failing ones otherwise."""
    report = health_report(readiness_checks(), advisory=frozenset({"breakers"}))
    return JsonResponse(report.as_dict(), status=200 if report.ok else 503)


class WorkerHealthServer:
    """``/healthz`` and ``/readyz`` of a worker, from a thread of its main process."""

    def __init__(self, host: str, port: int) -> None:
        self.httpd = ThreadingHTTPServer((host, port), _WorkerHealthHandler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="worker-health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("worker health served", port=self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _WorkerHealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, {"status": "alive", "pid": os.getpid()})
        elif path == "/readyz":
            try:
                report = readiness()
            except Exception as exc:
                logger.exception("readiness check failed")
                self._reply(503, {"status": "not_ready", "error": type(exc).__name__})
                return
            self._reply(200 if report.ok else 503, report.as_dict())
        else:
            self._reply(404, {"error": "not_found"})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes poll every few seconds; their requests are not worth a log line each.
        return
