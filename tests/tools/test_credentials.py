"""Credentials: encrypted at rest, scoped to an owner or a task, masked wherever they go."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from secrets import token_hex

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection

from agents.errors import RetryableError
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from agents_project.errors import InvalidInput, NotFound
from agents_project.logs import formatter
from audit.models import AuditEvent, DeadLetter
from tests.api.conftest import token_client
from tests.helpers import run_until_idle
from tests.tools import session_tools  # noqa: F401  (registers the session.* tools)
from tests.tools.session_tools import digest
from tools.credentials import credential_delete, credential_set, credentials_for_task
from tools.credentials import credentials_rotate as rotate
from tools.models import Credential

MASK = "[redacted]"


def start(user, *script) -> AgentTask:
    task, _ = task_start(owner=user, agent="scripted", input={"script": list(script)})
    return task


@pytest.mark.django_db
def test_a_credential_is_encrypted_at_rest_and_seen_only_by_its_owners_tasks(user, other_user):
    alice_key, bob_key, task_key = (f"sk-{token_hex(16)}" for _ in range(3))
    credential_set(owner=user, name="api_key", value=alice_key, any_host=True, actor="test")
    credential_set(owner=other_user, name="api_key", value=bob_key, any_host=True, actor="test")
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM tools_credential")
        stored = repr(cursor.fetchall())
    assert alice_key not in stored and bob_key not in stored

    first, second = start(user, {"final": 1}), start(user, {"final": 2})
    credential_set(
        owner=user, name="api_key", value=task_key, task_id=first.pk, any_host=True, actor="test"
    )
    credential_set(
        owner=user,
        name="only_first",
        value="x-first-secret",
        task_id=first.pk,
        any_host=True,
        actor="test",
    )
    assert credentials_for_task(task_id=first.pk, owner_id=user.pk) == {
        "api_key": task_key,  # the task's own wins over its owner's
        "only_first": "x-first-secret",
    }
    assert credentials_for_task(task_id=second.pk, owner_id=user.pk) == {"api_key": alice_key}
    bobs = start(other_user, {"final": 3})
    assert credentials_for_task(task_id=bobs.pk, owner_id=other_user.pk) == {"api_key": bob_key}
    # Even naming another owner's task, a task never gets that owner's credentials.
    assert credentials_for_task(task_id=first.pk, owner_id=other_user.pk) == {"api_key": bob_key}


@pytest.mark.django_db
def test_bad_credentials_are_refused_naming_the_field(user, other_user):
    with pytest.raises(InvalidInput) as bad_name:
        credential_set(owner=user, name="has space", value="v", actor="test")
    assert bad_name.value.field == "name"
    for value in ("", "short", 42):
        with pytest.raises(InvalidInput) as bad_value:
            credential_set(owner=user, name="k", value=value, actor="test")
        assert bad_value.value.field == "value"
    bobs = start(other_user, {"final": 1})
    with pytest.raises(NotFound):
        credential_set(
            owner=user, name="k", value="long-enough", task_id=bobs.pk, any_host=True, actor="test"
        )
    with pytest.raises(NotFound):
        credential_delete(owner=user, name="k", actor="test")
    assert not Credential.objects.exists()


@pytest.mark.django_db
def test_keys_rotate_and_a_lost_key_is_reported_without_the_value(user, settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.AGENTS = {**settings.AGENTS, "CREDENTIALS_KEYS": [old]}
    credential_set(owner=user, name="api_key", value="the-value-123", any_host=True, actor="test")
    task = start(user, {"final": 1})
    settings.AGENTS = {**settings.AGENTS, "CREDENTIALS_KEYS": [new, old]}
    assert rotate(actor="test") == 1
    settings.AGENTS = {**settings.AGENTS, "CREDENTIALS_KEYS": [new]}
    assert credentials_for_task(task_id=task.pk, owner_id=user.pk) == {"api_key": "the-value-123"}
    settings.AGENTS = {**settings.AGENTS, "CREDENTIALS_KEYS": [old]}
    with pytest.raises(RetryableError) as lost:
        credentials_for_task(task_id=task.pk, owner_id=user.pk)
    assert "the-value-123" not in str(lost.value)


def test_production_refuses_to_start_without_a_credentials_key():
    env = {k: v for k, v in os.environ.items() if k != "AGENTS_CREDENTIALS_KEY"}
    code = "import django; django.setup()"
    refused = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **env,
            "AGENTS_ENVIRONMENT": "production",
            "DJANGO_SETTINGS_MODULE": "agents_project.settings",
        },
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "AGENTS_CREDENTIALS_KEY must be set in production" in refused.stderr
    started = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **env,
            "AGENTS_ENVIRONMENT": "production",
            "AGENTS_CREDENTIALS_KEY": Fernet.generate_key().decode(),
            "DJANGO_SECRET_KEY": "x7" * 30 + "abcdef",
            "AGENTS_METRICS_TOKEN": "scrape-token",
            "AGENTS_AUDIT_KEY": "an-audit-key-for-tests-0123456789abcdef",
            "DJANGO_SETTINGS_MODULE": "agents_project.settings",
        },
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stderr


@pytest.mark.django_db
def test_the_credentials_command_reads_the_value_from_stdin_and_never_prints_it(user, capsys):
    secret = f"sk-{token_hex(16)}"
    call_command(
        "credentials",
        "set",
        "--owner",
        "alice",
        "--name",
        "api_key",
        "--host",
        "api.example.com",
        stdin=io.StringIO(secret + "\n"),
    )
    task = start(user, {"final": 1})
    assert credentials_for_task(task_id=task.pk, owner_id=user.pk) == {"api_key": secret}
    call_command("credentials", "list")
    out = capsys.readouterr().out
    assert "api_key" in out and "alice" in out and secret not in out
    call_command("credentials", "delete", "--owner", "alice", "--name", "api_key")
    assert not Credential.objects.exists()
    with pytest.raises(CommandError, match="no user"):
        call_command(
            "credentials", "set", "--owner", "nobody", "--name", "k", stdin=io.StringIO("v")
        )


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What the project's log handler writes (its formatter), captured from the root logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


@pytest.mark.django_db(transaction=True)
def test_a_credential_never_reaches_checkpoints_audit_dead_letters_the_api_or_logs(
    user, flaky, log_output, fast_retries, loopback_allowed
):
    secret = f"sk-{token_hex(16)}"
    credential_set(owner=user, name="api_key", value=secret, any_host=True, actor="test")
    peeking = start(
        user,
        {"tool": "session.peek"},
        {"tool": "http.get", "args": {"url": flaky.url("/me"), "bearer": "api_key"}},
        {"final": "done"},
    )
    leaks = [
        start(user, {"tool": "session.leak", "args": {"how": how}}) for how in ("message", "str")
    ]
    run_until_idle()

    peeking.refresh_from_db()
    assert peeking.status == TaskStatus.COMPLETED
    seen = Checkpoint.objects.get(task=peeking, step=1).observations["tool_results"][0]["value"]
    assert seen["names"] == ["api_key"]
    assert seen["digests"] == [["api_key", digest(secret)]]
    assert seen["raw"] == MASK
    assert flaky.requests[0].authorization == f"Bearer {secret}", "the tool did get the secret"

    for task in leaks:
        task.refresh_from_db()
        assert task.status == TaskStatus.DEAD_LETTERED
    letters = DeadLetter.objects.filter(task__in=leaks)
    assert letters.count() == 2
    assert all(MASK in letter.error for letter in letters)

    everything = json.dumps(
        {
            "checkpoints": list(Checkpoint.objects.values("state", "observations")),
            "audit": list(AuditEvent.objects.values("payload")),
            "dead_letters": list(DeadLetter.objects.values("error", "traceback", "message")),
            "tasks": list(AgentTask.objects.values("input", "result", "error")),
        },
        default=str,
    )
    assert secret not in everything
    assert MASK in everything
    api = token_client(user)
    responses = [
        api.get(url)
        for task in (peeking, *leaks)
        for url in (
            f"/api/tasks/{task.pk}/",
            f"/api/tasks/{task.pk}/audit/",
            f"/api/tasks/{task.pk}/checkpoints/",
        )
    ] + [api.get("/api/dead-letters/")]
    assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses]
    served = "".join(r.content.decode() for r in responses)
    assert secret not in served
    assert MASK in served
    logs = log_output.getvalue()
    assert "session.peek read a credential" in logs and "session.peek sending key" in logs
    assert secret not in logs
    assert MASK in logs


@pytest.mark.django_db
def test_the_admin_lists_credentials_without_their_values(admin_client, user):
    secret = f"sk-{token_hex(16)}"
    credential = credential_set(
        owner=user, name="api_key", value=secret, any_host=True, actor="test"
    )
    listing = admin_client.get("/admin/tools/credential/")
    detail = admin_client.get(f"/admin/tools/credential/{credential.pk}/change/")
    for response in (listing, detail):
        assert response.status_code == 200
        page = response.content.decode()
        assert "api_key" in page
        assert secret not in page
        assert credential.ciphertext not in page
    assert admin_client.get("/admin/tools/credential/add/").status_code == 403


@pytest.mark.django_db
def test_a_step_calling_only_tools_that_read_no_credentials_does_not_load_them(user):
    """``calc`` declares ``credentials=False``: its calls neither read nor decrypt the
    task's credentials; a tool that may read them (the default) loads them once."""
    import uuid

    from django.test.utils import CaptureQueriesContext

    from agents.definition import ToolCall
    from tools.runner import ToolRun, tools_run

    credential_set(
        owner=user, name="api_key", value="s3cret-" + token_hex(8), any_host=True, actor="test"
    )

    def credential_reads(calls: list[ToolCall]) -> int:
        run = ToolRun(task_id=uuid.uuid4(), owner_id=user.pk, step=1, events=[])
        with CaptureQueriesContext(connection) as queries:
            results = tools_run(run, calls)
        assert all(r.ok for r in results), results
        return sum('FROM "tools_credential"' in q["sql"] for q in queries.captured_queries)

    assert credential_reads([ToolCall("calc", {"expression": "6*7"})]) == 0
    assert credential_reads([ToolCall("session.peek", {})]) == 1
