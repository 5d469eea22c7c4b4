"""Issue 23, item 4: event streams cannot starve the server.

The image serves the web with uvicorn (ASGI), where an open stream holds no worker; on
top of that each user may hold ``AGENTS_EVENTS_MAX_STREAMS_PER_USER`` streams and the
deployment ``AGENTS_EVENTS_MAX_STREAMS`` (429 beyond, counted in Redis across the
server's processes), and a stream closes after its idle or absolute timeout. Under WSGI
a stream is never held: it sends what there is and closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from django.conf import settings
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.api.factories import waiting_for_approval
from tests.helpers import wait_until
from tests.integration.uvicorn import uvicorn_running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def _clear_stream_slots() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:streams:*"))
    if keys:
        client.delete(*keys)


@contextlib.contextmanager
def uvicorn_server(**env_extra: str) -> Iterator[str]:
    """The image's web command (uvicorn, two processes) on this test's database."""
    _clear_stream_slots()
    try:
        with uvicorn_running(
            "--workers", "2", "--lifespan", "off", AGENTS_EVENTS_POLL_INTERVAL="0.2", **env_extra
        ) as server:
            yield server.url
    finally:
        _clear_stream_slots()


class Streams:
    """Open event streams, held until ``close_all``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=httpx.Timeout(30.0))
        self.open: list[contextlib.ExitStack] = []
        self.readers: list[Iterator[bytes]] = []

    def start(self, token: str, task_id) -> httpx.Response:
        stack = contextlib.ExitStack()
        response = stack.enter_context(
            self.client.stream(
                "GET",
                f"{self.url}/api/tasks/{task_id}/events/",
                headers={"Authorization": f"Token {token}", "Accept": "text/event-stream"},
            )
        )
        if response.status_code == 200:
            # Kept: dropping the iterator would close the connection.
            chunks = response.iter_bytes()
            next(chunks)  # the stream has started: its slot is taken
            self.open.append(stack)
            self.readers.append(chunks)
        else:
            response.read()
            stack.close()
        return response

    def close_all(self) -> None:
        for stack in self.open:
            stack.close()
        self.open.clear()
        self.readers.clear()

    def close(self) -> None:
        self.close_all()
        self.client.close()


def _token(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


@pytest.mark.django_db(transaction=True)
def test_many_open_streams_leave_health_and_other_tenants_answered(user, other_user):
    alice, bob = _token(user), _token(other_user)
    alices_task = waiting_for_approval(user)  # its stream stays open: the task waits
    bobs_task = waiting_for_approval(other_user)
    with uvicorn_server(
        AGENTS_EVENTS_MAX_STREAMS_PER_USER="24", AGENTS_EVENTS_MAX_STREAMS="26"
    ) as url:
        streams = Streams(url)
        try:
            opened = [streams.start(alice, alices_task.pk).status_code for _ in range(24)]
            assert opened == [200] * 24
            # The 25th of one user, then the deployment's 27th, are refused, not queued.
            refused = streams.start(alice, alices_task.pk)
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
            assert "AGENTS_EVENTS_MAX_STREAMS_PER_USER" in refused.text
            assert [streams.start(bob, bobs_task.pk).status_code for _ in range(2)] == [200] * 2
            full = streams.start(bob, bobs_task.pk)
            assert full.status_code == 429 and "AGENTS_EVENTS_MAX_STREAMS)" in full.text
            # With 26 streams open, the server still answers everything else.
            with httpx.Client(timeout=10) as other:
                for _ in range(10):
                    assert other.get(f"{url}/healthz").status_code == 200
                    listed = other.get(
                        f"{url}/api/tasks/", headers={"Authorization": f"Token {bob}"}
                    )
                    assert listed.status_code == 200
                    assert [t["id"] for t in listed.json()["results"]] == [str(bobs_task.pk)]
            # Streams that end give their slots back.
            streams.close_all()
            wait_until(lambda: streams.start(alice, alices_task.pk).status_code == 200, timeout=30)
        finally:
            streams.close()


@pytest.mark.django_db(transaction=True)
def test_streams_close_at_their_idle_and_absolute_timeouts(user):
    token = _token(user)
    task = waiting_for_approval(user)
    for limits in (
        {"AGENTS_EVENTS_IDLE_SECONDS": "1", "AGENTS_EVENTS_MAX_SECONDS": "3600"},
        {"AGENTS_EVENTS_IDLE_SECONDS": "3600", "AGENTS_EVENTS_MAX_SECONDS": "1"},
    ):
        with uvicorn_server(AGENTS_EVENTS_HEARTBEAT="0.2", **limits) as url:
            with httpx.stream(
                "GET",
                f"{url}/api/tasks/{task.pk}/events/",
                headers={"Authorization": f"Token {token}"},
                timeout=30,
            ) as response:
                assert response.status_code == 200
                body = b"".join(response.iter_bytes()).decode()  # the server closes it
            assert f"id: {task.audit_seq}" in body and "event: end" not in body
            assert ": keep-alive" in body


@pytest.mark.django_db
@pytest.mark.timeout(60)
def test_a_wsgi_process_never_holds_a_stream(user):
    """Under WSGI (Django's test client), a task that waits forever still gets a
    response that ends: its events so far, then the client reconnects."""
    task = waiting_for_approval(user)
    client = APIClient()
    client.force_authenticate(user)
    with override_settings(
        AGENTS={**settings.AGENTS, "EVENTS_MAX_SECONDS": 3600, "EVENTS_IDLE_SECONDS": 3600}
    ):
        response = client.get(f"/api/tasks/{task.pk}/events/")
        assert response.status_code == 200
        body = b"".join(response.streaming_content).decode()
    assert body.startswith("retry: ") and f"id: {task.audit_seq}\n" in body
    assert "event: end" not in body
