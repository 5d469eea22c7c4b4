"""The model gateway's own rules (``llm.gateway``), in this process against real Redis;
the gateway as a process is tested in ``tests/integration/test_llm_gateway.py``."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

from agents.errors import CircuitOpen, RetryableError
from llm.client import ModelConfig
from llm.gateway import Call, Gateway
from tools.breakers import force_close

HELLO = [{"role": "user", "content": "hello"}]


def test_the_failure_that_opens_the_breaker_ends_the_call_as_circuit_open(settings):
    # As a call in a worker does (tests/llm/test_client.py): the step then waits for the
    # breaker without spending an attempt, even when its next try comes after the
    # reset timeout (a trial call).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: connections are refused
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": 2, "BREAKER_RESET_TIMEOUT": 30}
    config = ModelConfig(name="m", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)
    force_close(config.breaker, actor="test")
    transitions: list = []

    async def three_calls() -> list[BaseException]:
        gateway = Gateway(node="test-gateway")
        errors = []
        try:
            for n in range(3):
                call = Call(
                    task_id=uuid.uuid4(),
                    step=1,
                    fence=1,
                    payload={"key": f"k:{n}", "messages": HELLO, "deadline": time.time() + 30},
                    message=None,  # type: ignore[arg-type]
                )
                try:
                    await gateway._request(call, config, "", transitions)
                except RetryableError as exc:
                    errors.append(exc)
        finally:
            for client in gateway.clients.values():
                await client.close()
            gateway.db_pool.shutdown(wait=True)
        return errors

    try:
        first, second, third = asyncio.run(three_calls())
    finally:
        force_close(config.breaker, actor="test")
    assert not isinstance(first, CircuitOpen)
    assert isinstance(second, CircuitOpen) and "opened after" in str(second)
    assert isinstance(third, CircuitOpen)
    assert [t.to_state for t in transitions] == ["open"]
