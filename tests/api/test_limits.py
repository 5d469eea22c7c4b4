"""Issue 12, findings 6 and 8: deep nesting, sizes and numbers are a 400 naming the field,
never a 500, and nothing is half-created; log lines stay bounded."""

from __future__ import annotations

import io
import json
import logging

import pytest

from agents.models import AgentTask
from agents.services import task_start
from agents_project.errors import InvalidInput
from agents_project.logs import MAX_LINE, formatter
from agents_project.redaction import redact
from tests.api.factories import waiting_for_event

pytestmark = pytest.mark.django_db(transaction=True)


def nested_text(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def nested_value(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def post_raw(api, path: str, body: str):
    return api.generic("POST", path, body.encode(), content_type="application/json")


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [65, 500, 10_000, 100_000])
def test_deep_input_is_a_400_naming_the_field(api, depth, kind):
    body = '{"agent": "scripted", "input": {"script": [{"final": ' + nested_text(depth, kind)
    body += "}]}}"
    response = post_raw(api, "/api/tasks/", body)
    assert response.status_code == 400, response.content[:300]
    assert response["Content-Type"] == "application/json"
    assert response.json()["field"].startswith("input.script[0].final")
    assert "AGENTS_MAX_JSON_DEPTH" in response.json()["detail"]
    assert AgentTask.objects.count() == 0


def test_a_deep_body_of_any_shape_is_a_400(api):
    response = post_raw(api, "/api/tasks/", nested_text(100_000, "list"))
    assert response.status_code == 400
    assert response.json()["field"].startswith("body[0][0]")


def test_nesting_at_the_limit_is_accepted(api):
    # The body is one object around input, input one around script...: 60 levels inside.
    final = json.loads(nested_text(58, "list"))
    response = api.post(
        "/api/tasks/",
        {"agent": "scripted", "input": {"script": [{"final": final}]}},
        format="json",
    )
    assert response.status_code == 201, response.json()


def test_a_deep_signal_payload_is_a_400_naming_payload(api, user):
    task = waiting_for_event(user)
    body = '{"name": "paid", "payload": ' + nested_text(5000, "object") + "}"
    response = post_raw(api, f"/api/tasks/{task.pk}/signal/", body)
    assert response.status_code == 400
    assert response.json()["field"].startswith("payload")


def test_the_service_refuses_deep_values_without_recursion(user):
    with pytest.raises(InvalidInput) as refused:
        task_start(
            owner=user, agent="scripted", input={"script": [{"final": nested_value(100_000)}]}
        )
    assert refused.value.field == "input"
    assert AgentTask.objects.count() == 0


def test_redaction_walks_any_depth():
    masked = redact({"a": nested_value(200_000), "token": "x"}, secrets=["sk-secret-value"])
    assert masked["token"] == "[redacted]"


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"sleep": 1e300}, "input.script[0].sleep"),
        ({"wait": 1e300}, "input.script[0].wait"),
        ({"wait": 10**400}, "input.script[0].wait"),
        ({"wait": -1}, "input.script[0].wait"),
        ({"sleep": 86401}, "input.script[0].sleep"),
        ({"approval": "ok?", "timeout": 1e300}, "input.script[0].timeout"),
        ({"wait_event": "x", "timeout": -5}, "input.script[0].timeout"),
        ({"fail": "x", "times": 10**30}, "input.script[0].times"),
    ],
)
def test_numbers_a_script_gives_are_bounded(api, entry, field):
    response = api.post(
        "/api/tasks/", {"agent": "scripted", "input": {"script": [entry]}}, format="json"
    )
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field
    assert AgentTask.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        '{"agent": "scripted", "input": {"script": [{"sleep": 1e400}]}}',
        '{"agent": "scripted", "input": {"script": [{"final": 1}]}, "timeout_seconds": 1e300}',
        '{"agent": "scripted", "input": {"script": [{"final": 1' + "0" * 5000 + "}]}}",
    ],
)
def test_numbers_out_of_range_are_400_not_500(api, body):
    response = post_raw(api, "/api/tasks/", body)
    assert response.status_code == 400, response.content[:300]
    assert AgentTask.objects.count() == 0


def test_log_lines_are_bounded():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    logger = logging.getLogger("tests.limits")
    logger.addHandler(handler)
    try:
        logger.warning("huge %s", "x" * 1_000_000)
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().rstrip("\n")
    assert len(line) < MAX_LINE + 100
    assert "more characters]" in line
