"""The console in a real browser (Debian's headless Chromium via Playwright): each task
page says at its top why the task is where it is (a dead-lettered task, a task waiting
on an open circuit breaker, a suspended task), and a running task's timeline grows
live, from the event stream, without a reload.

The running task is run by a real worker process; the page is served by the live
(WSGI) server, so this also proves the stream works without an ASGI server.
Screenshots of every page land in ``var/<namespace>/screenshots/`` for review.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from playwright.sync_api import Page, sync_playwright
from rest_framework.authtoken.models import Token

from agents.models import TaskStatus
from audit.models import AuditEvent
from tests.admin.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.api.factories import dead_lettered, started, waiting_for_approval
from tests.console import BREAKER_NAME, held_open, waiting_on_breaker
from tests.helpers import wait_until
from tests.integration.conftest import Workers, pytest_runtest_makereport  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

# Waits for an event before its last steps, so the page is open before they run.
LIVE_SCRIPT = [
    {"think": "gather the invoices"},
    {"wait_event": "go"},
    {"sleep": 0.4},
    {"tool": "calc", "args": {"expression": "19 * 3"}},
    {"sleep": 0.2},
    {"think": "write the summary"},
    {"sleep": 0.6},
    {"final": "done"},
]


@pytest.fixture
def workers(request, transactional_db) -> Iterator[Workers]:
    pool = Workers("console-browser")
    yield pool
    pool.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(pool.report())


def _log_in(page: Page, url: str) -> None:
    page.goto(f"{url}/admin/login/?next=/admin/agents/agenttask/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "pw-ops")
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/agents/agenttask/")


def _why(page: Page, url: str, task_id: object, shot: Path) -> dict[str, object]:
    page.goto(f"{url}/admin/agents/agenttask/{task_id}/change/")
    page.wait_for_selector("#why")
    why_top = page.locator("#why").bounding_box()
    form_top = page.locator("fieldset").first.bounding_box()
    page.screenshot(path=str(shot), full_page=True)
    return {
        "status": page.inner_text("#task-status"),
        "summary": page.inner_text("#why-summary"),
        "panel": page.inner_text("#why"),
        "above_the_fields": why_top is not None
        and form_top is not None
        and why_top["y"] < form_top["y"],
        "top": why_top["y"] if why_top else None,
    }


def test_each_task_page_says_why_at_the_top_and_the_timeline_follows_live(
    live_server, operator, user, workers, settings_override
):
    screenshots = Path(settings.VAR_DIR) / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    dead, letter = dead_lettered(user)
    waiting = waiting_for_approval(user)
    token = Token.objects.create(user=user).key
    with held_open():
        blocked = waiting_on_breaker(user)
        # The in-process worker made the three above; a real one runs the live task.
        workers.start(concurrency=1)
        live = started(user, {"script": LIVE_SCRIPT})
        wait_until(
            lambda: AuditEvent.objects.filter(task=live, type="suspended").exists(), timeout=60
        )
        # No database access in this block (Playwright's event loop runs in this thread):
        # the live server and the worker do the work.
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(30_000)
                _log_in(page, live_server.url)
                page.screenshot(path=str(screenshots / "console-task-list.png"), full_page=True)
                dead_page = _why(
                    page, live_server.url, dead.pk, screenshots / "console-dead-lettered.png"
                )
                breaker_page = _why(
                    page, live_server.url, blocked.pk, screenshots / "console-open-breaker.png"
                )
                waiting_page = _why(
                    page, live_server.url, waiting.pk, screenshots / "console-suspended.png"
                )

                page.goto(f"{live_server.url}/admin/agents/agenttask/{live.pk}/change/")
                page.wait_for_selector("#live-state:not([hidden])")
                page.evaluate("window.__notReloaded = true")
                bars_before = page.locator("#step-bars tr.agents-step").count()
                rows_before = page.locator("#timeline-rows tr").count()
                status_before = page.inner_text("#task-status")
                page.screenshot(path=str(screenshots / "console-live-before.png"), full_page=True)
                # The event the task waits for, sent through the API as a client would.
                sent = httpx.post(
                    f"{live_server.url}/api/tasks/{live.pk}/signal/",
                    json={"name": "go", "payload": None},
                    headers={"Authorization": f"Token {token}"},
                    timeout=30,
                )
                page.wait_for_function(
                    "document.querySelectorAll('#step-bars tr.agents-step').length"
                    f" >= {len(LIVE_SCRIPT)}",
                    timeout=60_000,
                )
                page.wait_for_function(
                    "document.getElementById('task-status').textContent === 'completed'"
                )
                page.wait_for_function(
                    "document.getElementById('live-state').textContent.includes('ended')"
                )
                page.wait_for_function(
                    "document.getElementById('why-summary').textContent === 'Completed.'"
                )
                still_same_page = page.evaluate("window.__notReloaded === true")
                bars_after = page.locator("#step-bars tr.agents-step").count()
                rows_after = page.locator("#timeline-rows tr").count()
                live_summary = page.inner_text("#why-summary")
                bar_widths = page.eval_on_selector_all(
                    "#step-bars .agents-bar", "bars => bars.map(b => b.style.width)"
                )
                page.screenshot(path=str(screenshots / "console-live-after.png"), full_page=True)
                page.goto(f"{live_server.url}/admin/breakers/")
                page.screenshot(path=str(screenshots / "console-breakers.png"), full_page=True)
            finally:
                browser.close()

    assert dead_page["status"] == "dead_lettered"
    assert dead_page["summary"] == f"Dead-lettered: {letter.error}"
    assert "requeue or cancel" in str(dead_page["panel"]) and dead_page["above_the_fields"]
    assert breaker_page["status"] == "running"
    assert f"circuit breaker '{BREAKER_NAME}'" in str(breaker_page["summary"])
    assert "held open by an operator" in str(breaker_page["panel"])
    assert breaker_page["above_the_fields"]
    assert waiting_page["status"] == "suspended"
    assert waiting_page["summary"] == "Waiting for a person's approval: Refund 42?"
    assert waiting_page["above_the_fields"]

    assert sent.status_code == 201, sent.text
    assert status_before == "suspended" and still_same_page
    assert bars_before == 2 and bars_after == len(LIVE_SCRIPT)
    live.refresh_from_db()
    assert live.status == TaskStatus.COMPLETED
    assert rows_after == rows_before + (live.audit_seq - rows_before) == live.audit_seq
    assert live_summary == "Completed."
    assert "100%" in bar_widths, bar_widths  # the longest step (the 0.6 s sleep)
    for name in ("dead-lettered", "open-breaker", "suspended", "live-before", "live-after"):
        assert (screenshots / f"console-{name}.png").stat().st_size > 10_000


@pytest.fixture
def settings_override(settings):
    # Disconnected streams (the browser leaving a page) are noticed within a second.
    settings.AGENTS = {**settings.AGENTS, "EVENTS_HEARTBEAT": 1.0, "EVENTS_POLL_INTERVAL": 0.2}
