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


def test_suggest_timeouts_reports_percentiles_and_applies_them(user):
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
