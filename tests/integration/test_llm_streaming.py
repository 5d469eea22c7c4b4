"""Token streaming on real processes: an ``llm`` task with ``"stream": true``, its reply
streamed by the scripted chat server through the real SDK, its pieces relayed live on
``GET /api/tasks/{id}/events/`` (uvicorn) as ``model_delta`` events; the recorded reply
and the ``model_call`` event exactly as without streaming. Made by a worker's pool
process, and by the model gateway."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import connect_sse
from rest_framework.authtoken.models import Token

from agents.models import TaskStatus
from audit.models import AuditEvent
from llm.models import ModelCall
from tests.helpers import wait_until
from tests.integration.llm_helpers import ended, llm_env, start

pytestmark = pytest.mark.integration

ANSWER = "the refund of 42 euros was made today"


@pytest.mark.parametrize("gateway", [False, True], ids=["in-the-worker", "through-the-gateway"])
def test_a_streamed_reply_reaches_the_event_stream_live_and_is_recorded_whole(
    workers, asgi_server, user, chat, gateway
):
    # The answer waits a little (the stream is open by then), then comes in pieces.
    chat.script = [{"content": ANSWER, "delay": 2, "chunk_delay": 0.2}]
    env = llm_env(chat, AGENTS_LLM_GATEWAY=str(gateway).lower())
    workers.start(concurrency=1, **env)
    if gateway:
        workers.start_gateway(**env)
    token = Token.objects.create(user=user)
    task = start(user, stream=True)
    url = f"{asgi_server.url}/api/tasks/{task.pk}/events/"
    seen: list[tuple[str, dict]] = []
    with (
        httpx.Client(timeout=httpx.Timeout(60.0)) as client,
        connect_sse(client, "GET", url, headers={"Authorization": f"Token {token.key}"}) as events,
    ):
        for sse in events.iter_sse():
            if not sse.data:
                continue
            if sse.event == "end":
                break
            seen.append((sse.event, sse.json()))
    done = wait_until(lambda: ended(task), timeout=60)
    assert done.status == TaskStatus.COMPLETED, done.error
    assert done.result == {"answer": ANSWER}

    deltas = [data for kind, data in seen if kind == "model_delta"]
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    assert len(deltas) >= 4
    assert "".join(d["delta"] for d in deltas) == ANSWER
    assert {d["key"] for d in deltas} == {f"{task.pk}:1:model"}
    # Live: every piece came before the reply's durable model_call event.
    kinds = [kind for kind, _ in seen]
    assert kinds.index("model_call") > max(i for i, k in enumerate(kinds) if k == "model_delta")

    # Asked once, streamed, with the usage in the last chunk; recorded whole.
    (request,) = chat.received(task=task.pk)
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    record = ModelCall.objects.get(task=task)
    assert record.response["choices"][0]["message"]["content"] == ANSWER
    assert record.finish_reason == "stop"
    assert not record.usage_estimated
    call = AuditEvent.objects.get(task=task, type="model_call")
    assert call.payload["content"] == ANSWER
    assert call.payload["reused"] is False
