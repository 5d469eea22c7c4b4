"""Agents that only the integration tests need, loaded into their workers with
``AGENTS_MODULES=tests.integration.agents_for_tests``."""

from __future__ import annotations

import os
import time

from celery.exceptions import SoftTimeLimitExceeded

from agents.definition import (
    Agent,
    CallTools,
    Continue,
    Finish,
    StepContext,
    ToolCall,
    register,
)
from agents.scripted import Scripted
from tools.registry import Arg, tool


@register
class Careful(Agent):
    """On the soft time limit, keeps what it has and moves on."""

    name = "careful"

    def initial_state(self, input):
        return {"done": 0}

    def step(self, ctx: StepContext):
        if ctx.step > 1:
            return Finish(result=ctx.state)
        done = 0
        try:
            for _ in range(100):
                time.sleep(0.1)
                done += 1
        except SoftTimeLimitExceeded:
            return Continue(state={"done": done, "cut_short": True})
        return Continue(state={"done": done, "cut_short": False})


@register
class Stubborn(Agent):
    """Ignores the soft time limit; only the hard limit stops it."""

    name = "stubborn"

    def step(self, ctx: StepContext):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                time.sleep(0.1)
            except SoftTimeLimitExceeded:
                continue
        return Finish(result="never")


def _copy_log(line: str) -> None:
    """Append ``line`` to ``AGENTS_COPY_LOG`` (one write, so lines from processes
    running at once never interleave)."""
    path = os.environ.get("AGENTS_COPY_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


@register
class Recorded(Scripted):
    """The scripted agent, recording when each copy of each step starts and ends (with
    its process id) in ``AGENTS_COPY_LOG``, so a test can check that no two copies of a
    step ever ran at once."""

    name = "recorded"

    def step(self, ctx: StepContext):
        _copy_log(f"start {ctx.task_id} {ctx.step} {os.getpid()} {time.time():.6f}")
        try:
            return super().step(ctx)
        finally:
            _copy_log(f"end {ctx.task_id} {ctx.step} {os.getpid()} {time.time():.6f}")


@register
class Poison(Agent):
    """Returns what PostgreSQL would refuse to store: ``input["kind"]`` says what."""

    name = "poison"

    def step(self, ctx: StepContext):
        kind = ctx.input["kind"]
        if kind == "nan":
            return Continue(state={"items": [1, 2, 3, float("nan")]})
        if kind == "set":
            return Continue(state={"items": [1, 2, 3, {4}]})
        if kind == "nul":
            return Finish(result={"text": "a\x00b"})
        if ctx.step == 1:
            return CallTools([ToolCall("test.echo", {"text": "safe"})], state={})
        return Finish(result="unreachable")


@tool("test.echo", args={"text": Arg(str)}, replace=True)
def echo(ctx, args):
    """Answers with a NUL character in its value, as a binary HTTP body would."""
    return {"body": args["text"] + "\x00"}


@register
class SlowSideEffect(Agent):
    """Step 1 sleeps ``input["sleep"]`` seconds, then appends to the ledger (a side
    effect once per idempotency key); step 2 finishes. Each copy of step 1 is logged in
    ``AGENTS_COPY_LOG`` (start and end, with its host name), so a takeover test can
    see the vanished copy come back late."""

    name = "slow_side_effect"

    def step(self, ctx: StepContext):
        if ctx.step > 1:
            return Finish(result="done")
        host = os.uname().nodename
        _copy_log(f"start {ctx.task_id} {ctx.step} {os.getpid()} {time.time():.6f} {host}")
        time.sleep(float(ctx.input["sleep"]))
        _copy_log(f"end {ctx.task_id} {ctx.step} {os.getpid()} {time.time():.6f} {host}")
        return CallTools([ToolCall("ledger.append", {"key": "slow", "value": 1})], state={})
