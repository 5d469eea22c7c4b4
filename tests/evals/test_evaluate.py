"""``manage.py evaluate``: cases through the real engine, graded, against a baseline.

The model is the loopback chat server (real HTTP, the OpenAI wire format); it answers
by the system prompt it is sent, so a "careless" prompt gets worse answers and a
"JSON" prompt better ones. Replies are recorded with ``--live`` and then replayed with
the server stopped: the replayed runs cannot have reached any model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agents.models import AgentTask
from llm.testing.chat_server import ChatServer, first_user_text

pytestmark = pytest.mark.django_db(transaction=True)

CAREFUL = "You are careful. Use calc for arithmetic."
CARELESS = "You are careless. Guess."
BETTER = "You are careful. Use calc for arithmetic. When asked for JSON, reply with JSON only."

LLM_CASES = [
    {
        "id": "sum",
        "input": {"prompt": "add 2 and 3", "system": CAREFUL, "tools": ["calc"]},
        "expect": {
            "answer_contains": "5",
            "tools_called": ["calc"],
            "max_steps": 3,
            "max_tokens": 5000,
            "max_cost": 0.01,
        },
    },
    {
        "id": "capital",
        "input": {"prompt": "the capital of France?", "system": CAREFUL},
        "expect": {"answer_matches": r"\bParis\b", "max_steps": 1},
    },
    {
        "id": "json",
        "input": {"prompt": "give JSON with the name Ada", "system": CAREFUL},
        "expect": {"answer_matches": r'^\{"name": "Ada"\}$'},
    },
]

SCRIPTED_CASES = [
    {
        "id": "calc-then-final",
        "input": {"script": [{"tool": "calc", "args": {"expression": "6*7"}}, {"final": "42"}]},
        "expect": {
            "answer_equals": "42",
            "tools_called": ["calc"],
            "max_steps": 2,
            "result_schema": {"type": "string"},
            "python": {"path": "tests.evals.graders.steps_at_most", "arg": 2},
        },
    },
    {
        "id": "set-of-tools",
        "input": {
            "script": [
                {"tool": "calc", "args": {"expression": "1+1"}},
                {"tool": "ledger.append", "args": {"key": "k", "value": 2}},
            ]
        },
        "expect": {"tools_called": {"set": ["ledger.append", "calc"]}, "result_schema": {}},
    },
]


def careful_model(body: dict[str, Any]) -> dict[str, Any]:
    """The stand-in model: what it answers depends on the prompt it is given."""
    messages = body["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    prompt = first_user_text(body)
    tool_results = [m for m in messages if m["role"] == "tool"]
    if "add 2 and 3" in prompt:
        if "careless" in system:
            return {"content": "about 6"}
        if not tool_results:
            return {"tool_calls": [{"name": "calc", "arguments": {"expression": "2+3"}}]}
        return {"content": f"the sum is {tool_results[-1]['content']}"}
    if "capital" in prompt:
        return {"content": "Paris"}
    if "JSON" in prompt:
        return {"content": '{"name": "Ada"}' if "JSON only" in system else "The name is Ada."}
    return {"content": "?"}


def write_cases(path: Path, cases: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


def evaluate(*args: Any) -> tuple[int, str]:
    """Run the command; (exit status, terminal output)."""
    from io import StringIO

    out = StringIO()
    try:
        call_command("evaluate", *[str(a) for a in args], stdout=out)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


@pytest.fixture
def model(settings):
    server = ChatServer(responder=careful_model)
    with server.running():
        settings.LLM = {
            **settings.LLM,
            "BASE_URL": server.url,
            "MODEL": "stand-in",
            "API_KEY": "",
            "MODELS": {"stand-in": {"price": {"input": 1.0, "output": 2.0}}},
            "OWNER_DAILY_TOKENS": 0,
            "TIMEOUT": 10.0,
        }
        yield server


def test_a_worse_prompt_regresses_and_a_better_one_does_not(model, settings, tmp_path):
    cases = write_cases(tmp_path / "llm.jsonl", LLM_CASES)
    recording = tmp_path / "llm.recording.json"
    base, worse, better = tmp_path / "base.json", tmp_path / "worse.json", tmp_path / "better.json"

    # Record the replies to the current prompt and to the two candidates.
    status, out = evaluate(cases, "--agent", "llm", "--live", "--save-baseline", base)
    assert status == 0, out
    saved = json.loads(base.read_text())
    assert {c["id"]: c["passed"] for c in saved["cases"]} == {
        "sum": True,
        "capital": True,
        "json": False,
    }
    sum_case = next(c for c in saved["cases"] if c["id"] == "sum")
    assert sum_case["tools"] == ["calc"] and sum_case["steps"] == 2 and sum_case["tokens"] > 0
    assert sum_case["cost"] > 0
    for system in (CARELESS, BETTER):
        evaluate(cases, "--agent", "llm", "--live", "--override", json.dumps({"system": system}))
    live_requests = model.count()
    model.stop()
    settings.LLM = {**settings.LLM, "BASE_URL": "", "MODEL": ""}

    # Replayed, with no model reachable: the same as recorded.
    status, out = evaluate(cases, "--agent", "llm", "--replay", "--baseline", base)
    assert status == 0, out
    assert "0 regression(s)" in out

    status, out = evaluate(
        cases,
        "--agent", "llm", "--replay", "--baseline", base, "--report", worse,
        "--override", json.dumps({"system": CARELESS}),
    )  # fmt: skip
    assert status == 1, out
    report = json.loads(worse.read_text())
    assert report["baseline"]["regressions"] == ["sum"]
    assert "REGRESSION" in out and "sum" in out
    failed = next(c for c in report["cases"] if c["id"] == "sum")
    assert {g["grader"] for g in failed["grades"] if not g["passed"]} == {
        "answer_contains",
        "tools_called",
    }
    assert report["baseline"]["cases"]["sum"]["tokens_delta"] < 0

    status, out = evaluate(
        cases,
        "--agent", "llm", "--replay", "--baseline", base, "--report", better,
        "--override", json.dumps({"system": BETTER}),
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(better.read_text())
    assert report["baseline"]["regressions"] == []
    assert report["baseline"]["fixes"] == ["json"]
    assert model.count() == live_requests
    assert recording.exists()


def test_replay_refuses_a_request_it_has_not_recorded(tmp_path):
    cases = write_cases(tmp_path / "llm.jsonl", LLM_CASES[1:2])
    status, out = evaluate(cases, "--agent", "llm", "--replay")
    assert status == 1
    assert "no recorded reply for case 'capital' step 1" in out


def test_the_scripted_agent_against_its_baseline(tmp_path):
    cases = write_cases(tmp_path / "scripted.jsonl", SCRIPTED_CASES)
    base = tmp_path / "base.json"
    status, out = evaluate(cases, "--agent", "scripted", "--save-baseline", base)
    assert status == 0, out
    saved = json.loads(base.read_text())
    assert [c["passed"] for c in saved["cases"]] == [True, True], out
    assert AgentTask.objects.filter(owner__username="evaluation").count() == 2

    status, out = evaluate(cases, "--agent", "scripted", "--baseline", base)
    assert status == 0, out

    worse = [dict(SCRIPTED_CASES[0], input={"script": [{"final": "41"}]}), SCRIPTED_CASES[1]]
    status, out = evaluate(write_cases(tmp_path / "worse.jsonl", worse), "--agent", "scripted",
                           "--baseline", base)  # fmt: skip
    assert status == 1
    assert "calc-then-final: answer_equals: answer was '41'" in out


def test_bad_cases_are_refused_naming_the_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input": {}, "expect": {"answer_matches": "("}}\n')
    with pytest.raises(CommandError, match=r"line 1.expect.answer_matches"):
        call_command("evaluate", str(bad), "--agent", "scripted")
    bad.write_text('{"id": "a", "input": {}, "expect": {"max_steps": "3"}}\n')
    with pytest.raises(CommandError, match=r"line 1.expect.max_steps: must be an integer"):
        call_command("evaluate", str(bad), "--agent", "scripted")
    bad.write_text('{"id": "a", "input": {"script": [{"final": 1}]}}\n')
    with pytest.raises(CommandError, match=r"version: this code has 'scripted' version"):
        call_command("evaluate", str(bad), "--agent", "scripted", "--version", "9")
