"""The README's examples of schedules and of an edited approval, sent as written (the
blocks after ``<!-- example: NAME ... -->``: a request line, then its JSON body)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agents.models import Schedule
from agents.services import task_start
from audit.models import AuditEvent
from tests.api.conftest import token_client
from tests.helpers import run_until_idle
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> tuple[str, str, dict]:
    """(method, path, body) of the README's example ``name``."""
    found = re.search(
        rf"<!-- example: {re.escape(name)}\b.*?-->\n```\n(\w+) (\S+)\n(.*?)\n```",
        README.read_text(),
        re.S,
    )
    assert found, f"no example {name!r} in the README"
    method, path, body = found.groups()
    return method, path, json.loads(body)


def test_the_schedules_example(user):
    method, path, body = example("schedules")
    assert (method, path) == ("POST", "/api/schedules/")
    response = token_client(user).post(path, body, format="json")
    assert response.status_code == 201, response.json()
    schedule = Schedule.objects.get(pk=response.json()["id"])
    assert (schedule.cron, schedule.timezone) == ("0 8 * * 1-5", "Europe/Berlin")
    # 08:00 in Berlin, in UTC: 07:00 in winter, 06:00 in summer.
    assert schedule.next_slot.hour in (6, 7) and schedule.next_slot.weekday() < 5


def test_the_approve_edit_example(user):
    script = [
        {"tool": "ledger.append", "args": {"key": "refund", "value": 90}, "approve": "refund?"}
    ]
    task, _ = task_start(owner=user, agent="scripted", input={"script": script})
    run_until_idle()
    method, path, body = example("approve-edit")
    response = token_client(user).post(path.format(id=task.pk), body, format="json")
    assert response.status_code == 200, response.json()
    run_until_idle()
    assert list(LedgerEntry.objects.filter(task=task).values_list("value", flat=True)) == [40]
    decided = AuditEvent.objects.get(task=task, type="approval_decided").payload
    assert decided["diff"] == [{"op": "replace", "path": "/value", "value": 40}]
