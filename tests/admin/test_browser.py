"""A real browser (Debian's headless Chromium, driven by Playwright) uses the console:
log in, open a task waiting for approval, read its timeline, approve it.

Screenshots are saved under ``var/<namespace>/screenshots/``. Chromium is installed by
``.ci/run`` (``apt-get install chromium``); Playwright's own browser download is never
used (``executable_path``), so this needs no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from playwright.sync_api import sync_playwright

from agents.models import TaskStatus
from audit.models import AuditEvent
from tests.api.factories import waiting_for_approval
from tests.helpers import run_until_idle

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_an_operator_approves_a_suspended_task_in_the_browser(live_server, operator, user):
    task = waiting_for_approval(user)
    screenshots = Path(settings.VAR_DIR) / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    # No database access inside this block: Playwright's sync API runs an event loop in
    # this thread, where Django refuses ORM calls. The live server answers from its own.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(f"{live_server.url}/admin/login/?next=/admin/agents/agenttask/")
            page.fill("#id_username", "ops")
            page.fill("#id_password", "pw-ops")
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/agents/agenttask/")
            page.click(f"a:text-is('{task.pk}')")
            page.wait_for_selector("#timeline")
            timeline = page.inner_text("#timeline")
            status_before = page.inner_text("#task-status")
            waiting = page.inner_text("#waiting")
            page.screenshot(path=str(screenshots / "console-task-suspended.png"), full_page=True)

            page.fill("#decide input[name=comment]", "approved from the browser test")
            page.click("#decide button[value=approve]")
            page.wait_for_selector(".messagelist")
            message = page.inner_text(".messagelist")
            status_after = page.inner_text("#task-status")
            timeline_after = page.inner_text("#timeline")
            page.screenshot(path=str(screenshots / "console-task-approved.png"), full_page=True)
        finally:
            browser.close()

    assert "waits for approval: Refund 42?" in timeline
    assert "look at the refund" in timeline
    assert status_before == "suspended" and "Refund 42?" in waiting
    assert "Approval approved." in message
    assert status_after == "running"
    assert "approved by user:ops: approved from the browser test" in timeline_after
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING
    decided = AuditEvent.objects.get(task=task, type="approval_decided")
    assert decided.actor == "user:ops" and decided.payload["approved"] is True
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED and task.result == "ok"
    assert (screenshots / "console-task-approved.png").stat().st_size > 10_000
