"""Health checks that test the tools: /healthz, /readyz, workers, and exec probes."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from agents.models import TaskStatus
from agents.services import task_start
from agents_project.worker_process import BASE_DIR
from tests.helpers import wait_until
from tests.integration.servers import free_port
from tests.tools.flaky_server import FAILING, HANGING, HEALTHY, FlakyServer
from tools import registry
from tools.breakers import breaker_call
from tools.registry import Tool
from tools.services import breaker_force_close, breaker_force_open

PROBED = "flaky.probed"


@pytest.fixture
def probed_tool(flaky: FlakyServer, monkeypatch) -> FlakyServer:
    """A tool (in this process only) whose probe asks the flaky service for its health."""

    def probe() -> None:
        # No client timeout on purpose: the check's own timeout must bound a hung probe.
        httpx.get(flaky.url("/health"), timeout=None).raise_for_status()

    tool = Tool(name=PROBED, func=lambda ctx, args: None, args={}, probe=probe)
    monkeypatch.setitem(registry._REGISTRY, PROBED, tool)
    return flaky


def ready(client) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    return response.status_code, response.json()


@pytest.mark.django_db
def test_healthz_answers_and_readyz_checks_database_broker_redis_and_breakers(client):
    alive = client.get("/healthz")
    assert (alive.status_code, alive.json()) == (200, {"status": "alive"})
    status, body = ready(client)
    assert status == 200, body
    assert body["status"] == "ready"
    assert {"database", "broker", "redis", "breakers"} <= set(body["checks"])
    assert all(check["ok"] for check in body["checks"].values())


@pytest.mark.django_db
def test_a_failing_or_hanging_tool_makes_the_process_not_ready(client, probed_tool):
    status, body = ready(client)
    assert status == 200 and body["checks"][f"tool:{PROBED}"]["ok"] is True

    probed_tool.set_mode(FAILING)
    status, body = ready(client)
    assert status == 503 and body["status"] == "not_ready"
    failed = body["checks"][f"tool:{PROBED}"]
    assert failed["ok"] is False and "HTTPStatusError" in failed["error"]
    assert body["checks"]["database"]["ok"] is True

    probed_tool.set_mode(HANGING)
    status, body = ready(client)  # the probe's timeout, not the probe's hang, bounds it
    assert status == 503
    assert "Timed out after 5 seconds" in body["checks"][f"tool:{PROBED}"]["error"]

    probed_tool.set_mode(HEALTHY)
    assert ready(client)[0] == 200


@pytest.mark.django_db
def test_an_open_breaker_degrades_the_web_process_without_failing_it(client):
    """Issue 12, finding 5: one tenant's failing dependency must not take the web
    process out of rotation."""
    breaker_call(name="billing-api", func=lambda: None, trial_timeout=1, transitions=[])
    breaker_force_open(name="billing-api", actor="test")
    status, body = ready(client)
    assert status == 200 and body["status"] == "degraded"
    assert "billing-api (held open by an operator)" in body["checks"]["breakers"]["error"]
    breaker_force_close(name="billing-api", actor="test")
    status, body = ready(client)
    assert status == 200 and body["status"] == "ready"


@pytest.mark.django_db
def test_the_healthcheck_command_exits_non_zero_with_the_reason(probed_tool, capsys):
    call_command("healthcheck")
    assert f"ok   tool:{PROBED}" in capsys.readouterr().out
    probed_tool.set_mode(FAILING)
    with pytest.raises(CommandError) as refused:
        call_command("healthcheck")
    assert refused.value.returncode == 1
    assert f"tool:{PROBED}: Unavailable: probe failed" in str(refused.value)


def healthcheck_worker(port: int) -> subprocess.CompletedProcess[str]:
    """``manage.py healthcheck --worker`` as an exec probe in the worker's container runs it."""
    return subprocess.run(
        [sys.executable, "manage.py", "healthcheck", "--worker"],
        cwd=BASE_DIR,
        env={**os.environ, "AGENTS_WORKER_HEALTH_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_a_worker_whose_tools_are_down_stays_alive_but_reports_not_ready(
    workers, flaky, user, settings
):
    port = free_port()
    worker = workers.start(
        concurrency=1,
        AGENTS_WORKER_HEALTH_PORT=str(port),
        AGENTS_MODULES="tests.tools.probe_tools",
        FLAKY_URL=flaky.url(""),
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=60)
    readyz = httpx.get(f"{base}/readyz", timeout=10)
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["checks"]["tool:flaky.status"]["ok"] is True
    assert healthcheck_worker(port).returncode == 0

    flaky.set_mode(FAILING)
    readyz = httpx.get(f"{base}/readyz", timeout=10)
    assert readyz.status_code == 503
    assert readyz.json()["checks"]["tool:flaky.status"]["ok"] is False
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    probe = healthcheck_worker(port)
    assert probe.returncode == 1
    assert "tool:flaky.status" in probe.stderr and "probe failed" in probe.stderr
    # Not ready, but alive and working: it still runs steps that do not need the service.
    task, _ = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"tool": "calc", "args": {"expression": "6*7"}}]},
    )
    wait_until(lambda: type(task).objects.get(pk=task.pk).status == TaskStatus.COMPLETED)
    assert worker.poll() is None

    flaky.set_mode(HEALTHY)
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    assert healthcheck_worker(port).returncode == 0

    # Without a health port, --worker pings the workers over the broker instead.
    settings.AGENTS = {**settings.AGENTS, "WORKER_HEALTH_PORT": 0}
    call_command("healthcheck", "--worker")
