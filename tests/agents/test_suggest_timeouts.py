"""Limits learned from the observed distribution of durations."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from agents.core.dispatch import step_time_limits
from agents.definition import _REGISTRY, Agent, Finish, register
from agents.models import LearnedLimit
from agents.services import task_start
from agents.timeouts import duration_report, recommend
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def test_recommend_follows_the_tail_with_headroom_and_a_floor():
    assert recommend(0.01) == 1.0
    assert recommend(2.0) == 3.0
    assert recommend(40.0) == 60


def test_suggest_timeouts_reports_percentiles_and_applies_them(user, settings):
    settings.AGENTS = {**settings.AGENTS, "LEARN_MIN_SAMPLES": 9}
    script = [{"sleep": 0.05}, {"sleep": 0.05}, {"final": "ok"}]
    for _ in range(8):
        task_start(owner=user, agent="scripted", input={"script": script})
    task_start(owner=user, agent="scripted", input={"script": [{"sleep": 0.4}, {"final": 1}]})
    run_until_idle()

    rows = {row.kind: row for row in duration_report(agents=["scripted"])}
    cont = rows["continue"]
    assert cont.samples == 17
    assert 0.045 <= cont.p50 <= 0.2
    assert cont.p50 <= cont.p95 <= cont.p99 <= 0.6
    assert rows["(whole task)"].samples == 9

    out = StringIO()
    call_command("suggest_timeouts", "--agent", "scripted", "--apply", stdout=out)
    text = out.getvalue()
    assert "p99" in text and "continue" in text and "stored scripted" in text
    stored = LearnedLimit.objects.get(agent_name="scripted")
    assert stored.step_time_limit == max(
        r.recommended for k, r in rows.items() if k != "(whole task)"
    )

    class OptedIn(Agent):
        name = "scripted"  # reads the limits learned for "scripted"
        learned_limits = True

        def step(self, ctx):
            return Finish(result=None)

    original = _REGISTRY["scripted"]
    try:
        register(OptedIn)
        soft, hard = step_time_limits(_REGISTRY["scripted"])
        assert hard == stored.step_time_limit and soft == pytest.approx(hard * 0.8)
        assert step_time_limits(original) != (soft, hard), "agents that did not opt in keep theirs"
    finally:
        _REGISTRY["scripted"] = original


def test_nothing_is_stored_from_fewer_samples_than_the_minimum(user, settings):
    settings.AGENTS = {**settings.AGENTS, "LEARN_MIN_SAMPLES": 50}
    for _ in range(3):
        task_start(owner=user, agent="scripted", input={"script": [{"final": "ok"}]})
    run_until_idle()
    out = StringIO()
    call_command("suggest_timeouts", "--agent", "scripted", "--apply", stdout=out)
    assert "not stored scripted: 3 finished steps, at least 50 needed" in out.getvalue()
    assert not LearnedLimit.objects.filter(agent_name="scripted").exists()


def test_a_tasks_duration_leaves_out_the_time_it_waited_for_a_person(user):
    from datetime import timedelta

    from agents.models import AgentTask, Suspension

    approval = [{"approval": "ok?"}, {"final": "done"}]
    task, _ = task_start(owner=user, agent="scripted", input={"script": approval})
    run_until_idle()
    wait = Suspension.objects.get(task=task)
    # The person took an hour to answer.
    Suspension.objects.filter(pk=wait.pk).update(created_at=wait.created_at - timedelta(hours=1))
    AgentTask.objects.filter(pk=task.pk).update(created_at=task.created_at - timedelta(hours=1))
    call_command("approve", str(task.pk))
    run_until_idle()
    (whole,) = [r for r in duration_report(agents=["scripted"]) if r.kind == "(whole task)"]
    assert whole.samples == 1
    assert whole.p99 < 60, whole
