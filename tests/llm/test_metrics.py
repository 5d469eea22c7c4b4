"""The model-call metrics on ``GET /metrics``."""

from __future__ import annotations

import pytest

from agents.services import task_start
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def value(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name)]
    assert lines, f"{name} not in the metrics"
    return float(lines[0].rsplit(" ", 1)[1])


def test_tokens_duration_and_cost_of_model_calls_are_exported(chat, user, client, settings):
    settings.LLM = {**settings.LLM, "MODELS": {"scripted": {"price": {"input": 1, "output": 1}}}}
    before = client.get("/metrics").content.decode()
    prompt = 'agents_llm_tokens_total{agent="llm",kind="prompt",model="scripted"}'
    count = 'agents_llm_request_duration_seconds_count{model="scripted"}'
    was = {name: value(before, name) if name in before else 0.0 for name in (prompt, count)}
    chat.script = [{"content": "hi"}]
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "hello"})
    run_until_idle()
    text = client.get("/metrics").content.decode()
    assert value(text, count) == was[count] + 1
    assert value(text, prompt) > was[prompt]
    assert 'agents_llm_tokens_total{agent="llm",kind="completion",model="scripted"}' in text
    assert value(text, 'agents_llm_cost_total{model="scripted"}') > 0
