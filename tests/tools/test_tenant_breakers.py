"""Breakers one tenant cannot trip for another (issue 12, item 5), on real Redis and a
real HTTP service: bob's failures on alice's host open only bob's own breaker; a real
outage seen by two owners opens the shared, host-wide one."""

from __future__ import annotations

import uuid

import pytest
from django.core.management import call_command

from agents.definition import ToolCall
from agents.diagnosis import task_diagnosis
from agents.errors import CircuitOpen, RetryableError
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from tests.helpers import run_until_idle
from tests.tools.flaky_server import FAILING, HEALTHY
from tools import breakers
from tools.breakers import CLOSED, OPEN, breaker_call, breaker_scope, owner_breaker_name
from tools.runner import ToolRun, tools_run
from tools.selectors import breaker_get

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tight(settings):
    """Three failures in a row open a breaker; it stays open for 30 s (no trial here)."""
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": 3, "BREAKER_RESET_TIMEOUT": 30.0}


def get(run: ToolRun, url: str) -> object:
    try:
        return tools_run(run, [ToolCall("http.get", {"url": url, "timeout": 2})])[0].value
    except Exception as exc:
        return exc


def run_for(owner) -> ToolRun:
    return ToolRun(task_id=uuid.uuid4(), owner_id=owner.pk, step=1, events=[])


def test_one_owners_failures_open_only_its_own_breaker(
    tight, flaky, user, other_user, loopback_allowed
):
    alice, bob = user, other_user
    host = f"http:127.0.0.1:{flaky.port}"
    outcomes = [get(run_for(bob), flaky.url("/fail/boom")) for _ in range(4)]
    assert [type(o) for o in outcomes] == [
        RetryableError,
        RetryableError,
        CircuitOpen,
        CircuitOpen,
    ]
    assert outcomes[-1].breaker == owner_breaker_name(host, bob.pk)
    assert len(flaky.requests) == 3, "bob's open breaker stops his calls before the host"
    assert breaker_get(name=owner_breaker_name(host, bob.pk)).state == OPEN
    assert breaker_get(name=host).state == CLOSED

    for _ in range(5):
        answer = get(run_for(alice), flaky.url("/ok"))
        assert isinstance(answer, dict) and answer["status"] == 200, answer
    assert breaker_get(name=host).state == CLOSED
    # Bob keeps failing forever: still only his breaker, and alice still gets through.
    for _ in range(10):
        assert isinstance(get(run_for(bob), flaky.url("/fail/boom")), CircuitOpen)
    answer = get(run_for(alice), flaky.url("/ok"))
    assert isinstance(answer, dict) and answer["status"] == 200, answer


def test_a_real_outage_seen_by_two_owners_opens_the_shared_breaker(
    tight, flaky, user, other_user, django_user_model, loopback_allowed
):
    alice, bob = user, other_user
    carol = django_user_model.objects.create_user("carol", password="x")
    host = f"http:127.0.0.1:{flaky.port}"
    flaky.set_mode(FAILING)
    first = [get(run_for(alice), flaky.url("/a")), get(run_for(bob), flaky.url("/b"))]
    assert [type(o) for o in first] == [RetryableError, RetryableError]
    assert breaker_get(name=host).state == CLOSED
    opened = get(run_for(alice), flaky.url("/a"))
    assert isinstance(opened, CircuitOpen) and opened.breaker == host
    status = breaker_get(name=host)
    assert (status.state, status.failures) == (OPEN, 3)
    # Now the host fails fast for everyone, a third owner too, without reaching it.
    seen = len(flaky.requests)
    flaky.set_mode(HEALTHY)
    blocked = get(run_for(carol), flaky.url("/c"))
    assert isinstance(blocked, CircuitOpen) and blocked.breaker == host
    assert len(flaky.requests) == seen


def test_one_owner_alone_never_opens_the_shared_breaker_however_many_failures(tight):
    host = "shared-dependency"

    def failing() -> None:
        raise RetryableError("HTTP 503")

    for _ in range(20):
        with pytest.raises((RetryableError, CircuitOpen)):
            breaker_call(name=host, func=failing, trial_timeout=1, transitions=[], owner_id=7)
    assert breaker_get(name=host).state == CLOSED
    assert breaker_get(name=owner_breaker_name(host, 7)).state == OPEN
    # A success of another owner resets the shared count of failures in a row.
    assert breaker_call(name=host, func=lambda: "ok", trial_timeout=1, transitions=[], owner_id=8)
    assert breaker_get(name=host).failures == 0
    assert breaker_scope(owner_breaker_name(host, 7)) == (host, 7)
    assert breaker_scope("http:x:443") == ("http:x:443", None)


def test_the_why_panel_and_the_command_name_the_owners_breaker(
    tight, flaky, user, other_user, loopback_allowed, capsys, settings
):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 10, "RETRY_BACKOFF": 0.05}
    alice, bob = user, other_user
    host = f"http:127.0.0.1:{flaky.port}"
    bad = {"tool": "http.get", "args": {"url": flaky.url("/fail/x"), "timeout": 2}}
    good = {"tool": "http.get", "args": {"url": flaky.url("/ok"), "timeout": 2}}
    bobs = [
        task_start(owner=bob, agent="scripted", input={"script": [bad, {"final": 1}]})[0]
        for _ in range(4)
    ]
    alices = [
        task_start(owner=alice, agent="scripted", input={"script": [good, {"final": 2}]})[0]
        for _ in range(3)
    ]
    run_until_idle(max_messages=30, wait_for_retries=False)
    statuses = {t.pk: t.status for t in AgentTask.objects.all()}
    assert {statuses[t.pk] for t in alices} == {TaskStatus.COMPLETED}
    assert {statuses[t.pk] for t in bobs} == {TaskStatus.RUNNING}
    own = owner_breaker_name(host, bob.pk)
    assert breaker_get(name=own).state == OPEN
    assert breaker_get(name=host).state == CLOSED
    waiting = [task_diagnosis(AgentTask.objects.get(pk=t.pk)) for t in bobs]
    named = [d["open_breaker"]["name"] for d in waiting if d["open_breaker"]]
    assert named and set(named) == {own}

    call_command("breakers")
    out = capsys.readouterr().out
    assert own in out
    call_command("breakers", "--close", own)
    assert breaker_get(name=own).state == CLOSED
    call_command("breakers", "--open", host)
    assert breaker_get(name=host).forced
    assert isinstance(get(run_for(alice), flaky.url("/ok")), CircuitOpen)
    assert breakers.breaker_status(host).state == OPEN
