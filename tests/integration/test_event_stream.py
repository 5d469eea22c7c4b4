"""``GET /api/tasks/{id}/events/`` as a real client sees it: an ASGI server (uvicorn, the
production command) started on a free loopback port against this test's database, a
real worker running the task, and an SSE client (httpx + httpx-sse) that disconnects
twice mid-stream and resumes, once with the ``Last-Event-ID`` header and once with the
``last_event_id`` query parameter, without losing or repeating an event."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from rest_framework.authtoken.models import Token

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import tail, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
# Long enough steps that the task is still running while the client comes and goes.
SCRIPT = [
    {"think": "plan"},
    {"sleep": 0.3},
    {"tool": "calc", "args": {"expression": "6 * 7"}},
    {"sleep": 0.3},
    {"think": "check"},
    {"tool": "ledger.append", "args": {"key": "k", "value": 1}},
    {"sleep": 0.3},
    {"think": "almost"},
    {"sleep": 0.3},
    {"final": "done"},
]


def _read(
    client: httpx.Client, url: str, *, headers: dict[str, str], stop_after: int | None
) -> tuple[list[tuple[int, str, dict]], dict | None]:
    """Events read from one connection: (id, type, data) until ``stop_after`` of them
    (then the client hangs up), or until the server ends the stream (its ``end`` data)."""
    got: list[tuple[int, str, dict]] = []
    with connect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if not sse.data:
                continue  # "retry:" or a keep-alive comment: the SSE spec dispatches nothing
            if sse.event == "end":
                return got, sse.json()
            got.append((int(sse.id), sse.event, sse.json()))
            if stop_after is not None and len(got) >= stop_after:
                return got, None  # leaving the block closes the connection mid-stream
    return got, None


def test_a_client_that_disconnects_resumes_without_losing_or_repeating_an_event(
    workers, asgi_server, user
):
    token = Token.objects.create(user=user)
    auth = {"Authorization": f"Token {token.key}"}
    workers.start(concurrency=1)
    task, _ = task_start(owner=user, agent="scripted", input={"script": SCRIPT})
    url = f"{asgi_server.url}/api/tasks/{task.pk}/events/"
    received: list[tuple[int, str, dict]] = []
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        # 1. From the start; hang up after four events, while the task runs.
        first, end = _read(client, url, headers=auth, stop_after=4)
        assert end is None and len(first) == 4
        received += first
        # Events keep coming while nobody listens.
        wait_until(
            lambda: AuditEvent.objects.filter(task=task, seq__gt=received[-1][0] + 3).exists(),
            timeout=60,
        )
        # 2. Resume with the header EventSource sends; hang up again after three.
        second, end = _read(
            client, url, headers={**auth, "Last-Event-ID": str(received[-1][0])}, stop_after=3
        )
        assert end is None and len(second) == 3
        received += second
        # 3. Resume with the query parameter (and no header), to the end of the task.
        third, end = _read(
            client, f"{url}?last_event_id={received[-1][0]}", headers=auth, stop_after=None
        )
        received += third
        # 4. Nothing after the last event of an ended task: 204, which stops EventSource.
        after_end = client.get(url, headers={**auth, "Last-Event-ID": str(received[-1][0])})

    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED, task.error
    assert end == {"status": "completed", "last_event_id": task.audit_seq}
    ids = [seq for seq, _, _ in received]
    assert ids == list(range(1, task.audit_seq + 1)), "every event once, in order"
    trail = {e.seq: e for e in AuditEvent.objects.filter(task=task)}
    for seq, event_type, data in received:
        assert event_type == trail[seq].type == data["type"]
        assert data["seq"] == seq and data["payload"] == trail[seq].payload
    assert [t for _, t, _ in received].count("step") == len(SCRIPT)
    assert after_end.status_code == 204
    assert "Traceback" not in asgi_server.log.read_text(errors="replace"), tail(asgi_server.log)


def test_the_stream_keeps_the_api_rules(asgi_server, user, other_user):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
    mine = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    theirs = {"Authorization": f"Token {Token.objects.create(user=other_user).key}"}
    url = f"{asgi_server.url}/api/tasks/{task.pk}/events/"
    sse = {"Accept": "text/event-stream"}
    with httpx.Client(timeout=10) as client:
        anonymous = client.get(url)
        other = client.get(url, headers={**theirs, "Accept": "application/json"})
        other_sse = client.get(url, headers={**theirs, **sse})
        bad = client.get(url, headers={**mine, "Last-Event-ID": "x1"})
        bad_query = client.get(f"{url}?last_event_id=-3", headers=mine)
    assert anonymous.status_code == 401
    assert other.status_code == 404 and other.json()["error"] == "not_found"
    assert other_sse.status_code == 404
    assert bad.status_code == 400 and bad.json()["field"] == "Last-Event-ID"
    assert bad_query.status_code == 400 and bad_query.json()["field"] == "last_event_id"
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.PENDING
