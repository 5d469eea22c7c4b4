"""Issue 12, finding 2: a credential does not leak when it is transformed.

A two-line value with surrounding blanks (stored before control characters were
refused, as a legacy row), echoed by a careless server or library in each form it
takes (escaped, base64, URL-encoded, reversed, stripped, one line of it), in a result
and in an error, never shows in the audit trail, checkpoints, dead letters, the API,
``audit --json``, the admin or the log.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from agents_project.errors import InvalidInput
from agents_project.logs import formatter
from audit.models import AuditEvent, DeadLetter
from tests.api.conftest import token_client
from tests.helpers import run_until_idle
from tests.tools.session_tools import ECHO_FORMS, echo_form
from tools.credentials import credential_encrypt, credential_set
from tools.models import Credential

pytestmark = pytest.mark.django_db(transaction=True)

MASK = "[redacted]"
# Legacy: a value with a CR LF between two lines and blanks around it.
SECRET = "  sk-line-one-0a1b2c3d\r\nsk-line-two-4e5f6a7b  "


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def _legacy_credential(user) -> None:
    Credential.objects.create(
        owner=user, name="api_key", ciphertext=credential_encrypt(SECRET), hosts=["*"]
    )


def _leaked_pieces(form: str) -> set[str]:
    shown = echo_form(form, SECRET)
    return {piece.strip() for piece in shown.splitlines() if len(piece.strip()) >= 6}


def _everything_shown(user, admin_client, tasks: list[AgentTask]) -> dict[str, str]:
    api = token_client(user)
    api_text = ""
    for task in tasks:
        for url in (
            f"/api/tasks/{task.pk}/",
            f"/api/tasks/{task.pk}/audit/",
            f"/api/tasks/{task.pk}/checkpoints/",
        ):
            response = api.get(url)
            assert response.status_code == 200, url
            api_text += response.content.decode()
    api_text += api.get("/api/dead-letters/").content.decode()
    command = io.StringIO()
    for task in tasks:
        call_command("audit", str(task.pk), "--json", stdout=command)
    admin = ""
    for task in tasks:
        admin += admin_client.get(
            reverse("admin:agents_agenttask_change", args=[task.pk])
        ).content.decode()
    for letter in DeadLetter.objects.all():
        admin += admin_client.get(
            reverse("admin:audit_deadletter_change", args=[letter.pk])
        ).content.decode()
    database = json.dumps(
        {
            "checkpoints": list(Checkpoint.objects.values("state", "observations")),
            "audit": list(AuditEvent.objects.values("payload")),
            "dead_letters": list(DeadLetter.objects.values("error", "traceback", "message")),
            "tasks": list(AgentTask.objects.values("input", "result", "error")),
        },
        default=str,
    )
    return {
        "database": database,
        "api": api_text,
        "audit --json": command.getvalue(),
        "admin": admin,
    }


@pytest.mark.parametrize("form", ECHO_FORMS)
def test_a_transformed_credential_is_masked_everywhere(user, admin_client, log_output, form):
    from tests.tools import session_tools  # noqa: F401  (registers session.echo)

    _legacy_credential(user)
    tasks = [
        task_start(
            owner=user,
            agent="scripted",
            input={"script": [{"tool": "session.echo", "args": {"form": form, "fail": fail}}]},
        )[0]
        for fail in (False, True)
    ]
    with override_settings(AGENTS={**settings.AGENTS, "MAX_RETRIES": 0}):
        run_until_idle()
    statuses = sorted(AgentTask.objects.values_list("status", flat=True))
    assert statuses == sorted([TaskStatus.COMPLETED, TaskStatus.DEAD_LETTERED])
    shown = _everything_shown(user, admin_client, tasks)
    shown["log"] = log_output.getvalue()
    assert "upstream echoed" in shown["log"]
    for place, text in shown.items():
        for piece in _leaked_pieces(form):
            assert piece not in text, f"{form} form leaked into the {place}"
    assert MASK in shown["database"] and MASK in shown["api"] and MASK in shown["log"]


def test_a_two_line_bearer_refused_by_httpx_does_not_leak_through_its_error(
    user, admin_client, log_output, flaky, loopback_allowed
):
    _legacy_credential(user)
    task, _ = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"tool": "http.get", "args": {"url": flaky.url(), "bearer": "api_key"}}]},
    )
    with override_settings(AGENTS={**settings.AGENTS, "MAX_RETRIES": 0}):
        run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.DEAD_LETTERED
    shown = _everything_shown(user, admin_client, [task])
    shown["log"] = log_output.getvalue()
    pieces = {SECRET.strip(), *(line.strip() for line in SECRET.splitlines())}
    pieces.add(repr(SECRET)[1:-1].strip())
    for place, text in shown.items():
        for piece in pieces:
            assert piece not in text, f"leaked into the {place}"
    assert flaky.requests == []


@pytest.mark.parametrize(
    "value",
    [
        "line-one-value\nline-two-value",
        "carriage\rreturn-value",
        "tab\tseparated-value",
        "nul\x00character-value",
        "escape\x1b[31m-value",
        "delete\x7fcharacter",
        "next-line\x85character",
        " leading-blank-value",
        "trailing-blank-value ",
    ],
)
def test_values_with_control_characters_or_surrounding_blanks_are_refused(user, value):
    with pytest.raises(InvalidInput) as refused:
        credential_set(owner=user, name="api_key", value=value, any_host=True, actor="test")
    assert refused.value.field == "value"
    assert value.strip() not in refused.value.message
    err = io.StringIO()
    with pytest.raises(Exception, match="value"):
        call_command(
            "credentials",
            "set",
            "--owner",
            user.username,
            "--name",
            "k",
            stdin=io.StringIO(value + "\n"),
            stderr=err,
        )
    assert not Credential.objects.exists()
